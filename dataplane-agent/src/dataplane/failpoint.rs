//! Fault injection for the crash tests: an agent that kills itself right
//! after its N-th map write, so a test can crash it in the middle of a diff
//! every time instead of guessing when a diff is running.
//!
//! Only debug builds (what the tests run) read the variable; a release
//! build, what the image and the DaemonSet ship, has no failpoint at all.

/// Set to N: SIGKILL right after the N-th map write (put or delete) of
/// this process.
pub const ABORT_AFTER_MAP_WRITES: &str = "DATAPLANE_FAILPOINT_KILL_AFTER_MAP_WRITES";

#[derive(Debug, Default)]
pub struct MapWriteFailpoint {
    writes_left: Option<u64>,
}

impl MapWriteFailpoint {
    pub fn from_env() -> Self {
        if !cfg!(debug_assertions) {
            return Self::default();
        }
        let writes_left = std::env::var(ABORT_AFTER_MAP_WRITES)
            .ok()
            .and_then(|value| value.parse().ok());
        if let Some(writes) = writes_left {
            tracing::warn!(
                writes,
                "failpoint armed: killing the agent after {writes} map writes"
            );
        }
        Self { writes_left }
    }

    /// Called after every map write.
    pub fn wrote(&mut self) {
        let Some(left) = self.writes_left.as_mut() else {
            return;
        };
        *left = left.saturating_sub(1);
        if *left == 0 {
            // SAFETY: signals this process; SIGKILL models a crash exactly
            // (no destructor, no flush, no pin cleanup).
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
