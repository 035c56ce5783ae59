//! No critical sections on this architecture: `Caches::AVAILABLE` is false, so
//! `enabled` is never set and these are never called.
use super::{Caches, OUTBOX_LIMIT};

impl Caches {
    pub(super) fn pop_raw(&self, _class: usize) -> (usize, usize) {
        (0, 0)
    }
    pub(super) unsafe fn push_raw(&self, _: usize, _: usize, _: u32) -> u32 {
        1
    }
    pub(super) unsafe fn push_outbox_raw(&self, _: usize, _: usize, _: u32) -> u32 {
        1
    }
    pub(super) fn take_outbox_raw(
        &self,
        _: &mut [usize; OUTBOX_LIMIT],
        _: &mut [u16; OUTBOX_LIMIT],
    ) -> usize {
        0
    }
    pub(super) fn take_all_raw(&self, _class: usize) -> (usize, usize) {
        (usize::MAX, 0)
    }
    pub(super) unsafe fn install_raw(&self, _: usize, _: usize, _: usize, _: usize) -> bool {
        false
    }
    pub(super) fn contains_raw(&self, _: usize, _: usize, _: usize) -> bool {
        false
    }
    pub(super) fn lower_limit_raw(&self, _: usize, _: usize, _: u8, _: u8) -> bool {
        false
    }
}
