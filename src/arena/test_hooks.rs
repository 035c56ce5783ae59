//! Test hooks (feature `test-hooks`, enabled only for the crate's own tests): a lock held
//! and the arena left as a holder killed in its critical section leaves it.

use super::{Arena, ArenaLock};
use crate::source::PageSource;

impl<S: PageSource<Lock: ArenaLock>> Arena<S> {
    /// Takes the lock and keeps it, after leaving damage of kind `damage`: with 1 what a
    /// holder killed half-way through a small allocation leaves (a run's count off, one of
    /// its free blocks gone from its list); with 2, a page-run update begun and not
    /// finished; with anything else none.
    pub fn acquire_and_damage(&self, src: &S, damage: u8) {
        self.acquire(src);
        // SAFETY: the lock is held.
        let st = unsafe { &mut *self.state.get() };
        match damage {
            // SAFETY: the lock is held.
            1 => unsafe { st.bins.damage_for_test(src) },
            2 => st.pages.enter::<S>(),
            _ => {}
        }
    }
}
