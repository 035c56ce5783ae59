//! The preload library: `LD_PRELOAD=libcoreheap_preload.so PROGRAM` runs any program on
//! coreheap. Each export is a one-line forward to `coreheap::c_api`, where the C rules live
//! and are tested; nothing here may unwind (the workspace builds with `panic = "abort"`).
//!
//! Linux only, on the targets where coreheap has its backend (x86_64 and aarch64; the
//! README's "Targets"): elsewhere the build stops with the message below. The library is
//! also not built from a coreheap forced to its fallback (`COREHEAP_FORCE_FALLBACK=1`),
//! which has no `c_api`.

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
compile_error!(
    "coreheap-preload is an LD_PRELOAD library for Linux on x86_64 and aarch64; elsewhere a \
     Rust program can use coreheap::CoreHeap, which forwards to the system allocator there"
);

use core::ffi::{c_int, c_void};

use coreheap::c_api;

/// Runs when the library is loaded: see `c_api::init`.
extern "C" fn on_load() {
    c_api::init();
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

/// # Safety
/// C's `malloc`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    c_api::malloc(size)
}

/// # Safety
/// C's `free`: `p` is null or a block of this allocator.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: the C caller's contract.
    unsafe { c_api::free(p) }
}

/// # Safety
/// C's `calloc`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    c_api::calloc(n, size)
}

/// # Safety
/// C's `realloc`.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { c_api::realloc(p, size) }
}

/// # Safety
/// C's `reallocarray`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { c_api::reallocarray(p, n, size) }
}

/// # Safety
/// C's `posix_memalign`: `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // SAFETY: the C caller's contract.
    unsafe { c_api::posix_memalign(out, align, size) }
}

/// # Safety
/// C's `aligned_alloc`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    c_api::aligned_alloc(align, size)
}

/// # Safety
/// C's `memalign`.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    c_api::memalign(align, size)
}

/// # Safety
/// C's `valloc`.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    c_api::valloc(size)
}

/// # Safety
/// C's `pvalloc`.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    c_api::pvalloc(size)
}

/// # Safety
/// C's `malloc_info`: `fp` is an open `FILE *`.
#[no_mangle]
pub unsafe extern "C" fn malloc_info(options: c_int, fp: *mut libc::FILE) -> c_int {
    // SAFETY: the C caller's contract.
    unsafe { c_api::malloc_info(options, fp) }
}

/// C's `mallopt`.
#[no_mangle]
pub extern "C" fn mallopt(param: c_int, value: c_int) -> c_int {
    c_api::mallopt(param, value)
}

/// Writes coreheap's statistics as one JSON object to file descriptor `fd`.
#[no_mangle]
pub extern "C" fn coreheap_stats_json(fd: c_int) {
    c_api::stats_json(fd)
}

/// # Safety
/// glibc's old name for `free` (`cfree`, still exported by glibc).
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: the C caller's contract.
    unsafe { free(p) }
}

// glibc's internal entry points, which some programs and libraries call directly to reach
// "the" malloc: they must reach coreheap too, or a block would be freed by the other
// allocator. Each calls the public function (a tail jump) rather than repeat its body:
// identical bodies are merged into one outlined copy, which would cost `malloc` and `free`
// their inlined fast paths.

/// # Safety
/// C's `malloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { malloc(size) }
}

/// # Safety
/// C's `free`.
#[no_mangle]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    // SAFETY: the C caller's contract.
    unsafe { free(p) }
}

/// # Safety
/// C's `calloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { calloc(n, size) }
}

/// # Safety
/// C's `realloc`.
#[no_mangle]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { realloc(p, size) }
}

/// # Safety
/// C's `memalign`.
#[no_mangle]
pub unsafe extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: the C caller's contract.
    unsafe { memalign(align, size) }
}

/// # Safety
/// C's `malloc_usable_size`: `p` is null or a block of this allocator.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: the C caller's contract.
    unsafe { c_api::malloc_usable_size(p) }
}

/// # Safety
/// C's `malloc_trim`.
#[no_mangle]
pub unsafe extern "C" fn malloc_trim(pad: usize) -> c_int {
    c_api::malloc_trim(pad)
}

/// # Safety
/// C's `malloc_stats`.
#[no_mangle]
pub unsafe extern "C" fn malloc_stats() {
    c_api::malloc_stats()
}

/// # Safety
/// C's legacy `mallinfo`.
#[no_mangle]
pub unsafe extern "C" fn mallinfo() -> c_api::MallInfo {
    c_api::mallinfo()
}

/// # Safety
/// C's `mallinfo2`.
#[no_mangle]
pub unsafe extern "C" fn mallinfo2() -> c_api::MallInfo2 {
    c_api::mallinfo2()
}

/// Publishes `p` as the root of the `COREHEAP_SHM` heap (see `coreheap::shm::process`).
/// Returns 0, or -1 without such a heap.
#[no_mangle]
pub extern "C" fn coreheap_shm_set_root(p: *mut c_void) -> c_int {
    c_api::shm_set_root(p)
}

/// C's `fork`: the C library's, entered one thread at a time under `COREHEAP_SHM` (see
/// `c_api::fork`).
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    c_api::fork()
}

/// The root of the `COREHEAP_SHM` heap, or null.
#[no_mangle]
pub extern "C" fn coreheap_shm_root() -> *mut c_void {
    c_api::shm_root()
}
