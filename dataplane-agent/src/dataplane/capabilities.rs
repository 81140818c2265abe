//! Which capabilities the agent needs, checked at start so a missing one is
//! named precisely instead of surfacing as an EPERM from some syscall.

use anyhow::{Context as _, Result, bail};

/// Bit numbers in the capability sets (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process.
pub fn effective() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_effective(&status).context("no CapEff line in /proc/self/status")
}

fn parse_effective(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// What is missing from `effective` to run the dataplane, as operator
/// advice: loading programs and maps needs CAP_BPF, attaching networking
/// programs needs CAP_NET_ADMIN (CAP_SYS_ADMIN covers both, on kernels
/// before 5.8 it is the only way).
pub fn missing(effective: u64) -> Vec<&'static str> {
    let has = |bit: u32| effective & (1 << bit) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !admin {
        missing.push("CAP_BPF (to load programs and create, pin and update maps)");
    }
    if !has(CAP_NET_ADMIN) && !admin {
        missing.push("CAP_NET_ADMIN (to attach programs to cgroups and interfaces)");
    }
    missing
}

pub fn check() -> Result<()> {
    let missing = missing(effective()?);
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; grant them in the container's securityContext.capabilities.add (see deploy/daemonset.yaml)",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tagent\nCapInh:\t0000000000000000\nCapEff:\t0000008000001000\n";
        assert_eq!(parse_effective(status), Some((1 << 39) | (1 << 12)));
    }

    #[test]
    fn names_exactly_what_is_missing() {
        assert!(missing((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert_eq!(missing(1 << CAP_NET_ADMIN).len(), 1);
        assert!(missing(1 << CAP_NET_ADMIN)[0].starts_with("CAP_BPF"));
        assert!(missing(1 << CAP_BPF)[0].starts_with("CAP_NET_ADMIN"));
        assert_eq!(missing(0).len(), 2);
    }
}
