//! What the unit tests share: one PRNG and the test page sources.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::os;
use crate::size_class::CHUNK;
use crate::source::PageSource;

/// xorshift64*: a small deterministic generator for tests (the seed must not be 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Chunks a [`TestSource`] can have mapped at once.
pub const SLOTS: usize = 256;

/// A page source for unit tests: maps chunks with `os::map_aligned`, records them in its
/// own fixed table (no allocation, and no interference with the process registry), counts
/// its calls, and refuses to map more than `limit` chunks at once.
pub struct TestSource {
    slots: [AtomicUsize; SLOTS],
    limit: usize,
    pub maps: AtomicUsize,
    pub unmaps: AtomicUsize,
    pub purged_bytes: AtomicUsize,
    /// When set, purges fail (as madvise does for mlock'ed memory).
    pub refuse_purge: AtomicBool,
}

impl TestSource {
    pub fn new(limit: usize) -> Self {
        assert!(limit <= SLOTS);
        Self {
            slots: [const { AtomicUsize::new(0) }; SLOTS],
            limit,
            maps: AtomicUsize::new(0),
            unmaps: AtomicUsize::new(0),
            purged_bytes: AtomicUsize::new(0),
            refuse_purge: AtomicBool::new(false),
        }
    }

    pub fn live(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }
}

// SAFETY: chunks come from `os::map_aligned` (fresh, zeroed, CHUNK-aligned, private) and
// are recorded before they are returned and forgotten before they are unmapped; nothing
// here allocates or panics.
unsafe impl PageSource for TestSource {
    type Lock = crate::lock::RawLock;

    fn map_chunk(&self) -> *mut u8 {
        if self.live() >= self.limit {
            return ptr::null_mut();
        }
        let p = os::map_aligned(CHUNK, CHUNK);
        if p.is_null() {
            return p;
        }
        for s in &self.slots {
            if s.compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.maps.fetch_add(1, Ordering::Relaxed);
                return p;
            }
        }
        os::unmap(p, CHUNK);
        ptr::null_mut()
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        for s in &self.slots {
            if s.compare_exchange(chunk as usize, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.unmaps.fetch_add(1, Ordering::Relaxed);
                os::unmap(chunk, CHUNK);
                return;
            }
        }
        os::fatal(b"TestSource: unmap of a chunk it does not own\n");
    }

    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool {
        if self.refuse_purge.load(Ordering::Relaxed) {
            return false;
        }
        self.purged_bytes.fetch_add(len, Ordering::Relaxed);
        os::purge(p, len)
    }

    fn owns_chunk(&self, chunk: usize) -> bool {
        chunk != 0
            && self
                .slots
                .iter()
                .any(|s| s.load(Ordering::Acquire) == chunk)
    }
}

impl Drop for TestSource {
    fn drop(&mut self) {
        for s in &self.slots {
            let c = s.swap(0, Ordering::Relaxed);
            if c != 0 {
                os::unmap(c as *mut u8, CHUNK);
            }
        }
    }
}

/// Chunks in the shared test file: chunk 0 holds the bookkeeping (and whatever the test
/// keeps there after the first page), the others are handed out as arena chunks.
pub const FILE_CHUNKS: usize = 16;

/// The start of the shared file, seen by every view: which chunks are handed out.
#[repr(C)]
struct FileMeta {
    used: [AtomicBool; FILE_CHUNKS],
}

/// A memfd of `FILE_CHUNKS` chunks (sparse: it reads zero until written).
pub struct MemFile(i32);

impl MemFile {
    pub fn new() -> Self {
        let fd = os::file::memfd(c"coreheap-shared-test").expect("memfd_create failed");
        os::file::set_size(fd, (FILE_CHUNKS * CHUNK) as u64).expect("ftruncate failed");
        Self(fd)
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // The views that map it are gone by now.
        os::file::close(self.0);
    }
}

/// One process's view of the shared file, at an address of its own (`CHUNK`-aligned), and
/// the page source for that view: its base is where the view starts.
pub struct View<'f> {
    file: &'f MemFile,
    pub base: usize,
}

impl<'f> View<'f> {
    pub fn map(file: &'f MemFile) -> Self {
        let p = os::file::map_shared(file.0, FILE_CHUNKS * CHUNK, true, None, CHUNK)
            .expect("mmap of the memfd failed");
        Self {
            file,
            base: p as usize,
        }
    }

    fn meta(&self) -> &FileMeta {
        // SAFETY: the file starts with a `FileMeta` (all-zero: no chunk handed out).
        unsafe { &*(self.base as *const FileMeta) }
    }

    /// The index in the file of the chunk at `chunk` in this view, if it is an arena
    /// chunk's place.
    fn slot(&self, chunk: usize) -> Option<usize> {
        let off = chunk.wrapping_sub(self.base);
        let i = off / CHUNK;
        (off.is_multiple_of(CHUNK) && (1..FILE_CHUNKS).contains(&i)).then_some(i)
    }

    /// Makes the whole view inaccessible (or accessible again): a stored address of
    /// this view, followed through the other one, then faults.
    pub fn hide(&self, hidden: bool) {
        let access = if hidden {
            os::Access::None
        } else {
            os::Access::ReadWrite
        };
        assert!(os::protect(
            self.base as *mut u8,
            FILE_CHUNKS * CHUNK,
            access
        ));
    }

    /// Zeroes `len` bytes of the file at `off`, in every view (no live data lies there: the
    /// callers' contracts).
    fn punch(&self, off: usize, len: usize) -> bool {
        os::file::punch_hole(self.file.0, off as u64, len as u64)
    }
}

impl Drop for View<'_> {
    fn drop(&mut self) {
        crate::os::unmap(self.base as *mut u8, FILE_CHUNKS * CHUNK);
    }
}

// SAFETY: chunks are handed out once each (a compare-and-swap on the shared table) and
// are zero when handed out (the file starts zero, a returned chunk is punched out);
// they are `CHUNK`-aligned because the view is; the base is the view's start, below every
// chunk (chunk 0 is never handed out); nothing allocates or panics.
unsafe impl PageSource for View<'_> {
    type Lock = crate::lock::RawLock;

    fn base(&self) -> usize {
        self.base
    }

    fn map_chunk(&self) -> *mut u8 {
        for (i, used) in self.meta().used.iter().enumerate().skip(1) {
            if used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return (self.base + i * CHUNK) as *mut u8;
            }
        }
        ptr::null_mut()
    }

    unsafe fn unmap_chunk(&self, chunk: *mut u8) {
        let Some(i) = self.slot(chunk as usize) else {
            crate::os::fatal(b"View: unmap of a chunk it does not own\n");
        };
        // Zero for the next user (in every view), then give the slot back.
        if !self.punch(i * CHUNK, CHUNK) {
            crate::os::fatal(b"View: fallocate failed\n");
        }
        self.meta().used[i].store(false, Ordering::Release);
    }

    unsafe fn purge(&self, p: *mut u8, len: usize) -> bool {
        self.punch(p as usize - self.base, len)
    }

    fn owns_chunk(&self, chunk: usize) -> bool {
        self.slot(chunk)
            .is_some_and(|i| self.meta().used[i].load(Ordering::Acquire))
    }
}
