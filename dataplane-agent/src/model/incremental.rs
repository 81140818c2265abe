//! The model kept up to date change by change: a changed EndpointSlice
//! recomputes only its Service, so the cost of a change does not grow with
//! the cluster (kube-proxy's partial syncs, KEP-3453). [`desired`] from
//! scratch is the specification; a property test holds this to it.
//!
//! [`desired`]: super::desired

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{
    ClusterState, DesiredDataplane, Frontend, FrontendEntry, HealthCheck, NoLocalEndpoints,
    NodeInfo, NodeRecord, ObjectName, ServiceOutput, ServiceRecord, SkipCounts, SkipReason,
    Skipped, SliceRecord, SourceRange, endpoints, node_addresses, pod_cidrs, service_output,
    slice_problems,
};

/// The cluster, this node's view of it, and what every Service asks of
/// this node, with the Services whose answer is out of date.
#[derive(Debug)]
pub struct Model {
    node_name: String,
    node: NodeInfo,
    cluster: ClusterState,
    /// The InternalIPs of the nodes that have one.
    node_addresses: BTreeMap<String, Ipv4Addr>,
    /// Every node's pod CIDRs, with the node's InternalIP.
    pod_cidrs: BTreeMap<SourceRange, Ipv4Addr>,
    /// (Service, EndpointSlice) pairs: one set rather than a set per
    /// Service, as most Services have one slice and a set's first node
    /// costs hundreds of bytes.
    slices_of: BTreeSet<(ObjectName, ObjectName)>,
    outputs: BTreeMap<ObjectName, ServiceOutput>,
    /// Every Service that derives a frontend. The first in name order owns
    /// it (as in [`super::desired`]); the others are reported.
    claims: BTreeMap<Frontend, Vec<ObjectName>>,
    /// Every Service that asks for a healthCheckNodePort; the last in name
    /// order serves it.
    health_claims: BTreeMap<u16, Vec<ObjectName>>,
    dirty: BTreeSet<ObjectName>,
    /// A Node change can move any Service's backends (topology, tunnel
    /// addresses): everything is recomputed.
    all_dirty: bool,
    /// Slices changed since the last [`Model::recompute`].
    changed_slices: BTreeSet<ObjectName>,
    nodes_changed: bool,
    /// Problems of the Services' outputs and of the slices themselves,
    /// counted as they change so the metric costs nothing per sync.
    skipped_in_outputs: SkipCounts,
    skipped_in_slices: usize,
    /// Claims beyond the first, over all frontends.
    conflicts: usize,
    /// Over every Service's output, kept as they change.
    no_local_endpoints: NoLocalEndpoints,
    changes: ChangeTally,
    /// Services whose record changed since the last recompute.
    pending_services: BTreeSet<ObjectName>,
}

/// Change events taken in, counted as kube-proxy's change trackers count
/// them (`kubeproxy_sync_proxy_rules_{service,endpoint}_changes_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeTally {
    /// Every Service event since the start, those that changed nothing
    /// included (a relist counts each object once).
    pub service_events: u64,
    pub slice_events: u64,
    /// Distinct Services changed since the last recompute.
    pub services_pending: usize,
    /// EndpointSlice events that changed a slice since the last recompute.
    pub slice_changes_pending: u64,
}

/// One change a source saw.
#[derive(Clone, Debug)]
pub enum Update {
    /// A Service added or changed (Some), or deleted (None).
    Service(ObjectName, Option<ServiceRecord>),
    Slice(ObjectName, Option<SliceRecord>),
    Node(String, Option<NodeRecord>),
    /// Every Service, after a relist: the others are gone.
    AllServices(BTreeMap<ObjectName, ServiceRecord>),
    AllSlices(BTreeMap<ObjectName, SliceRecord>),
    AllNodes(BTreeMap<String, NodeRecord>),
}

/// What one [`Model::recompute`] changed.
#[derive(Debug, Default)]
pub struct Recomputed {
    /// Frontends whose entry may differ (added, removed or changed).
    pub frontends: BTreeSet<Frontend>,
    /// Services recomputed, with what is wrong with them now (for one log
    /// line per change, not per sync).
    pub services: Vec<SyncedService>,
    /// EndpointSlices that changed, for the programming-latency metric.
    pub slices: BTreeSet<ObjectName>,
    pub health_checks_changed: bool,
    pub nodes_changed: bool,
}

/// A recomputed Service and its problems.
#[derive(Debug)]
pub struct SyncedService {
    pub name: ObjectName,
    pub skipped: Vec<Skipped>,
}

impl Model {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.to_owned(),
            node: NodeInfo {
                name: node_name.to_owned(),
                ..NodeInfo::default()
            },
            cluster: ClusterState::default(),
            node_addresses: BTreeMap::new(),
            pod_cidrs: BTreeMap::new(),
            slices_of: BTreeSet::new(),
            outputs: BTreeMap::new(),
            claims: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            changed_slices: BTreeSet::new(),
            nodes_changed: false,
            skipped_in_outputs: SkipCounts::default(),
            skipped_in_slices: 0,
            conflicts: 0,
            no_local_endpoints: NoLocalEndpoints::default(),
            changes: ChangeTally::default(),
            pending_services: BTreeSet::new(),
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    /// Sets (Some) or removes (None) a Service. Returns whether anything
    /// the model reads changed.
    pub fn set_service(&mut self, name: &ObjectName, record: Option<ServiceRecord>) -> bool {
        self.changes.service_events += 1;
        let changed = match record {
            Some(record) => {
                self.cluster.services.get(name) != Some(&record) && {
                    self.cluster.services.insert(name.clone(), record);
                    true
                }
            }
            None => self.cluster.services.remove(name).is_some(),
        };
        if changed {
            self.dirty.insert(name.clone());
            self.pending_services.insert(name.clone());
        }
        changed
    }

    /// Sets or removes an EndpointSlice: its Service (before and after) is
    /// recomputed.
    pub fn set_slice(&mut self, name: &ObjectName, record: Option<SliceRecord>) -> bool {
        let previous = self.cluster.endpoint_slices.get(name);
        // kube-proxy's tracker counts only the slices of its family (FQDN
        // and IPv6 slices, headless Services' slices are not its events).
        let counted = [record.as_ref(), previous]
            .into_iter()
            .flatten()
            .any(|slice| !slice.is_ignored());
        if counted {
            self.changes.slice_events += 1;
        }
        if previous == record.as_ref() {
            return false;
        }
        if counted {
            self.changes.slice_changes_pending += 1;
        }
        let previous = match record {
            Some(record) => {
                if let Some(service) = record.service() {
                    self.dirty.insert(service.clone());
                    self.slices_of.insert((service.clone(), name.clone()));
                }
                self.cluster.endpoint_slices.insert(name.clone(), record)
            }
            None => self.cluster.endpoint_slices.remove(name),
        };
        self.skipped_in_slices -= previous.as_ref().map_or(0, problem_count);
        self.skipped_in_slices += self
            .cluster
            .endpoint_slices
            .get(name)
            .map_or(0, problem_count);
        let new_owner = self
            .cluster
            .endpoint_slices
            .get(name)
            .and_then(SliceRecord::service);
        if let Some(old_owner) = previous.as_ref().and_then(SliceRecord::service)
            && Some(old_owner) != new_owner
        {
            self.dirty.insert(old_owner.clone());
            self.slices_of.remove(&(old_owner.clone(), name.clone()));
        }
        self.changed_slices.insert(name.clone());
        true
    }

    /// Sets or removes a Node. Only what the model reads of it counts:
    /// status heartbeats change nothing.
    pub fn set_node(&mut self, name: &str, record: Option<NodeRecord>) -> bool {
        let changed = self.put_node(name, record);
        if changed {
            self.node_view_changed();
        }
        changed
    }

    /// Stores a Node's record; returns whether it changed.
    fn put_node(&mut self, name: &str, record: Option<NodeRecord>) -> bool {
        match record {
            Some(record) => {
                self.cluster.nodes.get(name) != Some(&record) && {
                    self.cluster.nodes.insert(name.to_owned(), record);
                    true
                }
            }
            None => self.cluster.nodes.remove(name).is_some(),
        }
    }

    /// After Node records changed: this node's view and every node's
    /// address, and what must be recomputed.
    fn node_view_changed(&mut self) {
        let node = NodeInfo::from_cluster(&self.cluster, &self.node_name);
        let addresses = node_addresses(&self.cluster);
        // This node's deletion state moves no backend; its zone and any
        // node's address do.
        let moves_backends = node.zone != self.node.zone
            || node.internal_ip != self.node.internal_ip
            || addresses != self.node_addresses;
        let pod_cidrs = pod_cidrs(&self.cluster);
        self.nodes_changed |=
            addresses != self.node_addresses || node != self.node || pod_cidrs != self.pod_cidrs;
        self.pod_cidrs = pod_cidrs;
        self.node = node;
        self.node_addresses = addresses;
        self.all_dirty |= moves_backends;
    }

    /// Takes one change in; returns whether anything the model reads
    /// changed.
    pub fn update(&mut self, update: Update) -> bool {
        match update {
            Update::Service(name, record) => self.set_service(&name, record),
            Update::Slice(name, record) => self.set_slice(&name, record),
            Update::Node(name, record) => self.set_node(&name, record),
            Update::AllServices(mut all) => {
                let names = union(self.cluster.services.keys(), all.keys());
                names.into_iter().fold(false, |changed, name| {
                    let record = all.remove(&name);
                    self.set_service(&name, record) || changed
                })
            }
            Update::AllSlices(mut all) => {
                let names = union(self.cluster.endpoint_slices.keys(), all.keys());
                names.into_iter().fold(false, |changed, name| {
                    let record = all.remove(&name);
                    self.set_slice(&name, record) || changed
                })
            }
            Update::AllNodes(mut all) => {
                // One view update for the whole list, not one per node.
                let names = union(self.cluster.nodes.keys(), all.keys());
                let changed = names.into_iter().fold(false, |changed, name| {
                    let record = all.remove(&name);
                    self.put_node(&name, record) || changed
                });
                if changed {
                    self.node_view_changed();
                }
                changed
            }
        }
    }

    /// Replaces the whole cluster: only what differs is recomputed.
    pub fn replace(&mut self, cluster: ClusterState) -> bool {
        let services = self.update(Update::AllServices(cluster.services));
        let slices = self.update(Update::AllSlices(cluster.endpoint_slices));
        let nodes = self.update(Update::AllNodes(cluster.nodes));
        services || slices || nodes
    }

    /// Marks every Service out of date: the periodic full resync's safety
    /// net against a change this model missed.
    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    pub fn has_changes(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty() || self.nodes_changed
    }

    /// The change events taken in so far, and those not recomputed yet.
    pub fn changes(&self) -> ChangeTally {
        ChangeTally {
            services_pending: self.pending_services.len(),
            ..self.changes
        }
    }

    /// Recomputes the out-of-date Services.
    pub fn recompute(&mut self) -> Recomputed {
        self.pending_services.clear();
        self.changes.slice_changes_pending = 0;
        let mut out = Recomputed {
            slices: std::mem::take(&mut self.changed_slices),
            nodes_changed: std::mem::take(&mut self.nodes_changed),
            ..Recomputed::default()
        };
        let dirty = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            self.cluster
                .services
                .keys()
                .chain(self.slices_of.iter().map(|(service, _)| service))
                .chain(self.outputs.keys())
                .cloned()
                .collect()
        } else {
            std::mem::take(&mut self.dirty)
        };
        for name in dirty {
            self.recompute_service(name, &mut out);
        }
        out
    }

    fn recompute_service(&mut self, name: ObjectName, out: &mut Recomputed) {
        let nodes = endpoints::Nodes {
            this: &self.node,
            addresses: &self.node_addresses,
        };
        let slices: Vec<(&ObjectName, &SliceRecord)> = slices_of_service(&self.slices_of, &name)
            .filter_map(|slice| Some((slice, self.cluster.endpoint_slices.get(slice)?)))
            .collect();
        let output = service_output(&name, self.cluster.services.get(&name), &slices, &nodes);
        let previous = self.outputs.remove(&name).unwrap_or_default();
        for skipped in &previous.skipped {
            self.skipped_in_outputs.remove(skipped.category, 1);
        }
        for skipped in &output.skipped {
            self.skipped_in_outputs.add(skipped.category, 1);
        }
        self.no_local_endpoints.remove(previous.no_local_endpoints);
        self.no_local_endpoints.add(output.no_local_endpoints);
        if output == previous {
            if !output.is_empty() {
                self.outputs.insert(name, output);
            }
            return;
        }
        for (frontend, _) in &previous.frontends {
            out.frontends.insert(*frontend);
            let before = extra_claims(&self.claims, frontend);
            unclaim(&mut self.claims, frontend, &name);
            self.conflicts = self.conflicts + extra_claims(&self.claims, frontend) - before;
        }
        for (frontend, _) in &output.frontends {
            out.frontends.insert(*frontend);
            let before = extra_claims(&self.claims, frontend);
            claim(&mut self.claims, *frontend, &name);
            self.conflicts = self.conflicts + extra_claims(&self.claims, frontend) - before;
        }
        if previous.health_check != output.health_check {
            out.health_checks_changed = true;
            if let Some((port, _)) = previous.health_check.as_deref() {
                unclaim(&mut self.health_claims, port, &name);
            }
            if let Some((port, _)) = output.health_check.as_deref() {
                claim(&mut self.health_claims, *port, &name);
            }
        }
        let mut skipped = output.skipped.clone();
        skipped.extend(self.conflicts_of(&name, &output));
        out.services.push(SyncedService {
            name: name.clone(),
            skipped,
        });
        if !output.is_empty() {
            self.outputs.insert(name, output);
        }
    }

    /// The frontends of `output` another Service owns.
    fn conflicts_of(&self, name: &ObjectName, output: &ServiceOutput) -> Vec<Skipped> {
        output
            .frontends
            .iter()
            .filter_map(|(frontend, _)| {
                let owner = self.claims.get(frontend)?.first()?;
                (owner != name).then(|| Skipped {
                    kind: "Service",
                    object: name.clone(),
                    category: SkipReason::FrontendConflict,
                    reason: format!("frontend {frontend} is already used by Service {owner}"),
                })
            })
            .collect()
    }

    /// The entry a frontend has now, from the Service that owns it.
    pub fn entry(&self, frontend: &Frontend) -> Option<&FrontendEntry> {
        let owner = self.claims.get(frontend)?.first()?;
        self.outputs.get(owner)?.entry(frontend)
    }

    /// Every frontend with its entry, in frontend order.
    pub fn frontends(&self) -> impl Iterator<Item = (&Frontend, &FrontendEntry)> {
        self.claims.keys().filter_map(|f| Some((f, self.entry(f)?)))
    }

    pub fn frontend_count(&self) -> usize {
        self.claims.len()
    }

    pub fn health_checks(&self) -> BTreeMap<u16, &HealthCheck> {
        self.health_claims
            .iter()
            .filter_map(|(port, claimants)| {
                let (_, check) = self
                    .outputs
                    .get(claimants.last()?)?
                    .health_check
                    .as_deref()?;
                Some((*port, check))
            })
            .collect()
    }

    /// Every node's pod CIDRs, with the node's InternalIP.
    pub fn pod_cidrs(&self) -> &BTreeMap<SourceRange, Ipv4Addr> {
        &self.pod_cidrs
    }

    pub fn node_addresses(&self) -> BTreeSet<Ipv4Addr> {
        self.node_addresses.values().copied().collect()
    }

    /// How many objects are skipped now, each reason counted once.
    pub fn skipped_count(&self) -> usize {
        self.skipped().total()
    }

    /// What [`Model::skipped_count`] counts, by reason.
    pub fn skipped(&self) -> SkipCounts {
        let mut counts = self.skipped_in_outputs;
        counts.add(SkipReason::Invalid, self.skipped_in_slices);
        counts.add(SkipReason::FrontendConflict, self.conflicts);
        counts
    }

    /// Service ports with a Local traffic policy served by other nodes only.
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        self.no_local_endpoints
    }

    /// The problems of one EndpointSlice that do not depend on its Service.
    pub fn slice_problems(&self, name: &ObjectName) -> Vec<Skipped> {
        self.cluster
            .endpoint_slices
            .get(name)
            .map(|slice| slice_problems(name, slice))
            .unwrap_or_default()
    }

    /// The whole desired state, as [`super::desired`] computes it (for
    /// tests and `dump`); the sync reads [`Model::entry`] instead.
    pub fn desired(&self) -> DesiredDataplane {
        DesiredDataplane {
            frontends: self
                .frontends()
                .map(|(frontend, entry)| (*frontend, entry.clone()))
                .collect(),
            health_checks: self
                .health_checks()
                .into_iter()
                .map(|(port, check)| (port, check.clone()))
                .collect(),
            node_addresses: self.node_addresses(),
            skipped: Vec::new(),
            no_local_endpoints: self.no_local_endpoints,
        }
    }
}

/// The slices of `service` in a set of (Service, slice) pairs.
fn slices_of_service<'a>(
    pairs: &'a BTreeSet<(ObjectName, ObjectName)>,
    service: &'a ObjectName,
) -> impl Iterator<Item = &'a ObjectName> + 'a {
    let first = (service.clone(), ObjectName::new("", ""));
    pairs
        .range(first..)
        .take_while(move |(owner, _)| owner == service)
        .map(|(_, slice)| slice)
}

fn union<'a, K: Ord + Clone + 'a>(
    a: impl Iterator<Item = &'a K>,
    b: impl Iterator<Item = &'a K>,
) -> BTreeSet<K> {
    a.chain(b).cloned().collect()
}

fn problem_count(slice: &SliceRecord) -> usize {
    match &slice.owner {
        super::input::SliceOwner::Invalid(_) => 1,
        super::input::SliceOwner::Service(_) => slice.problems.len(),
        super::input::SliceOwner::Ignored => 0,
    }
}

/// Claimants of `key` beyond the one that owns it.
fn extra_claims(claims: &BTreeMap<Frontend, Vec<ObjectName>>, key: &Frontend) -> usize {
    claims.get(key).map_or(0, |c| c.len().saturating_sub(1))
}

/// Adds `name` to the sorted claimants of `key`.
fn claim<K: Ord>(claims: &mut BTreeMap<K, Vec<ObjectName>>, key: K, name: &ObjectName) {
    let claimants = claims.entry(key).or_default();
    if let Err(position) = claimants.binary_search(name) {
        claimants.insert(position, name.clone());
        // Almost every key has one claimant: no room kept for more.
        claimants.shrink_to_fit();
    }
}

fn unclaim<K: Ord>(claims: &mut BTreeMap<K, Vec<ObjectName>>, key: &K, name: &ObjectName) {
    if let Some(claimants) = claims.get_mut(key) {
        claimants.retain(|c| c != name);
        if claimants.is_empty() {
            claims.remove(key);
        }
    }
}

#[cfg(test)]
mod tests;
