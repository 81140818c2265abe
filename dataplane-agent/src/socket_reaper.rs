//! The socket reaper: after a sync that took backends away from UDP
//! frontends, it destroys the connected UDP sockets that socket load
//! balancing pointed at those backends, in every network namespace of the
//! node. A connected UDP socket was translated once, at connect(); without
//! this it would talk to a removed backend for as long as it lives (the
//! failure kube-proxy avoids by deleting UDP conntrack entries of removed
//! endpoints). The application sees ECONNABORTED on its next call and
//! connects again, through the hooks, to a current backend. TCP sockets
//! are never touched: established connections keep their backend, as with
//! kube-proxy.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use dataplane_common::{
    IPPROTO_UDP, MemberKey, SCOPE_CLUSTER, SCOPE_NODEPORT_LOCAL, ServiceKey, ServiceValue,
    SockRevKey, SockRevValue, map_names,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    dataplane::{
        maps, netns,
        pins::PinLayout,
        sock_diag::{ConnectedUdp, DiagSocket, socket_cookie},
    },
    metrics::Metrics,
};

/// How the agent can destroy sockets on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// netlink sock_diag `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY).
    SockDiag,
    /// Neither: why.
    Unavailable(String),
}

/// Finds out whether `SOCK_DESTROY` works by destroying a socket of our
/// own: a kernel without CONFIG_INET_DIAG_DESTROY answers EOPNOTSUPP.
pub fn probe() -> Mechanism {
    match destroy_own_socket() {
        Ok(()) => Mechanism::SockDiag,
        Err(error) => Mechanism::Unavailable(format!("{error:#}")),
    }
}

fn destroy_own_socket() -> Result<()> {
    use anyhow::Context as _;
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").context("binding the probe's UDP socket")?;
    // Nothing is sent: connecting only fixes the peer.
    socket
        .connect("127.0.0.1:9")
        .context("connecting the probe's UDP socket")?;
    let (std::net::SocketAddr::V4(local), std::net::SocketAddr::V4(remote)) =
        (socket.local_addr()?, socket.peer_addr()?)
    else {
        anyhow::bail!("the probe's socket is not IPv4");
    };
    let cookie = socket_cookie(&socket).context("reading the probe socket's cookie")?;
    let mut diag = DiagSocket::open().context("opening a sock_diag netlink socket")?;
    diag.destroy(&ConnectedUdp::of_own(local, remote, cookie))
        .context(
            "SOCK_DESTROY of a socket of our own (kernel without CONFIG_INET_DIAG_DESTROY?)",
        )?;
    match socket.take_error()? {
        Some(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        other => anyhow::bail!("SOCK_DESTROY left the probe's socket with {other:?}"),
    }
}

/// What the datapath's maps say about translated sockets: the views of
/// SOCK_REV, SERVICES, NODE_IPS and MEMBERS the decision needs.
pub trait Datapath {
    /// The frontend a socket addressed before connect4 rewrote it to
    /// `backend` (SOCK_REV), if it did.
    fn frontend_of(&self, cookie: u64, backend: SocketAddrV4) -> Option<SocketAddrV4>;
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    fn is_node_ip(&self, ip: Ipv4Addr) -> bool;
    fn is_member(&self, key: &MemberKey) -> bool;
}

/// What to do with one connected UDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not translated by our hooks (or its record was evicted).
    NotOurs,
    /// Its backend still serves its frontend.
    Keep,
    /// Its backend left the frontend it dialled (or the frontend is gone).
    Destroy { frontend: SocketAddrV4 },
}

/// Decides as connect4 would now: the frontend the socket dialled (a
/// Service address, or a nodePort on one of this node's addresses), and
/// whether its backend is still a member of that frontend's current
/// backends.
pub fn verdict(datapath: &impl Datapath, socket: &ConnectedUdp) -> Verdict {
    let Some(frontend) = datapath.frontend_of(socket.cookie, socket.remote) else {
        return Verdict::NotOurs;
    };
    let cluster = ServiceKey {
        vip_be: u32::from_ne_bytes(frontend.ip().octets()),
        port_be: frontend.port().to_be(),
        protocol: IPPROTO_UDP,
        scope: SCOPE_CLUSTER,
    };
    let service = datapath.service(&cluster).or_else(|| {
        datapath.is_node_ip(*frontend.ip()).then_some(())?;
        datapath.service(&ServiceKey {
            vip_be: 0,
            scope: SCOPE_NODEPORT_LOCAL,
            ..cluster
        })
    });
    let member = service.is_some_and(|service| {
        datapath.is_member(&MemberKey {
            service_id: service.service_id,
            generation: service.generation,
            port_be: socket.remote.port().to_be(),
            ip_be: u32::from_ne_bytes(socket.remote.ip().octets()),
        })
    });
    if member {
        Verdict::Keep
    } else {
        Verdict::Destroy { frontend }
    }
}

/// The pinned maps, read-only.
struct PinnedDatapath {
    sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    node_ips: HashMap<MapData, u32, u32>,
    members: HashMap<MapData, MemberKey, u32>,
}

impl PinnedDatapath {
    fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            sock_rev: maps::open_pinned(layout, map_names::SOCK_REV)?,
            services: maps::open_pinned(layout, map_names::SERVICES)?,
            node_ips: maps::open_pinned(layout, map_names::NODE_IPS)?,
            members: maps::open_pinned(layout, map_names::MEMBERS)?,
        })
    }
}

impl Datapath for PinnedDatapath {
    fn frontend_of(&self, cookie: u64, backend: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = SockRevKey {
            cookie,
            backend_ip_be: u32::from_ne_bytes(backend.ip().octets()),
            backend_port_be: backend.port().to_be(),
            _pad: 0,
        };
        let value = self.sock_rev.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(value.vip_be.to_ne_bytes()),
            u16::from_be(value.port_be),
        ))
    }

    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    /// An address whose nodePorts the programs serve.
    fn is_node_ip(&self, ip: Ipv4Addr) -> bool {
        self.node_ips
            .get(&u32::from_ne_bytes(ip.octets()), 0)
            .is_ok_and(dataplane_common::node_ip_serves_node_ports)
    }

    fn is_member(&self, key: &MemberKey) -> bool {
        self.members.get(key, 0).is_ok()
    }
}

/// Frontends (address and port) that lost backends, with their Service's
/// name, for the log.
pub type Affected = BTreeMap<SocketAddrV4, String>;

/// What one pass did.
#[derive(Debug, Default)]
struct PassReport {
    namespaces: usize,
    destroyed: usize,
    failed: usize,
}

/// One pass over every namespace of the node.
fn reap(layout: &PinLayout, affected: &Affected) -> Result<PassReport> {
    let datapath = PinnedDatapath::open(layout)?;
    let mut report = PassReport::default();
    netns::visit_each(
        netns::all(),
        |namespace| {
            report.namespaces += 1;
            let listed = DiagSocket::open().and_then(|mut diag| {
                let sockets = diag.connected_udp()?;
                Ok((diag, sockets))
            });
            let (mut diag, sockets) = match listed {
                Ok(listed) => listed,
                Err(error) => {
                    debug!(namespace = %namespace.display(), %error, "UDP sockets not listed");
                    return;
                }
            };
            for socket in &sockets {
                let Verdict::Destroy { frontend } = verdict(&datapath, socket) else {
                    continue;
                };
                // A nodePort is recorded under 0.0.0.0, the client dialled a
                // node address.
                let service = affected
                    .get(&frontend)
                    .or_else(|| {
                        affected.get(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, frontend.port()))
                    })
                    .map_or("-", String::as_str);
                match diag.destroy(socket) {
                    Ok(()) => {
                        report.destroyed += 1;
                        debug!(service, %frontend, backend = %socket.remote, local = %socket.local, "destroyed a connected UDP socket whose backend left the Service");
                    }
                    // Closed meanwhile.
                    Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(error) => {
                        report.failed += 1;
                        warn!(service, %frontend, backend = %socket.remote, %error, "could not destroy a connected UDP socket whose backend left the Service");
                    }
                }
            }
        },
        |namespace, error| debug!(namespace = %namespace.display(), error = format!("{error:#}"), "namespace skipped"),
    )?;
    Ok(report)
}

/// Where syncs send the frontends that lost UDP backends.
#[derive(Clone)]
pub struct Reaper {
    requests: mpsc::UnboundedSender<Affected>,
}

impl Reaper {
    /// Asks for a pass; requests that arrive during one are merged into
    /// the next.
    pub fn reap(&self, affected: Affected) {
        let _ = self.requests.send(affected);
    }
}

/// Starts the reaper: it probes the kernel first (off the start-up's
/// path), logs what it found, and stops taking requests if sockets cannot
/// be destroyed here.
pub fn spawn(layout: PinLayout, metrics: Metrics) -> Reaper {
    let (requests, mut pending) = mpsc::unbounded_channel::<Affected>();
    tokio::spawn(async move {
        match tokio::task::spawn_blocking(probe).await {
            Ok(Mechanism::SockDiag) => info!(
                mechanism = "sock_diag SOCK_DESTROY",
                "connected UDP sockets to backends that leave a Service are destroyed at sync time"
            ),
            Ok(Mechanism::Unavailable(why)) => {
                warn!(
                    why,
                    "connected UDP sockets cannot be destroyed on this kernel: one connected to a backend that leaves its Service keeps that backend until the application reconnects"
                );
                return;
            }
            Err(error) => {
                warn!(%error, "the socket reaper's kernel probe failed; connected UDP sockets are not destroyed");
                return;
            }
        }
        while let Some(mut affected) = pending.recv().await {
            while let Ok(more) = pending.try_recv() {
                affected.extend(more);
            }
            let layout = layout.clone();
            let pass = tokio::task::spawn_blocking(move || reap(&layout, &affected)).await;
            match pass {
                Ok(Ok(report)) => {
                    metrics.record_sockets_destroyed(report.destroyed);
                    debug!(
                        namespaces = report.namespaces,
                        destroyed = report.destroyed,
                        failed = report.failed,
                        "socket reaper pass"
                    );
                }
                Ok(Err(error)) => warn!(error = format!("{error:#}"), "socket reaper pass failed"),
                Err(error) => warn!(%error, "socket reaper task failed"),
            }
        }
    });
    Reaper { requests }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[derive(Default)]
    struct FakeDatapath {
        sock_rev: BTreeMap<(u64, SocketAddrV4), SocketAddrV4>,
        services: Vec<(ServiceKey, ServiceValue)>,
        node_ips: BTreeSet<Ipv4Addr>,
        members: Vec<MemberKey>,
    }

    impl Datapath for FakeDatapath {
        fn frontend_of(&self, cookie: u64, backend: SocketAddrV4) -> Option<SocketAddrV4> {
            self.sock_rev.get(&(cookie, backend)).copied()
        }
        fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
            self.services
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| *v)
        }
        fn is_node_ip(&self, ip: Ipv4Addr) -> bool {
            self.node_ips.contains(&ip)
        }
        fn is_member(&self, key: &MemberKey) -> bool {
            self.members.contains(key)
        }
    }

    fn addr(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    fn key(frontend: &str, scope: u8) -> ServiceKey {
        let frontend = addr(frontend);
        ServiceKey {
            vip_be: u32::from_ne_bytes(frontend.ip().octets()),
            port_be: frontend.port().to_be(),
            protocol: IPPROTO_UDP,
            scope,
        }
    }

    fn value(service_id: u32, generation: u16) -> ServiceValue {
        ServiceValue {
            service_id,
            backend_count: 1,
            generation,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    fn member(service_id: u32, generation: u16, backend: &str) -> MemberKey {
        let backend = addr(backend);
        MemberKey {
            service_id,
            generation,
            port_be: backend.port().to_be(),
            ip_be: u32::from_ne_bytes(backend.ip().octets()),
        }
    }

    fn socket(cookie: u64, backend: &str) -> ConnectedUdp {
        ConnectedUdp::of_own(addr("10.1.1.2:40000"), addr(backend), cookie)
    }

    /// DNS on 10.96.0.10:53, generation 3 with one pod, 10.244.1.5:53.
    fn dns() -> FakeDatapath {
        let mut datapath = FakeDatapath::default();
        datapath
            .services
            .push((key("10.96.0.10:53", SCOPE_CLUSTER), value(7, 3)));
        datapath.members.push(member(7, 3, "10.244.1.5:53"));
        datapath
    }

    #[test]
    fn a_socket_our_hooks_did_not_translate_is_left_alone() {
        assert_eq!(
            verdict(&dns(), &socket(1, "10.244.9.9:53")),
            Verdict::NotOurs
        );
    }

    #[test]
    fn a_socket_whose_backend_is_a_member_of_the_current_generation_is_kept() {
        let mut datapath = dns();
        datapath
            .sock_rev
            .insert((1, addr("10.244.1.5:53")), addr("10.96.0.10:53"));
        assert_eq!(
            verdict(&datapath, &socket(1, "10.244.1.5:53")),
            Verdict::Keep
        );
    }

    #[test]
    fn a_socket_whose_backend_left_or_whose_service_went_is_destroyed() {
        let mut datapath = dns();
        datapath
            .sock_rev
            .insert((1, addr("10.244.2.8:53")), addr("10.96.0.10:53"));
        // A member of an older generation only.
        datapath.members.push(member(7, 2, "10.244.2.8:53"));
        let destroy = Verdict::Destroy {
            frontend: addr("10.96.0.10:53"),
        };
        assert_eq!(verdict(&datapath, &socket(1, "10.244.2.8:53")), destroy);

        datapath
            .sock_rev
            .insert((2, addr("10.244.1.5:53")), addr("10.96.0.10:53"));
        datapath.services.clear();
        assert_eq!(verdict(&datapath, &socket(2, "10.244.1.5:53")), destroy);
    }

    #[test]
    fn a_socket_to_a_node_port_on_a_node_address_is_judged_by_the_local_node_port_entry() {
        let mut datapath = FakeDatapath::default();
        datapath
            .services
            .push((key("0.0.0.0:30053", SCOPE_NODEPORT_LOCAL), value(9, 1)));
        datapath.members.push(member(9, 1, "10.244.1.5:53"));
        datapath.node_ips.insert(Ipv4Addr::new(192, 168, 0, 1));
        datapath
            .sock_rev
            .insert((1, addr("10.244.1.5:53")), addr("192.168.0.1:30053"));
        datapath
            .sock_rev
            .insert((2, addr("10.244.3.3:53")), addr("192.168.0.1:30053"));
        assert_eq!(
            verdict(&datapath, &socket(1, "10.244.1.5:53")),
            Verdict::Keep
        );
        assert_eq!(
            verdict(&datapath, &socket(2, "10.244.3.3:53")),
            Verdict::Destroy {
                frontend: addr("192.168.0.1:30053")
            }
        );
        // Not a node address: no nodePort applies.
        datapath.node_ips.clear();
        assert_eq!(
            verdict(&datapath, &socket(1, "10.244.1.5:53")),
            Verdict::Destroy {
                frontend: addr("192.168.0.1:30053")
            }
        );
    }

    #[test]
    fn the_kernel_destroys_sockets_on_this_machine() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        assert_eq!(probe(), Mechanism::SockDiag);
    }
}
