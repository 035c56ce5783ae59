//! The `const` builder on `CoreHeap`: its settings reach the heap, and the environment wins
//! over them. One binary (`harness = false`), since the global allocator is per binary; the
//! parent runs itself as a child with and without `COREHEAP_ARENAS`.

mod common;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new()
    .arenas(7)
    .purge_delay_ms(0)
    .dirty_max(1 << 20);

const CHILD_VAR: &str = "COREHEAP_BUILDER_CHILD";

/// The child: prints the arena count and what it keeps dirty after freeing 32 MiB.
fn child() {
    let dirty = common::dirty_after_freeing_32_mib(50);
    println!("arenas={} dirty={dirty}", coreheap::arena_count());
}

/// Runs the child with `env` added to an environment without `COREHEAP_*`; returns its
/// arena count and dirty bytes.
fn run(env: &[(&str, &str)]) -> (usize, usize) {
    let (arenas, dirty, _) = run_with_stderr(env);
    (arenas, dirty)
}

/// [`run`], with the child's stderr.
fn run_with_stderr(env: &[(&str, &str)]) -> (usize, usize, String) {
    let out = common::rerun_self()
        .env(CHILD_VAR, "1")
        .envs(env.iter().copied())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {stdout}\n{stderr}");
    let field = |name: &str| -> usize {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in: {stdout}"))
    };
    (field("arenas="), field("dirty="), stderr.into_owned())
}

/// `CoreHeap::new().arenas(7).purge_delay_ms(0).dirty_max(1 << 20)`: seven arenas (a count
/// few machines have CPUs for, so the default one per CPU will not pass for it), and what
/// the program freed goes back at the next tick.
fn the_builder_sets_the_heap() {
    let (arenas, dirty) = run(&[]);
    assert_eq!(arenas, 7, "the builder asked for 7 arenas");
    assert!(
        dirty <= 8 << 20,
        "with purge_delay_ms(0) and dirty_max(1M), {dirty} dirty bytes stay"
    );
}

/// `COREHEAP_ARENAS=2` wins over the builder's 7; the builder's other settings stay.
fn the_environment_wins_over_the_builder() {
    let (arenas, dirty) = run(&[("COREHEAP_ARENAS", "2")]);
    assert_eq!(arenas, 2, "the environment asked for 2 arenas");
    assert!(dirty <= 8 << 20, "{dirty} dirty bytes stay");
    // A bad value is reported naming the builder's value, and that value is used.
    let (arenas, _, err) = run_with_stderr(&[("COREHEAP_ARENAS", "abc")]);
    assert_eq!(arenas, 7, "a bad COREHEAP_ARENAS leaves the builder's 7");
    assert_eq!(
        err,
        "coreheap: COREHEAP_ARENAS=abc is not a number from 1 to 4096; using 7 (set by the program)\n"
    );
    let (_, _, err) = run_with_stderr(&[("COREHEAP_DIRTY_MAX", "big"), ("COREHEAP_DEBUG", "2")]);
    assert_eq!(
        err,
        "coreheap: COREHEAP_DEBUG=2 is not a boolean (1/0, true/false, yes/no, on/off); using 0\n\
         coreheap: COREHEAP_DIRTY_MAX=big is not a size in bytes (with K, M or G) up to 1024G; using 1M (set by the program)\n"
    );
}

/// A size above its maximum is clamped to it, and the message says so; the clamped value
/// is the environment's, so the builder's is not used (what was freed stays dirty: 1 TiB
/// may be kept, and the purge delay is an hour).
fn a_size_above_its_maximum_is_clamped() {
    let (_, dirty, err) = run_with_stderr(&[
        ("COREHEAP_DIRTY_MAX", "4096G"),
        ("COREHEAP_PURGE_MS", "99999999999999999999999"),
    ]);
    assert_eq!(
        err,
        "coreheap: COREHEAP_PURGE_MS=99999999999999999999999 is not a number from 0 to 3600000; using 3600000\n\
         coreheap: COREHEAP_DIRTY_MAX=4096G is not a size in bytes (with K, M or G) up to 1024G; using 1024G\n"
    );
    assert!(
        dirty >= 16 << 20,
        "with 1 TiB and an hour, only {dirty} dirty bytes stay"
    );
}

fn main() {
    if std::env::var_os(CHILD_VAR).is_some() {
        child();
        return;
    }
    let tests: [(&str, fn()); 3] = [
        ("the_builder_sets_the_heap", the_builder_sets_the_heap),
        (
            "the_environment_wins_over_the_builder",
            the_environment_wins_over_the_builder,
        ),
        (
            "a_size_above_its_maximum_is_clamped",
            a_size_above_its_maximum_is_clamped,
        ),
    ];
    common::run_tests(&tests);
}
