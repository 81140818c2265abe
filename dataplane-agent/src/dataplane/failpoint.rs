//! Fault injection for the tests: an agent that kills itself right after
//! its N-th map write, so a test can crash it in the middle of a diff every
//! time instead of guessing when a diff is running; and an agent that pins
//! in an older layout, so a test can upgrade from it.
//!
//! Only builds with debug assertions (what the tests run) read the
//! variables; a release build, what the image and the DaemonSet ship,
//! compiles the reading out.

/// Set to N: SIGKILL right after the N-th map write (put or delete) of
/// this process.
pub const KILL_AFTER_MAP_WRITES: &str = "DATAPLANE_FAILPOINT_KILL_AFTER_MAP_WRITES";

#[derive(Debug, Default)]
pub struct MapWriteFailpoint {
    writes_left: Option<u64>,
}

impl MapWriteFailpoint {
    pub fn from_env() -> Self {
        #[cfg(debug_assertions)]
        if let Ok(value) = std::env::var(KILL_AFTER_MAP_WRITES) {
            let Ok(writes) = value.parse::<u64>() else {
                tracing::error!(
                    "{KILL_AFTER_MAP_WRITES}={value:?} is not a number; failpoint not armed"
                );
                return Self::default();
            };
            tracing::warn!(
                writes,
                "failpoint armed: killing the agent after {writes} map writes"
            );
            return Self {
                writes_left: Some(writes),
            };
        }
        Self::default()
    }

    pub fn armed(&self) -> bool {
        self.writes_left.is_some()
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

/// Set to N: pin in layout version N instead of this build's, to stand in
/// for an agent of an older release in the upgrade test.
pub const PIN_LAYOUT_VERSION: &str = "DATAPLANE_FAILPOINT_PIN_LAYOUT_VERSION";

/// The layout version [`PIN_LAYOUT_VERSION`] asks for, in builds with debug
/// assertions only.
pub fn pin_layout_version_override() -> Option<u32> {
    #[cfg(debug_assertions)]
    if let Ok(value) = std::env::var(PIN_LAYOUT_VERSION) {
        match value.parse::<u32>() {
            Ok(version) => return Some(version),
            Err(_) => {
                tracing::error!("{PIN_LAYOUT_VERSION}={value:?} is not a number; ignored");
            }
        }
    }
    None
}

/// Set to N: a resync's read of SERVICES returns N milliseconds after it
/// read the map, so a test can make syncs overlap it every time.
pub const HOLD_SERVICES_READ_MS: &str = "DATAPLANE_FAILPOINT_HOLD_SERVICES_READ_MS";

/// The hold [`HOLD_SERVICES_READ_MS`] asks for, in builds with debug
/// assertions only.
pub fn services_read_hold() -> Option<std::time::Duration> {
    #[cfg(debug_assertions)]
    if let Ok(value) = std::env::var(HOLD_SERVICES_READ_MS) {
        match value.parse::<u64>() {
            Ok(ms) => return Some(std::time::Duration::from_millis(ms)),
            Err(_) => {
                tracing::error!("{HOLD_SERVICES_READ_MS}={value:?} is not a number; ignored");
            }
        }
    }
    None
}
