//! Which capabilities the agent needs, checked at start so a missing one is
//! named precisely instead of surfacing as an EPERM from some syscall.

use anyhow::{Context as _, Result, bail};

/// Bit numbers in the capability sets (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
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
/// before 5.8 it is the only way). The interface programs (`interfaces`)
/// also need CAP_PERFMON: without it the verifier refuses pointer
/// arithmetic with a variable offset (its Spectre v1 hardening), which the
/// compiler's memset of a packet or lookup buffer uses.
pub fn missing(effective: u64, interfaces: bool) -> Vec<&'static str> {
    let has = |bit: u32| effective & (1 << bit) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !admin {
        missing.push("CAP_BPF (to load programs and create, pin and update maps)");
    }
    if !has(CAP_NET_ADMIN) && !admin {
        missing.push("CAP_NET_ADMIN (to attach programs to cgroups and interfaces)");
    }
    if interfaces && !has(CAP_PERFMON) && !admin {
        missing.push(
            "CAP_PERFMON (for the node-interface programs to pass the verifier; or run with --interfaces= to serve no NodePort/LoadBalancer traffic)",
        );
    }
    missing
}

/// Checks this process' capabilities, `interfaces` when the node-interface
/// programs will be loaded.
pub fn check(interfaces: bool) -> Result<()> {
    let missing = missing(effective()?, interfaces);
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
        let socket_lb = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN);
        assert!(missing(socket_lb, false).is_empty());
        assert!(missing(socket_lb | (1 << CAP_PERFMON), true).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN, true).is_empty());
        assert!(missing(socket_lb, true)[0].starts_with("CAP_PERFMON"));
        assert_eq!(missing(1 << CAP_NET_ADMIN, false).len(), 1);
        assert!(missing(1 << CAP_NET_ADMIN, false)[0].starts_with("CAP_BPF"));
        assert!(missing(1 << CAP_BPF, false)[0].starts_with("CAP_NET_ADMIN"));
        assert_eq!(missing(0, true).len(), 3);
    }
}
