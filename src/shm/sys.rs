//! Moved to `crate::os::file` and `crate::os`: this re-export goes once `shm/` calls them there.
pub use crate::os::file::*;
pub use crate::os::{pid, process_alive, unmap};
