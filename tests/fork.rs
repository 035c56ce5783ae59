//! `fork` while other threads allocate: the child must find every arena usable (no lock left
//! held by a thread that does not exist there), its inherited blocks intact, and the heap's
//! invariants true.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

const FORKS: usize = 250;
const WORKERS: usize = 4;
/// How long one child may take before it counts as hung.
const CHILD_LIMIT: Duration = Duration::from_secs(30);

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A block filled with a pattern derived from its id.
struct Blk {
    p: *mut u8,
    layout: Layout,
    id: u64,
}

impl Blk {
    fn new(size: usize, align: usize, id: u64) -> Option<Blk> {
        let layout = Layout::from_size_align(size, align).ok()?;
        // SAFETY: size >= 1.
        let p = unsafe { alloc(layout) };
        if p.is_null() {
            return None;
        }
        let mut b = Blk { p, layout, id };
        b.fill();
        Some(b)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `p` is a live block of `layout.size()` bytes owned by this `Blk`.
        unsafe { std::slice::from_raw_parts(self.p, self.layout.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.p, self.layout.size()) }
    }

    /// The pattern: the id's word at the start of the block and of every page in it (so
    /// every page is touched, cheaply even in debug builds), and a byte at the end.
    fn fill(&mut self) {
        let w = splitmix(self.id);
        let s = self.bytes_mut();
        let last = s.len() - 1;
        for (k, off) in (0..s.len().saturating_sub(8)).step_by(4096).enumerate() {
            s[off..off + 8].copy_from_slice(&(w ^ k as u64).to_ne_bytes());
        }
        s[last] = w as u8 ^ 0x5a;
    }

    fn intact(&self) -> bool {
        let w = splitmix(self.id);
        let s = self.bytes();
        let last = s.len() - 1;
        let words_ok = (0..s.len().saturating_sub(8))
            .step_by(4096)
            .enumerate()
            .all(|(k, off)| s[off..off + 8] == (w ^ k as u64).to_ne_bytes());
        // The words end before the last byte, so nothing overwrites it.
        let last_ok = s[last] == w as u8 ^ 0x5a;
        words_ok && last_ok && (self.p as usize).is_multiple_of(self.layout.align())
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.p, self.layout) };
    }
}

/// A size and alignment from a random word. `heavy` (the parent's threads): 85% small, 13%
/// large, 2% huge. Light (the children, which must be quick): mostly small, 2% large of at
/// most 128 KiB, 0.4% huge.
fn size_for(r: u64, heavy: bool) -> (usize, usize) {
    let (large, huge) = if heavy { (85, 98) } else { (980, 996) };
    let roll = (r % if heavy { 100 } else { 1000 }) as usize;
    let x = (r >> 8) as usize;
    let size = if roll < large {
        1 + x % 2048
    } else if roll < huge {
        8193 + x % if heavy { 512 * 1024 } else { 120 * 1024 }
    } else {
        (2 << 20) + x % (2 << 20)
    };
    let align = match (r >> 40) % 20 {
        0 => 4096,
        1 => 65536,
        2 => 1 << 20,
        _ => 8,
    };
    (size, align)
}

/// Allocates and frees without pause until `stop`.
fn worker(me: u64, stop: &AtomicBool, ops: &AtomicU64) {
    // Run at a lower priority (nice 10, this thread only): the workers still run whenever a
    // core is free, but a forked child gets the CPU when it needs it, which keeps the test
    // short on two cores.
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    let mut live: Vec<Blk> = Vec::with_capacity(300);
    let mut r = me << 56;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        r = splitmix(r);
        let (size, align) = size_for(r, true);
        let b = Blk::new(size, align, r).expect("worker allocation failed");
        if live.len() < 256 {
            live.push(b);
        } else {
            let i = (r >> 20) as usize % live.len();
            let old = std::mem::replace(&mut live[i], b);
            assert!(old.intact(), "worker block corrupted");
        }
        n += 1;
        if n.is_multiple_of(1024) {
            ops.fetch_add(1024, Ordering::Relaxed);
        }
    }
    for b in &live {
        assert!(b.intact(), "worker block corrupted");
    }
}

/// Writes `msg` to stderr without allocating or taking the stderr lock (the child must not
/// depend on locks another thread of the parent may have held).
fn say(msg: &str) {
    // SAFETY: `msg` is a valid readable buffer.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// What a child does. Errors are returned, not panicked: a panic in the child would unwind
/// into the test harness's copy and run it in two processes.
fn child_work(k: usize, inherited: &[Blk]) -> Result<(), &'static str> {
    // Blocks inherited from the parent are intact.
    if !inherited.iter().all(Blk::intact) {
        return Err("an inherited block is corrupted");
    }
    // Allocate in the child, on this thread and on a new one.
    let mut mine = Vec::new();
    for i in 0..100u64 {
        let (size, align) = size_for(splitmix(i + (k as u64) * 1000), false);
        mine.push(Blk::new(size, align, i).ok_or("allocation failed in the child")?);
    }
    mine.push(Blk::new(5 << 20, 1 << 21, 9).ok_or("huge allocation failed in the child")?);
    // A thread of the child's own, ending with a huge block.
    let t = std::thread::spawn(move || {
        let mut v = Vec::new();
        for i in 0..500u64 {
            let (size, align) = size_for(splitmix(i ^ 0xabc ^ ((k as u64) << 32)), false);
            let b = Blk::new(size, align, i).ok_or("allocation failed in the child's thread")?;
            if i % 3 == 0 {
                v.push(b);
            } else if !b.intact() {
                return Err("a block of the child's thread is corrupted");
            }
        }
        v.push(Blk::new(3 << 20, 8, 7).ok_or("huge allocation failed in the child")?);
        if !v.iter().all(Blk::intact) {
            return Err("a block of the child's thread is corrupted");
        }
        Ok(())
    });
    t.join().map_err(|_| "the child's thread panicked")??;
    if !mine.iter().all(Blk::intact) {
        return Err("a block of the child is corrupted");
    }
    drop(mine);
    // The heap is consistent (this takes and releases every arena lock).
    coreheap::check_heap()?;
    // Inherited blocks can be freed in the child (they are the child's copies).
    if !inherited.iter().all(Blk::intact) {
        return Err("an inherited block is corrupted after the child's work");
    }
    Ok(())
}

fn child_main(k: usize, inherited: Vec<Blk>) -> ! {
    // SAFETY: alarm has no preconditions; pending alarms are not inherited across fork.
    unsafe { libc::alarm(60) };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let res = child_work(k, &inherited);
        drop(inherited);
        res.and_then(|()| coreheap::check_heap())
    }));
    let code = match r {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            say("fork child: ");
            say(e);
            say("\n");
            1
        }
        Err(_) => {
            say("fork child: panicked\n");
            2
        }
    };
    // SAFETY: _exit ends the process at once, without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Waits for `pid` for at most `CHILD_LIMIT`; kills it and fails if it does not finish.
fn wait_child(pid: libc::pid_t, k: usize) {
    let status = common::wait_limited(pid, CHILD_LIMIT, &format!("fork child {k}"));
    if libc::WIFSIGNALED(status) {
        panic!("fork child {k} died of signal {}", libc::WTERMSIG(status));
    }
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0, "fork child {k} failed");
}

#[test]
fn fork_while_other_threads_allocate() {
    // SAFETY: alarm has no preconditions; a hang kills the process instead of the CI job.
    unsafe { libc::alarm(300) };
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS as u64)
        .map(|me| {
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || worker(me + 1, &stop, &ops))
        })
        .collect();

    // Blocks the children inherit; some are replaced before each fork.
    let mut inherited: Vec<Blk> = (0..64u64)
        .map(|i| {
            let (size, align) = size_for(splitmix(i + 0xf00), true);
            Blk::new(size, align, i + 0xf00).unwrap()
        })
        .collect();
    let mut id = 1 << 40;
    for k in 0..FORKS {
        for j in 0..4 {
            id += 1;
            let (size, align) = size_for(splitmix(id), true);
            inherited[(k * 4 + j) % 64] = Blk::new(size, align, id).unwrap();
        }
        // SAFETY: the child only runs `child_main`, which ends in `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            child_main(k, std::mem::take(&mut inherited));
        }
        wait_child(pid, k);
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker failed");
    }
    assert!(inherited.iter().all(Blk::intact));
    drop(inherited);
    coreheap::check_heap().unwrap();
    eprintln!(
        "fork: {FORKS} forks in {elapsed:?} while {WORKERS} threads made {}+ allocations",
        ops.load(Ordering::Relaxed)
    );
    assert!(
        ops.load(Ordering::Relaxed) > 0,
        "the workers made no progress"
    );
}

/// Forks in the SIGUSR1 handler below (children `_exit` at once).
static HANDLER_FORKS: AtomicU64 = AtomicU64::new(0);
static HANDLER_FAILS: AtomicU64 = AtomicU64::new(0);
static STOP_SIGNALS: AtomicBool = AtomicBool::new(false);

extern "C" fn fork_in_handler(_sig: libc::c_int) {
    // SAFETY: fork, _exit and waitpid are async-signal-safe; errno is saved and restored.
    unsafe {
        let errno = *libc::__errno_location();
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        let mut st = 0;
        if pid < 0 || libc::waitpid(pid, &mut st, 0) != pid || st != 0 {
            HANDLER_FAILS.fetch_add(1, Ordering::Relaxed);
        }
        HANDLER_FORKS.fetch_add(1, Ordering::Relaxed);
        *libc::__errno_location() = errno;
    }
}

/// The child of `fork_from_a_signal_handler_while_allocating`: a helper thread signals this
/// one every 2 ms while it allocates and frees blocks of up to 70,000 bytes, so that the
/// handler's fork often lands inside an allocation holding its arena's lock.
fn signalled_child() -> ! {
    // SAFETY: a zeroed sigaction with a handler of the right type; sigemptyset fills the mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = fork_in_handler as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    // SAFETY: pthread_self has no preconditions. Sent as a number: musl's pthread_t is a
    // pointer, which a thread cannot take along.
    let me = unsafe { libc::pthread_self() } as usize;
    let signaller = std::thread::spawn(move || {
        while !STOP_SIGNALS.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: `me` is the main thread, which outlives this one (it joins it).
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
        }
    });
    let mut rng = common::Rng(0x2545_f491_4f6c_dd1d);
    let mut slots: [Option<Vec<u8>>; 16] = Default::default();
    let start = Instant::now();
    let mut ok = true;
    while start.elapsed() < Duration::from_secs(2) {
        let i = rng.below(slots.len());
        if let Some(v) = slots[i].take() {
            ok &= v.iter().step_by(97).all(|&b| b == i as u8);
        }
        let n = 1 + rng.below(70_000);
        slots[i] = Some(vec![i as u8; n]);
    }
    STOP_SIGNALS.store(true, Ordering::Relaxed);
    signaller.join().ok();
    let forks = HANDLER_FORKS.load(Ordering::Relaxed);
    ok &= forks > 0 && HANDLER_FAILS.load(Ordering::Relaxed) == 0;
    ok &= coreheap::check_heap().is_ok();
    // SAFETY: _exit ends the child without running the harness's exit code.
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}

/// `fork` from a signal handler that may have interrupted an allocation of the same thread
/// (issue 17): the prepare handler must not wait for the lock its own thread holds.
#[test]
fn fork_from_a_signal_handler_while_allocating() {
    // SAFETY: the child runs `signalled_child` only and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        signalled_child();
    }
    let st = common::wait_limited(pid, Duration::from_secs(60), "fork from a signal handler");
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child failed: status {st:#x}"
    );
}
