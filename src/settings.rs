//! Settings: every `COREHEAP_*` environment variable the library reads, in one table
//! ([`VARS`]), parsed by one rule set and read once, lazily, in one place ([`get`]).
//!
//! Rules (the kind of each variable is in [`VARS`]):
//! - a boolean is `1`/`0`, `true`/`false`, `yes`/`no` or `on`/`off`, in any case;
//! - a count is a decimal number (digits only);
//! - a size is a decimal number with an optional `K`, `M` or `G` suffix (any case; powers of
//!   1024);
//! - a variable that is unset or set to the empty string takes its default, silently;
//! - a count or size above its range (however many digits it has) is clamped to the
//!   largest value;
//! - any other value that does not parse (or a count below its range) is not used.
//!
//! Every value not used as written is reported once, on stderr, as
//! `coreheap: NAME=VALUE is not RULE; using USED`, where USED is what is used instead: the
//! clamped value, else the value the program chose (`CoreHeap`'s builder or `mallopt`,
//! followed by "(set by the program)"), else the default.
//!
//! Reading never allocates, never panics and keeps `errno`, so [`get`] may be called from
//! inside `malloc`, before the heap exists. The heap's initialisation merges these with what
//! a program chose through `CoreHeap`'s builder or `mallopt(M_ARENA_MAX)` (the environment
//! wins; `resolve`), and reports the values it could not use then, naming what it used;
//! the C interface's first look at `COREHEAP_SHM` reports them too, if it comes first (the
//! C interface has no builder).
//! `COREHEAP_LIB` is the runner's, not the
//! library's, and is not here.

use core::cell::UnsafeCell;
use core::ffi::CStr;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::diag::Line;
use crate::os;
pub(crate) use crate::overrides::Overrides;

/// The largest arena count `COREHEAP_ARENAS` may ask for.
pub const MAX_ARENAS: usize = 4096;

/// The largest `COREHEAP_DIRTY_MAX`: 1 TiB.
pub const DIRTY_MAX_LIMIT: u64 = 1 << 40;

/// The longest shared heap name of `COREHEAP_SHM`: `/dev/shm/NAME` must fit in
/// `shm::PATH_MAX` (255) bytes.
pub const SHM_NAME_MAX: usize = 255 - b"/dev/shm/".len();

/// The typed value of every setting.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Settings {
    /// `COREHEAP_ARENAS`: the arena count asked for (1 to [`MAX_ARENAS`]), or `None` for one
    /// per CPU the process may run on.
    pub arenas: Option<usize>,
    /// `COREHEAP_STATS`: print the statistics report to stderr at exit.
    pub stats: bool,
    /// `COREHEAP_STATS=json`: that report as one JSON object.
    pub stats_json: bool,
    /// `COREHEAP_RSEQ`: the per-CPU caches may be used (where rseq is available).
    pub rseq: bool,
    /// `COREHEAP_DEBUG`: debug mode (guard bytes, fill patterns).
    pub debug: bool,
    /// `COREHEAP_CHECK`: check every arena at exit.
    pub check: bool,
    /// `COREHEAP_SHM`: the shared heap the C interface takes its blocks from.
    pub shm: Option<ShmSpec>,
    /// `COREHEAP_PURGE_MS`: milliseconds after which unused dirty pages and cached huge
    /// spans go back to the OS (`None`: 1000).
    pub purge_ms: Option<usize>,
    /// `COREHEAP_DIRTY_MAX`: dirty bytes an arena may always keep, and the most bytes of
    /// huge spans kept for reuse (`None`: 64 MiB).
    pub dirty_max: Option<u64>,
}

impl Settings {
    /// Every setting at its default (what an empty environment gives).
    pub const DEFAULT: Settings = Settings {
        arenas: None,
        stats: false,
        stats_json: false,
        rseq: true,
        debug: false,
        check: false,
        shm: None,
        purge_ms: None,
        dirty_max: None,
    };
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A `COREHEAP_SHM=NAME:SIZE` value: the heap `/dev/shm/NAME`, created with `size` bytes if
/// it does not exist.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ShmSpec {
    name: [u8; SHM_NAME_MAX],
    name_len: usize,
    /// The size in bytes.
    pub size: u64,
}

impl ShmSpec {
    /// The name (non-empty, no `/`, at most [`SHM_NAME_MAX`] bytes, no NUL).
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }
}

/// How a variable is parsed, and where its value goes in [`Settings`].
#[derive(Clone, Copy)]
pub enum Kind {
    /// A boolean.
    Bool(fn(&mut Settings) -> &mut bool),
    /// A count from `min` to `max` (a larger one is reported and clamped to `max`).
    Count {
        /// The smallest value accepted.
        min: usize,
        /// The largest value used.
        max: usize,
        /// Where the value goes.
        field: fn(&mut Settings) -> &mut Option<usize>,
    },
    /// `NAME:SIZE`: a name without `/` and a size.
    NameSize(fn(&mut Settings) -> &mut Option<ShmSpec>),
    /// A size in bytes, with an optional K, M or G suffix, at most `max` (a larger one is
    /// reported and clamped to `max`).
    Size {
        /// The largest value used.
        max: u64,
        /// Where the value goes.
        field: fn(&mut Settings) -> &mut Option<u64>,
    },
    /// A boolean, or `json`: the report on, as JSON.
    Report {
        /// Whether the report is on.
        on: fn(&mut Settings) -> &mut bool,
        /// Whether it is JSON.
        json: fn(&mut Settings) -> &mut bool,
    },
}

impl Kind {
    /// Appends the rule a value must follow, as the reports say it ("a boolean (...)").
    pub(crate) fn describe(&self, l: &mut Line) {
        match *self {
            Kind::Bool(_) => l.str(b"a boolean (1/0, true/false, yes/no, on/off)"),
            Kind::Report { .. } => l.str(b"a boolean (1/0, true/false, yes/no, on/off) or json"),
            Kind::Size { max, .. } => l
                .str(b"a size in bytes (with K, M or G) up to ")
                .num(max >> 30)
                .str(b"G"),
            Kind::Count { min, max, .. } => l
                .str(b"a number from ")
                .num(min as u64)
                .str(b" to ")
                .num(max as u64),
            Kind::NameSize(_) => {
                l.str(b"NAME:SIZE (e.g. myheap:256M; SIZE in bytes, or with K, M or G)")
            }
        };
    }
}

/// One environment variable.
#[derive(Clone, Copy)]
pub struct Var {
    /// The variable's name.
    pub name: &'static CStr,
    /// Its parse rule and where its value goes.
    pub kind: Kind,
    /// The value used when it is unset, empty or bad, as the reports say it.
    pub default: &'static str,
    /// What it does, in one line.
    pub meaning: &'static str,
}

/// Every `COREHEAP_*` variable the library reads.
pub const VARS: [Var; 8] = [
    Var {
        name: c"COREHEAP_ARENAS",
        kind: Kind::Count {
            min: 1,
            max: MAX_ARENAS,
            field: |s| &mut s.arenas,
        },
        default: "one per CPU",
        meaning: "use this many arenas instead of one per CPU the process may run on",
    },
    Var {
        name: c"COREHEAP_STATS",
        kind: Kind::Report {
            on: |s| &mut s.stats,
            json: |s| &mut s.stats_json,
        },
        default: "0",
        meaning: "print the statistics report to stderr at exit (json: as one JSON object)",
    },
    Var {
        name: c"COREHEAP_RSEQ",
        kind: Kind::Bool(|s| &mut s.rseq),
        default: "1",
        meaning: "0 turns the lock-free per-CPU caches off (the locked path only)",
    },
    Var {
        name: c"COREHEAP_DEBUG",
        kind: Kind::Bool(|s| &mut s.debug),
        default: "0",
        meaning: "debug mode: guard bytes and fill patterns, checked at free and realloc",
    },
    Var {
        name: c"COREHEAP_CHECK",
        kind: Kind::Bool(|s| &mut s.check),
        default: "0",
        meaning: "check every arena's invariants at exit",
    },
    Var {
        name: c"COREHEAP_SHM",
        kind: Kind::NameSize(|s| &mut s.shm),
        default: "the process heap",
        meaning: "the C interface takes the whole heap from the shared heap /dev/shm/NAME",
    },
    Var {
        name: c"COREHEAP_PURGE_MS",
        kind: Kind::Count {
            min: 0,
            max: 3_600_000,
            field: |s| &mut s.purge_ms,
        },
        default: "1000",
        meaning: "milliseconds after which unused dirty pages and cached huge spans go back",
    },
    Var {
        name: c"COREHEAP_DIRTY_MAX",
        kind: Kind::Size {
            max: DIRTY_MAX_LIMIT,
            field: |s| &mut s.dirty_max,
        },
        default: "64M",
        meaning: "dirty bytes an arena always may keep, and the huge spans kept for reuse",
    },
];

// The positions of the variables a program may set, in `VARS`.
const ARENAS: usize = 0;
const STATS: usize = 1;
const RSEQ: usize = 2;
const DEBUG: usize = 3;
const PURGE_MS: usize = 6;
const DIRTY_MAX: usize = 7;

/// The arena count `mallopt(M_ARENA_MAX)` asked for before the heap existed (0: none).
static ARENA_MAX: AtomicUsize = AtomicUsize::new(0);

/// `mallopt(M_ARENA_MAX, n)`: the heap's initialisation, if it has not begun, uses `n`
/// arenas, as if the builder had asked for them (over the builder's own choice; the
/// environment still wins). Has no effect once the heap is initialised.
pub(crate) fn set_arena_max(n: usize) {
    ARENA_MAX.store(n, Ordering::Relaxed);
}

/// The dirty bytes `mallopt(M_TRIM_THRESHOLD)` chose last (`u64::MAX`: none).
static DIRTY_MAX_SET: AtomicU64 = AtomicU64::new(u64::MAX);

/// `mallopt(M_TRIM_THRESHOLD)`: the dirty bytes kept, as the program's choice (over the
/// builder's; the environment still wins), now and for an initialisation still to come.
pub(crate) fn set_dirty_max(bytes: u64) {
    if env_decides(DIRTY_MAX) {
        return;
    }
    let bytes = bytes.min(DIRTY_MAX_LIMIT);
    DIRTY_MAX_SET.store(bytes, Ordering::Relaxed);
    crate::policy::set_dirty_max(bytes as usize);
}

/// Whether the environment decided the setting at `VARS[i]` (a good or clamped value), so
/// that a program's own choice for it (the builder, `mallopt`) is not used.
fn env_decides(i: usize) -> bool {
    get_with_set().1 & (1 << i) != 0
}

/// The settings the process heap's initialisation uses: the environment over `ov` (the
/// builder's choices, with `mallopt`'s arena count and dirty bytes over the builder's) over
/// the defaults. A variable whose value is bad leaves the program's value, if any. The one
/// place the sources meet; reports the environment's unused values (once per process),
/// naming what is used.
pub(crate) fn resolve(ov: Option<&Overrides>) -> Settings {
    let (env, set) = get_with_set();
    let mut ov = *ov.unwrap_or(&Overrides::NONE);
    match ARENA_MAX.load(Ordering::Relaxed) {
        0 => {}
        n => ov.arenas = Some(n),
    }
    match DIRTY_MAX_SET.load(Ordering::Relaxed) {
        u64::MAX => {}
        b => ov.dirty_max = Some(b),
    }
    report_once(&ov);
    merge(env, set, &ov)
}

/// Reports, once per process, every value of the environment not used as written, naming
/// what is used with the program's choices `ov`.
pub(crate) fn report_once(ov: &Overrides) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.swap(true, Ordering::Relaxed) {
        os::keeping_errno(|| report(&process_env, ov, &mut |line| os::write_all(2, line)));
    }
}

/// [`resolve`] from the environment's settings `env` and the set of variables it decided.
fn merge(env: Settings, set: u16, ov: &Overrides) -> Settings {
    let mut s = env;
    let builder = |i: usize| set & (1 << i) == 0;
    let count = |n: u64, i: usize| match VARS[i].kind {
        Kind::Count { min, max, .. } => n.clamp(min as u64, max as u64) as usize,
        _ => n as usize,
    };
    if let (Some(n), true) = (ov.arenas, builder(ARENAS)) {
        s.arenas = Some(count(n as u64, ARENAS));
    }
    if let (Some(ms), true) = (ov.purge_ms, builder(PURGE_MS)) {
        s.purge_ms = Some(count(ms as u64, PURGE_MS));
    }
    if let (Some(b), true) = (ov.dirty_max, builder(DIRTY_MAX)) {
        s.dirty_max = Some(match VARS[DIRTY_MAX].kind {
            Kind::Size { max, .. } => b.min(max),
            _ => b,
        });
    }
    if let (Some(b), true) = (ov.debug, builder(DEBUG)) {
        s.debug = b;
    }
    if let (Some(b), true) = (ov.rseq, builder(RSEQ)) {
        s.rseq = b;
    }
    if let (Some(b), true) = (ov.stats, builder(STATS)) {
        s.stats = b;
    }
    s
}

/// `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`, in any case.
fn parse_bool(v: &[u8]) -> Option<bool> {
    const TRUE: [&[u8]; 4] = [b"1", b"true", b"yes", b"on"];
    const FALSE: [&[u8]; 4] = [b"0", b"false", b"no", b"off"];
    let is = |words: [&[u8]; 4]| words.iter().any(|w| w.eq_ignore_ascii_case(v));
    if is(TRUE) {
        Some(true)
    } else if is(FALSE) {
        Some(false)
    } else {
        None
    }
}

/// A non-empty string of decimal digits that fits in a `u64`.
fn parse_count(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// A non-empty string of decimal digits, `u64::MAX` if it is larger.
fn parse_count_sat(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(parse_count(v).unwrap_or(u64::MAX))
}

/// Splits a size into its digits and the shift of its `K`, `M` or `G` suffix (any case).
fn split_size(v: &[u8]) -> Option<(&[u8], u32)> {
    Some(match v.last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    })
}

/// A count with an optional `K`, `M` or `G` suffix (any case), in bytes.
fn parse_size(v: &[u8]) -> Option<u64> {
    let (digits, shift) = split_size(v)?;
    parse_count(digits)?.checked_mul(1 << shift)
}

/// [`parse_size`], `u64::MAX` for a size that does not fit.
fn parse_size_sat(v: &[u8]) -> Option<u64> {
    let (digits, shift) = split_size(v)?;
    let n = parse_count_sat(digits)?;
    Some(n.saturating_mul(1 << shift))
}

/// `NAME:SIZE`, split at the last colon.
fn parse_name_size(v: &[u8]) -> Option<ShmSpec> {
    let colon = v.iter().rposition(|&c| c == b':')?;
    let (name, size) = (&v[..colon], &v[colon + 1..]);
    if name.is_empty() || name.len() > SHM_NAME_MAX || name.contains(&b'/') {
        return None;
    }
    let mut spec = ShmSpec {
        name: [0; SHM_NAME_MAX],
        name_len: name.len(),
        size: parse_size(size)?,
    };
    spec.name[..name.len()].copy_from_slice(name);
    Some(spec)
}

/// The longest part of a bad value a report quotes.
const QUOTE_MAX: usize = 64;

/// What became of a value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Used as written.
    Used,
    /// Above the range: the largest value, this one, is used.
    Clamped(u64),
    /// Not used.
    Bad,
}

/// Sets `var` in `s` from its non-empty value `v`; a bad value leaves `s` as it was.
fn apply(s: &mut Settings, var: &Var, v: &[u8]) -> Outcome {
    let used = |ok: bool| if ok { Outcome::Used } else { Outcome::Bad };
    match var.kind {
        Kind::Bool(field) => used(parse_bool(v).map(|b| *field(s) = b).is_some()),
        Kind::Count { min, max, field } => match parse_count_sat(v) {
            Some(n) if n > max as u64 => {
                *field(s) = Some(max);
                Outcome::Clamped(max as u64)
            }
            Some(n) if n >= min as u64 => {
                *field(s) = Some(n as usize);
                Outcome::Used
            }
            _ => Outcome::Bad,
        },
        Kind::NameSize(field) => used(
            parse_name_size(v)
                .map(|spec| *field(s) = Some(spec))
                .is_some(),
        ),
        Kind::Size { max, field } => match parse_size_sat(v) {
            Some(n) if n > max => {
                *field(s) = Some(max);
                Outcome::Clamped(max)
            }
            Some(n) => {
                *field(s) = Some(n);
                Outcome::Used
            }
            None => Outcome::Bad,
        },
        Kind::Report { on, json } => {
            let as_json = v.eq_ignore_ascii_case(b"json");
            match parse_bool(v) {
                _ if as_json => {
                    *on(s) = true;
                    *json(s) = true;
                    Outcome::Used
                }
                Some(b) => {
                    *on(s) = b;
                    Outcome::Used
                }
                None => Outcome::Bad,
            }
        }
    }
}

/// Appends a size in bytes as the variables write it: with the largest suffix that divides
/// it exactly (`64M`, `1024G`, `4097`).
fn size_text(l: &mut Line, n: u64) {
    match [(30, b"G"), (20, b"M"), (10, b"K")]
        .into_iter()
        .find(|&(shift, _)| n != 0 && n.trailing_zeros() >= shift)
    {
        Some((shift, suffix)) => l.num(n >> shift).str(suffix),
        None => l.num(n),
    };
}

/// Appends the value `s` holds for `VARS[i]`, as a variable would say it, if the program
/// chose it (`ov`); false if it did not.
fn program_value(l: &mut Line, i: usize, s: &Settings, ov: &Overrides) -> bool {
    let flag = |l: &mut Line, b: bool| {
        l.str(if b { b"1" } else { b"0" });
    };
    match i {
        ARENAS if ov.arenas.is_some() => {
            l.num(s.arenas.unwrap_or(0) as u64);
        }
        PURGE_MS if ov.purge_ms.is_some() => {
            l.num(s.purge_ms.unwrap_or(0) as u64);
        }
        DIRTY_MAX if ov.dirty_max.is_some() => size_text(l, s.dirty_max.unwrap_or(0)),
        DEBUG if ov.debug.is_some() => flag(l, s.debug),
        RSEQ if ov.rseq.is_some() => flag(l, s.rseq),
        STATS if ov.stats.is_some() => flag(l, s.stats),
        _ => return false,
    }
    l.str(b" (set by the program)");
    true
}

/// Reports through `out` (one line each, ending with a newline) every value of `env` not
/// used as written, naming what is used instead with the program's choices `ov`.
fn report(env: Lookup, ov: &Overrides, out: &mut dyn FnMut(&[u8])) {
    let (s, set) = read(env);
    let merged = merge(s, set, ov);
    for (i, var) in VARS.iter().enumerate() {
        env(var.name, &mut |v| {
            let Some(v) = v.filter(|v| !v.is_empty()) else {
                return;
            };
            let mut scratch = Settings::DEFAULT;
            let outcome = apply(&mut scratch, var, v);
            if outcome == Outcome::Used {
                return;
            }
            let mut l = Line::new();
            l.str(b"coreheap: ")
                .str(var.name.to_bytes())
                .str(b"=")
                .str(&v[..v.len().min(QUOTE_MAX)]);
            if v.len() > QUOTE_MAX {
                l.str(b"...");
            }
            l.str(b" is not ");
            var.kind.describe(&mut l);
            l.str(b"; using ");
            match (outcome, var.kind) {
                (Outcome::Clamped(n), Kind::Size { .. }) => size_text(&mut l, n),
                (Outcome::Clamped(n), _) => {
                    l.num(n);
                }
                _ => {
                    if !program_value(&mut l, i, &merged, ov) {
                        l.str(var.default.as_bytes());
                    }
                }
            }
            l.str(b"\n");
            out(l.as_bytes());
        });
    }
}

/// Looks a variable up and hands its value (or `None`) to the callback.
type Lookup<'a> = &'a dyn Fn(&CStr, &mut dyn FnMut(Option<&[u8]>));

/// Every setting from `env` (quietly: [`report`] says what was not used); with the set of
/// variables whose value the environment decided (bit `i` for `VARS[i]`: a good value, or
/// one clamped to its range).
fn read(env: Lookup) -> (Settings, u16) {
    let mut s = Settings::DEFAULT;
    let mut set = 0u16;
    for (i, var) in VARS.iter().enumerate() {
        env(var.name, &mut |v| {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                if apply(&mut s, var, v) != Outcome::Bad {
                    set |= 1 << i;
                }
            }
        });
    }
    (s, set)
}

/// The process's environment, through the OS layer.
fn process_env(name: &CStr, f: &mut dyn FnMut(Option<&[u8]>)) {
    os::env::with_var(name, f)
}

const UNREAD: u8 = 0;
const READING: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNREAD);

/// The settings, written once before `STATE` becomes `READY`.
struct Slot(UnsafeCell<MaybeUninit<(Settings, u16)>>);
// SAFETY: written by one thread (the one that moved STATE from UNREAD to READING) before its
// Release store of READY; read only after an Acquire load of READY; never written again.
unsafe impl Sync for Slot {}
static SLOT: Slot = Slot(UnsafeCell::new(MaybeUninit::uninit()));

/// The settings of this process, read from the environment at the first call (a thread
/// that calls while another is reading reads the environment itself). Quiet: the heap's
/// initialisation reports the values it could not use (see the module documentation).
/// Never allocates, never panics, keeps `errno`.
#[inline]
pub fn get() -> Settings {
    get_with_set().0
}

/// [`get`], with the set of variables the environment decided (see [`read`]).
#[inline]
fn get_with_set() -> (Settings, u16) {
    if STATE.load(Ordering::Acquire) == READY {
        // SAFETY: READY is stored (Release) only after the slot was written; never changes.
        return unsafe { (*SLOT.0.get()).assume_init() };
    }
    os::keeping_errno(read_once)
}

#[cold]
fn read_once() -> (Settings, u16) {
    match STATE.compare_exchange(UNREAD, READING, Ordering::Acquire, Ordering::Acquire) {
        Ok(_) => {
            let s = read(&process_env);
            // SAFETY: only this thread writes the slot (it moved STATE to READING), and no
            // one reads it before READY.
            unsafe { (*SLOT.0.get()).write(s) };
            STATE.store(READY, Ordering::Release);
            s
        }
        // SAFETY: as in `get`.
        Err(READY) => unsafe { (*SLOT.0.get()).assume_init() },
        Err(_) => read(&process_env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `pairs` as the environment; returns the settings and the reports.
    fn read_from(pairs: &[(&str, &str)]) -> (Settings, Vec<String>) {
        let (s, _) = read(&|name, f| lookup(pairs, name, f));
        (s, reports_for(pairs, &Overrides::NONE))
    }

    fn lookup(pairs: &[(&str, &str)], name: &CStr, f: &mut dyn FnMut(Option<&[u8]>)) {
        let name = name.to_str().unwrap();
        f(pairs.iter().find(|p| p.0 == name).map(|p| p.1.as_bytes()))
    }

    /// The reports for `pairs` as the environment, with the program's choices `ov`.
    fn reports_for(pairs: &[(&str, &str)], ov: &Overrides) -> Vec<String> {
        let mut reports = Vec::new();
        report(&|name, f| lookup(pairs, name, f), ov, &mut |l| {
            reports.push(String::from_utf8(l.to_vec()).unwrap())
        });
        reports
    }

    /// The settings with `ov` merged, `pairs` as the environment.
    fn resolve_from(pairs: &[(&str, &str)], ov: &Overrides) -> Settings {
        let env = |name: &CStr, f: &mut dyn FnMut(Option<&[u8]>)| {
            let name = name.to_str().unwrap();
            f(pairs.iter().find(|p| p.0 == name).map(|p| p.1.as_bytes()))
        };
        let (s, set) = read(&env);
        merge(s, set, ov)
    }

    #[test]
    fn the_builder_positions_name_their_variables() {
        for (i, name) in [
            (ARENAS, "COREHEAP_ARENAS"),
            (STATS, "COREHEAP_STATS"),
            (RSEQ, "COREHEAP_RSEQ"),
            (DEBUG, "COREHEAP_DEBUG"),
            (PURGE_MS, "COREHEAP_PURGE_MS"),
            (DIRTY_MAX, "COREHEAP_DIRTY_MAX"),
        ] {
            assert_eq!(VARS[i].name.to_str().unwrap(), name);
        }
    }

    #[test]
    fn the_environment_over_the_builder_over_the_defaults() {
        let ov = Overrides {
            arenas: Some(3),
            purge_ms: Some(200),
            dirty_max: Some(1 << 20),
            debug: Some(true),
            rseq: Some(false),
            stats: Some(true),
        };
        assert_eq!(resolve_from(&[], &Overrides::NONE), Settings::DEFAULT);
        let s = resolve_from(&[], &ov);
        assert_eq!(
            (s.arenas, s.purge_ms, s.dirty_max),
            (Some(3), Some(200), Some(1 << 20))
        );
        assert!(s.debug && !s.rseq && s.stats);
        let s = resolve_from(
            &[
                ("COREHEAP_ARENAS", "2"),
                ("COREHEAP_PURGE_MS", "5"),
                ("COREHEAP_DIRTY_MAX", "2M"),
                ("COREHEAP_DEBUG", "0"),
                ("COREHEAP_RSEQ", "1"),
                ("COREHEAP_STATS", "no"),
            ],
            &ov,
        );
        assert_eq!(
            (s.arenas, s.purge_ms, s.dirty_max),
            (Some(2), Some(5), Some(2 << 20))
        );
        assert!(!s.debug && s.rseq && !s.stats);
        // A bad value leaves the builder's; a clamped one is the environment's.
        let s = resolve_from(&[("COREHEAP_ARENAS", "abc"), ("COREHEAP_DEBUG", "x")], &ov);
        assert_eq!(s.arenas, Some(3));
        assert!(s.debug);
        let s = resolve_from(&[("COREHEAP_ARENAS", "9999")], &ov);
        assert_eq!(s.arenas, Some(MAX_ARENAS));
        // The builder's values are clamped to the variables' ranges.
        let wild = Overrides {
            arenas: Some(0),
            purge_ms: Some(u32::MAX),
            dirty_max: Some(u64::MAX),
            ..Overrides::NONE
        };
        let s = resolve_from(&[], &wild);
        assert_eq!(
            (s.arenas, s.purge_ms, s.dirty_max),
            (Some(1), Some(3_600_000), Some(1 << 40))
        );
    }

    #[test]
    fn every_boolean_spelling() {
        for v in ["1", "true", "TRUE", "True", "yes", "YES", "on", "On"] {
            assert_eq!(parse_bool(v.as_bytes()), Some(true), "{v}");
        }
        for v in ["0", "false", "False", "no", "NO", "off", "OFF"] {
            assert_eq!(parse_bool(v.as_bytes()), Some(false), "{v}");
        }
        for v in ["", "2", "maybe", "y", "n", "01", " 1", "1 ", "truee", "o"] {
            assert_eq!(parse_bool(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn counts_and_sizes() {
        assert_eq!(parse_count(b"0"), Some(0));
        assert_eq!(parse_count(b"4096"), Some(4096));
        assert_eq!(parse_count(b"18446744073709551615"), Some(u64::MAX));
        for v in [
            "",
            "18446744073709551616",
            "-1",
            "+1",
            "1k",
            "1.5",
            " 1",
            "0x10",
        ] {
            assert_eq!(parse_count(v.as_bytes()), None, "{v:?}");
        }
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"4k"), Some(4 << 10));
        assert_eq!(parse_size(b"4K"), Some(4 << 10));
        assert_eq!(parse_size(b"256m"), Some(256 << 20));
        assert_eq!(parse_size(b"256M"), Some(256 << 20));
        assert_eq!(parse_size(b"2g"), Some(2 << 30));
        assert_eq!(parse_size(b"2G"), Some(2 << 30));
        assert_eq!(parse_size(b"17179869183G"), Some(17179869183 << 30));
        for v in [
            "",
            "K",
            "12Q",
            "1KB",
            "1T",
            "17179869184G",
            "99999999999999999999G",
            "1 M",
        ] {
            assert_eq!(parse_size(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn name_and_size() {
        let s = parse_name_size(b"cache:256M").unwrap();
        assert_eq!((s.name(), s.size), (&b"cache"[..], 256 << 20));
        assert_eq!(parse_name_size(b"a:b:4096").unwrap().name(), b"a:b");
        let long = [b'n'; SHM_NAME_MAX];
        let mut v = long.to_vec();
        v.extend_from_slice(b":1M");
        assert_eq!(parse_name_size(&v).unwrap().name(), &long[..]);
        v.insert(0, b'n');
        assert!(parse_name_size(&v).is_none());
        for v in [
            "x",
            ":1M",
            "a/b:1M",
            "x:12Q",
            "x:",
            "x:99999999999999999999G",
        ] {
            assert!(parse_name_size(v.as_bytes()).is_none(), "{v:?}");
        }
    }

    #[test]
    fn defaults_and_typed_values() {
        let (s, r) = read_from(&[]);
        assert_eq!(s, Settings::DEFAULT);
        assert!(r.is_empty());
        let (s, r) = read_from(&[
            ("COREHEAP_ARENAS", "3"),
            ("COREHEAP_STATS", "yes"),
            ("COREHEAP_RSEQ", "off"),
            ("COREHEAP_DEBUG", "TRUE"),
            ("COREHEAP_CHECK", "on"),
            ("COREHEAP_SHM", "h:1K"),
        ]);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(s.arenas, Some(3));
        assert!(s.stats && !s.rseq && s.debug && s.check);
        let shm = s.shm.unwrap();
        assert_eq!((shm.name(), shm.size), (&b"h"[..], 1024));
        // Empty is unset.
        let (s, r) = read_from(&[("COREHEAP_RSEQ", ""), ("COREHEAP_SHM", "")]);
        assert_eq!((s, r.len()), (Settings::DEFAULT, 0));
        // The old spellings keep their meaning.
        let (s, _) = read_from(&[("COREHEAP_STATS", "1"), ("COREHEAP_RSEQ", "0")]);
        assert!(s.stats && !s.rseq);
    }

    #[test]
    fn bad_values_are_reported_with_what_is_used() {
        let (s, r) = read_from(&[
            ("COREHEAP_DEBUG", "maybe"),
            ("COREHEAP_ARENAS", "abc"),
            ("COREHEAP_RSEQ", "2"),
            ("COREHEAP_SHM", "nocolon"),
        ]);
        assert_eq!(s, Settings::DEFAULT);
        assert_eq!(
            r,
            [
                "coreheap: COREHEAP_ARENAS=abc is not a number from 1 to 4096; using one per CPU\n",
                "coreheap: COREHEAP_RSEQ=2 is not a boolean (1/0, true/false, yes/no, on/off); using 1\n",
                "coreheap: COREHEAP_DEBUG=maybe is not a boolean (1/0, true/false, yes/no, on/off); using 0\n",
                "coreheap: COREHEAP_SHM=nocolon is not NAME:SIZE (e.g. myheap:256M; SIZE in bytes, or with K, M or G); using the process heap\n",
            ]
        );
        let (s, r) = read_from(&[("COREHEAP_ARENAS", "0")]);
        assert_eq!(s.arenas, None);
        assert_eq!(r.len(), 1);
        let (s, r) = read_from(&[("COREHEAP_ARENAS", "5000")]);
        assert_eq!(s.arenas, Some(MAX_ARENAS));
        assert_eq!(
            r,
            ["coreheap: COREHEAP_ARENAS=5000 is not a number from 1 to 4096; using 4096\n"]
        );
        // However many digits: above the range, clamped.
        let (s, r) = read_from(&[("COREHEAP_ARENAS", "99999999999999999999999")]);
        assert_eq!(s.arenas, Some(MAX_ARENAS));
        assert!(r[0].ends_with("; using 4096\n"), "{r:?}");
    }

    #[test]
    fn sizes_above_their_maximum_are_clamped() {
        for v in [
            "2048G",
            "1099511627777",
            "99999999999999999999G",
            "18446744073709551616",
        ] {
            let (s, r) = read_from(&[("COREHEAP_DIRTY_MAX", v)]);
            assert_eq!(s.dirty_max, Some(DIRTY_MAX_LIMIT), "{v}");
            assert_eq!(
                r,
                [format!(
                    "coreheap: COREHEAP_DIRTY_MAX={v} is not a size in bytes (with K, M or G) up to 1024G; using 1024G\n"
                )]
            );
        }
        // The largest itself is used quietly; a clamped value decides over the builder's.
        let (s, r) = read_from(&[("COREHEAP_DIRTY_MAX", "1024G")]);
        assert_eq!((s.dirty_max, r.len()), (Some(DIRTY_MAX_LIMIT), 0));
        let ov = Overrides {
            dirty_max: Some(1 << 20),
            ..Overrides::NONE
        };
        let s = resolve_from(&[("COREHEAP_DIRTY_MAX", "5000G")], &ov);
        assert_eq!(s.dirty_max, Some(DIRTY_MAX_LIMIT));
        // Not a size at all: the default.
        let (s, r) = read_from(&[("COREHEAP_DIRTY_MAX", "12Q")]);
        assert_eq!(s.dirty_max, None);
        assert!(r[0].ends_with("; using 64M\n"), "{r:?}");
    }

    #[test]
    fn a_bad_value_names_the_programs_value() {
        let ov = Overrides {
            arenas: Some(7),
            purge_ms: Some(250),
            dirty_max: Some(3 << 20),
            debug: Some(true),
            rseq: Some(false),
            stats: Some(true),
        };
        let bad = [
            ("COREHEAP_ARENAS", "abc"),
            ("COREHEAP_STATS", "x"),
            ("COREHEAP_RSEQ", "x"),
            ("COREHEAP_DEBUG", "maybe"),
            ("COREHEAP_PURGE_MS", "-1"),
            ("COREHEAP_DIRTY_MAX", "lots"),
        ];
        let r = reports_for(&bad, &ov);
        let used: Vec<&str> = r
            .iter()
            .map(|l| l.rsplit_once("; using ").unwrap().1)
            .collect();
        assert_eq!(
            used,
            [
                "7 (set by the program)\n",
                "1 (set by the program)\n",
                "0 (set by the program)\n",
                "1 (set by the program)\n",
                "250 (set by the program)\n",
                "3M (set by the program)\n",
            ]
        );
        // The builder's value as merged: clamped to the variable's range.
        let big = Overrides {
            arenas: Some(100_000),
            ..Overrides::NONE
        };
        let r = reports_for(&[("COREHEAP_ARENAS", "0")], &big);
        assert!(
            r[0].ends_with("; using 4096 (set by the program)\n"),
            "{r:?}"
        );
        // Without the program's choice, the default.
        let r = reports_for(&bad[..1], &Overrides::NONE);
        assert!(r[0].ends_with("; using one per CPU\n"), "{r:?}");
        // A clamped value is the environment's, whatever the program chose.
        let r = reports_for(&[("COREHEAP_ARENAS", "5000")], &ov);
        assert!(r[0].ends_with("; using 4096\n"), "{r:?}");
    }

    #[test]
    fn sizes_are_written_with_their_suffix() {
        let text = |n: u64| {
            let mut l = Line::new();
            size_text(&mut l, n);
            String::from_utf8(l.as_bytes().to_vec()).unwrap()
        };
        assert_eq!(text(0), "0");
        assert_eq!(text(4097), "4097");
        assert_eq!(text(4096), "4K");
        assert_eq!(text(3 << 20), "3M");
        assert_eq!(text(1 << 40), "1024G");
        assert_eq!(text((1 << 30) + (1 << 20)), "1025M");
    }

    #[test]
    fn a_long_bad_value_is_cut_and_the_line_ends() {
        let long = "x".repeat(1000);
        let (_, r) = read_from(&[("COREHEAP_SHM", &long)]);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains(&format!("={}... is not", &long[..QUOTE_MAX])));
        assert!(r[0].ends_with("using the process heap\n"), "{}", r[0]);
    }

    #[test]
    fn the_table_names_every_field_once() {
        let mut s = Settings::DEFAULT;
        for var in &VARS {
            assert!(var.name.to_bytes().starts_with(b"COREHEAP_"));
            let v: &[u8] = match var.kind {
                Kind::Bool(_) => b"on",
                Kind::Count { .. } => b"2",
                Kind::NameSize(_) => b"n:1",
                Kind::Report { .. } => b"json",
                Kind::Size { .. } => b"2M",
            };
            assert_eq!(apply(&mut s, var, v), Outcome::Used, "{v:?}");
        }
        assert_eq!(s.arenas, Some(2));
        assert!(s.stats && s.stats_json && s.rseq && s.debug && s.check && s.shm.is_some());
        assert_eq!((s.purge_ms, s.dirty_max), (Some(2), Some(2 << 20)));
    }

    #[test]
    fn get_reads_the_process_environment() {
        // Whatever the environment holds, two calls agree.
        assert_eq!(get(), get());
    }
}
