//! Heaps in shared memory: coreheap's arena engine in a file that several processes map.
//!
//! A [`SharedHeap`] is a file mapped `MAP_SHARED` (a path, or a POSIX shared memory name
//! under `/dev/shm`, see [`shm_path`]). It holds per-CPU arenas like the process heap's:
//! a process on CPU `k` allocates from arena `k % arenas`, a block may be freed by any
//! process, and it goes back to the arena that owns it. The engine is the same code
//! (`arena.rs`, `small.rs`, `large.rs`); what differs is the page source ([`ShmSource`],
//! chunks from the file), the locks (process-shared, robust: see [`crate::lock::RobustLock`])
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

mod layout;
pub mod process;
mod source;
mod sys;

use core::alloc::Layout;
use core::ffi::CStr;
use core::ptr::{self, NonNull};
use core::sync::atomic::Ordering;

use crate::arena::{lookup, ArenaStats, Lookup, LARGE_ALIGN_MAX, ORPHAN};
use crate::chunk::{ChunkHeader, CHUNK_HUGE, MAGIC};
use crate::size_class::{class_size, CHUNK, LARGE_MAX, PAGE};
use layout::{Plan, ShmArena, ShmHeader, FLAG_FIXED, SHM_MAGIC, STATE_INIT, STATE_READY};
pub use layout::{MAX_ARENAS, MAX_SIZE, SHM_VERSION};
pub use source::ShmSource;

/// An offset into a shared heap: the same block in every process. 0 is null.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
#[repr(transparent)]
pub struct ShmPtr(u64);

impl ShmPtr {
    pub const NULL: ShmPtr = ShmPtr(0);

    pub fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The offset from the start of the heap.
    pub fn offset(self) -> u64 {
        self.0
    }

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
    /// At this address (a multiple of [`CHUNK`]) in every process.
    At(usize),
}

/// How to create a heap.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// File mode of a new heap file (before the umask).
    pub mode: u32,
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
/// Invariant: `heap` views the whole file, mapped here for the life of this value, and the
/// heap is ready (`STATE_INIT` only while its creator runs `init`).
pub struct SharedHeap {
    heap: Heap,
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

    fn open_raw(
        path: &CStr,
        mode: Mode,
        size: u64,
        opts: &Options,
        writable: bool,
        init: &mut dyn FnMut(&SharedHeap),
    ) -> Result<SharedHeap, ShmError> {
        let bytes = path.to_bytes_with_nul();
        if bytes.len() > PATH_MAX + 1 {
            return Err(ShmError::new(
                ShmErrorKind::BadPath,
                "path longer than 255 bytes",
                0,
            ));
        }
        let mut saved = [0u8; PATH_MAX + 1];
        saved[..bytes.len()].copy_from_slice(bytes);
        if mode != Mode::Open {
            match Self::create_locked(path, opts) {
                // Named, empty, and flock-ed by us until the heap is ready.
                Ok(fd) => return Self::build_locked(fd, path, size, opts, saved, init, true),
                Err(e) if e.code == libc::EEXIST as u64 && mode == Mode::OpenOrCreate => {}
                Err(e) => return Err(e),
            }
        }
        // Open the existing file. A creator holds its flock until its heap is ready (`init`
        // included): wait for that. open_or_create takes the lock exclusively, as it may
        // have to create the heap itself.
        let exclusive = mode == Mode::OpenOrCreate;
        let fd = loop {
            let fd = match sys::open(path.as_ptr(), writable) {
                Ok(fd) => fd,
                // Removed between our failed creation and this open: try again.
                Err(libc::ENOENT) if mode == Mode::OpenOrCreate => {
                    match Self::create_locked(path, opts) {
                        Ok(fd) => {
                            return Self::build_locked(fd, path, size, opts, saved, init, true)
                        }
                        Err(e) if e.code == libc::EEXIST as u64 => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(ShmError::os("open", e)),
            };
            if Self::opened_in_own_init(fd) {
                sys::close(fd);
                return Err(ShmError::new(
                    ShmErrorKind::InInit,
                    "the heap was opened from inside its own init",
                    0,
                ));
            }
            if let Err(e) = sys::flock(fd, exclusive, WAIT_READY_US) {
                sys::close(fd);
                return Err(if e == libc::ETIMEDOUT {
                    ShmError::new(
                        ShmErrorKind::Timeout,
                        "the heap did not become ready within 60 s (its creator's init still running?)",
                        0,
                    )
                } else {
                    ShmError::os("flock", e)
                });
            }
            // The name may have been removed, or given to a new file, while we waited.
            if sys::still_named(fd, path.as_ptr()) {
                break fd;
            }
            sys::unlock(fd);
            sys::close(fd);
        };
        if Self::abandoned(fd) {
            // We hold the lock and the heap is not ready: its creator died.
            if exclusive {
                // Create it anew here, `init` included.
                return Self::build_locked(fd, path, size, opts, saved, init, false);
            }
            let empty = sys::file_size(fd) == Ok(0);
            sys::unlock(fd);
            sys::close(fd);
            return Err(if empty {
                ShmError::new(
                    ShmErrorKind::NotAHeap,
                    "not a coreheap shared heap (empty file; or its creator died at once)",
                    0,
                )
            } else {
                ShmError::new(
                    ShmErrorKind::CreatorDied,
                    "the process creating the heap died before it was ready",
                    0,
                )
            });
        }
        let r = Self::attach(fd, writable, saved);
        sys::unlock(fd);
        r.inspect_err(|_| sys::close(fd))
    }

    /// Calls `f` with the header of the file `fd` mapped read-only on its own; `None` if
    /// the file is shorter than a page (or cannot be mapped).
    fn peek<T>(fd: i32, f: impl FnOnce(*const ShmHeader) -> T) -> Option<T> {
        if sys::file_size(fd).map_or(true, |l| l < PAGE as u64) {
            return None;
        }
        let page = sys::map_peek(fd, PAGE).ok()?;
        let r = f(page.cast());
        sys::unmap(page as *mut u8, PAGE);
        Some(r)
    }

    /// Whether this process is creating the heap in `fd` and has not finished: `init`
    /// opening its own heap would wait for itself.
    fn opened_in_own_init(fd: i32) -> bool {
        Self::peek(fd, |h| {
            // SAFETY: `peek` maps the first page; the fields are read atomically.
            let (creator, state) = unsafe {
                (
                    (*h).creator.load(Ordering::Relaxed),
                    (*h).state.load(Ordering::Acquire),
                )
            };
            creator == sys::pid() && state == STATE_INIT
        })
        .unwrap_or(false)
    }

    /// Creates the file at `path` empty, and already flock-ed: built unnamed (`O_TMPFILE`),
    /// locked, then linked into place, so no other process sees it unlocked before it is
    /// ready. Where the file system has no unnamed files, created by name and then locked
    /// (an opener may then lock it first: `build_locked` and `abandoned` cope).
    fn create_locked(path: &CStr, opts: &Options) -> Result<i32, ShmError> {
        if let Ok(fd) = sys::create_unnamed(path.to_bytes_with_nul(), opts.mode) {
            if let Err(e) = sys::flock(fd, true, 0) {
                sys::close(fd);
                return Err(ShmError::os("flock", e));
            }
            match sys::link(fd, path.as_ptr()) {
                Ok(()) => return Ok(fd),
                Err(libc::ENOENT) | Err(libc::EPERM) => sys::close(fd), // no /proc: by name
                Err(e) => {
                    sys::close(fd);
                    return Err(ShmError::os("create the heap file", e));
                }
            }
        }
        let fd = sys::create_excl(path.as_ptr(), opts.mode)
            .map_err(|e| ShmError::os("create the heap file", e))?;
        if let Err(e) = sys::flock(fd, true, WAIT_READY_US) {
            sys::close(fd);
            return Err(ShmError::os("flock", e));
        }
        Ok(fd)
    }

    /// Whether the heap file `fd`, whose lock we hold, was left unfinished by a creator that
    /// died: empty, or a coreheap header that never became ready in a file of whole chunks
    /// (the size a creator gives it). Anything else is not ours to overwrite: opening it
    /// reports what it is.
    fn abandoned(fd: i32) -> bool {
        match sys::file_size(fd) {
            Ok(0) => true,
            Ok(len) if len % CHUNK as u64 == 0 => Self::peek(fd, |h| {
                // SAFETY: `peek` maps the first page; nobody writes it (we hold the lock).
                let (magic, state) = unsafe { ((*h).magic, (*h).state.load(Ordering::Acquire)) };
                (magic == SHM_MAGIC || magic == 0) && state != STATE_READY
            })
            .unwrap_or(false),
            _ => false,
        }
    }

    /// Builds the heap in `fd`, whose flock we hold, and releases the lock once it is ready.
    /// `fresh`: we created the file (on failure its name is removed again, before the lock
    /// is released, so no waiting opener takes over a file about to lose its name). If the
    /// file holds a ready heap (an opener got the lock first and built it), opens that.
    fn build_locked(
        fd: i32,
        path: &CStr,
        size: u64,
        opts: &Options,
        saved: [u8; PATH_MAX + 1],
        init: &mut dyn FnMut(&SharedHeap),
        fresh: bool,
    ) -> Result<SharedHeap, ShmError> {
        if fresh && !Self::abandoned(fd) {
            let r = Self::attach(fd, true, saved);
            sys::unlock(fd);
            return r.inspect_err(|_| sys::close(fd));
        }
        let r = sys::set_size(fd, 0)
            .map_err(|e| ShmError::os("ftruncate", e))
            .and_then(|_| Self::build(fd, size, opts, saved, init));
        if r.is_err() && fresh {
            let _ = sys::unlink(path.as_ptr());
        }
        sys::unlock(fd);
        r.inspect_err(|_| sys::close(fd))
    }

    /// Lays out and initialises a new heap in the freshly created, empty file `fd`.
    fn build(
        fd: i32,
        size: u64,
        opts: &Options,
        path: [u8; PATH_MAX + 1],
        init: &mut dyn FnMut(&SharedHeap),
    ) -> Result<SharedHeap, ShmError> {
        let narenas = opts
            .arenas
            .unwrap_or_else(crate::os::possible_cpus)
            .clamp(1, MAX_ARENAS as usize) as u32;
        if size > MAX_SIZE {
            return Err(ShmError::new(ShmErrorKind::BadSize, "size above 1 TiB", 0));
        }
        let plan = Plan::new(size, narenas).ok_or(ShmError::new(
            ShmErrorKind::BadSize,
            "size too small for the header, the arenas and one chunk",
            0,
        ))?;
        let at = match opts.fixed {
            Fixed::At(a) if a % CHUNK != 0 => {
                return Err(ShmError::new(
                    ShmErrorKind::AddressTaken,
                    "fixed address is not a multiple of the chunk size (4 MiB)",
                    0,
                ))
            }
            Fixed::At(a) => Some(a),
            _ => None,
        };
        sys::set_size(fd, plan.size).map_err(|e| ShmError::os("ftruncate", e))?;
        let base = map(fd, plan.size as usize, true, at)?;
        let used = (plan.arenas_off as usize + narenas as usize * size_of::<ShmArena>())
            .next_multiple_of(PAGE);
        if !sys::populate(base as *mut u8, used) {
            sys::unmap(base as *mut u8, plan.size as usize);
            return Err(ShmError::os("allocate the header's space", libc::ENOSPC));
        }
        let h = base as *mut ShmHeader;
        // SAFETY: the file is new and ours alone until the header says READY (other openers
        // wait for that); the mapping covers the plan; zeroed bytes are a valid header.
        unsafe {
            (*h).creator.store(sys::pid(), Ordering::Relaxed);
            (*h).chunk = CHUNK as u64;
            (*h).page = PAGE as u64;
            (*h).arena_size = core::mem::size_of::<ShmArena>() as u64;
            (*h).layout = layout::LAYOUT_HASH;
            (*h).size = plan.size;
            (*h).meta = plan.meta;
            (*h).nchunks = plan.nchunks;
            (*h).narenas = narenas;
            (*h).used_off = plan.used_off;
            (*h).heads_off = plan.heads_off;
            (*h).arenas_off = plan.arenas_off;
            (*h).mark = (crate::os::secret_key(0x5348_4d00 + sys::pid() as usize) | 1) as u64;
            if opts.fixed != Fixed::No {
                (*h).flags = FLAG_FIXED;
                (*h).fixed_addr = base as u64;
            }
            let mut ok = crate::lock::RobustLock::init_in_place(ptr::addr_of_mut!((*h).chunk_lock));
            for i in 0..narenas {
                let slot = (base + plan.arenas_off as usize + i as usize * size_of::<ShmArena>())
                    as *mut ShmArena;
                ok &= ShmArena::init_in_place(slot, i, false);
            }
            if !ok {
                sys::unmap(base as *mut u8, plan.size as usize);
                return Err(ShmError::os("pthread_mutex_init", libc::EINVAL));
            }
            (*h).version = SHM_VERSION;
            (*h).magic = SHM_MAGIC;
            (*h).state.store(STATE_INIT, Ordering::Release);
        }
        let heap = SharedHeap {
            heap: Heap::view(base, true),
            fd,
            path,
        };
        init(&heap);
        heap.heap
            .header()
            .state
            .store(STATE_READY, Ordering::Release);
        Ok(heap)
    }

    /// Validates the heap in `fd`, whose flock we hold and which `abandoned` said is not
    /// unfinished, and maps it.
    fn attach(fd: i32, writable: bool, path: [u8; PATH_MAX + 1]) -> Result<SharedHeap, ShmError> {
        let len = sys::file_size(fd).map_err(|e| ShmError::os("fstat", e))?;
        let (size, fixed) =
            Self::peek(fd, |h| Self::validate(h, len)).unwrap_or(Err(ShmError::new(
                ShmErrorKind::Truncated,
                "not a coreheap shared heap (shorter than a header)",
                0,
            )))?;
        let base = map(fd, size as usize, writable, fixed)?;
        // Validated again in the mapping that is used (the file could have changed since
        // the peek); `Heap::view` then copies the layout once.
        if Self::validate(base as *const ShmHeader, len) != Ok((size, fixed)) {
            sys::unmap(base as *mut u8, size as usize);
            return Err(ShmError::new(
                ShmErrorKind::NotAHeap,
                "heap header changed while it was being opened",
                0,
            ));
        }
        Ok(SharedHeap {
            heap: Heap::view(base, writable),
            fd,
            path,
        })
    }

    /// Checks the header at `h` against a file of `len` bytes. Returns the heap's size and
    /// its fixed address, if any.
    ///
    /// pre: `h` maps the file's first page, and we hold the file's flock, so no creator is
    /// writing it: a heap that is not READY now never will be.
    fn validate(h: *const ShmHeader, len: u64) -> Result<(u64, Option<usize>), ShmError> {
        // SAFETY: by the precondition the page is mapped and nobody writes the header; the
        // creator stored `state` (Release) after everything else, hence the Acquire.
        let h = unsafe {
            let state = (*h).state.load(Ordering::Acquire);
            if (*h).magic != SHM_MAGIC {
                return Err(ShmError::new(
                    ShmErrorKind::NotAHeap,
                    "not a coreheap shared heap (bad magic)",
                    0,
                ));
            }
            if (*h).version != SHM_VERSION {
                return Err(ShmError::new(
                    ShmErrorKind::Version,
                    "a coreheap heap of another version",
                    (*h).version as u64,
                ));
            }
            if state != STATE_READY {
                return Err(ShmError::new(
                    ShmErrorKind::CreatorDied,
                    "the process creating the heap died before it was ready",
                    0,
                ));
            }
            &*h
        };
        if h.chunk != CHUNK as u64
            || h.page != PAGE as u64
            || h.arena_size != core::mem::size_of::<ShmArena>() as u64
            || h.layout != layout::LAYOUT_HASH
        {
            return Err(ShmError::new(
                ShmErrorKind::Incompatible,
                "heap written by an incompatible build of coreheap",
                0,
            ));
        }
        let plan = Plan::new(h.size, h.narenas);
        let sound = h.size <= MAX_SIZE
            && (1..=MAX_ARENAS).contains(&h.narenas)
            && plan
                == Some(Plan {
                    size: h.size,
                    meta: h.meta,
                    nchunks: h.nchunks,
                    used_off: h.used_off,
                    heads_off: h.heads_off,
                    arenas_off: h.arenas_off,
                });
        if !sound {
            return Err(ShmError::new(
                ShmErrorKind::NotAHeap,
                "not a coreheap shared heap (inconsistent header)",
                0,
            ));
        }
        if len < h.size {
            return Err(ShmError::new(
                ShmErrorKind::Truncated,
                "heap file truncated (shorter than its header says)",
                0,
            ));
        }
        let fixed = (h.flags & FLAG_FIXED != 0).then_some(h.fixed_addr as usize);
        if fixed.is_some_and(|a| a % CHUNK != 0) {
            return Err(ShmError::new(
                ShmErrorKind::NotAHeap,
                "not a coreheap shared heap (bad fixed address)",
                0,
            ));
        }
        Ok((h.size, fixed))
    }

    /// Unmaps the heap (the file stays, with everything in it).
    pub fn close(self) {}

    /// Unmaps the heap and removes its file. Processes that still map it keep using it.
    pub fn destroy(self) -> Result<(), ShmError> {
        let r = sys::unlink(self.path.as_ptr().cast()).map_err(|e| ShmError::os("unlink", e));
        drop(self);
        r
    }

    /// The address of this process's mapping.
    pub fn base(&self) -> *mut u8 {
        self.heap.src.base as *mut u8
    }

    /// Bytes of the mapping.
    pub fn size(&self) -> usize {
        self.heap.src.len
    }

    /// The number of arenas.
    pub fn arenas(&self) -> usize {
        self.heap.src.narenas
    }

    /// Whether every process maps this heap at [`SharedHeap::base`].
    pub fn is_fixed(&self) -> bool {
        self.heap.header().flags & FLAG_FIXED != 0
    }

    /// Whether this process may allocate and free (not opened read-only).
    pub fn is_writable(&self) -> bool {
        self.heap.src.writable
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
            base: self.heap.src.base,
        })
    }

    /// `layout.size()` bytes aligned to `layout.align()`; null when the heap is full (or
    /// read-only).
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        self.heap.alloc(layout.size(), layout.align())
    }

    /// Like [`SharedHeap::alloc`], zeroed.
    pub fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.heap.alloc_zeroed(layout.size(), layout.align())
    }

    /// `size` bytes aligned to `align` (a power of two); null when the heap is full.
    pub fn alloc_raw(&self, size: usize, align: usize) -> *mut u8 {
        self.heap.alloc(size, align)
    }

    /// Like [`SharedHeap::alloc_raw`], zeroed.
    pub fn alloc_zeroed_raw(&self, size: usize, align: usize) -> *mut u8 {
        self.heap.alloc_zeroed(size, align)
    }

    /// Whether `p` points into this heap's mapping.
    #[inline]
    pub fn contains(&self, p: *const u8) -> bool {
        (p as usize).wrapping_sub(self.heap.src.base) < self.heap.src.len
    }

    /// `size` bytes (16-byte aligned) as an offset; null when the heap is full.
    pub fn alloc_shm(&self, size: usize) -> ShmPtr {
        self.offset_of(self.heap.alloc(size, 16))
    }

    /// Frees a block of this heap, whichever process allocated it.
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that no process uses any more. Anything
    /// else is detected where it can be and aborts with a message.
    pub unsafe fn free(&self, p: *mut u8) {
        // SAFETY: passed on.
        unsafe { self.heap.free(p) }
    }

    /// Frees the block at `p`.
    ///
    /// # Safety
    /// As for [`SharedHeap::free`].
    pub unsafe fn free_shm(&self, p: ShmPtr) {
        // SAFETY: passed on.
        unsafe { self.heap.free(self.ptr(p)) }
    }

    /// Resizes a block (in place when it can); null when the heap is full, `p` untouched.
    ///
    /// # Safety
    /// `p` is null or a live block of this heap that the caller owns.
    pub unsafe fn realloc(&self, p: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: passed on.
        unsafe { self.heap.realloc(p, size, 16) }
    }

    /// [`SharedHeap::realloc`] to a block aligned to `align`.
    ///
    /// # Safety
    /// As for [`SharedHeap::realloc`].
    pub unsafe fn realloc_aligned(&self, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        // SAFETY: passed on.
        unsafe { self.heap.realloc(p, size, align) }
    }

    /// The usable size of the live block `p` (aborts on a pointer that is not one).
    pub fn usable_size(&self, p: *mut u8) -> usize {
        self.heap.usable_size(p)
    }

    /// The pointer for `p` in this process; null for a null or out-of-range offset.
    pub fn ptr(&self, p: ShmPtr) -> *mut u8 {
        self.heap.ptr(p)
    }

    /// The offset of `p`; null if `p` is not inside the heap.
    pub fn offset_of<T: ?Sized>(&self, p: *const T) -> ShmPtr {
        self.heap.offset_of(p.cast())
    }

    /// The root all processes share (null in a new heap).
    pub fn root(&self) -> ShmPtr {
        ShmPtr(self.heap.header().root.load(Ordering::Acquire))
    }

    /// Sets the root. The data it leads to must be written before (this is a release).
    pub fn set_root(&self, p: ShmPtr) {
        if self.heap.src.writable {
            self.heap.header().root.store(p.0, Ordering::Release);
        }
    }

    /// Sets the root to `new` if it is `current`; returns the root found.
    pub fn compare_and_set_root(&self, current: ShmPtr, new: ShmPtr) -> Result<ShmPtr, ShmPtr> {
        if !self.heap.src.writable {
            return Err(self.root());
        }
        self.heap
            .header()
            .root
            .compare_exchange(current.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .map(ShmPtr)
            .map_err(ShmPtr)
    }

    /// Verifies every arena and the chunk maps. Returns the first violation.
    pub fn check(&self) -> Result<(), &'static str> {
        self.heap.check()
    }

    /// Counters of every arena and of huge blocks.
    pub fn stats(&self) -> ShmStats {
        self.heap.stats()
    }

    /// Takes arena `i`'s lock and never releases it, after leaving damage of kind `damage`
    /// (0 none, 1 a half-done small allocation, 2 a half-done page-run update): for tests of
    /// a lock holder's death.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn hold_arena_lock_for_test(&self, i: usize, damage: u8) {
        if i < self.arenas() {
            self.heap
                .arena(i)
                .acquire_and_damage(&self.heap.src, damage);
        }
    }

    /// `COREHEAP_SHM`: makes this process the heap's publisher unless another live process
    /// is. Returns whether it is now (children started with the variable inherited find
    /// their parent there, and keep their own heaps).
    fn claim_publisher(&self) -> bool {
        let me = sys::pid();
        let w = &self.heap.header().publisher;
        loop {
            let cur = w.load(Ordering::Acquire);
            if cur == me {
                return true;
            }
            if cur != 0 && sys::process_alive(cur) {
                return false;
            }
            if w.compare_exchange(cur, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Fork of a process whose own heap this is (`COREHEAP_SHM`), before `fork`: takes every
    /// arena lock and the chunk lock, so the child's copy is taken between operations.
    fn fork_prepare(&self) {
        for a in self.heap.arenas() {
            a.fork_lock(&self.heap.src);
        }
        self.heap.src.lock_chunks();
    }

    /// Fork, parent side (after the child has made its copy): releases the locks.
    fn fork_parent(&self) {
        self.heap.header().chunk_lock.unlock();
        for a in self.heap.arenas() {
            a.fork_unlock(&self.heap.src);
        }
    }

    /// Fork, child side: the child must not share its parent's heap (it would free and
    /// overwrite the parent's objects), so the mapping is replaced by a private copy at the
    /// same address, and the locks (held by the parent's forking thread) are made anew.
    /// Returns false if the copy could not be made: the child then shares the heap.
    fn fork_child(&self) -> bool {
        let (base, len) = (self.heap.src.base as *mut u8, self.heap.src.len);
        if !sys::privatize(base, len, self.fd) {
            return false;
        }
        // SAFETY: the memory is this process's private copy now; the locks in it belong to
        // a thread of the parent, and glibc emptied this thread's robust list at the fork, so
        // no list refers to them.
        unsafe {
            let h = self.heap.header() as *const ShmHeader as *mut ShmHeader;
            crate::lock::RobustLock::init_in_place(ptr::addr_of_mut!((*h).chunk_lock));
            for a in self.heap.arenas() {
                a.fork_reinit();
            }
        }
        true
    }

    /// Returns pending frees to their arenas. Free pages inside live chunks stay allocated
    /// in the file (punching them could raise SIGBUS on a full file system, see
    /// `ShmSource::purge`); wholly free chunks go back as they empty.
    pub fn trim(&self) {
        if self.heap.src.writable {
            for a in self.heap.arenas() {
                a.trim(&self.heap.src);
            }
        }
    }
}

impl Drop for SharedHeap {
    fn drop(&mut self) {
        sys::unmap(self.heap.src.base as *mut u8, self.heap.src.len);
        sys::close(self.fd);
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
    pub arenas: Vec<ArenaStats>,
    pub huge_blocks: u64,
    pub huge_bytes: u64,
    pub chunks_used: usize,
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
    fn heap(&self) -> Heap {
        // SAFETY: the type invariant: the heap is mapped writable at `base`.
        Heap::view(self.base, true)
    }
}

// SAFETY: blocks come from the shared heap's arenas, which hand each block out once, fit
// `layout` (size and alignment are passed on) and stay valid until deallocated; a handle
// copied anywhere names the same heap.
unsafe impl allocator_api2::alloc::Allocator for ShmAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.heap().allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the Allocator contract: `ptr` was allocated by this heap and is given up.
        unsafe { self.heap().free(ptr.as_ptr()) }
    }
}

// SAFETY: as for `ShmAlloc`; `&SharedHeap` is an allocator through allocator-api2's
// blanket `impl Allocator for &A`.
unsafe impl allocator_api2::alloc::Allocator for SharedHeap {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.heap.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        // SAFETY: the Allocator contract: `ptr` was allocated by this heap and is given up.
        unsafe { self.free(ptr.as_ptr()) }
    }
}

fn c_path(p: &std::path::Path) -> Result<std::ffi::CString, ShmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ShmError::new(ShmErrorKind::BadPath, "path holds a NUL byte", 0))
}

fn map(fd: i32, len: usize, writable: bool, at: Option<usize>) -> Result<usize, ShmError> {
    match sys::map_shared(fd, len, writable, at, CHUNK) {
        Ok(p) => Ok(p as usize),
        Err(libc::EEXIST) => Err(ShmError::new(
            ShmErrorKind::AddressTaken,
            "the heap's fixed address is taken in this process",
            libc::EEXIST as u64,
        )),
        Err(e) => Err(ShmError::os("mmap", e)),
    }
}

/// The operations of a mapped heap, shared by [`SharedHeap`] and [`ShmAlloc`].
struct Heap {
    src: ShmSource,
}

impl Heap {
    /// The heap mapped at `base`.
    ///
    /// pre: a ready heap (or one being built by this process) is mapped at `base`, whole.
    fn view(base: usize, writable: bool) -> Heap {
        // SAFETY: by the precondition the header is mapped at `base`.
        let h = unsafe { &*(base as *const ShmHeader) };
        Heap {
            src: ShmSource {
                base,
                len: h.size as usize,
                meta: h.meta as usize,
                nchunks: h.nchunks as usize,
                used_off: h.used_off as usize,
                heads_off: h.heads_off as usize,
                arenas_off: h.arenas_off as usize,
                narenas: h.narenas as usize,
                writable,
            },
        }
    }

    fn header(&self) -> &ShmHeader {
        self.src.header()
    }

    fn arena(&self, i: usize) -> &ShmArena {
        assert!(i < self.src.narenas);
        // SAFETY: arena `i < narenas` lies in the table of the mapped meta area (layout
        // invariant), initialised by the creator.
        unsafe {
            &*((self.src.base + self.src.arenas_off + i * core::mem::size_of::<ShmArena>())
                as *const ShmArena)
        }
    }

    fn arenas(&self) -> impl Iterator<Item = &ShmArena> {
        (0..self.src.narenas).map(move |i| self.arena(i))
    }

    fn current(&self) -> usize {
        crate::os::current_cpu() % self.src.narenas
    }

    fn alloc(&self, size: usize, align: usize) -> *mut u8 {
        self.alloc_inner(size, align).0
    }

    /// `Allocator::allocate`.
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        NonNull::new(self.alloc(layout.size(), layout.align()))
            .map(|p| NonNull::slice_from_raw_parts(p, layout.size()))
            .ok_or(allocator_api2::alloc::AllocError)
    }

    fn alloc_zeroed(&self, size: usize, align: usize) -> *mut u8 {
        let (p, zeroed) = self.alloc_inner(size, align);
        if !p.is_null() && !zeroed {
            // SAFETY: a fresh block of at least `size` bytes.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        p
    }

    /// A block and whether it reads zero.
    fn alloc_inner(&self, size: usize, align: usize) -> (*mut u8, bool) {
        if !self.src.writable || !align.is_power_of_two() {
            return (ptr::null_mut(), false);
        }
        let size = size.max(1);
        if size <= LARGE_MAX && align <= LARGE_ALIGN_MAX {
            let n = self.src.narenas;
            let first = self.current();
            // The arena of this CPU first; when the file has no chunk left for it, another
            // arena may still have free pages.
            for k in 0..n {
                let r = self.arena((first + k) % n).alloc(&self.src, size, align);
                if !r.0.is_null() {
                    return r;
                }
            }
            (ptr::null_mut(), false)
        } else {
            (self.alloc_huge(size, align), true)
        }
    }

    /// A block of whole chunks: a chunk header in the first page (or the first chunk, for
    /// alignments above a page), the block after it.
    fn alloc_huge(&self, size: usize, align: usize) -> *mut u8 {
        if align > CHUNK {
            return ptr::null_mut();
        }
        let lead = if align <= PAGE { PAGE } else { CHUNK };
        let Some(total) = size.checked_add(lead) else {
            return ptr::null_mut();
        };
        let n = total.div_ceil(CHUNK);
        let c = self.src.take_span(n);
        if c.is_null() {
            return c;
        }
        let h = c.cast::<ChunkHeader>();
        let base = self.src.base;
        // SAFETY: the span is ours (its `used` bits are set) and zero; the header's fields
        // before `pages` fit in the first page. Offsets, not addresses: other processes map
        // the heap elsewhere.
        unsafe {
            (*h).kind = CHUNK_HUGE;
            (*h).arena = u32::MAX;
            (*h).map_base = c as usize - base;
            (*h).map_len = n * CHUNK;
            (*h).huge_ptr = c as usize + lead - base;
            (*h).huge_size = size;
            (*h).set_magic(MAGIC);
        }
        self.src.publish(c);
        let hd = self.header();
        hd.huge_count.fetch_add(1, Ordering::Relaxed);
        hd.huge_bytes
            .fetch_add((n * CHUNK) as u64, Ordering::Relaxed);
        // SAFETY: `lead < total <= n * CHUNK`.
        unsafe { c.add(lead) }
    }

    unsafe fn free(&self, p: *mut u8) {
        if p.is_null() {
            return;
        }
        if !self.src.writable {
            crate::diag::invalid_pointer(b"coreheap: free() on a read-only shared heap", p);
        }
        let what = lookup(&self.src, p);
        match what {
            Lookup::Small { arena, .. } | Lookup::Large { arena, .. }
                if (arena as usize) < self.src.narenas =>
            {
                let local = arena as usize == self.current();
                // SAFETY: `p` is a live block of arena `arena` (lookup; the caller's
                // contract), which the caller gives up.
                unsafe {
                    self.arena(arena as usize).free(
                        &self.src,
                        p,
                        what,
                        self.header().mark as usize,
                        local,
                    )
                };
            }
            // A block of a chunk given up by a recovery (`Arena::recover`): dropped.
            Lookup::Small { arena: ORPHAN, .. } | Lookup::Large { arena: ORPHAN, .. } => {}
            // SAFETY: `h` is the live header of the huge block `p`.
            Lookup::Huge(h) => unsafe { self.free_huge(h, p) },
            _ => crate::diag::invalid_pointer(b"coreheap: shared heap free(): invalid pointer", p),
        }
    }

    /// # Safety
    /// `h` is the header of the live huge block `p`, which the caller gives up.
    unsafe fn free_huge(&self, h: *mut ChunkHeader, p: *mut u8) {
        // SAFETY: the header is mapped (lookup found it). Taking the magic away claims the
        // span: of two frees of one block (in any processes), one wins, the other aborts.
        let (span, len) = unsafe {
            let magic = &*ptr::addr_of!((*h).magic).cast::<core::sync::atomic::AtomicU64>();
            if magic
                .compare_exchange(MAGIC, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                crate::diag::invalid_pointer(b"coreheap: shared heap free(): double free", p);
            }
            ((*h).map_base + self.src.base, (*h).map_len)
        };
        let first = self.src.chunk_index(span);
        if span != h as usize
            || len % CHUNK != 0
            || first.is_none_or(|f| f + len / CHUNK > self.src.nchunks)
        {
            crate::diag::invalid_pointer(
                b"coreheap: shared heap free(): corrupted huge block header",
                p,
            );
        }
        let hd = self.header();
        hd.huge_count.fetch_sub(1, Ordering::Relaxed);
        hd.huge_bytes.fetch_sub(len as u64, Ordering::Relaxed);
        // SAFETY: the span is ours alone now (claimed above) and holds nothing live.
        unsafe { self.src.give_span(span as *mut u8, len / CHUNK) };
    }

    fn usable_size(&self, p: *mut u8) -> usize {
        if p.is_null() {
            return 0;
        }
        match lookup(&self.src, p) {
            // SAFETY: `lookup` returned a live run head.
            Lookup::Small { run, .. } => class_size(unsafe { (*run).class() }),
            // SAFETY: as above.
            Lookup::Large { run, .. } => unsafe { (*run).npages as usize * PAGE },
            // SAFETY: `h` is the live huge header of `p`.
            Lookup::Huge(h) => unsafe { (*h).map_base + (*h).map_len + self.src.base - p as usize },
            Lookup::Invalid => crate::diag::invalid_pointer(
                b"coreheap: shared heap malloc_usable_size(): invalid pointer",
                p,
            ),
        }
    }

    unsafe fn realloc(&self, p: *mut u8, size: usize, align: usize) -> *mut u8 {
        if p.is_null() {
            return self.alloc(size, align);
        }
        let have = self.usable_size(p);
        if size <= have && size >= have / 4 && (p as usize).is_multiple_of(align) {
            return p;
        }
        let q = self.alloc(size, align);
        if !q.is_null() {
            // SAFETY: both blocks are live and at least `min(have, size)` long; distinct.
            unsafe {
                ptr::copy_nonoverlapping(p, q, have.min(size));
                self.free(p);
            }
        }
        q
    }

    fn ptr(&self, p: ShmPtr) -> *mut u8 {
        if p.is_null() || p.0 >= self.src.len as u64 {
            ptr::null_mut()
        } else {
            (self.src.base + p.0 as usize) as *mut u8
        }
    }

    fn offset_of(&self, p: *const u8) -> ShmPtr {
        let off = (p as usize).wrapping_sub(self.src.base);
        if p.is_null() || off >= self.src.len {
            ShmPtr::NULL
        } else {
            ShmPtr(off as u64)
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        if !self.src.writable {
            return Err("a read-only heap cannot be checked (it takes the arena locks)");
        }
        for a in self.arenas() {
            a.check(&self.src)?;
        }
        let narenas = self.src.narenas as u32;
        let mut r = Ok(());
        self.src.for_each_head(|c| {
            let h = c as *const ChunkHeader;
            // SAFETY: a chunk with a `heads` bit is mapped and starts with a header.
            let (magic, kind, arena) = unsafe { ((*h).magic(), (*h).kind, (*h).arena_index()) };
            if r.is_ok() && magic != MAGIC && magic != 0 {
                r = Err("a chunk header has a bad magic");
            } else if r.is_ok()
                && magic == MAGIC
                && kind != CHUNK_HUGE
                && arena >= narenas
                && arena != ORPHAN
            {
                r = Err("an arena chunk names an arena that does not exist");
            }
        });
        r
    }

    fn stats(&self) -> ShmStats {
        let h = self.header();
        ShmStats {
            arenas: if self.src.writable {
                self.arenas().map(|a| a.stats(&self.src)).collect()
            } else {
                Vec::new()
            },
            huge_blocks: h.huge_count.load(Ordering::Relaxed),
            huge_bytes: h.huge_bytes.load(Ordering::Relaxed),
            chunks_used: self.src.chunks_used(),
            chunks_total: self.src.nchunks,
        }
    }
}
