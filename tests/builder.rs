//! The `const` builder on `CoreHeap`: its settings reach the heap, and the environment wins
//! over them. One binary (`harness = false`), since the global allocator is per binary; the
//! parent runs itself as a child with and without `COREHEAP_ARENAS`.

mod common;

use std::process::Command;

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
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("COREHEAP_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
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
    (field("arenas="), field("dirty="))
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
    // A bad value is reported, and the builder's value is used.
    let (arenas, _) = run(&[("COREHEAP_ARENAS", "abc")]);
    assert_eq!(arenas, 7, "a bad COREHEAP_ARENAS leaves the builder's 7");
}

fn main() {
    if std::env::var_os(CHILD_VAR).is_some() {
        child();
        return;
    }
    let tests: [(&str, fn()); 2] = [
        ("the_builder_sets_the_heap", the_builder_sets_the_heap),
        (
            "the_environment_wins_over_the_builder",
            the_environment_wins_over_the_builder,
        ),
    ];
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
