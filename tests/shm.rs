//! Shared-memory heaps across real processes: this binary runs its own workers
//! (`harness = false`; the workers are this executable started again with a role), so each
//! process maps the heap wherever its own address space puts it.
//!
//! Every wait is bounded: a worker that hangs is killed and the test fails.

mod common;

use std::alloc::Layout;
use std::hash::BuildHasherDefault;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allocator_api2::boxed::Box as ABox;
use allocator_api2::vec::Vec as AVec;
use coreheap::shm::{Fixed, Options, SharedHeap, ShmAlloc, ShmErrorKind, ShmPtr};

use common::Rng;

const ROLE: &str = "COREHEAP_SHM_ROLE";
const HEAP_MB: u64 = 256;

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        let arg = std::env::var("COREHEAP_SHM_ARG").unwrap_or_default();
        let path = PathBuf::from(std::env::var("COREHEAP_SHM_PATH").unwrap());
        match role.as_str() {
            "worker" => worker(&path, arg.parse().unwrap()),
            #[cfg(feature = "test-hooks")]
            "holder" => holder(&path, arg.parse().unwrap()),
            "racer" => racer(&path, &arg),
            "slow-creator" => slow_creator(&path),
            "reader" => collections_reader(&path),
            "huge-looper" => huge_looper(&path),
            _ => panic!("unknown role {role}"),
        }
        return;
    }
    // Heap files are left behind only by a failing run: remove them then too.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        remove_test_files();
        hook(info)
    }));
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        eprintln!("shm: hung for 300 s, failing");
        remove_test_files();
        std::process::exit(1);
    });
    let t = Instant::now();
    processes_share_one_heap();
    a_killed_process_does_not_wedge_the_others();
    kills_inside_huge_allocations_leak_nothing();
    // The lock-holder tests need the `test-hooks` feature, which the crate's own tests turn
    // on (a dev-dependency on itself); a packaged copy of the crate runs without them.
    #[cfg(feature = "test-hooks")]
    {
        a_dead_lock_holder_is_taken_over(0);
        a_dead_lock_holder_is_taken_over(1);
        a_dead_lock_holder_is_taken_over(2);
    }
    #[cfg(not(feature = "test-hooks"))]
    eprintln!("shm: built without the test-hooks feature: dead lock holders not tested");
    open_or_create_runs_init_once();
    a_creator_killed_in_init_is_taken_over();
    init_that_opens_its_own_heap_gets_an_error();
    bad_files_give_errors();
    collections_in_a_fixed_heap();
    fork_child_uses_the_heap();
    offsets_and_root();
    huge_blocks_and_exhaustion();
    realloc_follows_the_front_end_rules();
    eprintln!("shm: all tests passed in {:?}", t.elapsed());
}

fn remove_test_files() {
    let prefix = format!("coreheap-test-{}-", std::process::id());
    for e in std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A fresh path under /dev/shm for one test.
fn test_path(name: &str) -> PathBuf {
    let p = PathBuf::from(format!(
        "/dev/shm/coreheap-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    p
}

fn spawn(role: &str, path: &Path, arg: &str) -> Child {
    spawn_ops(role, path, arg, 40_000)
}

fn spawn_ops(role: &str, path: &Path, arg: &str, ops: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("COREHEAP_SHM_OPS", ops.to_string())
        .env(ROLE, role)
        .env("COREHEAP_SHM_PATH", path)
        .env("COREHEAP_SHM_ARG", arg)
        // A worker reports one line at its end (read by `processes_share_one_heap`).
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// Waits for `c` at most `limit`; kills it and fails on a hang. Returns its exit status.
fn wait(c: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{what} hung (killed after {limit:?})");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The exchange through which workers pass blocks to each other: `SLOTS` words in the heap
/// (the root), each 0 or the offset of a block waiting to be freed by another process.
const SLOTS: usize = 256;

fn slots(heap: &SharedHeap) -> &[AtomicU64] {
    let p = heap.ptr(heap.root());
    assert!(!p.is_null(), "no exchange in the heap");
    // SAFETY: the root is an array of SLOTS words, zeroed at creation, used only atomically.
    unsafe { std::slice::from_raw_parts(p as *const AtomicU64, SLOTS) }
}

/// A heap with the exchange as its root.
fn heap_with_exchange(path: &Path) -> SharedHeap {
    let heap = SharedHeap::create(path, HEAP_MB << 20).expect("create");
    let layout = Layout::array::<AtomicU64>(SLOTS).unwrap();
    let x = heap.alloc_zeroed(layout);
    assert!(!x.is_null());
    heap.set_root(heap.offset_of(x));
    heap
}

/// The bytes of a block that carry the pattern: the 64 after the header and the last 8
/// (writing every byte would keep the workers out of the allocator most of the time, and the
/// kill test wants them killed inside it).
fn patterned(len: usize) -> impl Iterator<Item = usize> {
    (24..len.min(88)).chain(len.saturating_sub(8).max(88)..len)
}

/// A block's contents: [writer id, length, seed] then bytes from the seed.
fn fill(p: *mut u8, len: usize, id: u64, seed: u64) {
    // SAFETY: `p` is a live block of at least `len >= 24` bytes owned by the caller.
    unsafe {
        let w = p as *mut u64;
        w.write(id);
        w.add(1).write(len as u64);
        w.add(2).write(seed);
        let mut r = Rng(seed | 1);
        for i in patterned(len) {
            *p.add(i) = r.next() as u8;
        }
    }
}

/// Checks a block written by [`fill`]; returns the writer's id.
fn verify(p: *const u8, heap: &SharedHeap) -> u64 {
    // SAFETY: `p` is a live block written by `fill` and handed over through the exchange.
    unsafe {
        let w = p as *const u64;
        let (id, len, seed) = (w.read(), w.add(1).read() as usize, w.add(2).read());
        assert!(
            len >= 24 && len <= heap.usable_size(p as *mut u8),
            "bad length {len}"
        );
        let mut r = Rng(seed | 1);
        for i in patterned(len) {
            assert_eq!(*p.add(i), r.next() as u8, "byte {i} of a block from {id}");
        }
        id
    }
}

/// A worker: allocates and frees in the heap; a third of its blocks go through the
/// exchange to be verified and freed by another process. Exits 0 when done, having freed
/// everything it holds.
fn worker(path: &Path, id: u64) {
    let heap = SharedHeap::open(path).expect("worker open");
    let x = slots(&heap);
    let mut rng = Rng(0x9e37_79b9 ^ (id << 32) ^ std::process::id() as u64);
    let mut held: Vec<(*mut u8, usize)> = Vec::new();
    let mut foreign = 0u64;
    let ops: usize = std::env::var("COREHEAP_SHM_OPS").map_or(40_000, |v| v.parse().unwrap());
    for op in 0..ops {
        let r = rng.below(100);
        if r < 42 || held.is_empty() {
            let len = match rng.below(100) {
                0..=79 => 24 + rng.below(488),
                80..=97 => 512 + rng.below(16 << 10),
                _ => (16 << 10) + rng.below(240 << 10),
            };
            let p = heap.alloc(Layout::from_size_align(len, 8).unwrap());
            assert!(!p.is_null(), "heap full at op {op}");
            fill(p, len, id, rng.next());
            if rng.below(3) == 0 {
                // Hand it over: to a free slot, or keep it if the exchange is full.
                let off = heap.offset_of(p).offset();
                let s = &x[rng.below(SLOTS)];
                if s.compare_exchange(0, off, Ordering::Release, Ordering::Relaxed)
                    .is_err()
                {
                    held.push((p, len));
                }
            } else {
                held.push((p, len));
            }
        } else if r < 80 {
            let i = rng.below(held.len());
            let (p, _) = held.swap_remove(i);
            verify(p, &heap);
            // SAFETY: our own live block.
            unsafe { heap.free(p) };
        } else {
            let s = &x[rng.below(SLOTS)];
            let off = s.swap(0, Ordering::Acquire);
            if off != 0 {
                let p = heap.ptr(ShmPtr::from_offset(off));
                if verify(p, &heap) != id {
                    foreign += 1;
                }
                // SAFETY: a live block taken off the exchange: ours alone now.
                unsafe { heap.free(p) };
            }
        }
    }
    for (p, _) in held {
        verify(p, &heap);
        // SAFETY: our own live block.
        unsafe { heap.free(p) };
    }
    println!("worker {id}: {foreign} blocks of other processes freed");
}

/// Empties the exchange (freeing what is left); returns how many blocks it held.
fn drain_exchange(heap: &SharedHeap) -> usize {
    let mut n = 0;
    for s in slots(heap) {
        let off = s.swap(0, Ordering::Acquire);
        if off != 0 {
            let p = heap.ptr(ShmPtr::from_offset(off));
            verify(p, heap);
            // SAFETY: a live block taken off the exchange.
            unsafe { heap.free(p) };
            n += 1;
        }
    }
    n
}

fn processes_share_one_heap() {
    let path = test_path("share");
    let heap = heap_with_exchange(&path);
    let base = heap.stats().in_use();
    let mut kids: Vec<Child> = (0..6)
        .map(|i| spawn("worker", &path, &i.to_string()))
        .collect();
    let mut foreign = 0u64;
    for (i, k) in kids.iter_mut().enumerate() {
        let s = wait(k, Duration::from_secs(120), "worker");
        assert!(s.success(), "worker {i} failed: {s}");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut k.stdout.take().unwrap(), &mut out).unwrap();
        // "worker N: F blocks of other processes freed"
        foreign += out
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap();
    }
    // Every worker verified and freed blocks that others allocated.
    assert!(foreign > 1000, "only {foreign} cross-process frees");
    let left = drain_exchange(&heap);
    heap.check().expect("heap check after six processes");
    let st = heap.stats();
    assert_eq!(
        st.in_use(),
        base,
        "bytes in use after every block was freed"
    );
    let remote: u64 = st.arenas.iter().map(|a| a.remote_frees).sum();
    eprintln!(
        "shm: 6 processes, {} arenas, {foreign} blocks freed by a process that did not \
         allocate them, {left} left in the exchange, {remote} frees through pending stacks, \
         check ok",
        heap.arenas()
    );
    heap.destroy().unwrap();
}

const KILLS: usize = 24;

fn a_killed_process_does_not_wedge_the_others() {
    let path = test_path("kill");
    let heap = heap_with_exchange(&path);
    // Workers that run long enough to be killed in mid-run (a few hundred ms each).
    let start = |id: usize| spawn_ops("worker", &path, &id.to_string(), 400_000);
    let mut kids: Vec<Child> = (0..4).map(start).collect();
    // Kill workers in mid-run, again and again, replacing each: some kills land while the
    // victim holds an arena lock or is half-way through a list update.
    let mut rng = Rng(std::process::id() as u64 | 1);
    for round in 0..KILLS {
        std::thread::sleep(Duration::from_millis(20 + rng.below(80) as u64));
        let victim = rng.below(kids.len());
        let _ = kids[victim].kill();
        let _ = kids[victim].wait();
        kids[victim] = start(100 + round);
    }
    for k in kids.iter_mut() {
        let s = wait(k, Duration::from_secs(120), "worker after kills");
        assert!(s.success(), "a surviving worker failed: {s}");
    }
    drain_exchange(&heap);
    heap.check().expect("heap check after killed processes");
    let st = heap.stats();
    let recovered: u64 = st.arenas.iter().map(|a| a.recoveries).sum();
    let repaired: u64 = st.arenas.iter().map(|a| a.repairs).sum();
    let orphaned: u64 = st.arenas.iter().map(|a| a.orphaned_chunks).sum();
    eprintln!(
        "shm: {KILLS} workers killed, {recovered} arena locks taken over from them \
         ({repaired} arenas repaired, {orphaned} chunks orphaned), check ok"
    );
    heap.destroy().unwrap();
}

/// Allocates and frees one 4 MiB block in a loop until killed.
fn huge_looper(path: &Path) {
    let heap = SharedHeap::open(path).expect("looper open");
    println!("looping");
    loop {
        let p = heap.alloc_raw(4 << 20, 8);
        if !p.is_null() {
            // SAFETY: a live block of 4 MiB.
            unsafe {
                p.write(1);
                heap.free(p);
            }
        }
    }
}

/// A process killed at any instruction of a huge allocation or free (the chunk bits, the
/// header, the file's punch) leaks nothing for good: 20 kills of a process looping on a
/// 4 MiB block, 5-25 ms into its run; the parent then still gets its 4 MiB block and
/// `check()` accounts for every used chunk (issue 17).
fn kills_inside_huge_allocations_leak_nothing() {
    let path = test_path("hugekill");
    let heap = SharedHeap::create(&path, 128 << 20).expect("create");
    let mut rng = Rng(std::process::id() as u64 | 1);
    for _ in 0..20 {
        let mut kid = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, "huge-looper")
            .env("COREHEAP_SHM_PATH", &path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn looper");
        let mut line = String::new();
        BufReader::new(kid.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + rng.below(21) as u64));
        let _ = kid.kill();
        let _ = kid.wait();
    }
    let p = heap.alloc_raw(4 << 20, 8);
    assert!(
        !p.is_null(),
        "no 4 MiB block after the kills: {} chunks used",
        heap.stats().chunks_used
    );
    heap.check()
        .expect("heap check after kills inside huge blocks");
    // SAFETY: allocated just above.
    unsafe { heap.free(p) };
    heap.check().expect("heap check after the free");
    let st = heap.stats();
    assert!(
        st.chunks_used <= 2,
        "{} chunks still used with no huge block live",
        st.chunks_used
    );
    eprintln!("shm: 20 kills inside huge allocations, no chunk leaked, check ok");
    heap.destroy().unwrap();
}

/// Takes arena 0's lock (damaging the arena first if asked) and waits to be killed.
#[cfg(feature = "test-hooks")]
fn holder(path: &Path, damage: u8) {
    let heap = SharedHeap::open(path).unwrap();
    heap.hold_arena_lock_for_test(0, damage);
    println!("holding");
    std::thread::sleep(Duration::from_secs(60));
}

/// `damage`: 0 none, 1 a half-done small allocation (repaired), 2 a half-done page-run
/// update (the arena's chunks are orphaned).
#[cfg(feature = "test-hooks")]
fn a_dead_lock_holder_is_taken_over(damage: u8) {
    let path = test_path("holder");
    let heap = SharedHeap::create_with(
        &path,
        32 << 20,
        &Options {
            arenas: Some(1),
            ..Options::default()
        },
    )
    .unwrap();
    // Blocks allocated before the holder dies.
    let small = heap.alloc(Layout::from_size_align(48, 8).unwrap());
    let large = heap.alloc(Layout::from_size_align(40 << 10, 8).unwrap());
    fill(small, 48, 1, 11);
    fill(large, 40 << 10, 1, 12);
    // A free block on the small run's list, for the holder to damage.
    let spare = heap.alloc(Layout::from_size_align(48, 8).unwrap());
    // SAFETY: our block.
    unsafe { heap.free(spare) };
    let mut h = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "holder")
        .env("COREHEAP_SHM_PATH", &path)
        .env("COREHEAP_SHM_ARG", damage.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(h.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "holding");
    h.kill().unwrap();
    h.wait().unwrap();
    // The only arena's lock belongs to a dead process: this must take it over, not hang.
    let t = Instant::now();
    let p = heap.alloc(Layout::from_size_align(100, 8).unwrap());
    assert!(!p.is_null());
    assert!(t.elapsed() < Duration::from_secs(10));
    let st = heap.stats();
    assert_eq!(st.arenas[0].recoveries, 1);
    let orphaned = damage == 2;
    assert_eq!(st.arenas[0].repairs, !orphaned as u64, "repaired in place");
    assert_eq!(
        st.arenas[0].orphaned_chunks, orphaned as u64,
        "chunks given up"
    );
    // The blocks from before are intact either way, and can be freed.
    verify(small, &heap);
    verify(large, &heap);
    // SAFETY: our blocks.
    unsafe {
        heap.free(small);
        heap.free(large);
        heap.free(p);
    }
    heap.check().unwrap();
    // After a repair every byte is accounted for again (the 48-byte request's block that a
    // half-done allocation took is lost: counted in use); orphaned blocks are not counted
    // at all.
    let lost = if damage == 1 {
        common::class_bytes(48, 8).unwrap()
    } else {
        0
    };
    assert_eq!(heap.stats().in_use(), lost);
    heap.destroy().unwrap();
    eprintln!(
        "shm: a lock held by a killed process was taken over: {}",
        [
            "intact arena, repaired",
            "half-done small allocation, repaired",
            "half-done page update, chunks orphaned"
        ][damage as usize]
    );
}

/// Races to open or create the heap; `init` records itself in a counter file.
fn racer(path: &Path, counter: &str) {
    let heap = SharedHeap::open_or_create(path, 32 << 20, |h| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(counter)
            .unwrap();
        f.write_all(b"x").unwrap();
        let msg = b"made by init";
        let p = h.alloc(Layout::from_size_align(msg.len() + 1, 1).unwrap());
        // SAFETY: a fresh block of msg.len() + 1 bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), p, msg.len());
            *p.add(msg.len()) = 0;
        }
        // Widen the window in which others find the heap not ready yet.
        std::thread::sleep(Duration::from_millis(100));
        h.set_root(h.offset_of(p));
    })
    .expect("open_or_create");
    let p = heap.ptr(heap.root());
    assert!(!p.is_null(), "root not set after open_or_create");
    // SAFETY: the root is a NUL-terminated string written by init before it returned.
    let s = unsafe { std::ffi::CStr::from_ptr(p.cast()) };
    assert_eq!(s.to_bytes(), b"made by init");
}

fn open_or_create_runs_init_once() {
    let path = test_path("race");
    let counter = format!("/tmp/coreheap-test-{}-init-count", std::process::id());
    let _ = std::fs::remove_file(&counter);
    let mut kids: Vec<Child> = (0..8).map(|_| spawn("racer", &path, &counter)).collect();
    for k in kids.iter_mut() {
        let s = wait(k, Duration::from_secs(60), "racer");
        assert!(s.success(), "a racer failed: {s}");
    }
    let runs = std::fs::read(&counter).unwrap();
    assert_eq!(runs.len(), 1, "init ran {} times", runs.len());
    let _ = std::fs::remove_file(&counter);
    let _ = std::fs::remove_file(&path);
    eprintln!("shm: 8 processes raced open_or_create; init ran once, all saw its root");
}

/// Creates the heap with an `init` that never finishes.
fn slow_creator(path: &Path) {
    let _heap = SharedHeap::open_or_create(path, 16 << 20, |_| {
        println!("in init");
        std::thread::sleep(Duration::from_secs(60));
    })
    .unwrap();
}

fn a_creator_killed_in_init_is_taken_over() {
    let path = test_path("slow");
    let mut c = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "slow-creator")
        .env("COREHEAP_SHM_PATH", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "in init");
    c.kill().unwrap();
    c.wait().unwrap();
    // Opening says what happened, at once.
    let e = SharedHeap::open(&path).unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::CreatorDied, "{e}");
    // open_or_create takes over: creates the heap anew and runs its own init.
    let mut ran = false;
    let heap = SharedHeap::open_or_create(&path, 16 << 20, |h| {
        ran = true;
        h.set_root(h.alloc_shm(8));
    })
    .expect("open_or_create after the creator died");
    assert!(ran, "init ran in the process that took over");
    assert!(!heap.root().is_null());
    heap.check().unwrap();
    heap.destroy().unwrap();
    eprintln!("shm: a creator killed in init: open reports it, open_or_create creates anew");
}

fn init_that_opens_its_own_heap_gets_an_error() {
    let path = test_path("reentrant");
    let mut inner = None;
    let heap = SharedHeap::open_or_create(&path, 16 << 20, |_| {
        inner = Some(SharedHeap::open(&path).map(|_| ()));
    })
    .unwrap();
    let e = inner.unwrap().unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::InInit, "{e}");
    heap.destroy().unwrap();
}

fn bad_files_give_errors() {
    // Garbage.
    let path = test_path("garbage");
    let mut r = Rng(7);
    let junk: Vec<u8> = (0..(1 << 20)).map(|_| r.next() as u8).collect();
    std::fs::write(&path, &junk).unwrap();
    assert_eq!(
        SharedHeap::open(&path).unwrap_err().kind,
        ShmErrorKind::NotAHeap
    );
    // Empty.
    std::fs::write(&path, b"").unwrap();
    assert_eq!(
        SharedHeap::open(&path).unwrap_err().kind,
        ShmErrorKind::NotAHeap
    );
    // Shorter than a header.
    std::fs::write(&path, b"coreheap").unwrap();
    assert_eq!(
        SharedHeap::open(&path).unwrap_err().kind,
        ShmErrorKind::Truncated
    );
    std::fs::remove_file(&path).unwrap();
    // A missing file.
    assert_eq!(SharedHeap::open(&path).unwrap_err().kind, ShmErrorKind::Os);
    // create() of an existing heap.
    let heap = SharedHeap::create(&path, 16 << 20).unwrap();
    let e = SharedHeap::create(&path, 16 << 20).unwrap_err();
    assert_eq!((e.kind, e.code), (ShmErrorKind::Os, libc::EEXIST as u64));
    drop(heap);
    // Truncated after creation.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8 << 20).unwrap();
    let e = SharedHeap::open(&path).unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::Truncated, "{e}");
    // Another version: the word after the magic.
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &99u32.to_le_bytes(), 8).unwrap();
    let e = SharedHeap::open(&path).unwrap_err();
    assert_eq!((e.kind, e.code), (ShmErrorKind::Version, 99), "{e}");
    assert!(e.to_string().contains("version 99"), "{e}");
    std::fs::remove_file(&path).unwrap();
    // Too small to hold anything.
    let e = SharedHeap::create(&path, 4 << 20).unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::BadSize);
    assert!(!path.exists(), "a failed create leaves no file behind");
    // New files are private to their owner.
    let heap = SharedHeap::create(&path, 16 << 20).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    heap.destroy().unwrap();
    // A fixed address that is taken: the heap's own, still mapped here.
    let fixed = SharedHeap::create_with(
        &path,
        16 << 20,
        &Options {
            fixed: Fixed::Anywhere,
            ..Options::default()
        },
    )
    .unwrap();
    let e = SharedHeap::open(&path).unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::AddressTaken, "{e}");
    let e = SharedHeap::create_with(
        test_path("fixed2"),
        16 << 20,
        &Options {
            fixed: Fixed::At(fixed.base() as usize),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ShmErrorKind::AddressTaken, "{e}");
    fixed.destroy().unwrap();
    eprintln!("shm: garbage, short, truncated, wrong-version files and taken addresses refused");
}

type Map = hashbrown::HashMap<u64, u64, BuildHasherDefault<std::hash::DefaultHasher>, ShmAlloc>;

/// What the creator puts at the root of the fixed heap.
struct Shared {
    v: AVec<u64, ShmAlloc>,
    m: Map,
}

fn collections_in_a_fixed_heap() {
    let path = test_path("collections");
    let heap = SharedHeap::create_with(
        &path,
        64 << 20,
        &Options {
            fixed: Fixed::Anywhere,
            ..Options::default()
        },
    )
    .unwrap();
    // SAFETY: every process that uses the handle (this one, the reader) has the heap open
    // while it does.
    let a = unsafe { heap.allocator() }.expect("a fixed heap has an allocator handle");
    let mut v = AVec::new_in(a);
    let mut m = Map::with_hasher_in(Default::default(), a);
    for i in 0..10_000u64 {
        v.push(i * 3);
        m.insert(i, i * i);
    }
    let root = ABox::into_raw(ABox::new_in(Shared { v, m }, a));
    heap.set_root(heap.offset_of(root));
    // The heap's address is taken here: the reader is another process.
    let mut r = spawn("reader", &path, "");
    assert!(wait(&mut r, Duration::from_secs(60), "reader").success());
    // The reader grew both through the heap: see its additions.
    // SAFETY: the root is the `Shared` built above; the reader has exited.
    let s = unsafe { &*(heap.ptr(heap.root()) as *const Shared) };
    assert_eq!(s.v.len(), 20_000);
    assert_eq!(s.v[15_000], 15_000 * 7);
    assert_eq!(s.m.get(&123_456), Some(&42));
    // SAFETY: the only owner; built with `a`.
    drop(unsafe { ABox::from_raw_in(root, a) });
    // `&SharedHeap` is an allocator too (for structures this process alone uses).
    let mut local: AVec<u64, &SharedHeap> = AVec::new_in(&heap);
    local.extend(0..1000u64);
    assert!(heap.contains(local.as_ptr().cast()));
    assert_eq!(local.iter().sum::<u64>(), 499_500);
    drop(local);
    heap.check().unwrap();
    heap.destroy().unwrap();
    eprintln!("shm: a Vec and a hash map built by one process, read and grown by another");
}

fn collections_reader(path: &Path) {
    let heap = SharedHeap::open(path).unwrap();
    assert!(heap.is_fixed());
    // SAFETY: the creator stored a `Shared` at the root and waits for us.
    let s = unsafe { &mut *(heap.ptr(heap.root()) as *mut Shared) };
    assert_eq!(s.v.len(), 10_000);
    assert!(s.v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    for i in 0..10_000u64 {
        assert_eq!(s.m.get(&i), Some(&(i * i)));
    }
    for i in 10_000..20_000u64 {
        s.v.push(i * 7);
    }
    s.m.insert(123_456, 42);
}

fn fork_child_uses_the_heap() {
    let path = test_path("fork");
    let heap = SharedHeap::create(&path, 32 << 20).unwrap();
    let p = heap.alloc(Layout::from_size_align(64, 8).unwrap());
    // SAFETY: fork in a process whose other thread (the watchdog) only sleeps; the child
    // uses the heap, then leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut ok = true;
        for i in 0..1000 {
            let q = heap.alloc(Layout::from_size_align(32 + i, 8).unwrap());
            ok &= !q.is_null();
            // SAFETY: our block.
            unsafe { heap.free(q) };
        }
        // The parent's block, freed by the child.
        // SAFETY: the parent does not touch `p` again.
        unsafe { heap.free(p) };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let status = common::wait_limited(pid, Duration::from_secs(30), "fork child");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    assert_eq!(
        heap.stats().in_use(),
        0,
        "the child freed the parent's block"
    );
    heap.check().unwrap();
    heap.destroy().unwrap();
    eprintln!("shm: a fork child used the inherited heap and freed its parent's block");
}

fn offsets_and_root() {
    let path = test_path("root");
    let heap = SharedHeap::create(&path, 16 << 20).unwrap();
    assert!(heap.root().is_null());
    let p = heap.alloc_shm(40);
    assert!(!p.is_null());
    assert_eq!(heap.offset_of(heap.ptr(p)), p);
    assert!(heap.ptr(ShmPtr::NULL).is_null());
    assert!(heap.ptr(ShmPtr::from_offset(1 << 40)).is_null());
    assert!(heap.offset_of(&p as *const ShmPtr).is_null());
    assert_eq!(heap.compare_and_set_root(ShmPtr::NULL, p), Ok(ShmPtr::NULL));
    assert_eq!(heap.compare_and_set_root(ShmPtr::NULL, p), Err(p));
    drop(heap);
    // Reopened (at another address, most likely): the root and the block are still there.
    let heap = SharedHeap::open(&path).unwrap();
    assert_eq!(heap.root(), p);
    assert_eq!(
        heap.usable_size(heap.ptr(p)),
        common::class_bytes(40, 8).unwrap()
    );
    let ro = SharedHeap::open_readonly(&path).unwrap();
    assert_eq!(ro.root(), p);
    assert!(ro.alloc(Layout::from_size_align(8, 8).unwrap()).is_null());
    drop(ro);
    // SAFETY: the block is live and no one else uses it.
    unsafe { heap.free_shm(p) };
    heap.check().unwrap();
    heap.destroy().unwrap();
}

fn huge_blocks_and_exhaustion() {
    let path = test_path("huge");
    let heap = SharedHeap::create(&path, 64 << 20).unwrap();
    // Larger than an arena serves: whole chunks.
    let big = heap.alloc(Layout::from_size_align(10 << 20, 64).unwrap());
    assert!(!big.is_null());
    // SAFETY: a fresh 10 MiB block.
    unsafe { std::ptr::write_bytes(big, 0x5a, 10 << 20) };
    assert!(heap.usable_size(big) >= 10 << 20);
    assert_eq!(heap.stats().huge_blocks, 1);
    // Fill the heap until it says no: a null, never a crash.
    let mut got = Vec::new();
    loop {
        let p = heap.alloc(Layout::from_size_align(1 << 20, 8).unwrap());
        if p.is_null() {
            break;
        }
        got.push(p);
        assert!(got.len() < 64, "a 64 MiB heap gave more than 64 MiB");
    }
    assert!(got.len() >= 30, "only {} MiB before exhaustion", got.len());
    for p in got {
        // SAFETY: our blocks.
        unsafe { heap.free(p) };
    }
    // SAFETY: our block.
    unsafe { heap.free(big) };
    assert_eq!(heap.stats().huge_blocks, 0);
    assert!(!heap
        .alloc(Layout::from_size_align(16 << 20, 8).unwrap())
        .is_null());
    heap.check().unwrap();
    heap.destroy().unwrap();
    eprintln!("shm: huge blocks, and exhaustion gives null");
}

/// The shared heap resizes through the same front end as the process heap: a small block
/// stays in place while its size needs its class, a large block is resized
/// in its page run, a huge block that shrinks by less than three quarters keeps its span;
/// growing past a span moves the contents.
fn realloc_follows_the_front_end_rules() {
    let path = test_path("realloc");
    let heap = SharedHeap::create(&path, 64 << 20).unwrap();
    let fill = |p: *mut u8, n: usize| {
        for i in 0..n {
            // SAFETY: `p` is a live block of at least `n` bytes.
            unsafe { p.add(i).write(i as u8 ^ 0x5a) };
        }
    };
    let same = |p: *const u8, n: usize| {
        // SAFETY: `p` is a live block of at least `n` bytes.
        (0..n).all(|i| unsafe { p.add(i).read() } == i as u8 ^ 0x5a)
    };
    // SAFETY: every pointer passed is a live block of this heap, owned here; each is used
    // only while live.
    unsafe {
        // The class below 64 bytes (48, or 32 with `pow2-classes`).
        let below = (0..coreheap::NUM_CLASSES)
            .map(coreheap::class_size)
            .filter(|&s| s < 64)
            .max()
            .unwrap();
        let p = heap.alloc_raw(64, 16);
        fill(p, 64);
        assert_eq!(
            heap.realloc(p, below + 1),
            p,
            "a small block shrinks in place while it needs its class"
        );
        let q = heap.realloc(p, below);
        assert_ne!(q, p, "a small block that fits a smaller class moves");
        assert!(same(q, below));
        heap.free(q);

        let p = heap.alloc_raw(100 << 10, 16);
        fill(p, 100 << 10);
        assert_eq!(
            heap.realloc(p, 60 << 10),
            p,
            "a large block shrinks in its run"
        );
        assert_eq!(
            heap.realloc(p, 100 << 10),
            p,
            "and grows into the free pages after it"
        );
        assert!(heap.usable_size(p) >= 100 << 10);
        assert!(same(p, 60 << 10));
        heap.free(p);

        let p = heap.alloc_raw(6 << 20, 16);
        fill(p, 6 << 20);
        assert_eq!(heap.realloc(p, 5 << 20), p, "a huge block keeps its span");
        assert!(heap.usable_size(p) >= 5 << 20);
        let q = heap.realloc(p, 9 << 20);
        assert!(!q.is_null());
        assert!(same(q, 5 << 20), "moved with its contents");
        assert_eq!(heap.stats().huge_blocks, 1);
        heap.free(q);
    }
    assert_eq!(heap.stats().huge_blocks, 0);
    assert_eq!(heap.stats().in_use(), 0);
    heap.check().unwrap();
    heap.destroy().unwrap();
    eprintln!("shm: realloc in place by the front end's rules");
}
