//! Opening and creating a shared heap's file: the file lock that makes one process the
//! creator, the header written and validated, the mapping, and the wait for a creator's
//! `init`.

use core::ffi::CStr;
use core::ptr;
use core::sync::atomic::Ordering;

use super::layout::{
    self, Plan, ShmArena, ShmHeader, FLAG_FIXED, SHM_MAGIC, STATE_INIT, STATE_READY,
};
use super::view::View;
use super::{
    Fixed, Mode, Options, SharedHeap, ShmError, ShmErrorKind, MAX_ARENAS, MAX_SIZE, PATH_MAX,
    SHM_VERSION, WAIT_READY_US,
};
use crate::os::{self, file};
use crate::size_class::{CHUNK, PAGE};

impl SharedHeap {
    pub(super) fn open_raw(
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
            let fd = match file::open(path.as_ptr(), writable) {
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
                file::close(fd);
                return Err(ShmError::new(
                    ShmErrorKind::InInit,
                    "the heap was opened from inside its own init",
                    0,
                ));
            }
            if let Err(e) = file::flock(fd, exclusive, WAIT_READY_US) {
                file::close(fd);
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
            if file::still_named(fd, path.as_ptr()) {
                break fd;
            }
            file::unlock(fd);
            file::close(fd);
        };
        if Self::abandoned(fd) {
            // We hold the lock and the heap is not ready: its creator died.
            if exclusive {
                // Create it anew here, `init` included.
                return Self::build_locked(fd, path, size, opts, saved, init, false);
            }
            let empty = file::file_size(fd) == Ok(0);
            file::unlock(fd);
            file::close(fd);
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
        file::unlock(fd);
        r.inspect_err(|_| file::close(fd))
    }

    /// Calls `f` with the header of the file `fd` mapped read-only on its own; `None` if
    /// the file is shorter than a page (or cannot be mapped).
    fn peek<T>(fd: i32, f: impl FnOnce(*const ShmHeader) -> T) -> Option<T> {
        if file::file_size(fd).map_or(true, |l| l < PAGE as u64) {
            return None;
        }
        let page = file::map_peek(fd, PAGE).ok()?;
        let r = f(page.cast());
        os::unmap(page as *mut u8, PAGE);
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
            creator == os::pid() && state == STATE_INIT
        })
        .unwrap_or(false)
    }

    /// Creates the file at `path` empty, and already flock-ed: built unnamed (`O_TMPFILE`),
    /// locked, then linked into place, so no other process sees it unlocked before it is
    /// ready. Where the file system has no unnamed files, created by name and then locked
    /// (an opener may then lock it first: `build_locked` and `abandoned` cope).
    fn create_locked(path: &CStr, opts: &Options) -> Result<i32, ShmError> {
        if let Ok(fd) = file::create_unnamed(path.to_bytes_with_nul(), opts.mode) {
            if let Err(e) = file::flock(fd, true, 0) {
                file::close(fd);
                return Err(ShmError::os("flock", e));
            }
            match file::link(fd, path.as_ptr()) {
                Ok(()) => return Ok(fd),
                Err(libc::ENOENT) | Err(libc::EPERM) => file::close(fd), // no /proc: by name
                Err(e) => {
                    file::close(fd);
                    return Err(ShmError::os("create the heap file", e));
                }
            }
        }
        let fd = file::create_excl(path.as_ptr(), opts.mode)
            .map_err(|e| ShmError::os("create the heap file", e))?;
        if let Err(e) = file::flock(fd, true, WAIT_READY_US) {
            file::close(fd);
            return Err(ShmError::os("flock", e));
        }
        Ok(fd)
    }

    /// Whether the heap file `fd`, whose lock we hold, was left unfinished by a creator that
    /// died: empty, or a coreheap header that never became ready in a file of whole chunks
    /// (the size a creator gives it). Anything else is not ours to overwrite: opening it
    /// reports what it is.
    fn abandoned(fd: i32) -> bool {
        match file::file_size(fd) {
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
            file::unlock(fd);
            return r.inspect_err(|_| file::close(fd));
        }
        let r = file::set_size(fd, 0)
            .map_err(|e| ShmError::os("ftruncate", e))
            .and_then(|_| Self::build(fd, size, opts, saved, init));
        if r.is_err() && fresh {
            let _ = file::unlink(path.as_ptr());
        }
        file::unlock(fd);
        r.inspect_err(|_| file::close(fd))
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
        file::set_size(fd, plan.size).map_err(|e| ShmError::os("ftruncate", e))?;
        let base = map(fd, plan.size as usize, true, at)?;
        let used = (plan.arenas_off as usize + narenas as usize * size_of::<ShmArena>())
            .next_multiple_of(PAGE);
        if !file::populate(base as *mut u8, used) {
            os::unmap(base as *mut u8, plan.size as usize);
            return Err(ShmError::os("allocate the header's space", libc::ENOSPC));
        }
        let h = base as *mut ShmHeader;
        // SAFETY: the file is new and ours alone until the header says READY (other openers
        // wait for that); the mapping covers the plan; zeroed bytes are a valid header.
        unsafe {
            (*h).creator.store(os::pid(), Ordering::Relaxed);
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
            (*h).mark = (crate::os::secret_key(0x5348_4d00 + os::pid() as usize) | 1) as u64;
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
                os::unmap(base as *mut u8, plan.size as usize);
                return Err(ShmError::os("pthread_mutex_init", libc::EINVAL));
            }
            (*h).version = SHM_VERSION;
            (*h).magic = SHM_MAGIC;
            (*h).state.store(STATE_INIT, Ordering::Release);
        }
        let heap = SharedHeap {
            view: View::at(base, true),
            fd,
            path,
        };
        init(&heap);
        heap.view
            .header()
            .state
            .store(STATE_READY, Ordering::Release);
        Ok(heap)
    }

    /// Validates the heap in `fd`, whose flock we hold and which `abandoned` said is not
    /// unfinished, and maps it.
    fn attach(fd: i32, writable: bool, path: [u8; PATH_MAX + 1]) -> Result<SharedHeap, ShmError> {
        let len = file::file_size(fd).map_err(|e| ShmError::os("fstat", e))?;
        let (size, fixed) =
            Self::peek(fd, |h| Self::validate(h, len)).unwrap_or(Err(ShmError::new(
                ShmErrorKind::Truncated,
                "not a coreheap shared heap (shorter than a header)",
                0,
            )))?;
        let base = map(fd, size as usize, writable, fixed)?;
        // Validated again in the mapping that is used (the file could have changed since
        // the peek); `View::view` then copies the layout once.
        if Self::validate(base as *const ShmHeader, len) != Ok((size, fixed)) {
            os::unmap(base as *mut u8, size as usize);
            return Err(ShmError::new(
                ShmErrorKind::NotAHeap,
                "heap header changed while it was being opened",
                0,
            ));
        }
        Ok(SharedHeap {
            view: View::at(base, writable),
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
}

pub(super) fn c_path(p: &std::path::Path) -> Result<std::ffi::CString, ShmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ShmError::new(ShmErrorKind::BadPath, "path holds a NUL byte", 0))
}

fn map(fd: i32, len: usize, writable: bool, at: Option<usize>) -> Result<usize, ShmError> {
    match file::map_shared(fd, len, writable, at, CHUNK) {
        Ok(p) => Ok(p as usize),
        Err(libc::EEXIST) => Err(ShmError::new(
            ShmErrorKind::AddressTaken,
            "the heap's fixed address is taken in this process",
            libc::EEXIST as u64,
        )),
        Err(e) => Err(ShmError::os("mmap", e)),
    }
}
