//! `coreheap run [--stats] [--lib PATH] -- PROGRAM [ARGS...]`: runs a program on coreheap by
//! `LD_PRELOAD`, keeping any preload it already has.
//!
//! `coreheap bench [OPTIONS]`: the benchmark suite (see `bench.rs`).

mod bench;

use std::env;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{exit, Command};

const LIB_NAME: &str = "libcoreheap_preload.so";

const USAGE: &str = "usage: coreheap run [--stats] [--lib PATH] -- PROGRAM [ARGS...]
       coreheap bench [OPTIONS]   (coreheap bench --help)

Runs PROGRAM with coreheap as its malloc (LD_PRELOAD of the preload library).
  --stats      print coreheap's per-arena statistics to stderr when PROGRAM exits
  --lib PATH   the preload library (default: $COREHEAP_LIB, else libcoreheap_preload.so
               beside this executable)";

fn main() {
    let mut args = env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("run") => run(args.collect()),
        Some("bench") => exit(bench::main(args.collect())),
        Some("-h") | Some("--help") | Some("help") => println!("{USAGE}"),
        _ => {
            eprintln!("{USAGE}");
            exit(2);
        }
    }
}

fn run(args: Vec<OsString>) {
    let mut stats = false;
    let mut lib: Option<PathBuf> = env::var_os("COREHEAP_LIB").map(PathBuf::from);
    let mut rest = args.into_iter();
    let mut program = Vec::new();
    while let Some(a) = rest.next() {
        match a.to_str() {
            Some("--stats") => stats = true,
            Some("--lib") => match rest.next() {
                Some(p) => lib = Some(PathBuf::from(p)),
                None => fail("--lib needs a path"),
            },
            Some("--") => {
                program.extend(rest.by_ref());
                break;
            }
            Some(s) if s.starts_with('-') => fail(&format!("unknown option {s}")),
            _ => {
                program.push(a);
                program.extend(rest.by_ref());
                break;
            }
        }
    }
    if program.is_empty() {
        fail("no program to run");
    }
    let lib = find_lib(lib).unwrap_or_else(|e| fail(&e));
    let mut preload = lib.into_os_string();
    if let Some(old) = env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = Command::new(&program[0]);
    cmd.args(&program[1..]).env("LD_PRELOAD", preload);
    if stats {
        cmd.env("COREHEAP_STATS", "1");
    }
    let err = cmd.exec();
    fail(&format!(
        "cannot run {}: {err}",
        program[0].to_string_lossy()
    ));
}

/// The preload library: `explicit` if given (a flag or `COREHEAP_LIB`), else the one beside
/// this executable. Canonical, and checked to exist.
fn find_lib(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    let lib = match explicit {
        Some(l) => l,
        None => env::current_exe()
            .map_err(|e| format!("cannot find my own executable: {e}"))?
            .with_file_name(LIB_NAME),
    };
    if !lib.is_file() {
        return Err(format!(
            "preload library not found at {} (build it with `cargo build --release --workspace`, or pass --lib PATH or set COREHEAP_LIB)",
            lib.display()
        ));
    }
    Ok(lib.canonicalize().unwrap_or(lib))
}

fn fail(msg: &str) -> ! {
    eprintln!("coreheap: {msg}");
    exit(127);
}
