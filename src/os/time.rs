//! Clocks and sleeping.

/// A coarse monotonic clock in milliseconds, wrapping (the vDSO's `CLOCK_MONOTONIC_COARSE`:
/// no system call, a few nanoseconds).
pub fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Sleeps about `us` microseconds (less if a signal arrives).
pub fn sleep_us(us: u64) {
    // The fields' types, not named: `libc::time_t` is deprecated on musl (it changes width).
    let ts = libc::timespec {
        tv_sec: (us / 1_000_000) as _,
        tv_nsec: ((us % 1_000_000) * 1000) as _,
    };
    // SAFETY: `ts` is valid; the remainder is not wanted.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}
