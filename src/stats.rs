//! Statistics: snapshots for Rust callers, and a report written without allocating.
//!
//! A heap hands its counters over: a walk over its arenas' snapshots (`each`, which calls
//! its argument once per arena) and its huge-block counters. Nothing here knows the heap.

use crate::arena::ArenaStats;
use crate::diag::Line;
use crate::size_class::{class_size, NUM_CLASSES};

/// Huge-block counters as a heap reports them: (allocations, frees, bytes in use, bytes
/// mapped, bytes of freed spans kept mapped for reuse).
pub type HugeTotals = (u64, u64, usize, usize, usize);

/// The report's first line: how many arenas, and whether the per-CPU caches are on; and the
/// heap's peak bytes in use ([`Stats::peak_in_use`]).
pub struct Heading {
    pub arenas: usize,
    pub caches: bool,
    pub peak_in_use: usize,
}

/// Counters of the whole heap: one entry per arena, and the directly mapped blocks.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Each arena's counters.
    pub arenas: Vec<ArenaStats>,
    /// Huge blocks (beyond an arena's page heap) allocated so far.
    pub huge_allocs: u64,
    /// Huge blocks freed so far.
    pub huge_frees: u64,
    /// Bytes asked for by the live huge blocks.
    pub huge_in_use: usize,
    /// Bytes of their spans.
    pub huge_mapped: usize,
    /// Bytes of freed huge spans kept mapped for reuse (not in `huge_mapped`).
    pub huge_cached: usize,
    /// The process's resident set when the snapshot was taken (`None` without `/proc`).
    pub resident: Option<usize>,
    /// The most bytes ever in use at once, small, large and huge blocks together. Counted
    /// where blocks leave and return to their arenas (bin refills and flushes of the CPU
    /// caches, the locked path, large and huge blocks), never on the CPU caches' fast
    /// paths, so it differs from the largest [`Stats::in_use`] by:
    /// - at most what the CPU caches, transfer slots and outboxes can hold (counted in use
    ///   here, as they are out of their arenas; about `CPU_CACHE_BYTES` per CPU plus the
    ///   slots), more;
    /// - at most `2 * 1 MiB` per arena more (arenas publish their bytes rounded up, in
    ///   1 MiB steps);
    /// - never less: it is at least the largest in-use figure the arenas ever had.
    ///
    /// Small blocks count their class size, large blocks their pages, huge blocks the bytes
    /// asked for, as [`Stats::in_use`] does.
    pub peak_in_use: usize,
    /// The largest resident set the process has had (`getrusage`'s `ru_maxrss`, or
    /// `resident` if the kernel's figure lags below it; `None` if `getrusage` failed).
    pub peak_resident: Option<usize>,
}

impl Stats {
    /// Bytes of blocks in use, all arenas and huge blocks.
    pub fn in_use(&self) -> usize {
        self.arenas.iter().map(|a| a.in_use()).sum::<usize>() + self.huge_in_use
    }
    /// Bytes mapped from the OS now.
    pub fn mapped(&self) -> usize {
        self.arenas.iter().map(|a| a.pages.mapped).sum::<usize>()
            + self.huge_mapped
            + self.huge_cached
    }
    /// Frees that came back through a pending stack: frees from a CPU of another arena, and
    /// local ones that found the arena's lock held.
    pub fn remote_frees(&self) -> u64 {
        self.arenas.iter().map(|a| a.remote_frees).sum()
    }
}

impl core::fmt::Display for Stats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for a in &self.arenas {
            f.write_str(core::str::from_utf8(arena_line(a).as_bytes()).unwrap_or("?"))?;
        }
        let t = total_line(&Totals {
            huge_allocs: self.huge_allocs,
            huge_in_use: self.huge_in_use,
            huge_mapped: self.huge_mapped,
            huge_cached: self.huge_cached,
            in_use: self.in_use(),
            peak_in_use: self.peak_in_use,
            mapped: self.mapped(),
            resident: self.resident,
            peak_resident: self.peak_resident,
            remote: self.remote_frees(),
        });
        f.write_str(core::str::from_utf8(t.as_bytes()).unwrap_or("?"))
    }
}

/// Collects a snapshot: `each` walks the heap's `arenas` arenas; `peak_in_use` is the
/// heap's high-water mark.
pub fn collect(
    arenas: usize,
    each: impl FnOnce(&mut dyn FnMut(ArenaStats)),
    huge: HugeTotals,
    peak_in_use: usize,
) -> Stats {
    let mut all = Vec::with_capacity(arenas);
    each(&mut |a| all.push(a));
    let (huge_allocs, huge_frees, huge_in_use, huge_mapped, huge_cached) = huge;
    let (resident, peak_resident) = resident_now_and_peak();
    Stats {
        arenas: all,
        huge_allocs,
        huge_frees,
        huge_in_use,
        huge_mapped,
        huge_cached,
        resident,
        peak_in_use,
        peak_resident,
    }
}

/// The resident set now and its peak, read together: the peak is at least the resident set
/// (the kernel's high-water mark may lag a few pages behind it).
fn resident_now_and_peak() -> (Option<usize>, Option<usize>) {
    let now = crate::os::resident_bytes();
    let peak = crate::os::peak_resident_bytes().map(|p| p.max(now.unwrap_or(0)));
    (now, peak)
}

fn kib(b: usize) -> u64 {
    (b as u64).div_ceil(1024)
}

fn arena_line(a: &ArenaStats) -> Line {
    let allocs: u64 = a.classes.iter().map(|c| c.allocs).sum::<u64>() + a.large.allocs;
    let mut l = Line::new();
    l.str(b"arena ")
        .num_w(a.index as u64, 3)
        .str(b": in use ")
        .num_w(kib(a.in_use()), 9)
        .str(b" KiB  mapped ")
        .num_w(kib(a.pages.mapped), 8)
        .str(b" KiB  dirty ")
        .num_w(kib(a.dirty_bytes), 6)
        .str(b" KiB  purged ")
        .num_w(a.pages.purged.div_ceil(1024), 8)
        .str(b" KiB  runs ")
        .num_w(a.pages.runs as u64, 6)
        .str(b"  locked allocs ")
        .num_w(allocs, 10)
        .str(b"  fast allocs ")
        .num_w(a.fast_allocs, 10)
        .str(b"  remote frees ")
        .num_w(a.remote_frees, 9)
        .str(b"  contended ")
        .num_w(a.contentions, 7)
        .str(b"\n");
    l
}

/// Totals of a whole heap, as the report's last lines print them.
struct Totals {
    huge_allocs: u64,
    huge_in_use: usize,
    huge_mapped: usize,
    huge_cached: usize,
    /// Arena and huge bytes together.
    in_use: usize,
    peak_in_use: usize,
    mapped: usize,
    resident: Option<usize>,
    peak_resident: Option<usize>,
    remote: u64,
}

fn total_line(t: &Totals) -> Line {
    let mut l = Line::new();
    l.str(b"huge  : in use ")
        .num_w(kib(t.huge_in_use), 9)
        .str(b" KiB  mapped ")
        .num_w(kib(t.huge_mapped), 8)
        .str(b" KiB  cached ")
        .num_w(kib(t.huge_cached), 8)
        .str(b" KiB  allocs ")
        .num(t.huge_allocs)
        .str(b"\ntotal : in use ")
        .num_w(kib(t.in_use), 9)
        .str(b" KiB  mapped ")
        .num_w(kib(t.mapped), 8)
        .str(b" KiB  remote frees ")
        .num(t.remote)
        .str(b"\npeak  : in use ")
        .num_w(kib(t.peak_in_use), 9)
        .str(b" KiB");
    let mut rss = |what: &[u8], v: Option<usize>| {
        l.str(what);
        match v {
            Some(b) => l.num(kib(b)).str(b" KiB"),
            None => l.str(b"unknown"),
        };
    };
    rss(b"  resident now ", t.resident);
    rss(b"  resident peak ", t.peak_resident);
    l.str(b"\n");
    l
}

/// Writes the report to `fd`: a line per arena, a line per size class in use, totals. Never
/// allocates, so it may run at exit or from `malloc_stats`.
pub fn write_report(
    fd: i32,
    heading: Heading,
    each: impl FnOnce(&mut dyn FnMut(ArenaStats)),
    huge: HugeTotals,
) {
    let mut head = Line::new();
    head.str(b"coreheap: ")
        .num(heading.arenas as u64)
        .str(if heading.caches {
            b" arenas, per-CPU caches on (rseq)\n".as_slice()
        } else {
            b" arenas, per-CPU caches off (no rseq)\n".as_slice()
        });
    head.write(fd);
    let mut in_use = 0;
    let mut mapped = 0;
    let mut remote = 0;
    let mut per_class = [0usize; NUM_CLASSES];
    each(&mut |a| {
        arena_line(&a).write(fd);
        in_use += a.in_use();
        mapped += a.pages.mapped;
        remote += a.remote_frees;
        for (c, total) in per_class.iter_mut().enumerate() {
            *total += a.class_in_use(c);
        }
    });
    let mut l = Line::new();
    l.str(b"classes in use (KiB):");
    for (c, total) in per_class.iter().enumerate() {
        l.str(b" ")
            .num(class_size(c) as u64)
            .str(b":")
            .num(kib(*total));
    }
    l.str(b"\n");
    l.write(fd);
    let (huge_allocs, _, huge_in_use, huge_mapped, huge_cached) = huge;
    let (resident, peak_resident) = resident_now_and_peak();
    total_line(&Totals {
        huge_allocs,
        huge_in_use,
        huge_mapped,
        huge_cached,
        in_use: in_use + huge_in_use,
        peak_in_use: heading.peak_in_use,
        mapped: mapped + huge_mapped + huge_cached,
        resident,
        peak_resident,
        remote,
    })
    .write(fd);
}

/// Writes the statistics as one JSON object to `fd`, without allocating (the same figures
/// as [`write_report`]; bytes, not KiB):
///
/// `{"arenas": N, "caches": bool, "in_use": B, "peak_in_use": B, "mapped": B,
/// "resident": B or null, "peak_resident": B or null, "remote_frees": N, "huge": {"allocs": N, "frees": N, "in_use": B, "mapped": B,
/// "cached": B},
/// "per_arena": [{"index": I, "in_use": B, "mapped": B, "dirty": B, "purged": B,
/// "runs": N, "locked_allocs": N, "fast_allocs": N, "fast_frees": N, "remote_frees": N,
/// "contended": N, "classes": [{"size": S, "in_use": B, "cached": N}, ...]}, ...]}`
pub fn write_json(
    fd: i32,
    heading: Heading,
    each: impl FnOnce(&mut dyn FnMut(ArenaStats)),
    huge: HugeTotals,
) {
    let mut l = Line::new();
    l.str(b"{\"arenas\": ")
        .num(heading.arenas as u64)
        .str(b", \"caches\": ")
        .str(if heading.caches { b"true" } else { b"false" })
        .str(b", \"per_arena\": [");
    l.write(fd);
    let (mut in_use, mut mapped, mut remote, mut first) = (0usize, 0usize, 0u64, true);
    each(&mut |a| {
        let allocs: u64 = a.classes.iter().map(|c| c.allocs).sum::<u64>() + a.large.allocs;
        let mut l = Line::new();
        l.str(if first {
            b"\n  {\"index\": "
        } else {
            b",\n  {\"index\": "
        })
        .num(a.index as u64)
        .str(b", \"in_use\": ")
        .num(a.in_use() as u64)
        .str(b", \"mapped\": ")
        .num(a.pages.mapped as u64)
        .str(b", \"dirty\": ")
        .num(a.dirty_bytes as u64)
        .str(b", \"purged\": ")
        .num(a.pages.purged)
        .str(b", \"runs\": ")
        .num(a.pages.runs as u64)
        .str(b", \"locked_allocs\": ")
        .num(allocs);
        l.write(fd);
        let mut l = Line::new();
        l.str(b", \"fast_allocs\": ")
            .num(a.fast_allocs)
            .str(b", \"fast_frees\": ")
            .num(a.fast_frees)
            .str(b", \"remote_frees\": ")
            .num(a.remote_frees)
            .str(b", \"contended\": ")
            .num(a.contentions)
            .str(b", \"classes\": [");
        l.write(fd);
        for c in 0..NUM_CLASSES {
            let mut l = Line::new();
            l.str(if c == 0 {
                b"{\"size\": "
            } else {
                b", {\"size\": "
            })
            .num(class_size(c) as u64)
            .str(b", \"in_use\": ")
            .num(a.class_in_use(c) as u64)
            .str(b", \"cached\": ")
            .num(a.cached[c])
            .str(b"}");
            l.write(fd);
        }
        let mut l = Line::new();
        l.str(b"]}");
        l.write(fd);
        first = false;
        in_use += a.in_use();
        mapped += a.pages.mapped;
        remote += a.remote_frees;
    });
    let (h_allocs, h_frees, h_in_use, h_mapped, h_cached) = huge;
    let mut l = Line::new();
    l.str(b"\n], \"in_use\": ")
        .num((in_use + h_in_use) as u64)
        .str(b", \"peak_in_use\": ")
        .num(heading.peak_in_use as u64)
        .str(b", \"mapped\": ")
        .num((mapped + h_mapped + h_cached) as u64);
    let (resident, peak_resident) = resident_now_and_peak();
    for (key, v) in [
        (&b", \"resident\": "[..], resident),
        (b", \"peak_resident\": ", peak_resident),
    ] {
        l.str(key);
        match v {
            Some(r) => l.num(r as u64),
            None => l.str(b"null"),
        };
    }
    l.str(b", \"remote_frees\": ").num(remote);
    l.write(fd);
    let mut l = Line::new();
    l.str(b", \"huge\": {\"allocs\": ")
        .num(h_allocs)
        .str(b", \"frees\": ")
        .num(h_frees)
        .str(b", \"in_use\": ")
        .num(h_in_use as u64)
        .str(b", \"mapped\": ")
        .num(h_mapped as u64)
        .str(b", \"cached\": ")
        .num(h_cached as u64)
        .str(b"}}\n");
    l.write(fd);
}
