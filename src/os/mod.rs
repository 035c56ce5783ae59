//! The operating-system layer: the only code that calls the C library or the kernel for
//! coreheap (`mmap`, `munmap`, `mremap`, `madvise`, `mprotect`, files, `futex` and other
//! `syscall`s, `pthread_*`, `sched_*`, `getenv`, `write`, `atexit`, `errno`).
//!
//! | file | what |
//! |---|---|
//! | [`mem`] | anonymous memory: map (aligned), reserve, unmap, purge, remap, move, protect; the page size |
//! | `file` | files and descriptors, shared mappings, hole punching, private copies, pipes |
//! | [`stop`] | stopping the process's other threads for a moment (a real-time signal whose handler waits) |
//! | [`sync`] | futex wait/wake, the robust process-shared mutex, fork handlers, `sched_yield`, cancellation off around a call |
//! | `rseq` | the thread's rseq area (x86_64 glibc): its CPU id and offset |
//! | [`cpu`] | the current CPU, the affinity set, the number of possible CPU ids |
//! | [`env`] | environment variables (parsing them is `crate::settings`') |
//! | [`errno`], [`io`] | `errno`; `write(2)`, `abort`, glibc's stdio list lock |
//! | [`time`], [`process`], [`random`] | clocks and sleep; thread and process ids, single-threadedness, liveness, `atexit`; `AT_RANDOM` |
//!
//! Everything is re-exported here under its plain name (`os::map_aligned`), except the
//! functions of `file` (`os::file::map_shared`) and the rseq module (`os::rseq::cpu_id`).
//!
//! # Contract
//! For every function of this layer:
//! - it never allocates and never calls back into any allocator, so it may be called while an
//!   arena lock is held and from inside `malloc` (also before the heap is initialised);
//! - it never panics (debug assertions aside, which state preconditions); failure is
//!   reported by a null pointer, `false`, `None` or `Err(errno)`;
//! - errno: a function that returns `Err(e)` returns the `errno` value of the failing call;
//!   every function may change the calling thread's `errno`, whether it succeeds or not
//!   (callers that must keep it, such as C's `free`, wrap the call in [`keeping_errno`]);
//! - addresses and lengths of memory are multiples of [`OS_PAGE`] unless a function says
//!   otherwise; paths are NUL-terminated;
//! - async-signal-safe where marked (`write_all`, `fatal`, the futex functions, the `errno`
//!   functions, `current_cpu`, the rseq functions, `thread_id`, `single_threaded` and `pid`,
//!   `file::signal`, `await_signal`, `close_nocancel`); the rest may be called from a
//!   signal handler only if the C library's function is async-signal-safe too;
//! - `pre:` lines (or `# Safety` for `unsafe fn`) state what the caller guarantees.
//!
//! On the fast paths (`rseq::*`, [`current_cpu`], [`keeping_errno`], [`thread_id`]) every
//! function is `#[inline]` and makes no call.
//!
//! The engine does not call this layer directly for its memory: it goes through
//! [`crate::source::PageSource`], so that a shared file mapping can take the place of
//! anonymous memory.

pub mod cpu;
pub mod env;
pub mod errno;
pub(crate) mod file;
pub mod io;
pub mod mem;
pub mod process;
pub mod random;
#[cfg(coreheap_rseq)]
pub mod rseq;
pub mod stop;
pub mod sync;
pub mod time;

pub use cpu::{cpu_affinity, current_cpu, possible_cpus};
#[cfg(test)]
pub use errno::errno;
pub use errno::{keeping_errno, set_errno};
pub use file::dup_fd_high;
pub use io::{
    fatal, stdio_list_lock, stdio_list_reset, stdio_list_unlock, write_all, write_stream,
};
#[cfg(test)]
pub use mem::{map_aligned, protect, Access};
pub use mem::{
    map_aligned_below, map_anon, move_mapping, purge, remap_in_place, reserve_aligned, unmap,
};
pub use process::{
    address_space_limited, at_exit, peak_resident_bytes, pid, process_alive, resident_bytes,
    single_threaded, thread_id,
};
pub use random::{random_word, secret_key};
pub use sync::{futex_wait, futex_wake, register_atfork, without_cancellation, yield_now};
pub use time::now_ms;
