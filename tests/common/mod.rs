//! Helpers shared by the integration tests.

use std::time::{Duration, Instant};

/// Waits for the child `pid` for at most `limit` and returns its wait status. A child still
/// running at the deadline is killed and the calling test fails, so a hang cannot stall CI.
pub fn wait_limited(pid: libc::pid_t, limit: Duration, what: &str) -> libc::c_int {
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is writable.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert_eq!(r, 0, "waitpid failed");
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, still running.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("{what} hung (killed after {limit:?})");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
