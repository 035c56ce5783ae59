//! Heaps in shared memory: coreheap's arena engine in a file that several processes map.
//!
//! A [`SharedHeap`] is a file mapped `MAP_SHARED` (a path, or a POSIX shared memory name
//! under `/dev/shm`, see [`shm_path`]). It holds per-CPU arenas like the process heap's:
//! a process on CPU `k` allocates from arena `k % arenas`, a block may be freed by any
//! process, and it goes back to the arena that owns it. The engine is the same code
//! (`arena.rs`, `small.rs`, `large.rs`); what differs is the page source (`ShmSource`,
//! chunks from the file), the locks (process-shared, robust: see `crate::lock::RobustLock`)
//! and the links, which the engine stores relative to the mapping's base so that processes
//! may map the file at different addresses.
//!
//! Addressing: a [`ShmPtr`] is an offset into the heap, the same in every process; turn it
//! into a pointer with [`SharedHeap::ptr`]. A heap created with [`Fixed::Anywhere`] or
//! [`Fixed::At`] is mapped at the same address by every process, so raw pointers stored in it
//! stay valid everywhere (and [`ShmAlloc`] lets Rust collections live in it).
//!
//! Robustness: a process killed while it holds an arena lock leaves the lock marked "owner
//! died" by the kernel; the next taker checks that arena and repairs what the dead holder
//! may have left half-done (see `Arena::recover`). Blocks the dead process had allocated
//! stay allocated (they are leaked unless another process frees them).
//!
//! Nothing in here allocates from the global allocator: the preload library opens a heap
//! from inside `malloc` (`COREHEAP_SHM`).

mod fork;
mod layout;
mod open;
pub mod process;
mod source;
mod view;

use core::alloc::Layout;
use core::ffi::CStr;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use crate::arena::ArenaStats;
use crate::os::{self, file};
use layout::FLAG_FIXED;
pub use layout::{MAX_ARENAS, MAX_SIZE, SHM_VERSION};
use open::c_path;
use source::ShmSource;
use view::View;

/// An offset into a shared heap: the same block in every process. 0 is null.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
#[repr(transparent)]
pub struct ShmPtr(u64);

impl ShmPtr {
    /// The null offset.
    pub const NULL: ShmPtr = ShmPtr(0);

    /// Whether this is [`ShmPtr::NULL`].
    pub fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The offset from the start of the heap.
    pub fn offset(self) -> u64 {
        self.0
    }

    /// The offset `off` into a heap (0 is null).
    pub fn from_offset(off: u64) -> ShmPtr {
        ShmPtr(off)
    }
}

/// Where processes map a heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fixed {
    /// Anywhere (`CHUNK`-aligned), possibly at a different address in every process.
    #[default]
    No,
    /// Where the creator's kernel put it; every other process maps it at that address.
    Anywhere,
    /// At this address (a multiple of `CHUNK`, 4 MiB) in every process.
    At(usize),
}

/// How to create a heap.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// File mode of a new heap file (before the umask).
    pub mode: u32,
    /// Whether every process maps the heap at one address.
    pub fixed: Fixed,
    /// Arenas (default: one per possible CPU).
    pub arenas: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: 0o600,
            fixed: Fixed::No,
            arenas: None,
        }
    }
}

/// Why a heap could not be created or opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmErrorKind {
    /// A system call failed (`errno` says why); `ShmError::what` names it.
    Os,
    /// The path is longer than [`PATH_MAX`] bytes or holds a NUL byte.
    BadPath,
    /// The size leaves no chunk for the arenas, or exceeds [`MAX_SIZE`].
    BadSize,
    /// The file is not a coreheap heap (or is empty).
    NotAHeap,
    /// A coreheap heap of another format version (`found`).
    Version,
    /// The file is shorter than its header says.
    Truncated,
    /// A heap written by a build with other constants (chunk, page or arena size).
    Incompatible,
    /// A fixed-address heap whose address is taken in this process.
    AddressTaken,
    /// The process creating the heap died before it was ready.
    CreatorDied,
    /// The heap did not become ready in time.
    Timeout,
    /// The heap was opened from inside its own `init` (it is not ready until `init` returns).
    InInit,
}

/// An error from [`SharedHeap`]'s constructors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmError {
    /// What kind of failure.
    pub kind: ShmErrorKind,
    /// The failing call or check.
    pub what: &'static str,
    /// `errno` for [`ShmErrorKind::Os`], the version found for `Version`, else 0.
    pub code: u64,
}

impl ShmError {
    fn new(kind: ShmErrorKind, what: &'static str, code: u64) -> ShmError {
        ShmError { kind, what, code }
    }
    fn os(what: &'static str, errno: i32) -> ShmError {
        Self::new(ShmErrorKind::Os, what, errno as u64)
    }
}

impl core::fmt::Display for ShmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.kind {
            ShmErrorKind::Os => write!(
                f,
                "{}: {}",
                self.what,
                std::io::Error::from_raw_os_error(self.code as i32)
            ),
            ShmErrorKind::Version => write!(
                f,
                "{}: format version {} (this build reads version {})",
                self.what, self.code, SHM_VERSION
            ),
            _ => f.write_str(self.what),
        }
    }
}

impl std::error::Error for ShmError {}

/// Longest path a heap remembers (to unlink it in [`SharedHeap::destroy`]).
pub const PATH_MAX: usize = 255;

/// The path of POSIX shared memory object `name` (`/dev/shm/NAME`, what `shm_open` uses).
pub fn shm_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/dev/shm").join(name.trim_start_matches('/'))
}

/// How long an opener waits for the file's lock, which a creator holds until its heap is
/// ready (its `init` may be running).
const WAIT_READY_US: u64 = 60_000_000;

/// A shared heap, mapped in this process.
///
/// Invariant: `view` views the whole file, mapped here for the life of this value, and the
/// heap is ready (`STATE_INIT` only while its creator runs `init`).
pub struct SharedHeap {
    view: View,
    fd: i32,
    path: [u8; PATH_MAX + 1],
}

/// What to do when opening.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Open,
    OpenOrCreate,
}

impl SharedHeap {
    /// Creates a new heap of `size` bytes at `path` (fails if the file exists).
    pub fn create(path: impl AsRef<std::path::Path>, size: u64) -> Result<SharedHeap, ShmError> {
        Self::create_with(path, size, &Options::default())
    }

    /// Creates a new heap with `opts`.
    pub fn create_with(
        path: impl AsRef<std::path::Path>,
        size: u64,
        opts: &Options,
    ) -> Result<SharedHeap, ShmError> {
        let p = c_path(path.as_ref())?;
        Self::open_raw(&p, Mode::Create, size, opts, true, &mut |_| {})
    }

    /// Opens an existing heap for reading and writing (waiting while it is being created).
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<SharedHeap, ShmError> {
        let p = c_path(path.as_ref())?;
        Self::open_raw(&p, Mode::Open, 0, &Options::default(), true, &mut |_| {})
    }

    /// Opens an existing heap read-only: its memory can be read, nothing allocated or freed
    /// (those calls return null or abort).
    pub fn open_readonly(path: impl AsRef<std::path::Path>) -> Result<SharedHeap, ShmError> {
        let p = c_path(path.as_ref())?;
        Self::open_raw(&p, Mode::Open, 0, &Options::default(), false, &mut |_| {})
    }

    /// Opens the heap at `path`, or creates it with `size` bytes if there is none. When
    /// several processes call this at once, exactly one creates the heap and runs `init` on
    /// it; the others wait until `init` has returned, then open it.
    pub fn open_or_create(
        path: impl AsRef<std::path::Path>,
        size: u64,
        init: impl FnOnce(&SharedHeap),
    ) -> Result<SharedHeap, ShmError> {
        Self::open_or_create_with(path, size, &Options::default(), init)
    }

    /// [`SharedHeap::open_or_create`] with options (used only if this call creates).
    pub fn open_or_create_with(
        path: impl AsRef<std::path::Path>,
        size: u64,
        opts: &Options,
        init: impl FnOnce(&SharedHeap),
    ) -> Result<SharedHeap, ShmError> {
        let p = c_path(path.as_ref())?;
        let mut init = Some(init);
        Self::open_raw(&p, Mode::OpenOrCreate, size, opts, true, &mut |h| {
            if let Some(f) = init.take() {
                f(h)
            }
        })
    }

    /// [`SharedHeap::open_or_create_with`] without allocating (for the preload library):
    /// `init` runs if this call created the heap.
    pub fn open_or_create_cstr(
        path: &CStr,
        size: u64,
        opts: &Options,
        init: &mut dyn FnMut(&SharedHeap),
    ) -> Result<SharedHeap, ShmError> {
        Self::open_raw(path, Mode::OpenOrCreate, size, opts, true, init)
    }

    /// Unmaps the heap (the file stays, with everything in it).
    pub fn close(self) {}

    /// Unmaps the heap and removes its file. Processes that still map it keep using it.
    pub fn destroy(self) -> Result<(), ShmError> {
        let r = file::unlink(self.path.as_ptr().cast()).map_err(|e| ShmError::os("unlink", e));
        drop(self);
        r
    }

    /// The address of this process's mapping.
    pub fn base(&self) -> *mut u8 {
        self.view.src.base as *mut u8
    }

    /// Bytes of the mapping.
    pub fn size(&self) -> usize {
        self.view.src.len
    }

    /// The number of arenas.
    pub fn arenas(&self) -> usize {
        self.view.src.narenas
    }

    /// Whether every process maps this heap at [`SharedHeap::base`].
    pub fn is_fixed(&self) -> bool {
        self.view.header().flags & FLAG_FIXED != 0
    }

    /// Whether this process may allocate and free (not opened read-only).
    pub fn is_writable(&self) -> bool {
        self.view.src.writable
    }

    /// An allocator handle for Rust collections that other processes may use too: it holds
    /// only the heap's fixed address, so a copy stored in the heap works in every process
    /// that maps it. `None` unless the heap is fixed-address and writable here.
    ///
    /// # Safety
    /// The handle is not tied to this value's lifetime (it could not live in the heap if
    /// it were): every process that uses a copy of it must have the heap mapped, writable,
    /// while it does (a `SharedHeap` of it open). Using it after the last one is closed
    /// reads and writes whatever is mapped at that address then.
    pub unsafe fn allocator(&self) -> Option<ShmAlloc> {
        (self.is_fixed() && self.is_writable()).then_some(ShmAlloc {
            base: self.view.src.base,
        })
    }

    /// `layout.size()` bytes aligned to `layout.align()`; null when the heap is full (or
    /// read-only).
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        self.view.alloc_raw(layout.size(), layout.align())
    }

    /// Like [`SharedHeap::alloc`], zeroed.
    pub fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.view.alloc_zeroed(layout.size(), layout.align())
    }

    /// `size` bytes aligned to `align` (a power of two); null when the heap is full.
    pub fn alloc_raw(&self, size: usize, align: usize) -> *mut u8 {
        self.view.alloc_raw(size, align)
    }

    /// Like [`SharedHeap::alloc_raw`], zeroed.
    pub fn alloc_zeroed_raw(&self, size: usize, align: usize) -> *mut u8 {
        self.view.alloc_zeroed(size, align)
    }

    /// Whether `p` points into this heap's mapping.
    #[inline]
    pub fn contains(&self, p: *const u8) -> bool {
        (p as usize).wrapping_sub(self.view.src.base) < self.view.src.len
    }

    /// `size` bytes (16-byte aligned) as an offset; null when the heap is full.
    pub fn alloc_shm(&self, size: usize) -> ShmPtr {
        self.offset_of(self.view.alloc_raw(size, 16))
    }

    /// Frees a block of this heap, whichever process allocated it.
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that no process uses any more. Anything
    /// else is detected where it can be and aborts with a message.
    pub unsafe fn free(&self, p: *mut u8) {
        // SAFETY: passed on.
        unsafe { self.view.free(p) }
    }

    /// Frees the block at `p`.
    ///
    /// # Safety
    /// As for [`SharedHeap::free`].
    pub unsafe fn free_shm(&self, p: ShmPtr) {
        // SAFETY: passed on.
        unsafe { self.view.free(self.ptr(p)) }
    }

    /// Resizes a block (in place when it can); null when the heap is full, `p` untouched.
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that the caller owns.
    pub unsafe fn realloc(&self, p: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: passed on.
        unsafe { self.view.realloc(p, size, 16) }
    }

    /// [`SharedHeap::realloc`] to a block aligned to `align`.
    ///
    /// # Safety
    /// As for [`SharedHeap::realloc`].
    pub unsafe fn realloc_aligned(&self, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        // SAFETY: passed on.
        unsafe { self.view.realloc(p, size, align) }
    }

    /// The usable size of the live block `p` (aborts on a pointer that is not one).
    pub fn usable_size(&self, p: *mut u8) -> usize {
        self.view.usable_size(p)
    }

    /// The pointer for `p` in this process; null for a null or out-of-range offset.
    pub fn ptr(&self, p: ShmPtr) -> *mut u8 {
        self.view.ptr(p)
    }

    /// The offset of `p`; null if `p` is not inside the heap.
    pub fn offset_of<T: ?Sized>(&self, p: *const T) -> ShmPtr {
        self.view.offset_of(p.cast())
    }

    /// The root all processes share (null in a new heap).
    pub fn root(&self) -> ShmPtr {
        ShmPtr(self.view.header().root.load(Ordering::Acquire))
    }

    /// Sets the root. The data it leads to must be written before (this is a release).
    pub fn set_root(&self, p: ShmPtr) {
        if self.view.src.writable {
            self.view.header().root.store(p.0, Ordering::Release);
        }
    }

    /// Sets the root to `new` if it is `current`; returns the root found.
    pub fn compare_and_set_root(&self, current: ShmPtr, new: ShmPtr) -> Result<ShmPtr, ShmPtr> {
        if !self.view.src.writable {
            return Err(self.root());
        }
        self.view
            .header()
            .root
            .compare_exchange(current.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .map(ShmPtr)
            .map_err(ShmPtr)
    }

    /// Verifies every arena and the chunk maps. Returns the first violation.
    pub fn check(&self) -> Result<(), &'static str> {
        self.view.check()
    }

    /// Calls `f` with each arena's counters, without allocating (for the C interface's
    /// `mallinfo` and `malloc_stats`), and returns the huge blocks' counters:
    /// (allocs, frees, bytes in use, bytes mapped). Nothing for a read-only heap.
    pub(crate) fn each_arena(
        &self,
        f: impl FnMut(crate::arena::ArenaStats),
    ) -> (u64, u64, usize, usize) {
        use crate::front::Backend;
        if self.view.src.writable {
            crate::front::for_each_arena(&self.view, f);
        }
        self.view.huge_counters().read()
    }

    /// Counters of every arena and of huge blocks.
    pub fn stats(&self) -> ShmStats {
        self.view.stats()
    }

    /// Takes arena `i`'s lock and never releases it, after leaving damage of kind `damage`
    /// (0 none, 1 a half-done small allocation, 2 a half-done page-run update): for tests of
    /// a lock holder's death.
    #[cfg(feature = "test-hooks")]
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn hold_arena_lock_for_test(&self, i: usize, damage: u8) {
        use crate::front::Backend;
        if i < self.arenas() {
            self.view
                .arena(i)
                .acquire_and_damage(&self.view.src, damage);
        }
    }

    /// Returns pending frees to their arenas. Free pages inside live chunks stay allocated
    /// in the file (punching them could raise SIGBUS on a full file system, see
    /// `ShmSource::purge`); wholly free chunks go back as they empty.
    pub fn trim(&self) {
        if self.view.src.writable {
            for a in self.view.arenas() {
                a.trim(&self.view.src);
            }
        }
    }
}

impl Drop for SharedHeap {
    fn drop(&mut self) {
        os::unmap(self.view.src.base as *mut u8, self.view.src.len);
        file::close(self.fd);
    }
}

// SAFETY: every operation goes through the arenas' process-shared locks, the chunk lock,
// or atomics; the struct itself is read-only after construction.
unsafe impl Send for SharedHeap {}
// SAFETY: as above.
unsafe impl Sync for SharedHeap {}

impl core::fmt::Debug for SharedHeap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedHeap")
            .field("base", &self.base())
            .field("size", &self.size())
            .field("arenas", &self.arenas())
            .field("fixed", &self.is_fixed())
            .finish()
    }
}

/// Counters of a shared heap.
#[derive(Clone, Debug, Default)]
pub struct ShmStats {
    /// Each arena's counters (empty for a read-only heap).
    pub arenas: Vec<ArenaStats>,
    /// Huge blocks live now.
    pub huge_blocks: u64,
    /// Bytes of their spans.
    pub huge_bytes: u64,
    /// Chunks of the file taken (arenas' and huge spans').
    pub chunks_used: usize,
    /// Chunks in the file.
    pub chunks_total: usize,
}

impl ShmStats {
    /// Bytes in use: small and large blocks of every arena, and huge spans.
    pub fn in_use(&self) -> usize {
        self.arenas.iter().map(|a| a.in_use()).sum::<usize>() + self.huge_bytes as usize
    }
}

/// An allocator handle for a fixed-address heap: a copy of it is valid in every process
/// that maps the heap, so collections that other processes grow and free can live in the
/// heap ([`allocator_api2::alloc::Allocator`]).
///
/// Invariant: `base` is the fixed address of a ready shared heap, mapped writable in the
/// process that uses the handle (the contract of [`SharedHeap::allocator`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmAlloc {
    base: usize,
}

impl ShmAlloc {
    fn view(&self) -> View {
        // SAFETY: the type invariant: the heap is mapped writable at `base`.
        View::at(self.base, true)
    }
}

// SAFETY: blocks come from the shared heap's arenas, which hand each block out once, fit
// `layout` (size and alignment are passed on) and stay valid until deallocated; a handle
// copied anywhere names the same heap.
unsafe impl allocator_api2::alloc::Allocator for ShmAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.view().allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the Allocator contract: `ptr` was allocated by this heap and is given up.
        unsafe { self.view().free(ptr.as_ptr()) }
    }
}

// SAFETY: as for `ShmAlloc`; `&SharedHeap` is an allocator through allocator-api2's
// blanket `impl Allocator for &A`.
unsafe impl allocator_api2::alloc::Allocator for SharedHeap {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.view.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the Allocator contract: `ptr` was allocated by this heap and is given up.
        unsafe { self.free(ptr.as_ptr()) }
    }
}
