//! Ctrl-C for the long-running tasks: they only note it and
//! unwind at the next step, so the testbed's Drop removes every namespace,
//! cgroup and pin they made. The agent and probes in the same process group
//! get the signal too and end on their own.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};

#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
        Ok(Self(flag))
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Fails once interrupted, to unwind.
    pub fn check(&self) -> Result<()> {
        if self.is_set() {
            bail!("{INTERRUPTED}");
        }
        Ok(())
    }

    /// `result`, or "interrupted" if the failure came from an interruption
    /// (a killed `ip` or probe fails with its own, less useful, message).
    pub fn explain<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() && self.is_set() {
            bail!("{INTERRUPTED}");
        }
        result
    }
}

const INTERRUPTED: &str = "interrupted; everything the run made has been removed";
