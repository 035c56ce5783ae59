//! Process events: the `pthread_atfork` handlers and the exit report and check.
//!
//! Lock order at fork: glibc's stdio list lock, then the arenas in index order, then the
//! huge span cache's lock (`source/spans.rs`). The child re-initialises every arena lock and
//! the span cache's rather than unlocking them (the thread that took it in the
//! parent does not exist in the child). The handlers are registered once per process.

use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::{ProcessHeap, HEAP, SRC};
use crate::diag::Line;
use crate::os;

impl ProcessHeap {
    fn fork_prepare(&self) {
        os::stdio_list_lock();
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                cfg.arena(i).fork_lock(&SRC);
            }
        }
        SRC.fork_lock();
    }

    fn fork_parent(&self) {
        SRC.fork_unlock();
        if let Some(cfg) = self.config() {
            for i in (0..cfg.count).rev() {
                cfg.arena(i).fork_unlock(&SRC);
            }
        }
        os::stdio_list_unlock();
    }

    fn fork_child(&self) {
        // The initialising thread, if any was recorded, does not exist here.
        self.init_thread.store(0, Ordering::Relaxed);
        if let Some(cfg) = self.config() {
            for i in 0..cfg.count {
                // SAFETY: the child of fork: only this thread exists, and process arenas'
                // locks are on no robust list.
                unsafe { cfg.arena(i).fork_reinit() };
            }
        }
        SRC.fork_reinit();
        os::stdio_list_reset();
    }
}

unsafe extern "C" fn atfork_prepare() {
    HEAP.fork_prepare();
}
unsafe extern "C" fn atfork_parent() {
    HEAP.fork_parent();
}
unsafe extern "C" fn atfork_child() {
    HEAP.fork_child();
}

/// Where the exit report goes: a private copy of stderr, taken when the report was asked for,
/// because programs may close stderr in their own exit handlers (coreutils does) before ours
/// run.
static REPORT_FD: AtomicI32 = AtomicI32::new(2);

extern "C" fn report_at_exit() {
    HEAP.write_report(REPORT_FD.load(Ordering::Relaxed));
}

/// `COREHEAP_CHECK=1`: verifies every arena at exit; a violation aborts with its name.
extern "C" fn check_at_exit() {
    let mut l = Line::new();
    match HEAP.check() {
        Ok(()) => {
            l.str(b"coreheap: heap check at exit: ok (")
                .num(HEAP.arena_count() as u64)
                .str(b" arenas)\n");
            l.write(REPORT_FD.load(Ordering::Relaxed));
        }
        Err(e) => {
            l.str(b"coreheap: heap check at exit failed: ")
                .str(e.as_bytes())
                .str(b"\n");
            os::fatal(l.as_bytes());
        }
    }
}

/// Registers the fork handlers (and the exit report and check, if asked for) once per
/// process.
pub(super) fn register_handlers() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    if !os::register_atfork(atfork_prepare, atfork_parent, atfork_child) {
        let mut l = Line::new();
        l.str(b"coreheap: pthread_atfork failed; fork may deadlock\n");
        l.write(2);
    }
    let settings = crate::settings::get();
    let (stats, check) = (settings.stats, settings.check);
    if stats || check {
        // A high descriptor number keeps out of the way of programs that pick small ones.
        let fd = os::dup_fd_high(2, 500);
        if fd >= 0 {
            REPORT_FD.store(fd, Ordering::Relaxed);
        }
        // atexit runs them in reverse: the check first, then the report.
        if stats {
            os::at_exit(report_at_exit);
        }
        if check {
            os::at_exit(check_at_exit);
        }
    }
}
