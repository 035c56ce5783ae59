//! Verifying an arena: its page heap, bins and runs against each other (the invariants of
//! `small.rs`, `large/` and `chunk.rs`).

use super::{Arena, ArenaLock, State};
use crate::chunk::{Kind, PageDesc, HEADER_PAGES};
use crate::size_class::{class_size, CHUNK_PAGES, NUM_CLASSES, PAGE};
use crate::small::check_run;
use crate::source::{PageSource, GRAIN};

impl<S: PageSource<Lock: ArenaLock>> Arena<S> {
    /// Verifies this arena's invariants (see `small.rs`, `large/` and `chunk.rs`).
    pub fn check(&self, src: &S) -> Result<(), &'static str> {
        self.acquire(src);
        // SAFETY: the lock is held.
        let r = unsafe {
            let st = &mut *self.state.get();
            self.drain_locked(src, st);
            Self::keep_published(src, st);
            self.check_locked(src, st)
        };
        self.release(src);
        r
    }

    /// [`Arena::check`] without draining the pending stack first.
    ///
    /// # Safety
    /// The caller holds the lock and passes this arena's state, and has published its bytes
    /// in use since it last changed them (`keep_published`), if the source has a meter.
    pub(super) unsafe fn check_locked(&self, src: &S, st: &mut State) -> Result<(), &'static str> {
        // SAFETY: by the contract.
        unsafe {
            let mut r = st.pages.check(src).and_then(|_| st.bins.check(src));
            if r.is_ok() {
                let mut in_use = 0usize;
                let mut runs = 0usize;
                let key = st.bins.key();
                st.pages.for_each_chunk(src, |c| {
                    let mut i = HEADER_PAGES;
                    while i < CHUNK_PAGES {
                        let d = &mut (*c).pages[i] as *mut PageDesc;
                        match (*d).kind() {
                            Kind::Small => {
                                runs += 1;
                                if r.is_ok() {
                                    r = check_run(src, d, key);
                                }
                            }
                            Kind::Large => {
                                runs += 1;
                                in_use += (*d).npages as usize * PAGE;
                            }
                            _ => {}
                        }
                        i += (*d).npages as usize;
                    }
                });
                if r.is_ok() && in_use != st.large.in_use {
                    r = Err("large bytes in use disagree with the large runs");
                }
                if r.is_ok() && runs != st.pages.counters.runs {
                    r = Err("run count disagrees with the chunks");
                }
                let small: u64 = (0..NUM_CLASSES)
                    .map(|c| {
                        let k = &st.bins.counters[c];
                        (k.allocs - k.frees) * class_size(c) as u64
                    })
                    .sum();
                if r.is_ok() && small != st.bins.bytes as u64 {
                    r = Err("small bytes in use disagree with the class counters");
                }
                // The meter's share (`State::published`) lies in its band (as at every
                // release of the lock; the caller published after its last change).
                let now = st.bins.bytes + st.large.in_use;
                if r.is_ok()
                    && src.meter().is_some()
                    && !(now <= st.published && st.published < now + 2 * GRAIN)
                {
                    r = Err("published bytes in use outside their band");
                }
            }
            r
        }
    }
}
