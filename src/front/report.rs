//! Misuse reports: a pointer that is not a block of the heap, or a block freed twice. Each
//! aborts with one line naming the call and the pointer, as glibc's `free(): invalid
//! pointer` does, and says what the pointer points into when the heap knows.

use crate::arena::describe;
use crate::diag::{invalid_pointer, Line};
use crate::os;
use crate::source::PageSource;

/// What a double free of a small block is reported as.
pub(crate) const DOUBLE_FREE: &[u8] = b"free(): double free detected";

/// Aborts for `p`, which is not a block the heap handed out, with `what` (the call and the
/// complaint, e.g. `free(): invalid pointer`). If `p` points into one of the heap's blocks
/// or its free memory, the message says so and names the block's arena and size.
#[cold]
#[inline(never)]
pub(crate) fn invalid<S: PageSource>(src: &S, p: *mut u8, what: &[u8]) -> ! {
    if let Some(inside) = describe(src, p) {
        let mut l = Line::new();
        l.str(what).str(b": ").hex(p as usize);
        if inside.block {
            l.str(b" (inside a ")
                .num(inside.size as u64)
                .str(b"-byte block");
            if let Some(a) = inside.arena {
                l.str(b" of arena ").num(a as u64);
            }
            l.str(b", not its start)\n");
        } else {
            l.str(b" (in free memory of arena ")
                .num(inside.arena.unwrap_or(0) as u64)
                .str(b": freed already?)\n");
        }
        os::fatal(l.as_bytes());
    }
    invalid_pointer(what, p)
}
