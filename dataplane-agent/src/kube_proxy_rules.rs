//! Removes what kube-proxy leaves on a node when it is parked: its
//! iptables chains (KUBE-*, in the nf_tables and legacy backends, IPv4 and
//! IPv6) and its nftables tables (`kube-proxy`), as `kube-proxy --cleanup`
//! does. Other rules are left exactly as they are.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

/// kube-proxy's own chains (pkg/proxy/iptables/proxier.go): these names
/// and prefixes only. Other components use KUBE- too (kubelet's
/// KUBE-FIREWALL and KUBE-KUBELET-CANARY, kube-router's KUBE-ROUTER-* and
/// network policy chains): those must stay.
const KUBE_PROXY_CHAINS: [&str; 8] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-MARK-MASQ",
];
const KUBE_PROXY_CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

fn is_kube_proxy_chain(name: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&name)
        || KUBE_PROXY_CHAIN_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}
/// kube-proxy's nftables mode keeps everything in tables of this name.
const NFT_TABLE: &str = "kube-proxy";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub chains: usize,
    pub jumps: usize,
    pub nft_tables: usize,
}

/// Removes kube-proxy's rules with every iptables backend and nft found on
/// PATH. A missing tool is skipped with a log line; a failing one is an
/// error.
pub fn remove_all() -> Result<Removed> {
    let mut removed = Removed::default();
    for tool in [
        "iptables-nft",
        "ip6tables-nft",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        if !available(&format!("{tool}-save")) {
            info!(
                tool,
                "not installed; nothing of kube-proxy's to remove with it"
            );
            continue;
        }
        let saved = output(&mut Command::new(format!("{tool}-save")))?;
        let (script, chains, jumps) = removal_script(&saved);
        if chains + jumps == 0 {
            continue;
        }
        restore(&format!("{tool}-restore"), &script)?;
        removed.chains += chains;
        removed.jumps += jumps;
    }
    if available("nft") {
        let tables = output(Command::new("nft").args(["list", "tables"]))?;
        for line in tables.lines() {
            // "table ip kube-proxy"
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, name] = words.as_slice()
                && *name == NFT_TABLE
            {
                output(Command::new("nft").args(["delete", "table", family, name]))?;
                removed.nft_tables += 1;
            }
        }
    } else {
        warn!("nft is not installed; kube-proxy's nftables tables, if any, are left");
    }
    Ok(removed)
}

fn available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}

fn restore(tool: &str, script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    child
        .stdin
        .take()
        .context("restore stdin")?
        .write_all(script.as_bytes())
        .with_context(|| format!("feeding {tool}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// From `iptables-save` output, an `iptables-restore --noflush` script that
/// deletes every rule of a non-kube-proxy chain that jumps into a KUBE-
/// chain, then flushes and deletes every KUBE- chain. Returns the script,
/// the chains and the jumps it removes.
pub fn removal_script(saved: &str) -> (String, usize, usize) {
    let mut script = String::new();
    let (mut chains_total, mut jumps_total) = (0, 0);
    let mut table: Option<&str> = None;
    let mut chains: Vec<&str> = Vec::new();
    let mut jumps: Vec<&str> = Vec::new();
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name);
            chains.clear();
            jumps.clear();
        } else if let Some(chain) = line.strip_prefix(':') {
            if let Some(name) = chain.split_whitespace().next()
                && is_kube_proxy_chain(name)
            {
                chains.push(name);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let jumps_into_kube = rule
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| matches!(w[0], "-j" | "-g") && is_kube_proxy_chain(w[1]));
            if jumps_into_kube && !is_kube_proxy_chain(chain) {
                jumps.push(rule);
            }
        } else if line == "COMMIT"
            && let Some(name) = table
        {
            if !chains.is_empty() || !jumps.is_empty() {
                script += &format!("*{name}\n");
                for rule in &jumps {
                    script += &format!("-D {rule}\n");
                }
                for chain in &chains {
                    script += &format!("-F {chain}\n");
                }
                for chain in &chains {
                    script += &format!("-X {chain}\n");
                }
                script += "COMMIT\n";
            }
            chains_total += chains.len();
            jumps_total += jumps.len();
            table = None;
        }
    }
    (script, chains_total, jumps_total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-FIREWALL - [0:0]
:MY-CHAIN - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -p tcp -m tcp --dport 9999 -j ACCEPT
-A OUTPUT -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -j KUBE-SVC-ABC
-A MY-CHAIN -j RETURN
-A OUTPUT -j KUBE-FIREWALL
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
";

    #[test]
    fn only_kube_proxy_chains_and_the_jumps_into_them_go() {
        let (script, chains, jumps) = removal_script(SAVED);
        assert_eq!((chains, jumps), (2, 2));
        assert_eq!(
            script,
            "*nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D OUTPUT -j KUBE-SERVICES\n\
             -F KUBE-SERVICES\n-F KUBE-SVC-ABC\n-X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_to_do_without_kube_proxy() {
        let (script, chains, jumps) = removal_script("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n");
        assert_eq!((script.as_str(), chains, jumps), ("", 0, 0));
    }
}
