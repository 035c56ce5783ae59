//! Fuzz target: sequences of allocations, frees and reallocs over a few threads, checked
//! against a model (see `tests/common/fuzz_ops.rs`). Run with `cargo +nightly fuzz run heap_ops`.
#![no_main]

#[path = "../../tests/common/fuzz_ops.rs"]
mod ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| ops::run(data));
