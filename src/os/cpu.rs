//! CPUs: the one the calling thread runs on, the ones the process may run on, and how many
//! ids the kernel may report.

/// The CPU the calling thread runs on now, or 0 if the kernel cannot tell.
///
/// On x86_64 with glibc 2.35 or later this reads the `cpu_id` field of the thread's rseq area
/// (registered by glibc for every thread; the kernel keeps the field current on every return
/// to user space): two loads, no call. Otherwise, and for a thread whose registration failed
/// (`cpu_id` negative), it asks `sched_getcpu`.
#[inline]
pub fn current_cpu() -> usize {
    #[cfg(coreheap_rseq)]
    if let Some(c) = super::rseq::cpu_id() {
        return c;
    }
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    if c < 0 {
        0
    } else {
        c as usize
    }
}

/// CPU ids the process may run on now, as a bit set, and the number of possible CPU ids.
/// When the kernel cannot tell, CPU 0 alone.
pub fn cpu_affinity(set: &mut [u64; 16]) -> usize {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cs` is a valid, writable cpu_set_t of the size we pass.
    let r = unsafe { libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut cs) };
    let mut count = 0;
    for cpu in 0..1024 {
        // SAFETY: `cpu` is below CPU_SETSIZE (1024).
        let on = r == 0 && unsafe { libc::CPU_ISSET(cpu, &cs) };
        if on {
            set[cpu / 64] |= 1 << (cpu % 64);
            count += 1;
        }
    }
    if count == 0 {
        set[0] = 1;
        count = 1;
    }
    count
}

/// A thread's CPU affinity (`sched_getaffinity`), kept to be put back.
pub struct Affinity(libc::cpu_set_t);

/// The calling thread's affinity, or `None` if the kernel will not tell.
pub fn thread_affinity() -> Option<Affinity> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cs` is a valid, writable cpu_set_t of the size we pass.
    let r = unsafe { libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut cs) };
    (r == 0).then_some(Affinity(cs))
}

/// Moves the calling thread to CPU `cpu` (below 1024) and keeps it there: its affinity
/// becomes that CPU alone. The kernel migrates a thread whose CPU leaves its affinity
/// before `sched_setaffinity` returns, so on true the thread runs on `cpu`. False (nothing
/// changed) when the thread may not run there (offline, outside its cpuset, or refused).
pub fn move_to(cpu: usize) -> bool {
    if cpu >= 1024 {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cs` is a valid cpu_set_t and `cpu` below its capacity.
    unsafe { libc::CPU_SET(cpu, &mut cs) };
    // SAFETY: `cs` is a valid cpu_set_t of the size we pass.
    unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &cs) == 0 }
}

/// Gives the calling thread affinity `a` again; if the kernel refuses it (the thread's
/// cpuset changed meanwhile and holds none of those CPUs), every CPU, which the kernel
/// narrows to the cpuset, so that the thread is never left pinned.
pub fn restore_affinity(a: &Affinity) {
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `a.0` is a valid cpu_set_t of the size we pass.
    if unsafe { libc::sched_setaffinity(0, size, &a.0) } != 0 {
        // SAFETY: an all-ones cpu_set_t is a valid set (every CPU); of the size we pass.
        unsafe {
            let all: libc::cpu_set_t =
                core::mem::transmute([0xffu8; core::mem::size_of::<libc::cpu_set_t>()]);
            libc::sched_setaffinity(0, size, &all);
        }
    }
}

/// The number of CPU ids the kernel may ever report: one more than the highest id in
/// `/sys/devices/system/cpu/possible` (hot-pluggable CPUs included), read without allocating.
/// Falls back to 1024 (`CPU_SETSIZE`) when the file cannot be read.
pub fn possible_cpus() -> usize {
    const FALLBACK: usize = 1024;
    let mut buf = [0u8; 256];
    let Some(n) = super::file::read_small(c"/sys/devices/system/cpu/possible", &mut buf) else {
        return FALLBACK;
    };
    match highest_number(&buf[..n]) {
        Some(m) if m < 1 << 16 => m + 1,
        _ => FALLBACK,
    }
}

/// The largest number in a kernel CPU list such as `"0-3,8-11\n"`.
fn highest_number(list: &[u8]) -> Option<usize> {
    let mut max = None;
    let mut cur: Option<usize> = None;
    for &b in list {
        if b.is_ascii_digit() {
            cur = Some(
                cur.unwrap_or(0)
                    .saturating_mul(10)
                    .saturating_add((b - b'0') as usize),
            );
        } else if let Some(v) = cur.take() {
            max = Some(max.map_or(v, |m: usize| m.max(v)));
        }
    }
    if let Some(v) = cur {
        max = Some(max.map_or(v, |m: usize| m.max(v)));
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the calling thread to `cpu`; false if the process may not run there.
    fn pin(cpu: usize) -> bool {
        // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
        let mut cs: libc::cpu_set_t = unsafe { core::mem::zeroed() };
        // SAFETY: `cs` is a valid cpu_set_t and `cpu` below its capacity.
        unsafe { libc::CPU_SET(cpu, &mut cs) };
        // SAFETY: `cs` is a valid cpu_set_t of the size we pass.
        unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &cs) == 0 }
    }

    fn rseq_in_use() -> bool {
        #[cfg(coreheap_rseq)]
        return super::super::rseq::cpu_id().is_some();
        #[allow(unreachable_code)]
        false
    }

    #[test]
    fn current_cpu_follows_the_thread() {
        let mut allowed = [0u64; 16];
        cpu_affinity(&mut allowed);
        std::thread::spawn(move || {
            let mut seen = 0;
            for cpu in 0..1024 {
                if allowed[cpu / 64] & (1 << (cpu % 64)) == 0 || !pin(cpu) {
                    continue;
                }
                assert_eq!(current_cpu(), cpu);
                #[cfg(coreheap_rseq)]
                if let Some(c) = super::super::rseq::cpu_id() {
                    assert_eq!(c, cpu, "rseq cpu_id");
                }
                seen += 1;
            }
            assert!(seen >= 1);
            eprintln!("rseq area: {}", rseq_in_use());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(highest_number(b"0-3,8-11\n"), Some(11));
        assert_eq!(highest_number(b"0\n"), Some(0));
        assert_eq!(highest_number(b"\n"), None);
        assert!(possible_cpus() >= 1);
    }
}
