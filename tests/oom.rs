//! Running out of memory: with the address space limited (RLIMIT_AS), allocations return
//! null instead of aborting, and succeed again once memory is freed.
//!
//! The limit is set in a forked child so the test process keeps its own address space.

mod common;

use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
use std::time::Duration;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

const MIB: usize = 1 << 20;
/// Address space the child may use beyond what it has when it sets the limit.
const HEADROOM: usize = 256 * MIB;

fn say(msg: &str) {
    // SAFETY: `msg` is a valid readable buffer; write(2) does not allocate.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Bytes of address space in use (`/proc/self/statm`, first field).
fn vm_size() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("read statm");
    let pages: usize = s.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// Limits the process's address space (`RLIMIT_AS`) to what it maps now plus `headroom`.
fn limit_address_space(headroom: usize) -> Result<(), &'static str> {
    let limit = vm_size() + headroom;
    let rl = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: `rl` is a valid rlimit; lowering a limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) } != 0 {
        return Err("setrlimit failed");
    }
    Ok(())
}

fn fill(p: *mut u8, len: usize, v: u8) {
    // SAFETY: the caller passes a live block of at least `len` bytes.
    unsafe { p.write_bytes(v, len) };
}

fn holds(p: *const u8, len: usize, v: u8) -> bool {
    // SAFETY: the caller passes a live block of at least `len` bytes.
    unsafe { std::slice::from_raw_parts(p, len) }
        .iter()
        .step_by(509)
        .all(|&b| b == v)
}

/// The child's work. Returns an error instead of panicking (a panic would unwind into the
/// test harness's copy in the child), and never grows a collection once the limit is set.
fn child() -> Result<(), &'static str> {
    let large = Layout::from_size_align(MIB, 8).unwrap();
    let huge = Layout::from_size_align(64 * MIB, 8).unwrap();
    let small = Layout::from_size_align(4096, 8).unwrap();
    let mut larges: Vec<*mut u8> = Vec::with_capacity(4096);
    let mut huges: Vec<*mut u8> = Vec::with_capacity(256);
    let mut smalls: Vec<*mut u8> = Vec::with_capacity(256 * 1024);

    limit_address_space(HEADROOM)?;

    // Mixed 64 MiB (mapped directly) and 1 MiB (page heap) requests until both fail.
    let mut huge_nulls = 0;
    let mut large_nulls = 0;
    loop {
        if larges.len() == larges.capacity() || huges.len() == huges.capacity() {
            return Err("never ran out of memory");
        }
        // SAFETY: non-zero sizes.
        let h = unsafe { alloc(huge) };
        if h.is_null() {
            huge_nulls += 1;
        } else {
            fill(h, 4096, 0x11); // the first page only: RSS is not the point here
            huges.push(h);
        }
        // SAFETY: as above.
        let l = unsafe { alloc(large) };
        if l.is_null() {
            large_nulls += 1;
        } else {
            fill(l, MIB, 0x22);
            larges.push(l);
        }
        if h.is_null() && l.is_null() {
            break;
        }
    }
    if huges.is_empty() || larges.is_empty() {
        return Err("nothing could be allocated under the limit");
    }
    let got = huges.len() * 64 * MIB + larges.len() * MIB;
    if got < HEADROOM / 2 {
        return Err("far less than the headroom could be allocated");
    }
    // Small blocks fill what is left in the chunks, then fail too.
    loop {
        if smalls.len() == smalls.capacity() {
            return Err("small allocations never failed");
        }
        // SAFETY: non-zero size.
        let s = unsafe { alloc(small) };
        if s.is_null() {
            break;
        }
        fill(s, 64, 0x33);
        smalls.push(s);
    }
    // Still out of memory, every way of asking. (`black_box`: the compiler may remove an
    // allocation whose block nobody uses, and take it to have succeeded.)
    let got = |p: *mut u8| !std::hint::black_box(p).is_null();
    // SAFETY: non-zero sizes.
    unsafe {
        if got(alloc(huge)) || got(alloc(large)) || got(alloc(small)) {
            return Err("an allocation succeeded right after failing");
        }
        if got(alloc_zeroed(huge)) || got(alloc_zeroed(large)) {
            return Err("a zeroed allocation succeeded right after failing");
        }
    }
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve(64 * MIB).is_ok() {
        return Err("try_reserve succeeded at the limit");
    }
    // A failed realloc returns null and leaves the block as it was.
    let l = larges[0];
    // SAFETY: `l` is a live block of layout `large`; the new size is non-zero.
    if !unsafe { realloc(l, large, 64 * MIB) }.is_null() {
        return Err("realloc succeeded at the limit");
    }
    if !holds(l, MIB, 0x22) {
        return Err("a failed realloc damaged the block");
    }
    let h = huges[0];
    // SAFETY: `h` is a live block of layout `huge`; the new size is non-zero.
    if !unsafe { realloc(h, huge, 512 * MIB) }.is_null() {
        return Err("huge realloc succeeded at the limit");
    }
    if !holds(h, 4096, 0x11) {
        return Err("a failed huge realloc damaged the block");
    }
    coreheap::check_heap()?;

    // Free every huge block, half of the large ones and all the small ones: allocation works
    // again.
    for p in huges.drain(..) {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(p, huge) };
    }
    let keep = larges.len() / 2;
    for p in larges.drain(keep..) {
        if !holds(p, MIB, 0x22) {
            return Err("a large block was damaged");
        }
        // SAFETY: as above.
        unsafe { dealloc(p, large) };
    }
    for p in smalls.drain(..) {
        if !holds(p, 64, 0x33) {
            return Err("a small block was damaged");
        }
        // SAFETY: as above.
        unsafe { dealloc(p, small) };
    }
    // SAFETY: non-zero sizes.
    unsafe {
        // (`black_box`, as above: without it the compiler may remove `h`, `l` and `s`,
        // which are only written or compared with null, and take them to have succeeded.)
        let h = std::hint::black_box(alloc(huge));
        let l = std::hint::black_box(alloc(large));
        let s = std::hint::black_box(alloc(small));
        let z = alloc_zeroed(large);
        if h.is_null() || l.is_null() || s.is_null() || z.is_null() {
            return Err("allocation still fails after freeing");
        }
        if !holds(z, MIB, 0) {
            return Err("alloc_zeroed returned dirty memory");
        }
        fill(h, 64 * MIB, 0x44);
        fill(l, MIB, 0x55);
        dealloc(h, huge);
        dealloc(l, large);
        dealloc(s, small);
        dealloc(z, large);
    }
    if v.try_reserve(32 * MIB).is_err() {
        return Err("try_reserve fails after freeing");
    }
    drop(v);
    for p in larges.drain(..) {
        if !holds(p, MIB, 0x22) {
            return Err("a large block was damaged");
        }
        // SAFETY: as above.
        unsafe { dealloc(p, large) };
    }
    coreheap::check_heap()?;
    if huge_nulls == 0 || large_nulls == 0 {
        return Err("some kind of request never failed");
    }
    Ok(())
}

/// Forks a child that runs `work` under an alarm of `alarm_s` seconds and `_exit`s: 0 when
/// it returns Ok, 1 (after writing `name` and the error) when it returns an error, 2 when it
/// panics. Returns the child's pid.
fn fork_child(work: fn() -> Result<(), &'static str>, name: &str, alarm_s: u32) -> libc::pid_t {
    // SAFETY: the child runs `work` and ends in `_exit`; it touches no lock another thread
    // of the harness could hold (its collections are allocated before any limit is set).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm has no preconditions; a hang kills the child.
        unsafe { libc::alarm(alarm_s) };
        let code = match std::panic::catch_unwind(work) {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                say(name);
                say(e);
                say("\n");
                1
            }
            Err(_) => 2,
        };
        // SAFETY: ends the child at once, without the harness's exit path.
        unsafe { libc::_exit(code) };
    }
    pid
}

#[test]
fn allocation_fails_cleanly_and_recovers() {
    // SAFETY: alarm has no preconditions; a hang kills the process instead of the CI job.
    unsafe { libc::alarm(120) };
    let pid = fork_child(child, "oom child: ", 60);
    let status = common::wait_limited(pid, Duration::from_secs(90), "the out-of-memory child");
    assert!(
        !libc::WIFSIGNALED(status),
        "the out-of-memory child died of signal {} (an abort means a failed allocation was \
         not reported as null)",
        libc::WTERMSIG(status)
    );
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the out-of-memory child failed"
    );
}

/// Address space the tight-limit child may use beyond what it has when it sets the limit:
/// room for one chunk mapped exactly (4 MiB) and a little more, but not for a chunk mapped
/// with room to align it (8 MiB).
const TIGHT_HEADROOM: usize = 6 * MIB;

/// The phase the tight-limit child is in; each pinned thread waits for its own.
static PHASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn wait_phase(p: usize) {
    while PHASE.load(std::sync::atomic::Ordering::Acquire) != p {
        std::thread::yield_now();
    }
}

fn next_phase(p: usize) {
    PHASE.store(p, std::sync::atomic::Ordering::Release);
}

/// 64 KiB blocks until one fails; returns how many (at most `v`'s capacity).
fn fill_64k(v: &mut Vec<*mut u8>) -> usize {
    let l = Layout::from_size_align(64 * 1024, 8).unwrap();
    while v.len() < v.capacity() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(l) };
        if p.is_null() {
            break;
        }
        fill(p, 64 * 1024, 0x66);
        v.push(p);
    }
    v.len()
}

fn free_64k(v: &mut Vec<*mut u8>) -> bool {
    let l = Layout::from_size_align(64 * 1024, 8).unwrap();
    let mut ok = true;
    for p in v.drain(..) {
        ok &= holds(p, 64 * 1024, 0x66);
        // SAFETY: allocated by `fill_64k` with this layout.
        unsafe { dealloc(p, l) };
    }
    ok
}

/// The tight-limit child (see `tight_limit_fill_free_refill_across_cpus`).
fn tight_child() -> Result<(), &'static str> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static FIRST: AtomicUsize = AtomicUsize::new(0);
    static AGAIN: AtomicUsize = AtomicUsize::new(0);
    static FAILED: AtomicUsize = AtomicUsize::new(0);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pin = move |k: usize| {
        if cores.len() >= 2 {
            core_affinity::set_for_current(cores[k]);
        }
    };
    let pin1 = pin.clone();
    // Thread 0 (CPU 0) fills the address space with 64 KiB blocks, frees them, and later
    // fills it again; thread 1 (CPU 1) meanwhile allocates 1,100 blocks of 1,000 bytes,
    // which its own arena cannot map a chunk for: another arena must serve them.
    let t0 = std::thread::spawn(move || {
        pin(0);
        let mut v: Vec<*mut u8> = Vec::with_capacity(4096);
        next_phase(1);
        wait_phase(3);
        FIRST.store(fill_64k(&mut v), Ordering::Relaxed);
        if !free_64k(&mut v) {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        next_phase(4);
        wait_phase(5);
        AGAIN.store(fill_64k(&mut v), Ordering::Relaxed);
        if !free_64k(&mut v) {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        next_phase(6);
    });
    wait_phase(1);
    let t1 = std::thread::spawn(move || {
        pin1(1);
        let l = Layout::from_size_align(1000, 8).unwrap();
        let mut v: Vec<*mut u8> = Vec::with_capacity(1100);
        next_phase(2);
        wait_phase(4);
        while v.len() < v.capacity() {
            // SAFETY: non-zero size.
            let p = unsafe { alloc(l) };
            if p.is_null() {
                FAILED.fetch_add(1, Ordering::Relaxed);
                break;
            }
            fill(p, 1000, 0x77);
            v.push(p);
        }
        for p in v.drain(..) {
            if !holds(p, 1000, 0x77) {
                FAILED.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: allocated just above with this layout.
            unsafe { dealloc(p, l) };
        }
        next_phase(5);
    });
    wait_phase(2);
    let huge = Layout::from_size_align(3 * MIB, 8).unwrap();
    let small = Layout::from_size_align(4104, 8).unwrap();
    let mut huges: Vec<*mut u8> = Vec::with_capacity(16);

    limit_address_space(TIGHT_HEADROOM)?;
    // A 4,104-byte block, and 3 MiB blocks (a span each) until the limit: the first must
    // succeed (its span fits, exactly mapped), the limit must then be reached; after freeing,
    // as many again.
    let mut counts = [0; 2];
    for count in &mut counts {
        // SAFETY: non-zero size.
        let s = unsafe { alloc(small) };
        if s.is_null() {
            return Err("a 4,104-byte block failed under the limit");
        }
        fill(s, 4104, 0x12);
        while huges.len() < huges.capacity() {
            // SAFETY: non-zero size.
            let h = unsafe { alloc(huge) };
            if h.is_null() {
                break;
            }
            fill(h, 3 * MIB, 0x13);
            huges.push(h);
        }
        *count = huges.len();
        for h in huges.drain(..) {
            if !holds(h, 3 * MIB, 0x13) {
                return Err("a 3 MiB block was damaged");
            }
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(h, huge) };
        }
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(s, small) };
    }
    if counts[0] == 0 {
        return Err("no 3 MiB block under a limit 6 MiB above the process's size");
    }
    if counts[0] == huges.capacity() {
        return Err("the limit was never reached");
    }
    if counts[1] < counts[0] {
        return Err("fewer 3 MiB blocks after freeing");
    }
    next_phase(3);
    t0.join().map_err(|_| "thread 0 panicked")?;
    t1.join().map_err(|_| "thread 1 panicked")?;
    if FAILED.load(Ordering::Relaxed) != 0 {
        return Err(
            "an allocation on CPU 1 failed while CPU 0's arena had memory, or a block was damaged",
        );
    }
    let (first, again) = (FIRST.load(Ordering::Relaxed), AGAIN.load(Ordering::Relaxed));
    if first * 64 * 1024 < 3 * MIB {
        return Err("less than 3 MiB of 64 KiB blocks under a 6 MiB headroom");
    }
    if again * 10 < first * 9 {
        return Err("far fewer 64 KiB blocks after freeing them");
    }
    coreheap::check_heap()
}

/// Near an `RLIMIT_AS` limit (what the process maps + 6 MiB): chunks and spans are mapped
/// without over-reserving, so the process fills the space the limit leaves, frees it and
/// fills it again; a thread pinned to another CPU, whose arena cannot map a chunk, is served
/// by the arena that has memory (issue 17).
#[test]
fn tight_limit_fill_free_refill_across_cpus() {
    let pid = fork_child(tight_child, "tight-limit child: ", 60);
    let status = common::wait_limited(pid, Duration::from_secs(60), "the tight-limit child");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the tight-limit child failed: status {status:#x}"
    );
}
