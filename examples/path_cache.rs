//! A path-name cache that several processes fill at once, in a coreheap shared heap.
//!
//! ```text
//! cargo run --release --example path_cache -- [DIR] [PROCESSES]
//! ```
//!
//! Every process walks `DIR` (default `/usr/include`) and interns each path it meets in one
//! table that lives in the heap: an open-addressing array of offsets ([`ShmPtr`]), each slot
//! filled with one compare-and-swap. Whoever meets a path first stores it; the others find
//! it and store nothing. Offsets, not pointers: the processes map the heap at different
//! addresses. At the end the first process prints what the table holds and the heap's
//! counters, checks the heap and removes it.

use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use coreheap::shm::{SharedHeap, ShmPtr};

/// Slots of the table (a power of two); the walk stops adding when it is 3/4 full.
const SLOTS: usize = 1 << 20;
const HEAP_SIZE: u64 = 512 << 20;

/// The root of the heap.
#[repr(C)]
struct Table {
    /// Paths stored, and paths found already there.
    stored: AtomicU64,
    found: AtomicU64,
    slots: [AtomicU64; SLOTS],
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/usr/include".into()));
    let procs: usize = args
        .next()
        .map(|s| s.parse().expect("PROCESSES"))
        .unwrap_or(4);
    let name = format!(
        "coreheap-path-cache-{}",
        std::env::var("COREHEAP_PATH_CACHE_ID").unwrap_or_else(|_| std::process::id().to_string())
    );
    let path = coreheap::shm::shm_path(&name);

    if std::env::var_os("COREHEAP_PATH_CACHE_ID").is_some() {
        // A worker: open (or, racing the others, create) the heap and walk.
        let heap = open(&path);
        let (stored, found) = walk(&heap, &dir);
        println!(
            "process {}: stored {stored}, found {found}",
            std::process::id()
        );
        return;
    }

    let t = std::time::Instant::now();
    let id = std::process::id().to_string();
    let kids: Vec<_> = (0..procs)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .arg(&dir)
                .env("COREHEAP_PATH_CACHE_ID", &id)
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success(), "a worker failed");
    }
    let elapsed = t.elapsed();
    let path = coreheap::shm::shm_path(&format!("coreheap-path-cache-{id}"));
    let heap = SharedHeap::open(&path).expect("open the cache");
    let table = table(&heap);
    let stored = table.stored.load(Ordering::Relaxed);
    let found = table.found.load(Ordering::Relaxed);
    // Every slot holds a distinct path: count them and their bytes.
    let mut n = 0u64;
    let mut bytes = 0usize;
    for s in table.slots.iter() {
        let off = s.load(Ordering::Acquire);
        if off != 0 {
            n += 1;
            bytes += entry(&heap, ShmPtr::from_offset(off)).len();
        }
    }
    assert_eq!(n, stored, "every stored path has a slot");
    let st = heap.stats();
    println!(
        "{procs} processes interned {n} distinct paths ({bytes} bytes) of {} seen, in {elapsed:.2?}",
        stored + found
    );
    println!(
        "heap: {} arenas, {} bytes in use, {} of {} chunks used, {} frees from other arenas",
        heap.arenas(),
        st.in_use(),
        st.chunks_used,
        st.chunks_total,
        st.arenas.iter().map(|a| a.remote_frees).sum::<u64>()
    );
    heap.check().expect("heap check");
    println!("heap check: ok");
    heap.destroy().expect("remove the heap");
}

fn open(path: &Path) -> SharedHeap {
    SharedHeap::open_or_create(path, HEAP_SIZE, |h| {
        let t = h.alloc_zeroed(Layout::new::<Table>());
        assert!(!t.is_null(), "heap too small for the table");
        h.set_root(h.offset_of(t));
    })
    .expect("open or create the heap")
}

fn table(heap: &SharedHeap) -> &Table {
    // SAFETY: the root is the zeroed `Table` made by init; it is only used atomically.
    unsafe { &*(heap.ptr(heap.root()) as *const Table) }
}

/// An entry: a length word, then the bytes.
fn entry(heap: &SharedHeap, p: ShmPtr) -> &[u8] {
    let q = heap.ptr(p);
    // SAFETY: entries are written whole before their offset is published, never changed.
    unsafe { std::slice::from_raw_parts(q.add(8), (q as *const u64).read() as usize) }
}

/// Interns `s`: true if this call stored it.
fn intern(heap: &SharedHeap, t: &Table, s: &[u8]) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut mine = ShmPtr::NULL;
    let mut i = h as usize & (SLOTS - 1);
    loop {
        let cur = t.slots[i].load(Ordering::Acquire);
        if cur == 0 {
            if mine.is_null() {
                mine = heap.alloc_shm(8 + s.len());
                assert!(!mine.is_null(), "heap full");
                let q = heap.ptr(mine);
                // SAFETY: a fresh block of 8 + len bytes.
                unsafe {
                    (q as *mut u64).write(s.len() as u64);
                    std::ptr::copy_nonoverlapping(s.as_ptr(), q.add(8), s.len());
                }
            }
            match t.slots[i].compare_exchange(0, mine.offset(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(other) => {
                    if entry(heap, ShmPtr::from_offset(other)) == s {
                        // SAFETY: our unpublished block.
                        unsafe { heap.free_shm(mine) };
                        return false;
                    }
                }
            }
        } else if entry(heap, ShmPtr::from_offset(cur)) == s {
            if !mine.is_null() {
                // SAFETY: our unpublished block.
                unsafe { heap.free_shm(mine) };
            }
            return false;
        }
        i = (i + 1) & (SLOTS - 1);
    }
}

fn walk(heap: &SharedHeap, dir: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let t = table(heap);
    let (mut stored, mut found) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if t.stored.load(Ordering::Relaxed) as usize >= SLOTS / 4 * 3 {
                return (stored, found);
            }
            if intern(heap, t, p.as_os_str().as_bytes()) {
                stored += 1;
                t.stored.fetch_add(1, Ordering::Relaxed);
            } else {
                found += 1;
                t.found.fetch_add(1, Ordering::Relaxed);
            }
            if e.file_type().map(|f| f.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    (stored, found)
}
