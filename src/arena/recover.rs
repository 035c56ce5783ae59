//! Shared heaps: taking over the lock of an arena whose holder died in its critical
//! section (a robust lock reports it, see [`ArenaLock::ROBUST`]), and the chunks such an
//! arena gives up ([`ORPHAN`]). Process arenas, whose lock never reports a dead holder,
//! never run this code.

use super::{Arena, ArenaLock, LargeCounters, Lookup, State};
use crate::chunk::{header_of_desc, ChunkHeader, Kind, PageDesc, CHUNK_ARENA, HEADER_PAGES, MAGIC};
use crate::large::PageHeap;
use crate::size_class::{CHUNK_PAGES, PAGE};
use crate::small::SmallBins;
use crate::source::PageSource;

/// The arena index written into the chunks of a shared heap's arena that a dead process
/// left damaged: they stay mapped, their live blocks stay valid, but they belong to no arena
/// any more (frees of their blocks are dropped, see [`Arena::recover`]).
pub const ORPHAN: u32 = u32::MAX - 1;

impl<S: PageSource<Lock: ArenaLock>> Arena<S> {
    /// Whether the run `run` (found by a lookup made before the lock was taken) still
    /// belongs to this arena: a recovery may have orphaned its chunk since. Always true for
    /// a lock that never reports a dead holder.
    ///
    /// pre: the caller holds the lock; `run` is a descriptor in a mapped chunk.
    #[inline(always)]
    pub(super) fn owns_run(&self, run: *mut PageDesc) -> bool {
        // SAFETY: by the precondition the header is mapped.
        !S::Lock::ROBUST || unsafe { (*header_of_desc(run)).arena_index() } == self.index
    }

    /// Whether `what` is a block whose chunk a recovery orphaned (never, for a lock that
    /// never reports a dead holder): it is dropped when freed.
    #[inline(always)]
    pub(super) fn orphaned(what: Lookup) -> bool {
        S::Lock::ROBUST
            && matches!(what, Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
                if arena == ORPHAN)
    }

    /// The lock was taken from a holder that died in its critical section: repair the arena
    /// or, where that cannot be done safely, orphan its chunks and start it over empty.
    ///
    /// Repair, when the holder died outside every update of page runs (the page heap's
    /// `busy` mark, set around each of them in a shared heap): the page runs, the free-run
    /// lists and the chunk list are then as the last finished update left them, and what
    /// the holder may have half-done is confined to small runs and bins (a block half
    /// popped or pushed, a bin half-linked, counts not yet updated), which
    /// [`SmallBins::rebuild`] rebuilds from the runs themselves; the large counters are
    /// recounted from the runs; then the whole arena is checked.
    ///
    /// Orphan, when the mark was set or the check fails: every chunk whose header names
    /// this arena is rewritten to name [`ORPHAN`] and the arena starts over empty. Blocks in
    /// orphaned chunks stay valid for whoever holds them; their memory is lost to the heap.
    /// A page-run update cut short (a run split but not yet listed, a list half-linked)
    /// passes checks that follow `next` links, and the next unlink then hands a run out
    /// twice; finishing or undoing it would need a
    /// journal of every operation, giving up the chunks cannot hand out a block twice.
    ///
    /// pre: the calling thread holds the lock, just taken with `Taken::OwnerDied`.
    #[cold]
    #[inline(never)]
    pub(super) fn recover(&self, src: &S) {
        // SAFETY: the lock is held (precondition).
        let st = unsafe { &mut *self.state.get() };
        st.recoveries += 1;
        let intact = !st.pages.busy();
        // The recovery is itself an update: if this process dies in it, the next taker
        // orphans (a repair half done is not trusted).
        st.pages.enter::<S>();
        // SAFETY: as above; with the mark clear the page heap is sound (see above), which
        // its check confirms before `rebuild` changes anything; the walks of `rebuild` are
        // bounded and checked.
        let repaired = intact
            && unsafe {
                st.pages.check(src).is_ok() && {
                    st.bins.rebuild(&mut st.pages, src);
                    let (mut large, mut runs) = (0usize, 0usize);
                    st.pages.for_each_chunk(src, |c| {
                        let mut i = HEADER_PAGES;
                        while i < CHUNK_PAGES {
                            let d = &(*c).pages[i];
                            match d.kind() {
                                Kind::Large => {
                                    large += d.npages as usize * PAGE;
                                    runs += 1;
                                }
                                Kind::Small => runs += 1,
                                _ => {}
                            }
                            i += (d.npages as usize).max(1);
                        }
                    });
                    st.large.in_use = large;
                    st.pages.counters.runs = runs;
                    self.check_locked(src, st).is_ok()
                }
            };
        if repaired {
            st.repairs += 1;
        } else {
            self.orphan_all(src, st);
        }
        st.pages.leave::<S>();
        self.lock.mark_consistent();
    }

    /// See [`Arena::recover`].
    #[cold]
    fn orphan_all(&self, src: &S, st: &mut State) {
        let index = self.index;
        let mut n = 0;
        // Through the source, not the arena's chunk list, which may be half-updated.
        src.for_each_chunk(&mut |c| {
            let h = c.cast::<ChunkHeader>();
            // SAFETY: the source lists mapped chunks, whose headers are readable; `magic`
            // is written last when a chunk is set up (`init_arena_chunk`), so a header
            // with it names its arena.
            unsafe {
                if (*h).magic() == MAGIC && (*h).kind == CHUNK_ARENA && (*h).arena_index() == index
                {
                    (*h).set_arena_index(ORPHAN);
                    n += 1;
                }
            }
        });
        let key = self.key;
        st.bins = SmallBins::new();
        st.bins.set_key(key);
        // The new page heap carries the caller's update mark (`recover` holds one): a
        // death while it is being written leaves a heap that is marked busy, whatever
        // order the copy writes its bytes in.
        let mut fresh = PageHeap::new(index);
        fresh.enter::<S>();
        st.pages = fresh;
        st.large = LargeCounters::default();
        st.orphaned += n;
    }
}
