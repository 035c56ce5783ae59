//! Replays the fuzz target's committed corpus (`fuzz/corpus/heap_ops`) on stable, so CI runs
//! every input the fuzzer found interesting without nightly or cargo-fuzz.

#[path = "common/fuzz_ops.rs"]
mod ops;

#[test]
fn replay_fuzz_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("fuzz").is_dir() {
        // A packaged crate: the fuzz package and its corpus stay in the repository.
        eprintln!("no fuzz corpus in this copy of the crate: nothing replayed");
        return;
    }
    let dir = root.join("fuzz/corpus/heap_ops");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "the seed corpus is missing ({} files)",
        files.len()
    );
    for f in &files {
        let data = std::fs::read(f).unwrap();
        eprintln!("replaying {} ({} bytes)", f.display(), data.len());
        ops::run(&data);
    }
    eprintln!("replayed {} inputs", files.len());
}
