//! Where an engine's memory comes from: the seam between the arena engine and the OS.
//!
//! The arenas ask a [`PageSource`] for whole chunks and give them back; they never call the
//! OS themselves, and they learn whether an address is one of their chunks only through
//! [`PageSource::owns_chunk`]. The source also chooses the lock its arenas take
//! ([`PageSource::Lock`]).
//!
//! - [`OsSource`] (`os.rs`): anonymous private memory, recorded in the process-wide chunk
//!   [`registry`]; freed huge spans are kept for reuse in the process-wide [`spans`] cache;
//! - `ShmSource` (`shm/source.rs`): chunks of a shared file, which several processes map.
//!
//! A source may also keep a [`Meter`] (`meter.rs`) of the bytes its arenas and huge blocks
//! have handed out, with their peak.
//!
//! This module imports nothing of the engine: it sits below it.

mod meter;
mod os;
pub mod registry;
pub mod retired;
pub mod spans;

pub use meter::{Meter, GRAIN};
pub use os::OsSource;

/// A provider of chunks.
///
/// # Safety
/// Implementations must uphold, for every method:
/// - it never allocates through any global allocator and never panics (it runs inside
///   `malloc`, under an arena lock: printing or formatting may allocate and deadlock);
/// - `map_chunk` returns null or a `CHUNK`-aligned, readable, writable, zeroed region of
///   `CHUNK` bytes that nothing else uses, for which `owns_chunk` is true until
///   `unmap_chunk`;
/// - `base` returns the same value for the life of the source, and every chunk lies
///   strictly above it (`base < chunk`), so that no chunk address is stored as 0, the null
///   link.
pub unsafe trait PageSource: Sync {
    /// The address stored links are relative to: 0 for memory private to this process
    /// (links are then plain addresses), the mapping's address for a heap that several
    /// processes map at different addresses.
    #[inline(always)]
    fn base(&self) -> usize {
        0
    }

    /// Whether several processes share the memory, so that a process may die in the middle
    /// of an update of it: the page heap then marks its updates (`PageHeap::enter`) for the
    /// recovery of an arena whose lock holder died. Equals `Lock::ROBUST` (checked where
    /// arenas are built).
    const SHARED: bool = false;

    /// The lock of the arenas built on this source (`arena::ArenaLock` is implemented for
    /// it; the bound is stated there, so that this seam imports nothing of the engine): the
    /// private futex lock for memory of one process, a process-shared robust lock for memory
    /// several processes share.
    type Lock;

    /// Calls `f` with every chunk of this source that may belong to an arena (a superset
    /// is fine), for the recovery of an arena whose own chunk list may be damaged. Sources
    /// that are never shared need not implement it.
    fn for_each_chunk(&self, _f: &mut dyn FnMut(*mut u8)) {}

    /// A fresh zeroed chunk, or null when memory is exhausted.
    fn map_chunk(&self) -> *mut u8;
    /// Returns a chunk from `map_chunk`.
    ///
    /// # Safety
    /// `chunk` came from `map_chunk` of this source and nothing refers into it any more.
    unsafe fn unmap_chunk(&self, chunk: *mut u8);
    /// Releases the pages of `[p, p + len)`, which hold no live data: they become zero.
    /// Returns false, with the pages unchanged, if the source cannot.
    ///
    /// # Safety
    /// The range lies in one chunk of this source, is page-aligned and holds no live block.
    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool;
    /// Whether `chunk` (a `CHUNK`-aligned address) is a live chunk of this source.
    fn owns_chunk(&self, chunk: usize) -> bool;
    /// [`Self::owns_chunk`] as far as a quicker test tells, for the fast paths: true only
    /// where `owns_chunk` is; false also for chunks the quicker test does not see (the
    /// process heap's chunks outside the registry's static half), which the caller then
    /// sorts out with `owns_chunk`.
    #[inline(always)]
    fn owns_chunk_quick(&self, chunk: usize) -> bool {
        self.owns_chunk(chunk)
    }

    /// A span for one huge block: at least `len` bytes (a multiple of `PAGE`) aligned to
    /// `align` (a power of two, at least `CHUNK`), readable and writable, that nothing else
    /// uses and `owns_chunk` does not see yet. Returns its start, its real length and how
    /// many bytes from its start may hold old data (a reused span): the rest reads zero.
    /// Null when memory is exhausted. By default a source has no spans (and the other span
    /// methods are never called).
    fn map_span(&self, _len: usize, _align: usize) -> (*mut u8, usize, usize) {
        (core::ptr::null_mut(), 0, 0)
    }
    /// Makes `head` (a `CHUNK`-aligned address inside a span from `map_span` or
    /// `move_span`, where the huge block's chunk header is written) seen by `owns_chunk`.
    /// Returns false if the source cannot record that address (never for a span from
    /// `move_span`); the span is then still the caller's, unpublished.
    ///
    /// # Safety
    /// The header at `head` is complete.
    unsafe fn publish_span(&self, _head: *mut u8) -> bool {
        false
    }
    /// The value a free writes over a huge header's magic to claim the block (with a
    /// compare-and-swap): 0 by default; a shared source's busy mark with the freeing
    /// process's id, so that a span whose freeing process dies is found and given back.
    fn free_claim(&self) -> u64 {
        0
    }
    /// Makes a head published with `publish_span` unseen again.
    ///
    /// # Safety
    /// The span's block is no longer live.
    unsafe fn unpublish_span(&self, _head: *mut u8) {}
    /// Returns a span from `map_span` or `move_span` of `len` bytes (its real length). The
    /// source may keep it for a later `map_span` (then returning it to the OS after a
    /// delay, or on `release_cached`).
    ///
    /// # Safety
    /// Its head is not published and nothing refers into it any more.
    unsafe fn unmap_span(&self, _span: *mut u8, _len: usize) {}
    /// The arenas' decay clock ticked (at most every `large::TICK_MS`): a source that keeps
    /// freed spans returns those unused for too long. Never blocks on a lock.
    fn tick(&self, _now_ms: u32) {}

    /// Returns every span kept for reuse to the OS (`trim`).
    fn release_cached(&self) {}

    /// The meter of bytes in use and their peak that this source's arenas and huge blocks
    /// publish to, if it keeps one (the process heap's does; see [`Meter`]).
    #[inline(always)]
    fn meter(&self) -> Option<&Meter> {
        None
    }

    /// Resizes the span at `span` from `len` to `new_len` bytes (multiples of `PAGE`)
    /// without moving it. Returns false, with nothing changed, if the source cannot.
    ///
    /// # Safety
    /// The span is the caller's.
    unsafe fn resize_span(&self, _span: *mut u8, _len: usize, _new_len: usize) -> bool {
        false
    }
    /// Moves the pages of the span at `span` (`len` bytes, head `head` published) to a new
    /// span of `new_len` bytes aligned to `align`, without copying, and unpublishes `head`.
    /// Returns the new span, or null with nothing changed (the caller then copies).
    ///
    /// # Safety
    /// The span is the caller's.
    unsafe fn move_span(
        &self,
        _head: *mut u8,
        _span: *mut u8,
        _len: usize,
        _new_len: usize,
        _align: usize,
    ) -> *mut u8 {
        core::ptr::null_mut()
    }
}
