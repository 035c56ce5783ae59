//! `coreheap bench`: runs every workload under glibc's malloc, coreheap and each installed
//! peer (jemalloc, mimalloc, TCMalloc) by `LD_PRELOAD`, interleaving the allocators run by run,
//! and reports median wall time and peak RSS with ratios, as text, Markdown and an SVG chart.
//!
//! A sample is one process: wall time from spawn to exit, peak RSS from `wait4`'s
//! `ru_maxrss` (the child's own high-water mark). Each workload must exit 0 and print the same
//! standard output under every allocator (the synthetic workloads print a checksum of their
//! work), or the bench stops: a wrong answer is not a benchmark result.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const USAGE: &str = "usage: coreheap bench [OPTIONS]

Runs the benchmark workloads under glibc's malloc, coreheap and every installed peer
(Debian packages libjemalloc2, libmimalloc2.0, libtcmalloc-minimal4), interleaved run by run,
and writes a report to the output folder: results.md (medians with their spread, ratios,
targets), results.json (every sample) and results.svg.
  --workloads A,B   workloads to run (default: all; `--workloads list` lists them)
  --allocators A,B  allocators (default: every one found: glibc,coreheap,jemalloc,mimalloc,tcmalloc;
                    also coreheap-locked: coreheap with COREHEAP_RSEQ=0, the locked path only)
  --threads N       threads of the synthetic workloads (default: the CPUs available)
  --runs N          runs per workload and allocator (default 5; the median is reported)
  --scale F         work per run relative to the default sizes (default 1.0)
  --quick           a smoke run: --scale 0.01 --runs 1 (marked so in the report, targets
                    not judged)
  --out DIR         where to write the report (default bench-results; the committed
                    docs/bench only when named)
  --peer NAME=PATH  another allocator to compare (a shared object to preload); repeatable.
                    jemalloc, mimalloc and tcmalloc are found through the dynamic linker's
                    cache (ldconfig -p) or Debian's paths
  --lib PATH        coreheap's preload library (default: as for `coreheap run`)
  --alt-lib PATH    another build of it, run as allocator coreheap-alt (for example one
                    built with --features unhardened, to measure what the hardening costs)
  --timeout SECS    kill a run that takes longer and fail (default 600)
  -h, --help        this text

Progress is shown on stderr only when it is a terminal.";

/// Allocators known by name: the soname the dynamic linker's cache knows them by, then
/// paths tried when the cache does not (first found wins).
const PEERS: [(&str, &str, &[&str]); 3] = [
    (
        "jemalloc",
        "libjemalloc.so.2",
        &[
            "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
            "/usr/lib64/libjemalloc.so.2",
            "/usr/lib/libjemalloc.so.2",
        ],
    ),
    (
        "mimalloc",
        "libmimalloc.so.2",
        &[
            "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
            "/usr/lib64/libmimalloc.so.2",
            "/usr/lib/libmimalloc.so.2",
        ],
    ),
    (
        "tcmalloc",
        "libtcmalloc_minimal.so.4",
        &[
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4",
            "/usr/lib/libtcmalloc_minimal.so.4",
        ],
    ),
];

/// The synthetic workloads, run by the `coreheap-workloads` executable.
const SYNTHETIC: [&str; 12] = [
    "larson",
    "prodcons",
    "larson-16",
    "prodcons-16",
    "batch",
    "cache-thrash",
    "cache-scratch",
    "mixed",
    "fragment",
    "realloc",
    "huge",
    "large",
];

/// Real programs, with the package that provides them.
const PROGRAMS: [(&str, &str, &str); 5] = [
    ("python", "python3", "python3"),
    ("sqlite3", "sqlite3", "sqlite3"),
    ("sqlite3-cache", "sqlite3", "sqlite3"),
    ("gcc", "gcc", "gcc"),
    ("sort", "sort", "coreutils"),
];

struct Options {
    workloads: Vec<String>,
    allocators: Option<Vec<String>>,
    threads: usize,
    runs: usize,
    scale: f64,
    out: PathBuf,
    lib: Option<PathBuf>,
    /// A second build of coreheap's library to compare, run as `coreheap-alt`.
    alt_lib: Option<PathBuf>,
    /// Allocators named with `--peer`.
    peers: Vec<(String, PathBuf)>,
    timeout: Duration,
    /// `--quick`: a smoke run, whose timings mean nothing.
    smoke: bool,
}

struct Allocator {
    name: String,
    /// The shared object to preload; `None` for glibc's own malloc.
    preload: Option<PathBuf>,
    /// Environment it runs with (for coreheap-locked: the rseq fast path off).
    env: &'static [(&'static str, &'static str)],
}

/// coreheap with its per-CPU caches off: the locked path alone, for before/after
/// comparisons of the rseq fast path. Only when asked for by name.
const LOCKED: &str = "coreheap-locked";

/// One way to start a workload.
struct Job {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    stdin: Option<PathBuf>,
}

#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kib: u64,
}

/// Entry point of `coreheap bench`; returns the process exit code: 2 for a usage error,
/// 1 for a failed run.
pub fn main(p: lexopt::Parser) -> i32 {
    let opts = match parse(p) {
        Ok(Some(o)) => o,
        Ok(None) => return 0,
        Err(e) => {
            eprintln!("coreheap bench: {e}\n{USAGE}");
            return 2;
        }
    };
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("coreheap bench: {e}");
            1
        }
    }
}

fn run(opts: &Options) -> Result<(), String> {
    let allocators = find_allocators(opts)?;
    let work = std::env::temp_dir().join(format!("coreheap-bench-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let result = bench(opts, &allocators, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

/// The options, or `None` when the command was answered already (`--help`, `--workloads
/// list`).
fn parse(mut p: lexopt::Parser) -> Result<Option<Options>, String> {
    use lexopt::Arg::{Long, Short};
    let mut o = Options {
        workloads: Vec::new(),
        allocators: None,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        runs: 5,
        scale: 1.0,
        out: PathBuf::from("bench-results"),
        lib: std::env::var_os("COREHEAP_LIB").map(PathBuf::from),
        alt_lib: None,
        peers: Vec::new(),
        timeout: Duration::from_secs(600),
        smoke: false,
    };
    let list = |s: String| -> Vec<String> { s.split(',').map(str::to_owned).collect() };
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("not UTF-8: {}", v.to_string_lossy()))
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("workloads") => o.workloads = list(text(&mut p)?),
            Long("allocators") => o.allocators = Some(list(text(&mut p)?)),
            Long("threads") => o.threads = number(&text(&mut p)?)?,
            Long("runs") => o.runs = number(&text(&mut p)?)?,
            Long("scale") => {
                o.scale = text(&mut p)?
                    .parse()
                    .map_err(|_| "--scale needs a number".to_string())?
            }
            Long("quick") => {
                o.scale = 0.01;
                o.runs = 1;
                o.smoke = true;
            }
            Long("out") => o.out = PathBuf::from(text(&mut p)?),
            Long("lib") => o.lib = Some(PathBuf::from(text(&mut p)?)),
            Long("alt-lib") => o.alt_lib = Some(PathBuf::from(text(&mut p)?)),
            Long("peer") => {
                let v = text(&mut p)?;
                let Some((name, path)) = v.split_once('=') else {
                    return Err(format!("--peer wants NAME=PATH, not {v}"));
                };
                o.peers.push((name.to_string(), PathBuf::from(path)));
            }
            Long("timeout") => o.timeout = Duration::from_secs(number(&text(&mut p)?)? as u64),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(None);
            }
            a => return Err(a.unexpected().to_string()),
        }
    }
    let all: Vec<&str> = SYNTHETIC
        .iter()
        .copied()
        .chain(PROGRAMS.iter().map(|p| p.0))
        .collect();
    if o.workloads == ["list"] {
        for w in &all {
            println!("{w}");
        }
        return Ok(None);
    }
    if o.workloads.is_empty() {
        o.workloads = all.iter().map(|s| s.to_string()).collect();
    }
    for w in &o.workloads {
        if !all.contains(&w.as_str()) {
            return Err(format!("unknown workload {w} (known: {})", all.join(",")));
        }
    }
    if o.runs == 0 || o.threads == 0 || o.scale <= 0.0 {
        return Err("--runs, --threads and --scale must be positive".into());
    }
    Ok(Some(o))
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

fn find_allocators(o: &Options) -> Result<Vec<Allocator>, String> {
    let lib = crate::find_lib(o.lib.clone())?;
    let mut found = vec![
        Allocator {
            name: "glibc".into(),
            preload: None,
            env: &[],
        },
        Allocator {
            name: "coreheap".into(),
            preload: Some(lib.clone()),
            env: &[],
        },
    ];
    let cache = linker_cache();
    for (name, soname, paths) in PEERS {
        let from_cache = cache
            .iter()
            .find(|(n, _)| n == soname)
            .map(|(_, p)| p.clone());
        let found_path =
            from_cache.or_else(|| paths.iter().map(PathBuf::from).find(|p| p.is_file()));
        if let Some(p) = found_path.filter(|p| p.is_file()) {
            if !o.peers.iter().any(|(n, _)| n == name) {
                found.push(Allocator {
                    name: name.into(),
                    preload: Some(p),
                    env: &[],
                });
            }
        }
    }
    for (name, path) in &o.peers {
        let path = fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        found.push(Allocator {
            name: name.clone(),
            preload: Some(path),
            env: &[],
        });
    }
    if let Some(alt) = &o.alt_lib {
        // Absolute: the workloads run in a scratch directory.
        let alt = fs::canonicalize(alt).map_err(|e| format!("{}: {e}", alt.display()))?;
        found.push(Allocator {
            name: "coreheap-alt".into(),
            preload: Some(alt),
            env: &[],
        });
    }
    let Some(want) = &o.allocators else {
        return Ok(found);
    };
    found.push(Allocator {
        name: LOCKED.into(),
        preload: Some(lib),
        env: &[("COREHEAP_RSEQ", "0")],
    });
    let mut chosen = Vec::new();
    for w in want {
        match found.iter().position(|a| &a.name == w) {
            Some(i) => chosen.push(found.swap_remove(i)),
            None if PEERS.iter().any(|p| p.0 == w) => {
                return Err(format!(
                    "{w} is not installed (Debian: apt-get install {})",
                    match w.as_str() {
                        "jemalloc" => "libjemalloc2",
                        "mimalloc" => "libmimalloc2.0",
                        _ => "libtcmalloc-minimal4",
                    }
                ))
            }
            None => return Err(format!("unknown allocator {w}")),
        }
    }
    Ok(chosen)
}

/// Builds the command lines of the chosen workloads, writing their inputs into `work`.
/// Real programs that are not installed are skipped with a note.
/// The dynamic linker's cache (`ldconfig -p`): (soname, path) pairs of this machine's
/// architecture; empty when `ldconfig` cannot be run.
fn linker_cache() -> Vec<(String, PathBuf)> {
    let Ok(out) = Command::new("ldconfig").arg("-p").output() else {
        return Vec::new();
    };
    let arch = if cfg!(target_arch = "x86_64") {
        "x86-64"
    } else {
        std::env::consts::ARCH
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "\tlibmimalloc.so.2 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libmimalloc.so.2"
            let (left, path) = l.trim().split_once(" => ")?;
            let (name, tags) = left.split_once(' ')?;
            tags.contains(arch)
                .then(|| (name.to_string(), PathBuf::from(path)))
        })
        .collect()
}

fn jobs(o: &Options, work: &Path) -> Result<Vec<Job>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my executable: {e}"))?;
    let workloads = exe.with_file_name("coreheap-workloads");
    let mut jobs = Vec::new();
    for w in &o.workloads {
        if SYNTHETIC.contains(&w.as_str()) {
            if !workloads.is_file() {
                return Err(format!(
                    "{} not found (cargo build --release --workspace)",
                    workloads.display()
                ));
            }
            jobs.push(Job {
                name: w.clone(),
                program: workloads.clone(),
                args: [
                    w.as_str(),
                    "--threads",
                    &o.threads.to_string(),
                    "--scale",
                    &o.scale.to_string(),
                ]
                .iter()
                .map(OsString::from)
                .collect(),
                env: Vec::new(),
                stdin: None,
            });
            continue;
        }
        let (_, cmd, package) = PROGRAMS.iter().find(|p| p.0 == w).expect("checked");
        let Some(program) = which(cmd) else {
            eprintln!("coreheap bench: skipping {w}: {cmd} not found (Debian package {package})");
            continue;
        };
        jobs.push(program_job(w, program, o.scale, work)?);
    }
    Ok(jobs)
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn scaled(n: f64, scale: f64) -> usize {
    ((n * scale) as usize).max(1)
}

/// The page cache of the `sqlite3-cache` job: 200 MiB (sqlite takes a negative
/// `cache_size` as KiB).
const SQLITE_CACHE_KIB: usize = 200 * 1024;

fn program_job(name: &str, program: PathBuf, scale: f64, work: &Path) -> Result<Job, String> {
    let write = |file: &str, text: &str| -> Result<PathBuf, String> {
        let p = work.join(file);
        fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        Ok(p)
    };
    let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    Ok(match name {
        "python" => {
            // Dicts of strings and lists, a third deleted, then a sorted join: the object
            // churn of a typical script. PYTHONMALLOC=malloc sends every object to malloc.
            let n = scaled(500_000.0, scale);
            let script = write(
                "bench.py",
                &format!(
                    "d = {{}}\nfor i in range({n}):\n    k = 'key-%d-%s' % (i, 'x' * (i % 40))\n    \
                     d[k] = [str(i)] * (i % 7) + [k.upper()]\nfor k in list(d)[::3]:\n    \
                     del d[k]\nprint(len(d), sum(len(v) for v in d.values()))\n"
                ),
            )?;
            Job {
                name: name.into(),
                program,
                args: vec![script.into_os_string()],
                env: vec![("PYTHONMALLOC".into(), "malloc".into())],
                stdin: None,
            }
        }
        "sqlite3" => {
            let n = scaled(1_000_000.0, scale);
            let sql = write(
                "bench.sql",
                &format!(
                    "create table t(id integer primary key, name text, v integer);\n\
                     with recursive c(x) as (select 1 union all select x+1 from c where x < {n})\n\
                     insert into t(name, v) select 'name-' || x, (x * 7919) % 100003 from c;\n\
                     create index t_v on t(v);\ncreate index t_name on t(name);\n\
                     select count(*), sum(v) from t;\n"
                ),
            )?;
            Job {
                name: name.into(),
                program,
                args: os(&[":memory:"]),
                env: Vec::new(),
                stdin: Some(sql),
            }
        }
        "sqlite3-cache" => {
            // A temporary on-disk database (the empty file name) behind a 200 MiB page cache,
            // filled past it: the cache's page buffers (a page and sqlite's header, 4,097 to
            // 4,608 bytes each) are most of the peak RSS.
            let n = scaled(1_500_000.0, scale);
            let sql = write(
                "bench-cache.sql",
                &format!(
                    "pragma cache_size = -{SQLITE_CACHE_KIB};
                     create table t(id integer primary key, name text, v integer, pad text);
                     with recursive c(x) as (select 1 union all select x+1 from c where x < {n})
                     insert into t(name, v, pad) select 'name-' || x, (x * 7919) % 100003,
                     printf('%080d', x * 104729) from c;
                     create index t_v on t(v);
create index t_name on t(name);
                     select count(*), sum(v), sum(length(pad)) from t where name > 'name-5';
"
                ),
            )?;
            Job {
                name: name.into(),
                program,
                args: os(&[""]),
                env: Vec::new(),
                stdin: Some(sql),
            }
        }
        "gcc" => {
            // Non-static functions, so the compiler cannot drop them.
            let n = scaled(200.0, scale);
            let mut src = String::from("#include <stdio.h>\n");
            for i in 0..n {
                let _ = writeln!(
                    src,
                    "int f{i}(int x) {{ int a[64]; for (int i = 0; i < 64; i++) a[i] = x * i + {i}; \
                     int s = 0; for (int i = 0; i < 64; i++) s += a[i] % ({i} + 3); return s; }}"
                );
            }
            let _ = writeln!(
                src,
                "int main(void) {{ printf(\"%d\\n\", f0(1)); return 0; }}"
            );
            let c = write("bench.c", &src)?;
            let o = work.join("bench.o");
            Job {
                name: name.into(),
                program,
                args: vec![
                    "-O2".into(),
                    "-c".into(),
                    c.into_os_string(),
                    "-o".into(),
                    o.into_os_string(),
                ],
                env: Vec::new(),
                stdin: None,
            }
        }
        "sort" => {
            // Written through a small buffer: the runner's own memory must stay small, since
            // a child's peak RSS can include what it shared with the runner before `exec`.
            let n = scaled(2_000_000.0, scale);
            let input = work.join("sort.txt");
            let f = fs::File::create(&input).map_err(|e| format!("{}: {e}", input.display()))?;
            let mut f = std::io::BufWriter::new(f);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                writeln!(f, "{:x} {}", x, x % 1000)
                    .map_err(|e| format!("{}: {e}", input.display()))?;
            }
            f.flush().map_err(|e| format!("{}: {e}", input.display()))?;
            Job {
                name: name.into(),
                program,
                args: vec![input.into_os_string()],
                env: vec![("LC_ALL".into(), "C".into())],
                stdin: None,
            }
        }
        _ => unreachable!("checked in parse"),
    })
}

fn bench(o: &Options, allocators: &[Allocator], work: &Path) -> Result<(), String> {
    let jobs = jobs(o, work)?;
    if jobs.is_empty() {
        return Err("no workload to run".into());
    }
    let total = jobs.len() * o.runs * allocators.len();
    let mut done = 0;
    let started = Instant::now();
    // samples[job][allocator]
    let mut samples = vec![vec![Vec::new(); allocators.len()]; jobs.len()];
    for (j, job) in jobs.iter().enumerate() {
        let mut expected: Option<Vec<u8>> = None;
        for run in 0..o.runs {
            // Rotate the order every run, so no allocator always follows the same one.
            for k in 0..allocators.len() {
                let a = (k + run + j) % allocators.len();
                progress(done, total, &job.name, &allocators[a].name, started);
                let (sample, stdout) = run_once(job, &allocators[a], work, o.timeout)?;
                match &expected {
                    None => expected = Some(stdout),
                    Some(e) if *e != stdout => {
                        return Err(format!(
                            "{} printed different output under {} than before:\n{}\nvs\n{}",
                            job.name,
                            allocators[a].name,
                            String::from_utf8_lossy(&stdout),
                            String::from_utf8_lossy(e)
                        ))
                    }
                    Some(_) => {}
                }
                samples[j][a].push(sample);
                done += 1;
            }
        }
    }
    progress(done, total, "done", "", started);
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(2) } == 1 {
        eprintln!();
    }
    let report = Report::new(o, allocators, &jobs, &samples);
    let text = report.markdown();
    print!("{text}");
    fs::create_dir_all(&o.out).map_err(|e| format!("cannot create {}: {e}", o.out.display()))?;
    let write = |name: &str, body: String| -> Result<PathBuf, String> {
        let path = o.out.join(name);
        fs::write(&path, body).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let md = write("results.md", text)?;
    write("results.json", report.json(&samples))?;
    write("results.svg", report.svg())?;
    eprintln!(
        "wrote results.md, results.json and results.svg to {}",
        md.parent().unwrap_or(Path::new(".")).display()
    );
    Ok(())
}

/// A progress bar on stderr, when stderr is a terminal (a log gets no escape codes).
fn progress(done: usize, total: usize, job: &str, alloc: &str, started: Instant) {
    const WIDTH: usize = 30;
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(2) } != 1 {
        return;
    }
    let filled = done * WIDTH / total.max(1);
    let eta = if done > 0 {
        let per = started.elapsed().as_secs_f64() / done as f64;
        format!("~{:.0}s left", per * (total - done) as f64)
    } else {
        String::new()
    };
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} {job} {alloc} {eta}\x1b[K",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    let _ = err.flush();
}

/// Runs `job` once under `alloc`; returns its sample and standard output.
fn run_once(
    job: &Job,
    alloc: &Allocator,
    work: &Path,
    timeout: Duration,
) -> Result<(Sample, Vec<u8>), String> {
    let out_path = work.join("stdout");
    let err_path = work.join("stderr");
    let file = |p: &Path| fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args)
        .current_dir(work)
        .env_remove("LD_PRELOAD")
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?);
    for (k, v) in &job.env {
        cmd.env(k, v);
    }
    if let Some(p) = &alloc.preload {
        cmd.env("LD_PRELOAD", p);
    }
    for (k, v) in alloc.env {
        cmd.env(k, v);
    }
    match &job.stdin {
        Some(p) => cmd.stdin(fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => cmd.stdin(Stdio::null()),
    };
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", job.program.display()))?;
    let pid = child.id() as libc::pid_t;
    let (status, rusage) = wait_limited(pid, timeout).ok_or_else(|| {
        format!(
            "{} under {} took longer than {:?}; killed",
            job.name, alloc.name, timeout
        )
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let err = fs::read_to_string(&err_path).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "{} failed under {} (wait status {status:#x}):\n{}",
            job.name,
            alloc.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let stdout = fs::read(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    Ok((
        Sample {
            secs,
            rss_kib: rusage.ru_maxrss as u64,
        },
        stdout,
    ))
}

/// Waits for `pid` with `wait4`, killing it past `timeout`. Returns its status and resource
/// usage, or `None` if it had to be killed.
fn wait_limited(pid: libc::pid_t, timeout: Duration) -> Option<(i32, libc::rusage)> {
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: rusage is plain data; zeroed is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our child; `status` and `ru` are writable.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            return Some((status, ru));
        }
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, still running; reap it after the kill.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

/// Medians, ready to print.
struct Report {
    allocators: Vec<String>,
    workloads: Vec<String>,
    /// `time[w][a]`, `rss[w][a]` (MiB): medians.
    time: Vec<Vec<f64>>,
    rss: Vec<Vec<f64>>,
    /// The same cells' smallest and largest samples.
    time_range: Vec<Vec<(f64, f64)>>,
    rss_range: Vec<Vec<(f64, f64)>>,
    header: String,
    /// A `--quick` run: timings mean nothing, targets are not judged.
    smoke: bool,
}

impl Report {
    fn new(o: &Options, allocators: &[Allocator], jobs: &[Job], s: &[Vec<Vec<Sample>>]) -> Self {
        let med = |f: &dyn Fn(&Sample) -> f64| -> Vec<Vec<f64>> {
            s.iter()
                .map(|w| {
                    w.iter()
                        .map(|a| median(a.iter().map(f).collect()))
                        .collect()
                })
                .collect()
        };
        let range = |f: &dyn Fn(&Sample) -> f64| -> Vec<Vec<(f64, f64)>> {
            s.iter()
                .map(|w| {
                    w.iter()
                        .map(|a| {
                            a.iter()
                                .map(f)
                                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
                        })
                        .collect()
                })
                .collect()
        };
        let mut header = String::new();
        let _ = writeln!(header, "# coreheap benchmark results\n");
        if o.smoke {
            let _ = writeln!(
                header,
                "**Smoke run (`--quick`: scale 0.01, one run): the timings mean nothing and \
                 the targets are not judged.**\n"
            );
        }
        let _ = writeln!(
            header,
            "Written by `coreheap bench` ({}). Median of {} run(s) per workload and allocator, \
             allocators interleaved run by run; synthetic workloads with {} thread(s), scale {}.\n",
            std::env::args().skip(1).collect::<Vec<_>>().join(" "),
            o.runs,
            o.threads,
            o.scale
        );
        let _ = writeln!(header, "Machine: {}.\n", machine());
        let _ = writeln!(header, "Allocators:");
        for a in allocators {
            let _ = writeln!(
                header,
                "- {}: {}",
                a.name,
                a.preload
                    .as_ref()
                    .map_or("the C library's own malloc".into(), |p| format!(
                        "`{}`",
                        p.display()
                    ))
            );
        }
        Report {
            allocators: allocators.iter().map(|a| a.name.clone()).collect(),
            workloads: jobs.iter().map(|j| j.name.clone()).collect(),
            time: med(&|x| x.secs),
            rss: med(&|x| x.rss_kib as f64 / 1024.0),
            time_range: range(&|x| x.secs),
            rss_range: range(&|x| x.rss_kib as f64 / 1024.0),
            header,
            smoke: o.smoke,
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.allocators.iter().position(|a| a == name)
    }

    /// The best value of workload `w` among the allocators other than coreheap (in
    /// either configuration).
    fn best_peer(&self, v: &[f64]) -> Option<(usize, f64)> {
        v.iter()
            .enumerate()
            .filter(|(i, _)| !self.allocators[*i].starts_with("coreheap"))
            .map(|(i, &x)| (i, x))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    #[allow(clippy::too_many_arguments)]
    fn table(
        &self,
        out: &mut String,
        title: &str,
        v: &[Vec<f64>],
        ranges: &[Vec<(f64, f64)>],
        unit: &str,
        prec: usize,
    ) {
        let glibc = self.index("glibc");
        let core = self.index("coreheap");
        let _ = writeln!(out, "## {title}\n");
        let _ = write!(out, "| workload |");
        for a in &self.allocators {
            let _ = write!(out, " {a} |");
        }
        let _ = writeln!(out, " coreheap / best peer |");
        let _ = write!(out, "|---|");
        for _ in &self.allocators {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out, "---:|");
        for ((w, row), range) in self.workloads.iter().zip(v).zip(ranges) {
            let _ = write!(out, "| {w} |");
            for (&x, &(lo, hi)) in row.iter().zip(range) {
                let _ = match glibc {
                    Some(g) if row[g] > 0.0 => write!(
                        out,
                        " {x:.prec$} {unit} ({:.2}x; {lo:.prec$}-{hi:.prec$}) |",
                        x / row[g]
                    ),
                    _ => write!(out, " {x:.prec$} {unit} ({lo:.prec$}-{hi:.prec$}) |"),
                };
            }
            match (core, self.best_peer(row)) {
                (Some(c), Some((p, best))) if best > 0.0 => {
                    let _ = writeln!(out, " {:.2} ({}) |", row[c] / best, self.allocators[p]);
                }
                _ => {
                    let _ = writeln!(out, " |");
                }
            }
        }
        let _ = write!(out, "| geometric mean vs glibc |");
        for a in 0..self.allocators.len() {
            match glibc {
                Some(g) => {
                    let r: Vec<f64> = v.iter().map(|row| row[a] / row[g]).collect();
                    let _ = write!(out, " {:.2}x |", geomean(&r));
                }
                None => {
                    let _ = write!(out, " |");
                }
            }
        }
        let _ = writeln!(out, " |\n");
        let _ = writeln!(
            out,
            "Each cell: median, and in brackets the ratio to glibc and the smallest and largest \
             sample. Best peer: the lowest median among the allocators other than coreheap.\n"
        );
    }

    fn markdown(&self) -> String {
        let mut out = self.header.clone();
        out.push('\n');
        self.table(
            &mut out,
            "Wall time (seconds)",
            &self.time,
            &self.time_range,
            "s",
            3,
        );
        self.table(
            &mut out,
            "Peak RSS (MiB)",
            &self.rss,
            &self.rss_range,
            "MiB",
            1,
        );
        if self.smoke {
            let _ = writeln!(out, "Targets are not judged on a smoke run.\n");
        } else {
            self.targets(&mut out);
        }
        out
    }

    /// Every sample, as JSON: `{"smoke": .., "allocators": [..], "workloads": [{"name": ..,
    /// "samples": {"<allocator>": [{"secs": .., "rss_kib": ..}, ..]}, "median_secs": {..},
    /// "median_rss_mib": {..}}]}`.
    fn json(&self, s: &[Vec<Vec<Sample>>]) -> String {
        let q = |t: &str| format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        let _ = write!(out, "{{\"smoke\": {}, \"allocators\": [", self.smoke);
        let names: Vec<String> = self.allocators.iter().map(|a| q(a)).collect();
        let _ = write!(out, "{}], \"workloads\": [", names.join(", "));
        for (w, name) in self.workloads.iter().enumerate() {
            if w > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{{\"name\": {}, \"samples\": {{", q(name));
            for (a, alloc) in self.allocators.iter().enumerate() {
                let v: Vec<String> = s[w][a]
                    .iter()
                    .map(|x| format!("{{\"secs\": {}, \"rss_kib\": {}}}", x.secs, x.rss_kib))
                    .collect();
                let sep = if a > 0 { ", " } else { "" };
                let _ = write!(out, "{sep}{}: [{}]", q(alloc), v.join(", "));
            }
            let medians = |m: &[f64]| -> String {
                self.allocators
                    .iter()
                    .zip(m)
                    .map(|(a, x)| format!("{}: {x}", q(a)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = write!(
                out,
                "}}, \"median_secs\": {{{}}}, \"median_rss_mib\": {{{}}}}}",
                medians(&self.time[w]),
                medians(&self.rss[w])
            );
        }
        out.push_str("]}\n");
        out
    }

    /// The suite's targets for coreheap, each marked met or missed.
    fn targets(&self, out: &mut String) {
        let (Some(c), Some(m)) = (self.index("coreheap"), self.index("mimalloc")) else {
            let _ = writeln!(out, "Targets need coreheap and mimalloc in the run.\n");
            return;
        };
        let mark = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(out, "## Targets\n");
        let r: Vec<f64> = self.time.iter().map(|row| row[c] / row[m]).collect();
        let g = geomean(&r);
        let _ = writeln!(
            out,
            "- Time, geometric mean, coreheap / mimalloc <= 0.90: {g:.2} ({})",
            mark(g <= 0.9)
        );
        let slow: Vec<String> = self
            .workloads
            .iter()
            .zip(&self.time)
            .filter_map(|(w, row)| {
                let (p, best) = self.best_peer(row)?;
                let ratio = row[c] / best;
                (ratio > 1.1).then(|| format!("{w} {ratio:.2}x {}", self.allocators[p]))
            })
            .collect();
        let _ = writeln!(
            out,
            "- Time, every workload <= 1.10x the fastest peer: {} ({})",
            if slow.is_empty() {
                "all within".to_string()
            } else {
                slow.join(", ")
            },
            mark(slow.is_empty())
        );
        let fat: Vec<String> = self
            .workloads
            .iter()
            .zip(&self.rss)
            .filter_map(|(w, row)| {
                let ratio = row[c] / row[m];
                (ratio > 1.25).then(|| format!("{w} {ratio:.2}x"))
            })
            .collect();
        let _ = writeln!(
            out,
            "- Peak RSS, every workload <= 1.25x mimalloc: {} ({})\n",
            if fat.is_empty() {
                "all within".to_string()
            } else {
                fat.join(", ")
            },
            mark(fat.is_empty())
        );
    }

    /// Two panels of horizontal bars, time and peak RSS, each relative to glibc on a log
    /// scale, one group per workload, one bar per allocator.
    fn svg(&self) -> String {
        const COLORS: [&str; 7] = [
            "#8c8c8c", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#e377c2",
        ];
        let color = |a: usize| match self.allocators[a].as_str() {
            "glibc" => COLORS[0],
            "coreheap" => COLORS[1],
            "jemalloc" => COLORS[2],
            "mimalloc" => COLORS[3],
            "tcmalloc" => COLORS[4],
            "coreheap-locked" => COLORS[5],
            _ => COLORS[6],
        };
        let na = self.allocators.len();
        let bar = 11.0;
        let group = bar * na as f64 + 12.0;
        let label_w = 110.0;
        let panel_w = 330.0;
        let top = 70.0;
        let height = top + group * self.workloads.len() as f64 + 50.0;
        let width = label_w + 2.0 * panel_w + 80.0;
        // Log2 scale from 1/4 to 4; bars beyond are cut at the edge and labelled.
        let (lo, hi) = (-2.0f64, 2.0f64);
        let gap = 50.0;
        let x_of = |panel: usize, r: f64| {
            let l = r.max(1e-9).log2().clamp(lo, hi);
            label_w + panel as f64 * (panel_w + gap) + (l - lo) / (hi - lo) * panel_w
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"11\">"
        );
        let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">coreheap vs peers, \
             relative to glibc (log scale; left of 1 is better)</text>",
            label_w
        );
        // Legend.
        let mut lx = label_w;
        for a in 0..na {
            let _ = writeln!(
                s,
                "<rect x=\"{lx}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{}\"/>\
                 <text x=\"{}\" y=\"37\">{}</text>",
                color(a),
                lx + 14.0,
                self.allocators[a]
            );
            // About 7 px per character at the default 12 px font, and a gap.
            lx += 14.0 + 7.0 * self.allocators[a].len() as f64 + 24.0;
        }
        let glibc = self.index("glibc");
        for (panel, (title, v)) in [("wall time", &self.time), ("peak RSS", &self.rss)]
            .into_iter()
            .enumerate()
        {
            let x0 = label_w + panel as f64 * (panel_w + gap);
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" font-weight=\"bold\" text-anchor=\"middle\">{title}</text>",
                x0 + panel_w / 2.0,
                top - 10.0
            );
            for t in [0.25, 0.5, 1.0, 2.0, 4.0] {
                let x = x_of(panel, t);
                let _ = writeln!(
                    s,
                    "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{}\" stroke=\"{}\"/>\
                     <text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}x</text>",
                    height - 40.0,
                    if t == 1.0 { "#000" } else { "#ddd" },
                    height - 27.0,
                    t
                );
            }
            let Some(g) = glibc else { continue };
            for (w, row) in v.iter().enumerate() {
                let y0 = top + w as f64 * group + 6.0;
                if panel == 0 {
                    let _ = writeln!(
                        s,
                        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                        label_w - 8.0,
                        y0 + bar * na as f64 / 2.0 + 4.0,
                        self.workloads[w]
                    );
                }
                for (a, &x) in row.iter().enumerate() {
                    let r = if row[g] > 0.0 { x / row[g] } else { 1.0 };
                    let (x1, x2) = (x_of(panel, 1.0), x_of(panel, r));
                    let y = y0 + a as f64 * bar;
                    let _ = writeln!(
                        s,
                        "<rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{}\"/>",
                        x1.min(x2),
                        (x2 - x1).abs().max(1.0),
                        bar - 2.0,
                        color(a)
                    );
                    if a == self.index("coreheap").unwrap_or(usize::MAX)
                        || !(0.25..=4.0).contains(&r)
                    {
                        let _ = writeln!(
                            s,
                            "<text x=\"{}\" y=\"{}\" font-size=\"9\">{r:.2}</text>",
                            x1.max(x2) + 3.0,
                            y + bar - 3.0
                        );
                    }
                }
            }
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

/// CPUs, kernel and C library, for the report's header.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let glibc = unsafe { std::ffi::CStr::from_ptr(gnu_get_libc_version()) }
        .to_string_lossy()
        .into_owned();
    format!("{cpus} CPUs ({model}), Linux {kernel}, glibc {glibc}")
}

extern "C" {
    fn gnu_get_libc_version() -> *const libc::c_char;
}
