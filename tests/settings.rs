//! Settings from the environment, seen from a process: a bad value is reported once, on
//! stderr, in one line naming the variable, the value and what is used instead, however many
//! threads (and the allocator itself) read the settings.

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
