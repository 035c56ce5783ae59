//! `coreheap run [--stats] [--lib PATH] -- PROGRAM [ARGS...]`: runs a program on coreheap by
//! `LD_PRELOAD`, keeping any preload it already has.
//!
//! `coreheap bench [OPTIONS]`: the benchmark suite (see `bench.rs`).
//!
//! Every subcommand takes `--help`; `coreheap --version` prints the version. Usage errors
//! exit with status 2; a program that cannot be started, 127 (as a shell says it).

mod bench;

use std::env;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{exit, Command};

const LIB_NAME: &str = "libcoreheap_preload.so";

const USAGE: &str = "usage: coreheap run [--stats] [--lib PATH] -- PROGRAM [ARGS...]
       coreheap bench [OPTIONS]   (coreheap bench --help)
       coreheap --version

Runs PROGRAM with coreheap as its malloc (LD_PRELOAD of the preload library).";

const RUN_USAGE: &str = "usage: coreheap run [--stats] [--lib PATH] [--] PROGRAM [ARGS...]

Runs PROGRAM with coreheap as its malloc (LD_PRELOAD of the preload library), keeping any
LD_PRELOAD it already has (coreheap's library goes first).
  --stats      print coreheap's per-arena statistics to stderr when PROGRAM exits
  --lib PATH   the preload library (default: $COREHEAP_LIB, else libcoreheap_preload.so
               beside this executable, else in ../lib from it)
  -h, --help   this text";

fn main() {
    let mut p = lexopt::Parser::from_env();
    let cmd = match p.next() {
        Ok(Some(lexopt::Arg::Value(v))) => v,
        Ok(Some(lexopt::Arg::Long("version") | lexopt::Arg::Short('V'))) => {
            println!("coreheap {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Ok(Some(lexopt::Arg::Long("help") | lexopt::Arg::Short('h'))) => {
            println!("{USAGE}");
            return;
        }
        Ok(None) => usage_error("no command", USAGE),
        Ok(Some(a)) => usage_error(&a.unexpected().to_string(), USAGE),
        Err(e) => usage_error(&e.to_string(), USAGE),
    };
    match cmd.to_str() {
        Some("run") => run(p),
        Some("bench") => exit(bench::main(p)),
        Some("help") => println!("{USAGE}"),
        _ => usage_error(&format!("unknown command {}", cmd.to_string_lossy()), USAGE),
    }
}

/// Reports a usage error with the usage text and exits with status 2.
fn usage_error(msg: &str, usage: &str) -> ! {
    eprintln!("coreheap: {msg}\n{usage}");
    exit(2);
}

fn run(mut p: lexopt::Parser) {
    use lexopt::Arg::{Long, Short, Value};
    let mut stats = false;
    let mut lib: Option<PathBuf> = env::var_os("COREHEAP_LIB").map(PathBuf::from);
    let mut program: Vec<OsString> = Vec::new();
    loop {
        let arg = match p.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => usage_error(&e.to_string(), RUN_USAGE),
        };
        match arg {
            Long("stats") => stats = true,
            Long("lib") => match p.value() {
                Ok(v) => lib = Some(PathBuf::from(v)),
                Err(e) => usage_error(&e.to_string(), RUN_USAGE),
            },
            Long("help") | Short('h') => {
                println!("{RUN_USAGE}");
                return;
            }
            Value(v) => {
                // The program: it and everything after it are its own.
                program.push(v);
                match p.raw_args() {
                    Ok(rest) => program.extend(rest),
                    Err(e) => usage_error(&e.to_string(), RUN_USAGE),
                }
                break;
            }
            a => usage_error(&a.unexpected().to_string(), RUN_USAGE),
        }
    }
    if program.is_empty() {
        usage_error("no program to run", RUN_USAGE);
    }
    let lib = find_lib(lib).unwrap_or_else(|e| {
        eprintln!("coreheap: {e}");
        exit(1)
    });
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
    eprintln!(
        "coreheap: cannot run {}: {err}",
        program[0].to_string_lossy()
    );
    exit(127);
}

/// The preload library: `explicit` if given (a flag or `COREHEAP_LIB`), else the one beside
/// this executable, else `../lib/` from it (where `scripts/install.sh` puts it). Canonical,
/// and checked to exist.
fn find_lib(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    let lib = match explicit {
        Some(l) => l,
        None => {
            let exe =
                env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
            let beside = exe.with_file_name(LIB_NAME);
            let installed = exe
                .parent()
                .and_then(|bin| bin.parent())
                .map(|prefix| prefix.join("lib").join(LIB_NAME));
            match installed {
                Some(l) if !beside.is_file() && l.is_file() => l,
                _ => beside,
            }
        }
    };
    if !lib.is_file() {
        return Err(format!(
            "preload library not found at {} (build it with `cargo build --release --workspace`, or pass --lib PATH or set COREHEAP_LIB)",
            lib.display()
        ));
    }
    Ok(lib.canonicalize().unwrap_or(lib))
}
