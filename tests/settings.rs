//! Settings from the environment, seen from a process: a bad value is reported once, on
//! stderr, in one line naming the variable, the value and what is used instead, however many
//! threads (and the allocator itself) read the settings.

mod common;

use std::process::Command;

#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();

const CHILD_VAR: &str = "COREHEAP_SETTINGS_CHILD";

/// The child: reads the settings from several threads at once, allocating meanwhile.
fn child() {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                let v = vec![1u8; 1000];
                let s = coreheap::settings::get();
                assert_eq!(v.len(), 1000);
                s
            })
        })
        .collect();
    for t in threads {
        let s = t.join().unwrap();
        assert!(!s.debug, "a bad value uses the default");
        assert!(s.stats, "COREHEAP_STATS=yes is on");
        assert_eq!(s.arenas, Some(2));
    }
    assert_eq!(coreheap::settings::get(), coreheap::settings::get());
}

#[test]
fn a_bad_value_is_reported_once() {
    if std::env::var_os(CHILD_VAR).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_bad_value_is_reported_once",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, "1")
        .env("COREHEAP_DEBUG", "maybe")
        .env("COREHEAP_STATS", "yes")
        .env("COREHEAP_ARENAS", "2")
        .output()
        .expect("spawn child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
    let line = "coreheap: COREHEAP_DEBUG=maybe is not a boolean (1/0, true/false, yes/no, on/off); using 0\n";
    assert_eq!(stderr.matches(line).count(), 1, "stderr:\n{stderr}");
    assert_eq!(
        stderr.matches("COREHEAP_").count(),
        1,
        "only the bad value is reported:\n{stderr}"
    );
    // `COREHEAP_STATS=yes` turned the exit report on, with the two arenas asked for.
    assert!(
        stderr.contains("coreheap: 2 arenas"),
        "no exit report:\n{stderr}"
    );
}

const PURGE_CHILD: &str = "COREHEAP_SETTINGS_PURGE_CHILD";

/// The purge child: prints what it keeps dirty after freeing 32 MiB.
fn purge_child() {
    println!("dirty={}", common::dirty_after_freeing_32_mib(300));
}

/// `COREHEAP_PURGE_MS` and `COREHEAP_DIRTY_MAX` set how soon freed pages go back: with 0 ms
/// and 1 MiB, what a program freed is returned once the decay clock ticks; by default
/// (1 s, 64 MiB) it is still kept then.
#[test]
fn purge_settings_return_memory_sooner() {
    if std::env::var_os(PURGE_CHILD).is_some() {
        purge_child();
        return;
    }
    let dirty = |env: &[(&str, &str)]| -> usize {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "purge_settings_return_memory_sooner",
                "--exact",
                "--nocapture",
            ])
            .env(PURGE_CHILD, "1")
            .env("COREHEAP_ARENAS", "1")
            .envs(env.iter().copied())
            .output()
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("dirty="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no dirty= line: {stdout}"))
    };
    let kept = dirty(&[]);
    let returned = dirty(&[("COREHEAP_PURGE_MS", "0"), ("COREHEAP_DIRTY_MAX", "1M")]);
    assert!(
        kept >= 16 << 20,
        "default settings kept only {kept} dirty bytes"
    );
    assert!(
        returned <= 8 << 20,
        "with COREHEAP_PURGE_MS=0 and COREHEAP_DIRTY_MAX=1M, {returned} dirty bytes stay"
    );
}
