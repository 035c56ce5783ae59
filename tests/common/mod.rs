//! Helpers shared by the integration tests.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

/// Waits for the child `pid` for at most `limit` and returns its wait status. A child still
/// running at the deadline is killed and the calling test fails, so a hang cannot stall CI.
pub fn wait_limited(pid: libc::pid_t, limit: Duration, what: &str) -> libc::c_int {
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is writable.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert_eq!(r, 0, "waitpid failed");
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, still running.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("{what} hung (killed after {limit:?})");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A xorshift generator: reproducible workloads without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The block size a small request of `size` bytes aligned to `align` gets: the smallest
/// class of at least `size` bytes whose blocks (at multiples of its size from a page) are
/// aligned to `align`; `None` above the small sizes. An oracle by search, independent of the
/// heap's class table.
pub fn class_bytes(size: usize, align: usize) -> Option<usize> {
    (0..coreheap::NUM_CLASSES)
        .map(coreheap::class_size)
        .find(|&cs| cs >= size && cs.is_multiple_of(align.min(coreheap::PAGE)))
}

/// Frees 32 MiB of large blocks (written first), waits `wait_ms`, takes 64 more slow-path
/// operations (the arenas' decay clock ticks on them), and returns the dirty bytes the
/// heap keeps then: how much of what was freed it still holds.
pub fn dirty_after_freeing_32_mib(wait_ms: u64) -> usize {
    // Page runs of their own, above the largest size class (whose blocks the CPU caches
    // would serve without the slow path).
    let layout = std::alloc::Layout::from_size_align(512 << 10, 8).unwrap();
    // SAFETY: non-zero size; each block freed once.
    let blocks: Vec<usize> = (0..64)
        .map(|_| unsafe { std::alloc::alloc(layout) } as usize)
        .collect();
    for &b in &blocks {
        // SAFETY: each block written once, then freed once with its layout.
        unsafe {
            std::ptr::write_bytes(b as *mut u8, 1, layout.size());
            std::alloc::dealloc(b as *mut u8, layout);
        }
    }
    std::thread::sleep(Duration::from_millis(wait_ms));
    for _ in 0..64 {
        // SAFETY: as above.
        unsafe { std::alloc::dealloc(std::alloc::alloc(layout), layout) };
    }
    coreheap::stats().arenas.iter().map(|a| a.dirty_bytes).sum()
}

/// A command that runs this test binary again, in an environment without `COREHEAP_*`
/// variables (the caller adds the ones its case needs).
pub fn rerun_self() -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("COREHEAP_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The `main` of a `harness = false` test: runs each `(name, test)` whose name contains an
/// argument of the command line (every one without such an argument), printing libtest's
/// line for each that passes.
pub fn run_tests(tests: &[(&str, fn())]) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, f) in tests {
        if filter.is_empty() || filter.iter().any(|p| name.contains(p.as_str())) {
            f();
            println!("test {name} ... ok");
        }
    }
}
