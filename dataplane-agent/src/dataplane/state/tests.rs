use super::{fake::FakeMaps, *};
use std::net::Ipv4Addr;

use crate::model::{Backend, FrontendEntry, ObjectName, Protocol};
use dataplane_common::MemberKey;

fn frontend(last_octet: u8) -> Frontend {
    Frontend::cluster(Ipv4Addr::new(10, 96, 0, last_octet), 80, Protocol::Tcp)
}

fn backends(last_octets: &[u8]) -> Vec<Backend> {
    last_octets
        .iter()
        .map(|o| Backend::routed(Ipv4Addr::new(10, 0, 0, *o), 8080))
        .collect()
}

fn desired(frontends: &[(u8, &[u8])]) -> DesiredDataplane {
    DesiredDataplane {
        frontends: frontends
            .iter()
            .map(|(f, b)| {
                (
                    frontend(*f),
                    FrontendEntry {
                        service: ObjectName::new("default", format!("svc-{f}")),
                        port_name: "".into(),
                        backends: backends(b),
                        affinity_timeout_s: None,
                        source_ranges: Vec::new(),
                        drop_without_backends: false,
                    },
                )
            })
            .collect(),
        health_checks: BTreeMap::new(),
        node_addresses: BTreeSet::new(),
        skipped: vec![],
        no_local_endpoints: Default::default(),
    }
}

fn set(last_octets: &[u8]) -> BTreeSet<Backend> {
    backends(last_octets).into_iter().collect()
}

/// Applies, then frees what the apply retired, as the agent does.
fn converge(mirror: &mut PinnedState, maps: &mut FakeMaps, want: &DesiredDataplane) -> ApplyReport {
    let report = mirror.apply(want, maps, &Limits::default());
    let retired = mirror.unreachable_backends();
    let (_, error) = mirror.free_retired(&retired, maps);
    assert!(error.is_none());
    assert!(maps.members_match_slots(), "{:?}", maps.log);
    report
}

#[test]
fn new_service_writes_backends_before_the_service_entry() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let report = converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    assert_eq!(report.updated, 1);
    assert_eq!(
        maps.log,
        [
            "put_backend 1/0/0",
            "put_member 1/0",
            "put_backend 1/0/1",
            "put_member 1/0",
            "put_service 10.96.0.10:80/TCP"
        ]
    );
    assert_eq!(mirror, maps.state);
}

#[test]
fn changing_backends_never_exposes_a_removed_or_partial_set() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2, 3])]));
    maps.visible_history.clear();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 3, 4])]));

    let key = service_key(&frontend(10));
    let (old, new) = (set(&[1, 2, 3]), set(&[1, 3, 4]));
    for visible in &maps.visible_history {
        let now = &visible[&key];
        assert!(
            *now == old || *now == new,
            "saw a mixed backend set {now:?}"
        );
    }
    assert_eq!(maps.visible_history.last().unwrap()[&key], new);
    // The old generation is gone once freed, and the mirror is exact.
    assert_eq!(maps.state.backends.len(), 3);
    assert_eq!(mirror, maps.state);
}

#[test]
fn old_generation_stays_until_it_is_freed() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    mirror.apply(&desired(&[(10, &[1])]), &mut maps, &Limits::default());
    // A connect() that read the old entry just before the flip must still
    // find its slot.
    assert_eq!(maps.state.backends.len(), 3);
    let retired = mirror.unreachable_backends();
    assert_eq!(retired.len(), 2);
    mirror.free_retired(&retired, &mut maps);
    assert_eq!(maps.state.backends.len(), 1);
}

#[test]
fn an_unchanged_desired_state_writes_nothing() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let want = desired(&[(10, &[1, 2]), (11, &[3])]);
    converge(&mut mirror, &mut maps, &want);
    maps.log.clear();
    let report = converge(&mut mirror, &mut maps, &want);
    assert_eq!(report.updated, 0);
    assert!(maps.log.is_empty(), "{:?}", maps.log);
}

#[test]
fn removed_frontends_are_deleted_and_their_slots_freed() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(
        &mut mirror,
        &mut maps,
        &desired(&[(10, &[1, 2]), (11, &[3])]),
    );
    let report = converge(&mut mirror, &mut maps, &desired(&[(11, &[3])]));
    assert_eq!(report.removed, 1);
    assert_eq!(maps.state.services.len(), 1);
    assert_eq!(maps.state.backends.len(), 1);
    assert_eq!(mirror, maps.state);
}

#[test]
fn service_ids_survive_a_restart_and_a_restarted_agent_rewrites_nothing() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let want = desired(&[(10, &[1]), (11, &[2]), (12, &[3])]);
    converge(&mut mirror, &mut maps, &want);
    let ids_before: Vec<u32> = maps.state.services.values().map(|v| v.service_id).collect();

    // A new agent starts from what it reads back from the pinned maps.
    let mut restarted = maps.read_back();
    maps.log.clear();
    converge(&mut restarted, &mut maps, &want);
    assert!(maps.log.is_empty(), "{:?}", maps.log);

    // Adding a frontend does not renumber the others; freed ids are reused.
    converge(
        &mut restarted,
        &mut maps,
        &desired(&[(10, &[1]), (12, &[3])]),
    );
    converge(
        &mut restarted,
        &mut maps,
        &desired(&[(10, &[1]), (12, &[3]), (13, &[4])]),
    );
    let id_of = |o: u8| maps.state.services[&service_key(&frontend(o))].service_id;
    assert_eq!(id_of(10), ids_before[0]);
    assert_eq!(id_of(12), ids_before[2]);
    assert_eq!(id_of(13), ids_before[1], "the freed id is reused");
}

#[test]
fn a_failing_frontend_keeps_its_old_backends_and_others_still_update() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1]), (11, &[2])]));
    maps.fail_backend_ip = Some(Ipv4Addr::new(10, 0, 0, 9));
    let report = converge(
        &mut mirror,
        &mut maps,
        &desired(&[(10, &[1, 9]), (11, &[3])]),
    );

    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, frontend(10));
    assert_eq!(report.updated, 1);
    let visible = maps.visible_history.last().unwrap();
    assert_eq!(
        visible[&service_key(&frontend(10))],
        set(&[1]),
        "old backends kept, never half"
    );
    assert_eq!(visible[&service_key(&frontend(11))], set(&[3]));
    assert_eq!(
        mirror, maps.state,
        "partial slots of the failed update were freed"
    );
}

#[test]
fn too_many_backends_is_an_error_for_that_frontend_only() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let limits = Limits {
        max_backends_per_service: 2,
        ..Limits::default()
    };
    let report = mirror.apply(
        &desired(&[(10, &[1, 2, 3]), (11, &[4])]),
        &mut maps,
        &limits,
    );
    assert!(matches!(
        report.failed.as_slice(),
        [(f, FrontendError::TooManyBackends { count: 3, limit: 2 })] if *f == frontend(10)
    ));
    assert_eq!(maps.state.services.len(), 1);
}

#[test]
fn a_frontend_without_backends_is_programmed_with_count_zero() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[])]));
    let value = maps.state.services[&service_key(&frontend(10))];
    assert_eq!(value.backend_count, 0);
}

#[test]
fn keys_use_network_byte_order() {
    let key = service_key(&frontend(10));
    assert_eq!(key.vip_be.to_ne_bytes(), [10, 96, 0, 10]);
    assert_eq!(key.port_be.to_ne_bytes(), [0, 80]);
    assert_eq!(frontend_of(&key), Some(frontend(10)));
}

#[test]
fn failed_deletes_are_reported_and_retried_at_the_next_sync() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1]), (11, &[2])]));
    maps.fail_deletes = true;
    let report = mirror.apply(&desired(&[(11, &[2])]), &mut maps, &Limits::default());
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, frontend(10));
    let retired = mirror.unreachable_backends();
    let (deleted, error) = mirror.free_retired(&retired, &mut maps);
    assert_eq!(
        (deleted, error.is_some()),
        (0, false),
        "nothing retired while the entry stays"
    );
    assert_eq!(
        mirror, maps.state,
        "the mirror only records what the kernel took"
    );

    maps.fail_deletes = false;
    let report = converge(&mut mirror, &mut maps, &desired(&[(11, &[2])]));
    assert_eq!(report.removed, 1);
    assert_eq!(maps.state.backends.len(), 1);
    assert_eq!(mirror, maps.state);
}

#[test]
fn a_failed_release_keeps_the_slots_in_the_mirror() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    mirror.apply(&desired(&[(10, &[1])]), &mut maps, &Limits::default());
    maps.fail_deletes = true;
    let retired = mirror.unreachable_backends();
    let (deleted, error) = mirror.free_retired(&retired, &mut maps);
    assert_eq!(deleted, 0);
    assert!(error.is_some());
    assert_eq!(
        mirror.unreachable_backends(),
        retired,
        "still known, freed later"
    );
    assert_eq!(mirror, maps.state);
}

#[test]
fn generations_wrap_around() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1])]));
    let key = service_key(&frontend(10));
    let mut value = maps.state.services[&key];
    // Pretend many updates happened: the entry sits at the last generation.
    let old_slot = BackendKey {
        service_id: value.service_id,
        generation: 0,
        index: 0,
    };
    let slot = maps.state.backends[&old_slot];
    maps.state.backends.remove(&old_slot);
    let wrapped_slot = BackendKey {
        generation: u16::MAX,
        ..old_slot
    };
    maps.state.backends.insert(wrapped_slot, slot);
    maps.members.remove(&member_key(&old_slot, &slot));
    maps.members.insert(member_key(&wrapped_slot, &slot), 0);
    value.generation = u16::MAX;
    maps.state.services.insert(key, value);
    mirror = maps.read_back();

    converge(&mut mirror, &mut maps, &desired(&[(10, &[2])]));
    let value = maps.state.services[&key];
    assert_eq!(value.generation, 0);
    assert_eq!(mirror.current_backends(&value).len(), 1);
    assert_eq!(maps.state.backends.len(), 1);
}

#[test]
fn an_id_is_not_reused_while_its_old_slots_wait_to_be_freed() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    let old_id = maps.state.services[&service_key(&frontend(10))].service_id;
    // Frontend 10 goes and frontend 11 arrives in the same sync, before the
    // release has removed 10's slots.
    mirror.apply(&desired(&[(11, &[3])]), &mut maps, &Limits::default());
    let new_id = maps.state.services[&service_key(&frontend(11))].service_id;
    assert_ne!(new_id, old_id);
    let retired = mirror.unreachable_backends();
    mirror.free_retired(&retired, &mut maps);
    let visible = maps.visible_history.last().unwrap();
    assert_eq!(visible[&service_key(&frontend(11))], set(&[3]));
    assert_eq!(maps.state.backends.len(), 1);
}

#[test]
fn the_backend_limit_never_exceeds_what_a_slot_index_can_hold() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let limits = Limits {
        max_backends_per_service: usize::MAX,
        ..Limits::default()
    };
    let many: Vec<Backend> = (0..=u32::from(u16::MAX))
        .map(|i| Backend::routed(Ipv4Addr::from(0x0a00_0000 + i), 80))
        .collect();
    let mut want = desired(&[(10, &[])]);
    want.frontends
        .values_mut()
        .for_each(|e| e.backends = many.clone());
    let report = mirror.apply(&want, &mut maps, &limits);
    assert!(matches!(
        report.failed.as_slice(),
        [(_, FrontendError::TooManyBackends { limit: 65535, .. })]
    ));
}

fn with_affinity(mut want: DesiredDataplane, timeout_s: Option<u32>) -> DesiredDataplane {
    want.frontends
        .values_mut()
        .for_each(|e| e.affinity_timeout_s = timeout_s);
    want
}

#[test]
fn switching_affinity_updates_the_entry_in_place() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    let key = service_key(&frontend(10));
    let before = maps.state.services[&key];
    maps.log.clear();

    let report = converge(
        &mut mirror,
        &mut maps,
        &with_affinity(desired(&[(10, &[1, 2])]), Some(30)),
    );
    assert_eq!(report.updated, 1);
    assert_eq!(
        maps.log,
        ["put_service 10.96.0.10:80/TCP"],
        "no new generation"
    );
    let after = maps.state.services[&key];
    assert_eq!(after.flags, SERVICE_FLAG_AFFINITY);
    assert_eq!(after.affinity_timeout_s, 30);
    assert_eq!(
        (after.service_id, after.generation),
        (before.service_id, before.generation)
    );

    converge(&mut mirror, &mut maps, &desired(&[(10, &[1, 2])]));
    assert_eq!(maps.state.services[&key], before, "switched off again");
}

#[test]
fn members_follow_their_slots_through_updates_and_releases() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(
        &mut mirror,
        &mut maps,
        &desired(&[(10, &[1, 2]), (11, &[3])]),
    );
    assert_eq!(maps.members.len(), 3);
    converge(&mut mirror, &mut maps, &desired(&[(10, &[2, 4])]));
    assert_eq!(maps.members.len(), 2);
    assert_eq!(maps.state.backends.len(), 2);
    assert_eq!(mirror, maps.state);
}

#[test]
fn orphan_members_are_freed() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    converge(&mut mirror, &mut maps, &desired(&[(10, &[1])]));
    let orphan = MemberKey {
        service_id: 99,
        generation: 3,
        port_be: 80u16.to_be(),
        ip_be: 1,
    };
    maps.members.insert(orphan, 0);
    let mut restarted = maps.read_back();
    assert_eq!(restarted.stray_members, BTreeSet::from([orphan]));
    let ids = restarted.ids_in_use();
    assert!(ids.contains(&99), "a stray member's id is not handed out");
    let error = restarted.free_orphan_members(&mut maps);
    assert!(error.is_none());
    assert!(!maps.members.contains_key(&orphan));
    assert!(maps.members_match_slots());
    assert_eq!(restarted, maps.read_back());
    assert!(restarted.stray_members.is_empty());
}

#[test]
fn the_node_wide_backend_limit_refuses_whole_frontends_and_counts_removals_first() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let limits = Limits {
        max_backends: 3,
        ..Limits::default()
    };
    let report = mirror.apply(
        &desired(&[(10, &[1, 2]), (11, &[3, 4])]),
        &mut maps,
        &limits,
    );
    assert!(matches!(
        report.failed.as_slice(),
        [(f, FrontendError::BackendLimit { wanted: 2, in_use: 2, limit: 3 })] if *f == frontend(11)
    ));
    assert_eq!(maps.state.services.len(), 1, "never half a Service");

    // Growing within the limit works; a frontend removed in the same sync
    // frees its backends first.
    let report = mirror.apply(&desired(&[(10, &[1, 2, 5])]), &mut maps, &limits);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let report = mirror.apply(&desired(&[(11, &[3, 4])]), &mut maps, &limits);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(mirror.live_backend_count(), 2);
}

#[test]
fn the_frontend_limit_is_reported_per_frontend() {
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let limits = Limits {
        max_services: 2,
        ..Limits::default()
    };
    let report = mirror.apply(
        &desired(&[(10, &[1]), (11, &[2]), (12, &[3])]),
        &mut maps,
        &limits,
    );
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, frontend(12));
    assert_eq!(report.failed[0].1.reason(), "service_limit");
    assert_eq!(maps.state.services.len(), 2);
}

#[test]
fn source_ranges_are_written_before_the_check_and_removed_after_it() {
    let range = |octet: u8, prefix_len: u8| SourceRange {
        ip: Ipv4Addr::new(198, 51, 100, octet),
        prefix_len,
    };
    let mut mirror = PinnedState::default();
    let mut maps = FakeMaps::default();
    let mut want = desired(&[(10, &[1])]);
    let with_ranges = |want: &mut DesiredDataplane, ranges: Vec<SourceRange>| {
        want.frontends
            .values_mut()
            .for_each(|e| e.source_ranges = ranges.clone());
    };
    with_ranges(&mut want, vec![range(0, 24), range(7, 32)]);
    let report = mirror.apply(&want, &mut maps, &Limits::default());
    assert!(report.failed.is_empty());
    assert_eq!(mirror, maps.state);
    let first_range = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_source_range"))
        .unwrap();
    let flip = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_service"))
        .unwrap();
    assert!(first_range < flip, "{:?}", maps.log);

    // Narrowing the ranges: the new set is complete before the old prefix
    // goes; dropping them all clears the flag before the last prefix goes
    // (FakeMaps checks both after every write).
    with_ranges(&mut want, vec![range(7, 32)]);
    mirror.apply(&want, &mut maps, &Limits::default());
    assert_eq!(maps.state.source_ranges.len(), 1);
    with_ranges(&mut want, vec![]);
    mirror.apply(&want, &mut maps, &Limits::default());
    assert!(maps.state.source_ranges.is_empty());
    assert_eq!(mirror, maps.state);

    // A removed frontend takes its ranges along, so a new frontend that
    // gets its id later starts clean.
    with_ranges(&mut want, vec![range(0, 24)]);
    mirror.apply(&want, &mut maps, &Limits::default());
    mirror.apply(&desired(&[]), &mut maps, &Limits::default());
    assert!(maps.state.source_ranges.is_empty(), "{:?}", maps.log);
    assert_eq!(mirror, maps.state);
}
