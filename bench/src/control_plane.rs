//! The control plane at scale (ours only; the peers' rule loads are timed
//! with the data plane): how long the agent takes to program N Services
//! from start, how soon one endpoint change reaches the map (paced by the
//! default 100 ms --min-sync-period, and unpaced), its memory, and the CPU
//! it uses while nothing changes (periodic full resyncs included).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use dataplane_testbed::{
    interrupt::Interrupt,
    testbed::{AgentSource, Testbed},
};
use serde::{Deserialize, Serialize};

use super::{Dataplane, OUR_AGENT_ARGS, ServiceSet, Site, endpoint_change_latency, rss_mib};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub(crate) struct ControlPlaneRow {
    pub(crate) services: usize,
    /// From the agent's start to its ready line: every Service programmed.
    /// The median of [`PROGRAM_STARTS`] starts on empty maps.
    pub(crate) program_seconds: f64,
    /// The fastest and slowest of those starts.
    #[serde(default)]
    pub(crate) program_seconds_range: Option<(f64, f64)>,
    /// Starts timed although the cores were still busy after 10 s.
    #[serde(default)]
    pub(crate) busy_starts: usize,
    /// An endpoint change written to the SERVICES entry flipped, with the
    /// default --min-sync-period of 100 ms.
    pub(crate) change_p50_ms: f64,
    pub(crate) change_p99_ms: f64,
    /// The same with --min-sync-period 0.
    pub(crate) unpaced_change_p50_ms: f64,
    pub(crate) unpaced_change_p99_ms: f64,
    /// Resident memory once everything is programmed and the changes made.
    pub(crate) rss_mib: Option<f64>,
    /// The agent's CPU time while nothing changes, in percent of one core,
    /// over `idle_seconds` (with the default 30 s --sync-period, so full
    /// resyncs are included).
    pub(crate) idle_cpu_percent: f64,
    pub(crate) idle_seconds: f64,
}

/// How long the agent may take to program the largest set from start.
const READY_WITHIN: Duration = Duration::from_secs(300);

/// Starts on empty maps timed per scale: one start is at the mercy of
/// whatever else wakes on a shared machine.
const PROGRAM_STARTS: usize = 3;

pub(crate) fn measure(
    scales: &[usize],
    changes: usize,
    idle: Duration,
    interrupt: &Interrupt,
) -> Result<Vec<ControlPlaneRow>> {
    let site = Site::new(Dataplane::Ours)?;
    let tb = &site.tb;
    let mut rows = Vec::new();
    for &services in scales {
        interrupt.check()?;
        let set = ServiceSet::new(services, &site.pods);
        set.write_manifests(tb)?;
        let mut starts = Vec::new();
        let mut busy_starts = 0;
        for _ in 1..PROGRAM_STARTS {
            starts.push(time_start(tb, &mut busy_starts)?);
            tb.stop_agent_within(libc::SIGTERM, Duration::from_secs(120))?;
            tb.agent_cli(&["cleanup"])?;
            interrupt.check()?;
        }
        // The last start stays up for the other measurements.
        starts.push(time_start(tb, &mut busy_starts)?);
        starts.sort_by(f64::total_cmp);
        let program_seconds = starts[starts.len() / 2];
        let program_seconds_range = Some((starts[0], starts[starts.len() - 1]));
        let (change_p50_ms, change_p99_ms) = endpoint_change_latency(tb, &set, changes)?;
        let pid = tb.agent_pid().context("the agent is not running")?;
        let rss_mib = rss_mib(pid);
        interrupt.check()?;
        let idle_cpu_percent = cpu_percent(pid, idle)?;
        tb.stop_agent_within(libc::SIGTERM, Duration::from_secs(120))?;

        let mut unpaced = OUR_AGENT_ARGS.to_vec();
        unpaced.extend(["--min-sync-period", "0s"]);
        tb.start_agent_within(&AgentSource::Manifests, &unpaced, READY_WITHIN)?;
        let (unpaced_change_p50_ms, unpaced_change_p99_ms) =
            endpoint_change_latency(tb, &set, changes)?;
        tb.stop_agent_within(libc::SIGTERM, Duration::from_secs(120))?;
        tb.agent_cli(&["cleanup"])?;

        let row = ControlPlaneRow {
            services,
            program_seconds,
            program_seconds_range,
            busy_starts,
            change_p50_ms,
            change_p99_ms,
            unpaced_change_p50_ms,
            unpaced_change_p99_ms,
            rss_mib,
            idle_cpu_percent,
            idle_seconds: idle.as_secs_f64(),
        };
        println!(
            "bench: control plane {services:>7} Services  programmed in {:.2} s [{:.2}..{:.2}]  change p50/p99 {:.0}/{:.0} ms (unpaced {:.1}/{:.1})  RSS {:.0} MiB  idle CPU {:.2}%",
            row.program_seconds,
            starts[0],
            starts[starts.len() - 1],
            row.change_p50_ms,
            row.change_p99_ms,
            row.unpaced_change_p50_ms,
            row.unpaced_change_p99_ms,
            row.rss_mib.unwrap_or(f64::NAN),
            row.idle_cpu_percent
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Starts the agent on empty maps; seconds until it reports ready.
/// Counts in `busy_starts` a start the cores were not quiet for.
fn time_start(tb: &Testbed, busy_starts: &mut usize) -> Result<f64> {
    // The kernel frees a removed map's entries after the removal returns:
    // a start right after the previous run's cleanup would share the cores
    // with that.
    if !wait_for_quiet_cores()? {
        *busy_starts += 1;
    }
    let started = Instant::now();
    tb.start_agent_within(&AgentSource::Manifests, &OUR_AGENT_ARGS, READY_WITHIN)?;
    Ok(started.elapsed().as_secs_f64())
}

/// The CPU time `pid` (all its threads) uses over `window`, in percent of
/// one core.
fn cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid)? - before;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second / started.elapsed().as_secs_f64() * 100.0)
}

/// Waits until the machine's cores are at least 90% idle over 200 ms, for
/// at most 10 s; false if they never were.
fn wait_for_quiet_cores() -> Result<bool> {
    const QUIET: f64 = 0.9;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = cpu_idle_and_total()?;
        std::thread::sleep(Duration::from_millis(200));
        let after = cpu_idle_and_total()?;
        let total = after.1.saturating_sub(before.1).max(1);
        let idle = after.0.saturating_sub(before.0) as f64 / total as f64;
        if idle >= QUIET {
            return Ok(true);
        }
        if Instant::now() > deadline {
            println!(
                "bench: the cores are only {:.0}% idle; timing the start anyway",
                idle * 100.0
            );
            return Ok(false);
        }
    }
}

/// Idle (idle + iowait) and total clock ticks of all cores (proc(5)).
fn cpu_idle_and_total() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(|field| field.parse().context("a non-numeric field in /proc/stat"))
        .collect::<Result<_>>()?;
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((idle, ticks.iter().sum()))
}

/// utime + stime of a process, in clock ticks (proc(5)).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: fields are counted after its ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command name in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line; the first after ')' is field 3.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc/PID/stat")?
            .parse()
            .context("a non-numeric CPU time in /proc/PID/stat")
    };
    Ok(field(14)? + field(15)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_time_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_ticks(pid).unwrap();
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ticks(pid).unwrap() > before);
    }
}
