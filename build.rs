//! Decides, per target, what this build of coreheap contains (README "Targets"):
//!
//! - `coreheap_backend`: the allocator itself, on Linux for x86_64 and aarch64 (glibc or
//!   musl). Anywhere else `CoreHeap` forwards to `std::alloc::System` and the rest of the
//!   API is left out (`src/lib.rs`). `COREHEAP_FORCE_FALLBACK=1` in the build's environment
//!   builds the fallback on Linux too, so that CI can build and test it (`.ci/run`).
//! - `coreheap_rseq`: the rseq critical sections of the per-CPU caches (x86_64 assembly,
//!   glibc's rseq area), on x86_64 Linux with glibc. Without it the locked path does
//!   everything, chosen at compile time. `COREHEAP_FORCE_LOCKED=1` builds without them on
//!   x86_64 too: the build other architectures get, checked in CI.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(coreheap_backend)");
    println!("cargo::rustc-check-cfg=cfg(coreheap_rseq)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=COREHEAP_FORCE_FALLBACK");
    println!("cargo::rerun-if-env-changed=COREHEAP_FORCE_LOCKED");
    let target = |key: &str| env::var(key).unwrap_or_default();
    let forced = |key: &str| env::var(key).is_ok_and(|v| v == "1");
    let (os, arch, libc) = (
        target("CARGO_CFG_TARGET_OS"),
        target("CARGO_CFG_TARGET_ARCH"),
        target("CARGO_CFG_TARGET_ENV"),
    );
    let backend = os == "linux"
        && matches!(arch.as_str(), "x86_64" | "aarch64")
        && !forced("COREHEAP_FORCE_FALLBACK");
    if backend {
        println!("cargo::rustc-cfg=coreheap_backend");
    }
    if backend && arch == "x86_64" && libc == "gnu" && !forced("COREHEAP_FORCE_LOCKED") {
        println!("cargo::rustc-cfg=coreheap_rseq");
    }
}
