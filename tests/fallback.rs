//! `CoreHeap` as a program's global allocator, allocating on some threads and freeing on
//! others, contents checked at every step. Built normally it exercises coreheap's backend;
//! built with `COREHEAP_FORCE_FALLBACK=1` (`.ci/run`) it is the test of the fallback that
//! targets without the backend get (`build.rs`): there the blocks must be the system
//! allocator's, which glibc's `malloc_usable_size` checks.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new().arenas(2).purge_delay_ms(10);

/// The byte at `i` of block `id`.
fn byte(id: usize, i: usize) -> u8 {
    (id.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 9)) as u8
}

/// Sizes from 1 byte to 2.5 MiB: small, large and (every 64th) huge blocks of the backend.
fn size(id: usize) -> usize {
    match id % 64 {
        63 => (2 << 20) + (id * 8191) % (1 << 19),
        n if n % 4 == 3 => 8193 + (id * 4099) % (1 << 18),
        n if n % 4 == 0 => 1 + id % 16,
        _ => 16 + (id * 97) % 8192,
    }
}

fn filled(id: usize) -> Vec<u8> {
    let n = size(id);
    let mut v = Vec::with_capacity(n / 2);
    // Grown by pushes: reallocation keeps the contents.
    for i in 0..n {
        v.push(byte(id, i));
    }
    v
}

fn check(id: usize, v: &[u8]) {
    assert_eq!(v.len(), size(id), "block {id}");
    if let Some(i) = (0..v.len()).find(|&i| v[i] != byte(id, i)) {
        panic!("block {id}: byte {i} is {} not {}", v[i], byte(id, i));
    }
}

/// Four producers hand blocks to two consumers, which check them, keep some a while and
/// free them; zeroed blocks must read zero.
#[test]
fn blocks_cross_threads_with_their_contents() {
    const PER_PRODUCER: usize = 128;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel::<(usize, Vec<u8>)>()).unzip();
    let consumers: Vec<_> = rxs
        .into_iter()
        .map(|rx| {
            thread::spawn(move || {
                let mut kept: Vec<(usize, Vec<u8>)> = Vec::new();
                let mut n = 0;
                for (id, v) in rx {
                    check(id, &v);
                    if id % 4 == 3 {
                        let zeroed = vec![0u8; size(id)];
                        assert!(zeroed.iter().all(|&b| b == 0), "zeroed block {id}");
                    }
                    kept.push((id, v));
                    if kept.len() > 16 {
                        let (id, v) = kept.swap_remove(n % kept.len());
                        check(id, &v);
                    }
                    n += 1;
                    assert!(Instant::now() < deadline, "too slow: a lock may be stuck");
                }
                for (id, v) in &kept {
                    check(*id, v);
                }
                n
            })
        })
        .collect();
    let producers: Vec<_> = (0..4)
        .map(|t| {
            let txs = txs.clone();
            thread::spawn(move || {
                for k in 0..PER_PRODUCER {
                    let id = t * PER_PRODUCER + k;
                    let v = filled(id);
                    check(id, &v);
                    txs[id % 2].send((id, v)).unwrap();
                }
            })
        })
        .collect();
    drop(txs);
    for p in producers {
        p.join().unwrap();
    }
    let received: usize = consumers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(received, 4 * PER_PRODUCER);
}

/// The build says which allocator it has, and the blocks are that allocator's.
#[test]
fn blocks_come_from_the_allocator_the_build_names() {
    assert_eq!(coreheap::BACKEND, cfg!(coreheap_backend));
    // Built with the switch (CI's step), the fallback must be what this test checks.
    let forced = option_env!("COREHEAP_FORCE_FALLBACK") == Some("1");
    assert!(
        !(forced && coreheap::BACKEND),
        "COREHEAP_FORCE_FALLBACK=1 left the backend on"
    );
    let v: Vec<u8> = std::iter::repeat_n(7, 100).collect();
    let aligned = Box::new(Aligned([3; 256]));
    #[cfg(coreheap_backend)]
    {
        assert!(coreheap::owns(v.as_ptr()));
        assert!(coreheap::owns(&*aligned));
    }
    #[cfg(not(coreheap_backend))]
    {
        assert!(!coreheap::fast_path() && !coreheap::rseq_registered());
        coreheap::trim();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        for (p, n) in [(v.as_ptr(), 100), (aligned.0.as_ptr(), 256)] {
            // SAFETY: without the backend the blocks are glibc malloc's, whose size it
            // knows (a block of another allocator would not be).
            let usable = unsafe { libc::malloc_usable_size(p as *mut libc::c_void) };
            assert!(usable >= n, "{usable} < {n}");
        }
    }
    assert_eq!(aligned.as_ref() as *const Aligned as usize % 4096, 0);
    assert!(v.iter().all(|&b| b == 7) && aligned.0.iter().all(|&b| b == 3));
}

#[repr(align(4096))]
struct Aligned([u8; 256]);
