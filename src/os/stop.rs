//! Stopping the process's other threads for a moment, as stop-the-world collectors do, without
//! allocating: a `COREHEAP_SHM` fork child copies its parent's heap after `fork`, and the
//! parent's other threads must not write into it meanwhile (`crate::shm::process`).
//!
//! [`stop_others`] picks a free real-time signal (from `SIGRTMAX` down: one whose action is
//! `SIG_DFL`, which the calling thread does not block and which is not pending), installs
//! [`on_stop`] for it (`SA_RESTART`, every signal blocked while it runs), lists the threads in
//! `/proc/self/task` (raw `openat` and `getdents64`: `opendir` allocates), sends the signal to
//! each other thread (`tgkill`) and waits until each has answered from the handler, where it
//! then waits on a futex. It lists the threads again until a listing finds no thread it has
//! not signalled (a thread may create threads until it is stopped). [`resume_others`] lets
//! them go, waits until every one has left the handler and restores the signal's action.
//!
//! Bounds and what is not stopped:
//! - the whole stop waits at most [`STOP_LIMIT_MS`] for answers; a thread that has not
//!   answered by then (stopped by a debugger, or starved for that long) runs on;
//! - a thread that blocks the signal (`SigBlk` in `/proc/self/task/TID/status`: kernel
//!   io_uring workers, threads that block every signal) is not sent it, and runs on; a thread
//!   seen blocking it is looked at again twice, 1 ms apart (glibc's `pthread_create` blocks
//!   every signal in the creating thread for a moment);
//! - a thread that waits for the signal in `sigwait`/`sigtimedwait` (a signal-handling
//!   thread: the kernel unblocks the waited-for signals during the wait, so `SigBlk` does not
//!   show them) is not sent it either, so that it is not handed a signal it never asked for:
//!   `/proc/self/task/TID/syscall` names the call and the address of its set, read with
//!   `process_vm_readv` (which fails rather than faults if the thread has left the call). One
//!   that enters the wait between that look and the signal takes the signal there, and is
//!   given up on at the next quiet 5 ms;
//! - a thread that exits, or a zombie main thread (after `pthread_exit`), is skipped;
//! - threads beyond the first [`MAX_THREADS`] are not stopped;
//! - no free signal: nothing is stopped (said once on stderr).
//!
//! A signal sent to a thread that never ran the handler would stay pending and, once the
//! action is back to `SIG_DFL`, kill the process when delivered: [`resume_others`] sets the
//! action to `SIG_IGN` first, which discards it in every thread (POSIX, `sigaction`).
//!
//! One stop at a time: the functions are called by one thread at a time (for the shared heap,
//! the thread that holds all of its locks), as their `pre:` lines say. The handler uses only
//! atomics, raw system calls (`gettid`, `futex`) and `errno`, all async-signal-safe.
//!
//! Effects on the stopped threads (signal(7)): a system call interrupted by the handler is
//! restarted (`SA_RESTART`), except those Linux never restarts after a handler (`poll`,
//! `epoll_wait`, `select`, `nanosleep`, `sigtimedwait`, socket calls with a timeout, ...), which
//! return `EINTR`, as under any signal. Signals that arrive for a stopped thread wait until it
//! leaves the handler.
//!
//! Nothing here is a cancellation point: files are opened, read and closed with raw system
//! calls, and the pause between two looks is a futex wait with a timeout.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering};

use super::errno::{errno, set_errno};

/// Threads that can be stopped at once; the others run on.
pub const MAX_THREADS: usize = 1024;
/// How long a stop waits for the threads' answers at most, in all.
pub const STOP_LIMIT_MS: u32 = 1000;

/// The slot of a signalled thread: sent, then answered from the handler or found gone.
const SENT: u8 = 0;
const ANSWERED: u8 = 1;
const GONE: u8 = 2;

/// Nonzero while the signalled threads must stay in the handler: the stop's number (never 0).
static HOLD: AtomicU32 = AtomicU32::new(0);
/// The last stop's number.
static ROUND: AtomicU32 = AtomicU32::new(0);
/// Threads inside [`on_stop`] (the futex word [`resume_others`] waits on).
static INSIDE: AtomicU32 = AtomicU32::new(0);
/// Bumped at every answer (the futex word [`stop_others`] waits on).
static ANSWERS: AtomicU32 = AtomicU32::new(0);
/// The signalled threads: `TIDS[i]` and `STATE[i]` for `i < COUNT`.
///
/// Invariant: a slot's tid and state are written (SENT) before `COUNT` covers it (Release),
/// and `COUNT` before the thread is sent the signal; the handler reads `COUNT` with Acquire.
static TIDS: [AtomicI32; MAX_THREADS] = [const { AtomicI32::new(0) }; MAX_THREADS];
static STATE: [AtomicU8; MAX_THREADS] = [const { AtomicU8::new(SENT) }; MAX_THREADS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// The signal in use between [`stop_others`] and [`resume_others`], 0 when none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The no-free-signal warning was written.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The signal's action before [`stop_others`] installed the handler (`SIG_DFL`, or what a
/// racing `sigaction` had set), and the buffers for `/proc`.
struct Scratch {
    old: libc::sigaction,
    buf: [u8; 2048],
}
struct ScratchCell(UnsafeCell<Scratch>);
// SAFETY: used only by [`stop_others`], [`resume_others`] and [`forget_in_child`], which one
// thread at a time calls (their preconditions).
unsafe impl Sync for ScratchCell {}
static SCRATCH: ScratchCell = ScratchCell(UnsafeCell::new(Scratch {
    // SAFETY: an all-zero `sigaction` is plain data (SIG_DFL, no flags, an empty mask).
    old: unsafe { core::mem::zeroed() },
    buf: [0; 2048],
}));

/// The scratch area.
///
/// # Safety
/// The caller is the one thread inside the stop machinery (see [`ScratchCell`]) and holds no
/// other reference from this function.
unsafe fn scratch() -> &'static mut Scratch {
    // SAFETY: by the contract no other reference exists.
    unsafe { &mut *SCRATCH.0.get() }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Sends `sig` to thread `tid` of this process; false if it does not exist (`ESRCH`).
fn tgkill(tid: i32, sig: i32) -> bool {
    // SAFETY: tgkill only sends a signal (or, with 0, checks the thread exists).
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
    r == 0 || errno() != libc::ESRCH
}

/// The signal handler: answers and waits while the stop that sent the signal holds.
extern "C" fn on_stop(_sig: libc::c_int) {
    let saved = errno();
    // Counted before `HOLD` is read, so that `resume_others` (which clears `HOLD`, then waits
    // for `INSIDE` to reach 0) cannot miss a thread that saw the stop hold.
    INSIDE.fetch_add(1, Ordering::SeqCst);
    let hold = HOLD.load(Ordering::SeqCst);
    if hold != 0 {
        let me = gettid();
        let n = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
        if let Some(i) = (0..n).find(|&i| TIDS[i].load(Ordering::Relaxed) == me) {
            // A thread not in the table was not asked (a signal of an earlier stop): it
            // goes on at once.
            if STATE[i]
                .compare_exchange(SENT, ANSWERED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                ANSWERS.fetch_add(1, Ordering::Release);
                super::sync::futex_wake_all(&ANSWERS, false);
            }
            while HOLD.load(Ordering::Acquire) == hold {
                super::sync::futex_wait(&HOLD, hold, false);
            }
        }
    }
    if INSIDE.fetch_sub(1, Ordering::SeqCst) == 1 {
        super::sync::futex_wake_all(&INSIDE, false);
    }
    set_errno(saved);
}

/// Stops every other thread of the process that can be stopped (see the module text); true
/// if the signal handler is installed, and [`resume_others`] must follow.
///
/// pre: no other thread is inside `stop_others`, `resume_others` or `forget_in_child`; the
/// calling thread does not hold a lock that a thread may need to reach a point where it takes
/// signals (it would never answer, and the stop would wait its whole limit).
pub fn stop_others() -> bool {
    if super::process::single_threaded() {
        return false;
    }
    // SAFETY: one thread at a time (precondition).
    let s = unsafe { scratch() };
    let Some(sig) = install(&mut s.old) else {
        if !WARNED.swap(true, Ordering::Relaxed) {
            super::sync::without_cancellation(|| {
                super::io::write_all(
                    2,
                    b"coreheap: COREHEAP_SHM: no free real-time signal to stop the other \
                      threads at fork; a fork child's heap may be torn\n",
                );
            });
        }
        return false;
    };
    SIGNAL.store(sig, Ordering::Relaxed);
    COUNT.store(0, Ordering::Relaxed);
    let round = ROUND.load(Ordering::Relaxed).wrapping_add(1).max(1);
    ROUND.store(round, Ordering::Relaxed);
    HOLD.store(round, Ordering::SeqCst);
    let start = super::time::now_ms();
    let me = gettid();
    let mut retries = 0;
    loop {
        let (sent, blocked) = signal_new_threads(me, sig, &mut s.buf);
        await_answers(start, sig, &mut s.buf);
        if elapsed(start) >= STOP_LIMIT_MS {
            break;
        }
        if sent > 0 {
            // A thread signalled in this listing may have created threads before it stopped.
            continue;
        }
        if !blocked || retries == 2 {
            break;
        }
        retries += 1;
        // A raw futex wait on a word no one wakes: a sleep that is not a cancellation point,
        // unlike `nanosleep`.
        let idle = AtomicU32::new(0);
        super::sync::futex_wait_ms(&idle, 0, false, 1);
    }
    true
}

fn elapsed(start: u32) -> u32 {
    super::time::now_ms().wrapping_sub(start)
}

/// Finds a free real-time signal and installs the handler for it, keeping the old action in
/// `old`; `None` if none is free.
fn install(old: &mut libc::sigaction) -> Option<i32> {
    // SAFETY: plain data filled by the calls; the handler is an `extern "C"` function that
    // lives for the whole program; `sa_mask` is initialised by `sigfillset`.
    unsafe {
        let mut mask: libc::sigset_t = core::mem::zeroed();
        let mut pending: libc::sigset_t = core::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, core::ptr::null(), &mut mask);
        libc::sigpending(&mut pending);
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        let mut sig = libc::SIGRTMAX();
        while sig >= libc::SIGRTMIN() {
            let mut cur: libc::sigaction = core::mem::zeroed();
            let free = libc::sigaction(sig, core::ptr::null(), &mut cur) == 0
                && cur.sa_sigaction == libc::SIG_DFL
                && libc::sigismember(&mask, sig) == 0
                && libc::sigismember(&pending, sig) == 0;
            if free && libc::sigaction(sig, &sa, old) == 0 {
                if old.sa_sigaction == libc::SIG_DFL {
                    return Some(sig);
                }
                // Another thread set an action between the two calls: it is put back.
                libc::sigaction(sig, old, core::ptr::null_mut());
            }
            sig -= 1;
        }
        None
    }
}

/// Lists the other threads and sends `sig` to each one not yet in the table that neither
/// blocks it nor waits for it in `sigwait`. Returns how many were sent it, and whether one
/// blocking it was seen.
fn signal_new_threads(me: i32, sig: i32, buf: &mut [u8; 2048]) -> (usize, bool) {
    let (mut sent, mut blocked) = (0, false);
    let mut tids = [0i32; 64];
    let mut dir = TaskDir::open();
    while let Some(n) = dir.next_batch(buf, &mut tids) {
        for &tid in &tids[..n] {
            let count = COUNT.load(Ordering::Relaxed);
            if tid == me
                || count >= MAX_THREADS
                || (0..count).any(|i| TIDS[i].load(Ordering::Relaxed) == tid)
            {
                continue;
            }
            match thread_status(tid, sig, buf) {
                Status::Gone | Status::Waiting => continue,
                Status::Blocking => {
                    blocked = true;
                    continue;
                }
                Status::Runs => {}
            }
            TIDS[count].store(tid, Ordering::Relaxed);
            STATE[count].store(SENT, Ordering::Relaxed);
            // Release: the slot is written before a handler can look for it.
            COUNT.store(count + 1, Ordering::Release);
            if !tgkill(tid, sig) {
                STATE[count].store(GONE, Ordering::Relaxed);
            }
            sent += 1;
        }
    }
    dir.close();
    (sent, blocked)
}

/// Waits until every signalled thread has answered or will not, or the stop's time is up.
fn await_answers(start: u32, sig: i32, buf: &mut [u8; 2048]) {
    loop {
        let seen = ANSWERS.load(Ordering::Acquire);
        let count = COUNT.load(Ordering::Relaxed);
        if (0..count).all(|i| STATE[i].load(Ordering::Acquire) != SENT) {
            return;
        }
        let used = elapsed(start);
        if used >= STOP_LIMIT_MS {
            return;
        }
        let slice = (STOP_LIMIT_MS - used).min(5);
        if !super::sync::futex_wait_ms(&ANSWERS, seen, false, slice) {
            // A quiet slice: a thread that has exited since it was sent the signal, or that
            // blocks it now or waits for it in `sigwait` (it took the signal there, or
            // blocked it just before it came) will not answer.
            for i in 0..count {
                let tid = TIDS[i].load(Ordering::Relaxed);
                if STATE[i].load(Ordering::Acquire) == SENT
                    && (!tgkill(tid, 0) || !matches!(thread_status(tid, sig, buf), Status::Runs))
                {
                    STATE[i].store(GONE, Ordering::Relaxed);
                }
            }
        }
    }
}

/// What `/proc/self/task/TID/status` says of a thread, for a stop with signal `sig`.
enum Status {
    /// Gone, or a zombie (a main thread that called `pthread_exit` stays listed).
    Gone,
    /// It blocks `sig`.
    Blocking,
    /// It waits for `sig` in `sigwait`.
    Waiting,
    Runs,
}

fn thread_status(tid: i32, sig: i32, buf: &mut [u8; 2048]) -> Status {
    let mut path = [0u8; 64];
    let Some(path) =
        super::file::path_with_number(&mut path, b"/proc/self/task/", tid as u64, b"/status\0")
    else {
        return Status::Runs;
    };
    let Some(n) = read_raw(path, buf) else {
        return Status::Gone;
    };
    let text = &buf[..n];
    if let Some(st) = field(text, b"\nState:\t") {
        if matches!(st.first(), Some(b'Z' | b'X')) {
            return Status::Gone;
        }
    }
    if let Some(mask) = field(text, b"\nSigBlk:\t").map(hex) {
        if (1..=64).contains(&sig) && mask & (1u64 << (sig - 1)) != 0 {
            return Status::Blocking;
        }
    }
    // A thread in `sigwait` (`rt_sigtimedwait`) has the signals it waits for unblocked while
    // it waits (the kernel's `real_blocked`, which `/proc` does not show): the set it waits
    // for is read from its system call's first argument.
    if waits_for(tid, sig, buf) {
        return Status::Waiting;
    }
    Status::Runs
}

/// A hexadecimal number at the start of `text` (up to 16 digits).
fn hex(text: &[u8]) -> u64 {
    text.iter()
        .take(16)
        .map_while(|&c| (c as char).to_digit(16))
        .fold(0u64, |v, d| (v << 4) | d as u64)
}

/// Whether thread `tid` is blocked in `rt_sigtimedwait` for a set that holds `sig`
/// (`/proc/self/task/TID/syscall`: the call's number, then its arguments in hexadecimal).
fn waits_for(tid: i32, sig: i32, buf: &mut [u8; 2048]) -> bool {
    let mut path = [0u8; 64];
    let Some(path) =
        super::file::path_with_number(&mut path, b"/proc/self/task/", tid as u64, b"/syscall\0")
    else {
        return false;
    };
    let Some(n) = read_raw(path, buf) else {
        return false;
    };
    let mut words = buf[..n].split(|&c| c == b' ');
    let number = words.next().unwrap_or(b"");
    if number != decimal_of(libc::SYS_rt_sigtimedwait as u64, &mut [0; 20]) {
        return false;
    }
    let Some(set) = words.next().and_then(|w| w.strip_prefix(b"0x")).map(hex) else {
        return false;
    };
    // The set lies in this process, but the thread may have left the call and freed it:
    // read with `process_vm_readv`, which fails rather than faults.
    let mut mask = 0u64;
    let local = libc::iovec {
        iov_base: (&raw mut mask).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: set as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` is our 8-byte word; the kernel checks `remote` and fails with EFAULT
    // where it is not mapped.
    let got = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if got != 8 {
        // EFAULT: the set is gone, so the thread has left the call. Anything else (EPERM
        // or ENOSYS from a seccomp filter: nspawn without CAP_SYS_PTRACE, sandboxes) says
        // nothing of the set: the thread is taken to wait for the signal, as it may, rather
        // than handed one it never asked for.
        return got < 0 && errno() != libc::EFAULT;
    }
    (1..=64).contains(&sig) && mask & (1u64 << (sig - 1)) != 0
}

fn decimal_of(v: u64, tmp: &mut [u8; 20]) -> &[u8] {
    crate::diag::decimal(v, tmp)
}

/// The text after `key` in `text`.
fn field<'t>(text: &'t [u8], key: &[u8]) -> Option<&'t [u8]> {
    let at = text.windows(key.len()).position(|w| w == key)?;
    Some(&text[at + key.len()..])
}

/// Opens `path` (NUL-terminated) read-only with a raw `openat` (not a cancellation point).
fn open_raw(path: &[u8], flags: i32) -> i32 {
    // SAFETY: `path` is NUL-terminated (callers build it so).
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | flags,
        ) as i32
    }
}

/// Reads the start of the small file `path` into `buf` with raw system calls.
fn read_raw(path: &[u8], buf: &mut [u8]) -> Option<usize> {
    let fd = open_raw(path, 0);
    if fd < 0 {
        return None;
    }
    // SAFETY: `buf` is writable for its length; `fd` is ours and closed right after.
    let n = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
    super::file::close_nocancel(fd);
    (n > 0).then_some(n as usize)
}

/// `/proc/self/task`, read with `getdents64`.
struct TaskDir {
    fd: i32,
}

impl TaskDir {
    fn open() -> Self {
        Self {
            fd: open_raw(b"/proc/self/task\0", libc::O_DIRECTORY),
        }
    }

    /// The next thread ids into `tids`, how many (`.` and `..` are skipped); `None` at the
    /// end. The kernel returns no more entries than fit in the slice of `buf` it is given,
    /// and no more than `tids` holds fit in that slice.
    fn next_batch(&mut self, buf: &mut [u8; 2048], tids: &mut [i32; 64]) -> Option<usize> {
        if self.fd < 0 {
            return None;
        }
        // An entry is at least 24 bytes (8 + 8 + 2 + 1, a name and its NUL, aligned to 8):
        // 64 entries fit in 64 * 24 bytes.
        let len = 64 * 24;
        // SAFETY: `buf` is writable for `len` bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, self.fd, buf.as_mut_ptr(), len) };
        if n <= 0 {
            return None;
        }
        let (mut off, mut got) = (0usize, 0usize);
        while off + 19 <= n as usize && got < tids.len() {
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let name = &buf[off + 19..(off + reclen).min(n as usize)];
            let digits = name.iter().take_while(|c| c.is_ascii_digit());
            let tid = digits.fold(0i64, |v, &c| v * 10 + (c - b'0') as i64);
            if tid > 0 && tid <= i32::MAX as i64 {
                tids[got] = tid as i32;
                got += 1;
            }
            off += reclen;
        }
        Some(got)
    }

    fn close(self) {
        if self.fd >= 0 {
            super::file::close_nocancel(self.fd);
        }
    }
}

/// Lets the threads [`stop_others`] stopped go, waits (at most [`STOP_LIMIT_MS`]) until each
/// has left the handler, and restores the signal's action, discarding the signal where it is
/// still pending.
///
/// pre: after a [`stop_others`] that returned true, on the same thread.
pub fn resume_others() {
    HOLD.store(0, Ordering::SeqCst);
    super::sync::futex_wake_all(&HOLD, false);
    let start = super::time::now_ms();
    loop {
        let inside = INSIDE.load(Ordering::SeqCst);
        if inside == 0 || elapsed(start) >= STOP_LIMIT_MS {
            break;
        }
        super::sync::futex_wait_ms(&INSIDE, inside, false, 5);
    }
    // SAFETY: one thread at a time (precondition).
    restore(unsafe { &scratch().old });
}

fn restore(old: &libc::sigaction) {
    let sig = SIGNAL.swap(0, Ordering::Relaxed);
    if sig == 0 {
        return;
    }
    // SAFETY: plain data; SIG_IGN discards the signal where it is pending, then the old action
    // is put back.
    unsafe {
        let mut ign: libc::sigaction = core::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(sig, &ign, core::ptr::null_mut());
        libc::sigaction(sig, old, core::ptr::null_mut());
    }
}

/// In a fork child of a process that was stopping its threads: the child's one thread
/// forgets the stop and restores the signal's action (the child inherits the handler).
///
/// pre: the child of `fork`, after a [`stop_others`] in the parent that returned true.
pub fn forget_in_child() {
    HOLD.store(0, Ordering::Relaxed);
    INSIDE.store(0, Ordering::Relaxed);
    COUNT.store(0, Ordering::Relaxed);
    // SAFETY: the child has this one thread.
    restore(unsafe { &scratch().old });
}
