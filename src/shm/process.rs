//! `COREHEAP_SHM=NAME:SIZE`: the C interface (the preload library) takes the whole
//! process's heap from the shared heap `/dev/shm/NAME`, created with `SIZE` bytes if it does
//! not exist (a number with an optional `K`, `M` or `G`). The heap is fixed-address, so other
//! processes can map it (read-only if they like) and follow the raw pointers the program
//! stored; the program publishes an entry point with `coreheap_shm_set_root`.
//!
//! Fork: a child must not share its parent's heap (it would free and overwrite the parent's
//! objects), so fork handlers give the child a private copy of the heap at the same address
//! (the parent waits in `fork` until the copy is made; all arena locks are held meanwhile).
//! The child's later allocations stay private; only the process that opened the heap
//! publishes into it. The parent's other threads are stopped from before `fork` until the
//! copy is made (`os::stop`), so the child's copy is one instant's, as a real fork's is;
//! docs/shm.md lists the threads that cannot be stopped. Threads enter the C library's `fork`
//! one at a time (`fork_gated`, through the preload library's `fork`), so that no stopped
//! thread is inside another `fork`, holding the lock glibc takes after the prepare handlers.
//!
//! One publisher: a process started with the variable while another live process
//! publishes through the heap (typically a child that inherited the environment and ran
//! `exec`) keeps its own process heap; it would only leak into the shared one.
//!
//! Decided once, at the first call (the value comes from `crate::settings`): without the
//! variable, with a bad value, or if the heap cannot be opened (a one-line warning on
//! stderr), everything stays on the process heap. Blocks allocated before the decision stay
//! on the process heap too; `free` tells the two apart by address.

use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

use super::{Fixed, Options, SharedHeap};
use crate::os;
use crate::settings;

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
const OPENING: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The heap, written once before `STATE` becomes `ON`.
struct Slot(core::cell::UnsafeCell<MaybeUninit<SharedHeap>>);
// SAFETY: written by one thread (the one that moved STATE to OPENING) before the Release
// store of ON; read only after an Acquire load of ON.
unsafe impl Sync for Slot {}
static SHARED: Slot = Slot(core::cell::UnsafeCell::new(MaybeUninit::uninit()));

/// The process's shared heap, if `COREHEAP_SHM` asked for one and it could be opened.
#[inline]
pub fn heap() -> Option<&'static SharedHeap> {
    match STATE.load(Ordering::Acquire) {
        OFF | OPENING => None,
        // SAFETY: ON is stored (Release) only after the slot was written; never changes.
        ON => Some(unsafe { (*SHARED.0.get()).assume_init_ref() }),
        _ => open(),
    }
}

#[cold]
fn open() -> Option<&'static SharedHeap> {
    if STATE
        .compare_exchange(UNKNOWN, OPENING, Ordering::Acquire, Ordering::Acquire)
        .is_err()
    {
        // Another thread is opening it: this call uses the process heap meanwhile.
        return heap_if_on();
    }
    // Opening the heap must not change what the program sees in errno.
    crate::os::keeping_errno(open_from_env)
}

fn open_from_env() -> Option<&'static SharedHeap> {
    // The C interface has no builder: bad values are reported with what the environment
    // leaves (unless the process heap's initialisation reported them already).
    settings::report_once(&settings::Overrides::NONE);
    // Without the variable, or with a bad value (reported just now), the process heap
    // serves everything.
    let Some((path, size)) = settings::get()
        .shm
        .and_then(|spec| Some((shm_path(spec.name())?, spec.size)))
    else {
        STATE.store(OFF, Ordering::Release);
        return None;
    };
    let opts = Options {
        fixed: Fixed::Anywhere,
        ..Options::default()
    };
    let Ok(cpath) = core::ffi::CStr::from_bytes_until_nul(&path) else {
        STATE.store(OFF, Ordering::Release);
        return None;
    };
    match SharedHeap::open_or_create_cstr(cpath, size, &opts, &mut |_| {}) {
        Ok(h) if !h.claim_publisher() => {
            // A process started by the publisher with the variable inherited: it keeps a
            // heap of its own (it would only leak into the shared one).
            drop(h);
            STATE.store(OFF, Ordering::Release);
            None
        }
        Ok(h) => {
            // SAFETY: only this thread writes the slot (it moved STATE to OPENING).
            unsafe { (*SHARED.0.get()).write(h) };
            STATE.store(ON, Ordering::Release);
            if !os::register_atfork(fork_prepare, fork_parent, fork_child) {
                os::write_all(
                    2,
                    b"coreheap: COREHEAP_SHM: no fork handlers; a fork child would share the heap\n",
                );
            }
            heap_if_on()
        }
        Err(e) => {
            let mut l = crate::diag::Line::new();
            l.str(b"coreheap: COREHEAP_SHM: cannot open the shared heap: ")
                .str(e.what.as_bytes())
                .str(b"; using the process heap\n");
            l.write(2);
            STATE.store(OFF, Ordering::Release);
            None
        }
    }
}

/// Set in a fork child once its heap is a private copy: from then on the mapping is
/// ordinary private memory, which `fork` itself copies, and the handlers do nothing (a
/// second privatization would copy only what the file holds, losing the copy's own
/// writes: a grandchild of bash found zeroed chunk headers).
static PRIVATE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The heap while it is still the shared file's mapping.
fn shared_heap() -> Option<&'static SharedHeap> {
    if PRIVATE.load(Ordering::Relaxed) {
        None
    } else {
        heap_if_on()
    }
}

/// One `fork` at a time, from before the C library's `fork` starts until it has returned, in
/// a process whose heap is still the shared file's (taken by [`fork_gated`]).
///
/// Why: the prepare handler stops the other threads (`os::stop`) and then returns into glibc,
/// which takes its fork handler lock again before it forks (and between the parent and child
/// handlers). Another thread inside glibc's `fork` holds that lock for a moment as it enters
/// (while it walks the handler list, before its first prepare handler) and again after its
/// last parent handler; stopped there, it would never release it, and the forking thread would
/// wait for it for ever (seen: `fork_concurrent.c` on a shared heap hung once in a few hundred
/// runs; with 60,000 empty handler entries, which glibc walks holding the lock, nearly always).
/// A thread that waits here holds nothing of glibc's, so stopping it is harmless. Process-
/// private: this process's threads only.
static FORK_GATE: crate::lock::RawLock = crate::lock::RawLock::new(false);

/// `fork` through [`FORK_GATE`] while the heap is the shared file's: `fork` is the C library's
/// (which runs the fork handlers). Returns what it returned, `errno` as it left it. A thread
/// that holds the gate already (a `fork` from a signal handler that interrupted this thread
/// inside `fork`) goes through without it, as its prepare handler skips the locks the
/// thread holds. The child (one thread, the copy of the one holding the gate) makes the gate
/// anew.
pub(crate) fn fork_gated(fork: impl FnOnce() -> libc::pid_t) -> libc::pid_t {
    // errno kept: a wait at the gate may leave EAGAIN or EINTR, which a `fork` that then
    // succeeds would return with.
    let gated = shared_heap().is_some() && os::keeping_errno(|| FORK_GATE.lock_for_fork());
    let pid = fork();
    if gated {
        os::keeping_errno(|| {
            if pid == 0 {
                FORK_GATE.reinit();
            } else {
                FORK_GATE.unlock();
            }
        });
    }
    pid
}

/// The pipe through which a fork child tells its parent that its copy is made.
static FORK_PIPE: [core::sync::atomic::AtomicI32; 2] = [
    core::sync::atomic::AtomicI32::new(-1),
    core::sync::atomic::AtomicI32::new(-1),
];

/// The fork pipe's (read, write) ends, -1 when it could not be made.
fn fork_pipe() -> (i32, i32) {
    (
        FORK_PIPE[0].load(Ordering::Relaxed),
        FORK_PIPE[1].load(Ordering::Relaxed),
    )
}

/// What the last prepare handler did, for the parent and child handlers of the same `fork`
/// (glibc runs all three on the forking thread): bit [`THREADS`] if the process had other
/// threads (the stdio list lock is taken), bit [`STOPPED`] if they were stopped.
static FORK_DID: AtomicU8 = AtomicU8::new(0);
const THREADS: u8 = 1;
const STOPPED: u8 = 2;

unsafe extern "C" fn fork_prepare() {
    if let Some(h) = shared_heap() {
        let threads = !os::single_threaded();
        if threads {
            // Before the arenas (a thread may allocate while it holds the list lock), and
            // before the other threads are stopped: fork takes this lock after the prepare
            // handlers, and a stopped thread that held it would never let it go.
            os::stdio_list_lock();
        }
        h.fork_prepare();
        // The pipe and `FORK_DID` are this `fork`'s only once its locks are held: two threads
        // that fork at once run their prepare handlers at once (recent glibc), and
        // the second's pipe written before then replaced the first's (its parent waited on
        // the other pipe, or on closed descriptors, and let the threads go before its child
        // had copied the heap: `fork_concurrent.c` on a shared heap).
        let (r, w) = os::file::pipe().unwrap_or((-1, -1));
        FORK_PIPE[0].store(r, Ordering::Relaxed);
        FORK_PIPE[1].store(w, Ordering::Relaxed);
        if threads {
            // The process heap's fork locks too (its prepare handler may run after this one).
            crate::heap::prepare_fork_early();
        }
        // The heap is copied in the child after `fork`: the other threads must not write
        // into it before the copy is made (the parent waits for it on the pipe, without
        // which nothing is stopped). Stopped here, not later, the child's copy and the rest
        // of the child's memory are the same instant's.
        let stopped = threads && r >= 0 && os::stop::stop_others();
        FORK_DID.store(
            (u8::from(threads) * THREADS) | (u8::from(stopped) * STOPPED),
            Ordering::Relaxed,
        );
    }
}

unsafe extern "C" fn fork_parent() {
    if let Some(h) = shared_heap() {
        let (r, w) = fork_pipe();
        if r >= 0 {
            // Our write end closed, the read returns when the child writes or exits.
            os::file::close_nocancel(w);
            os::file::await_signal(r);
            os::file::close_nocancel(r);
        }
        let did = FORK_DID.load(Ordering::Relaxed);
        if did & STOPPED != 0 {
            os::stop::resume_others();
        }
        h.fork_parent();
        if did & THREADS != 0 {
            os::stdio_list_unlock();
        }
    }
}

unsafe extern "C" fn fork_child() {
    if let Some(h) = shared_heap() {
        let did = FORK_DID.load(Ordering::Relaxed);
        if did & STOPPED != 0 {
            os::stop::forget_in_child();
        }
        if !h.fork_child() {
            os::write_all(
                2,
                b"coreheap: COREHEAP_SHM: no memory for the fork child's copy of the heap\n",
            );
            os::fatal(b"coreheap: a fork child cannot share its parent's heap\n");
        }
        PRIVATE.store(true, Ordering::Relaxed);
        let (r, w) = fork_pipe();
        if w >= 0 {
            os::file::signal(w);
            os::file::close_nocancel(w);
            os::file::close_nocancel(r);
        }
        if did & THREADS != 0 {
            os::stdio_list_reset();
        }
    }
}

fn heap_if_on() -> Option<&'static SharedHeap> {
    if STATE.load(Ordering::Acquire) == ON {
        // SAFETY: as in `heap`.
        Some(unsafe { (*SHARED.0.get()).assume_init_ref() })
    } else {
        None
    }
}

/// `/dev/shm/NAME`, NUL-terminated; `None` if it does not fit in `PATH_MAX` bytes.
fn shm_path(name: &[u8]) -> Option<[u8; super::PATH_MAX + 1]> {
    let prefix = b"/dev/shm/";
    let len = prefix.len() + name.len();
    if len > super::PATH_MAX {
        return None;
    }
    let mut path = [0u8; super::PATH_MAX + 1];
    path[..prefix.len()].copy_from_slice(prefix);
    path[prefix.len()..len].copy_from_slice(name);
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_path() {
        let p = shm_path(b"cache").unwrap();
        assert!(p.starts_with(b"/dev/shm/cache\0"));
        let longest = [b'n'; settings::SHM_NAME_MAX];
        assert_eq!(shm_path(&longest).unwrap()[super::super::PATH_MAX], 0);
        assert!(shm_path(&[b'n'; settings::SHM_NAME_MAX + 1]).is_none());
    }
}
