//! The Markdown report: every figure with its min..max and failures, and
//! ratios that say "within noise" whenever the two ranges overlap.

use std::fmt::Write as _;

use super::{
    Dataplane, ENDPOINTS_PER_SERVICE, Figure, Load, Results, Row,
    tunnel::{TunnelRow, TunnelVariant},
};

pub(crate) const MIN_RUNS_FOR_A_RATIO: usize = 3;

/// How `ours` compares with `theirs`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Comparison {
    /// One of them has failed exchanges: no rate to compare.
    Failures,
    TooFewRounds,
    /// The ranges of the rounds overlap: no round-to-round evidence that
    /// one is faster.
    WithinNoise,
    /// The ratio of the medians, with the range the two spreads allow.
    Ratio {
        median: f64,
        low: f64,
        high: f64,
    },
}

pub(crate) fn comparison(ours: &Figure, theirs: &Figure) -> Comparison {
    if ours.invalid() || theirs.invalid() {
        return Comparison::Failures;
    }
    // Fewer runs than this give no range worth the name.
    if ours.runs.min(theirs.runs) < MIN_RUNS_FOR_A_RATIO {
        return Comparison::TooFewRounds;
    }
    let overlap = ours.rate_min <= theirs.rate_max && theirs.rate_min <= ours.rate_max;
    if overlap || theirs.rate_min <= 0.0 {
        return Comparison::WithinNoise;
    }
    Comparison::Ratio {
        median: ours.median.probe.rate / theirs.median.probe.rate,
        low: ours.rate_min / theirs.rate_max,
        high: ours.rate_max / theirs.rate_min,
    }
}

/// A table cell under a "vs X" heading: the ratio with its range, or
/// "~1.0 (within noise)" when the ranges overlap.
pub(crate) fn compare(ours: &Figure, theirs: &Figure) -> String {
    match comparison(ours, theirs) {
        Comparison::Failures => "n/a (failures)".to_owned(),
        Comparison::TooFewRounds => format!("n/a (fewer than {MIN_RUNS_FOR_A_RATIO} rounds)"),
        Comparison::WithinNoise => "~1.0 (within noise)".to_owned(),
        Comparison::Ratio { median, low, high } => format!("{median:.2} [{low:.2}..{high:.2}]"),
    }
}

/// The same in a sentence: "1.22x iptables [1.07..1.59]", "within noise
/// of the floor".
pub(crate) fn versus(ours: &Figure, theirs: &Figure, name: &str) -> String {
    match comparison(ours, theirs) {
        Comparison::Failures => format!("no ratio to {name} (failed exchanges)"),
        Comparison::TooFewRounds => {
            format!("no ratio to {name} (fewer than {MIN_RUNS_FOR_A_RATIO} rounds)")
        }
        Comparison::WithinNoise => format!("within noise of {name}"),
        Comparison::Ratio { median, low, high } => {
            format!("{median:.2}x {name} [{low:.2}..{high:.2}]")
        }
    }
}

/// A figure above the floor's whole range: impossible for a dataplane that
/// adds work to the floor's path, so the report flags it for explanation.
pub(crate) fn above_floor(figure: &Figure, floor: &Figure) -> bool {
    figure.rate_min > floor.rate_max
}

fn row_of(results: &Results, services: usize, dataplane: Dataplane) -> Option<&Row> {
    results
        .rows
        .iter()
        .find(|r| r.services == services && r.dataplane() == dataplane)
}

/// This row's figure compared with `dataplane`'s at the same scale.
fn ratio(results: &Results, row: &Row, dataplane: Dataplane, load: Load) -> String {
    let theirs = row_of(results, row.services, dataplane).and_then(|r| r.figure(load));
    match (row.figure(load), theirs) {
        (Some(ours), Some(theirs)) => compare(ours, theirs),
        _ => "n/a".to_owned(),
    }
}

fn tunnel_row(rows: &[TunnelRow], variant: TunnelVariant) -> Option<&TunnelRow> {
    rows.iter().find(|row| row.variant == variant)
}

/// The tunnel path's table: every variant against the floor and the peers.
fn tunnel_table(rows: &[TunnelRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut out = "\n### NodePort whose pods are all on another node (client outside -> node-1 -> node-2; floor: the client straight to node-2's pods)\n\n".to_owned();
    out += "| dataplane | new conn/s | p50 µs | p99 µs | CPU ms/1k | keep-alive req/s | p99 µs | conn/s vs floor | vs iptables | vs nftables |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in rows {
        let s = &row.short_connections;
        let k = &row.keepalive;
        let vs = |variant| {
            tunnel_row(rows, variant).map_or_else(
                || "n/a".to_owned(),
                |theirs| compare(s, &theirs.short_connections),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            row.variant.label(),
            s.cell(1.0, 0),
            s.median.probe.p50_us,
            s.median.probe.p99_us,
            s.median.cpu_ms_per_1000,
            k.cell(1.0, 0),
            k.median.probe.p99_us,
            vs(TunnelVariant::Direct),
            vs(TunnelVariant::Iptables),
            vs(TunnelVariant::Nftables),
        );
    }
    out
}

/// `what` with both ranges, if `figure` lies above the floor's range.
fn anomaly(what: &str, figure: &Figure, floor: &Figure) -> Option<String> {
    above_floor(figure, floor).then(|| {
        format!(
            "{what}: {:.0} [{:.0}..{:.0}] above the floor's {:.0} [{:.0}..{:.0}]",
            figure.median.probe.rate,
            figure.rate_min,
            figure.rate_max,
            floor.median.probe.rate,
            floor.rate_min,
            floor.rate_max,
        )
    })
}

/// Figures of non-floor rows that lie above the floor's range.
pub(crate) fn anomalies(results: &Results) -> Vec<String> {
    let mut found = Vec::new();
    for row in results
        .rows
        .iter()
        .filter(|r| r.dataplane() != Dataplane::Direct)
    {
        let Some(floor) = row_of(results, row.services, Dataplane::Direct) else {
            continue;
        };
        for load in Load::ALL {
            if let (Some(figure), Some(floor_figure)) = (row.figure(load), floor.figure(load)) {
                let what = format!(
                    "{} Services, {}, {}",
                    row.services,
                    row.dataplane().label(),
                    load.label()
                );
                found.extend(anomaly(&what, figure, floor_figure));
            }
        }
    }
    if let Some(floor) = tunnel_row(&results.tunnel, TunnelVariant::Direct) {
        for row in results
            .tunnel
            .iter()
            .filter(|r| r.variant != TunnelVariant::Direct)
        {
            for (what, figure, floor_figure) in [
                (
                    "new connections",
                    &row.short_connections,
                    &floor.short_connections,
                ),
                ("keep-alive requests", &row.keepalive, &floor.keepalive),
            ] {
                let what = format!("tunnel path, {}, {what}", row.variant.label());
                found.extend(anomaly(&what, figure, floor_figure));
            }
        }
    }
    found
}

pub(crate) fn markdown(results: &Results) -> String {
    let mut out = format!(
        "Machine: {} cores, kernel {}; commit {}, {} build; {} s per run, {} clients at once for new connections and keep-alive requests (latencies are under that load), {} rounds with the dataplanes interleaved; every rate is the median [min..max] of the rounds, with failed exchanges beside it (every exchange's answer is checked). A ratio is given only where the two ranges do not overlap; otherwise it reads \"~1.0 (within noise)\".\n\n",
        results.cores,
        results.kernel,
        results.commit,
        results.build,
        results.seconds_per_run,
        results.parallel,
        results.rounds
    );
    out += "### ClusterIP, from a pod (floor: the same pod to the Service's ten pods directly, in turn)\n\n";
    out += "| Services | dataplane | new conn/s | p50 µs | p99 µs | CPU ms/1k | keep-alive req/s | p99 µs | bulk Gbit/s | program s | conn/s vs floor | vs iptables | vs nftables |\n";
    out += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &results.rows {
        let (Some(s), Some(k), Some(b)) = (&row.short_connections, &row.keepalive, &row.bulk)
        else {
            let _ = writeln!(
                out,
                "| {} | {} | did not load within {:.0} s | | | | | | | {:.0}+ | | | |",
                row.services,
                row.dataplane().label(),
                row.program_seconds,
                row.program_seconds
            );
            continue;
        };
        let vs = |dataplane| ratio(results, row, dataplane, Load::ClusterShort);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {:.3} | {} | {} | {} |",
            row.services,
            row.dataplane().label(),
            s.cell(1.0, 0),
            s.median.probe.p50_us,
            s.median.probe.p99_us,
            s.median.cpu_ms_per_1000,
            k.cell(1.0, 0),
            k.median.probe.p99_us,
            b.cell(8.0 / 1e9, 2),
            row.program_seconds,
            vs(Dataplane::Direct),
            vs(Dataplane::Iptables),
            vs(Dataplane::Nftables),
        );
    }
    out += "\n### NodePort, from a client outside the cluster (floor: the same client to the pods' addresses, in turn)\n\n";
    out += "| Services | dataplane | new conn/s | p50 µs | p99 µs | CPU ms/1k | keep-alive req/s | p99 µs | conn/s vs floor | vs iptables | vs nftables |\n";
    out += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &results.rows {
        let (Some(s), Some(k)) = (&row.node_port_short, &row.node_port_keepalive) else {
            let _ = writeln!(
                out,
                "| {} | {} | did not load | | | | | | | | |",
                row.services,
                row.dataplane().label()
            );
            continue;
        };
        let vs = |dataplane| ratio(results, row, dataplane, Load::NodePortShort);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            row.services,
            row.dataplane().label(),
            s.cell(1.0, 0),
            s.median.probe.p50_us,
            s.median.probe.p99_us,
            s.median.cpu_ms_per_1000,
            k.cell(1.0, 0),
            k.median.probe.p99_us,
            vs(Dataplane::Direct),
            vs(Dataplane::Iptables),
            vs(Dataplane::Nftables),
        );
    }
    out += &tunnel_table(&results.tunnel);
    let anomalies = anomalies(results);
    if anomalies.is_empty() {
        out += "\nNo figure lies above the floor's range.\n";
    } else {
        out += "\n**Above the floor's range (to be explained before anyone quotes them):**\n\n";
        for anomaly in anomalies {
            let _ = writeln!(out, "- {anomaly}");
        }
    }
    out += "\n### Control plane (ours)\n\n";
    out += "| Services | all programmed from start, s (median [min..max] of the starts) | endpoint change to map, p50 ms | p99 ms | unpaced p50 ms | unpaced p99 ms | agent RSS MiB | idle CPU, % of a core |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &results.control_plane {
        let _ = writeln!(
            out,
            "| {} | {:.2}{} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.2} |",
            row.services,
            row.program_seconds,
            row.program_seconds_range
                .map_or_else(String::new, |(min, max)| format!(" [{min:.2}..{max:.2}]"))
                + if row.busy_starts > 0 {
                    " (cores busy)"
                } else {
                    ""
                },
            row.change_p50_ms,
            row.change_p99_ms,
            row.unpaced_change_p50_ms,
            row.unpaced_change_p99_ms,
            row.rss_mib.map_or_else(String::new, |v| format!("{v:.0}")),
            row.idle_cpu_percent,
        );
    }
    if let Some(row) = results.control_plane.first() {
        let _ = writeln!(
            out,
            "\n(Endpoint changes: {ENDPOINTS_PER_SERVICE} endpoints per Service, one endpoint dropped per change, timed from the manifest write to the SERVICES entry's flip. Paced: the agent's default 100 ms --min-sync-period, which coalesces bursts (kube-proxy's iptables mode defaults to 1 s); unpaced: --min-sync-period 0. Idle CPU over {:.0} s with nothing changing, periodic full resyncs (every 30 s) included. Programming: starts on empty maps, each once the cores were 90% idle over 200 ms, as the kernel frees the previous run's maps after its cleanup returns; \"cores busy\" marks a start timed after waiting 10 s for that in vain.)",
            row.idle_seconds
        );
    }
    out += "\n### In-kernel cost of the interface programs (BPF_PROG_TEST_RUN, ns per packet)\n\n";
    out += "| packet | program | timed as | ns/packet | no-op TC program ns/packet | above the floor |\n";
    out += "|---|---|---|---:|---:|---:|\n";
    for cost in &results.program_costs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {:+.1} |",
            cost.packet,
            cost.program,
            cost.method,
            cost.ns_per_packet,
            cost.floor_ns_per_packet,
            cost.ns_per_packet - cost.floor_ns_per_packet
        );
    }
    out
}

/// The README's paragraph of figures, generated from the results (the
/// README quotes `summary.md` verbatim; a test keeps the two equal).
pub(crate) fn summary(results: &Results) -> String {
    let mut out = format!(
        "Measured at commit {} ({} build) on {} cores, {} rounds of {} s with the dataplanes interleaved, {} clients at once; medians, ratios only where the ranges of the rounds do not overlap:\n\n",
        results.commit,
        results.build,
        results.cores,
        results.rounds,
        results.seconds_per_run,
        results.parallel
    );
    let mut scales: Vec<usize> = results.rows.iter().map(|r| r.services).collect();
    scales.dedup();
    for services in scales {
        let Some(ours) = row_of(results, services, Dataplane::Ours) else {
            continue;
        };
        let mut parts = Vec::new();
        for (load, what) in [
            (Load::ClusterShort, "ClusterIP new connections"),
            (Load::NodePortShort, "NodePort new connections"),
        ] {
            let Some(figure) = ours.figure(load) else {
                continue;
            };
            let versus: Vec<String> = [
                (Dataplane::Direct, "the floor"),
                (Dataplane::Iptables, "iptables"),
                (Dataplane::Nftables, "nftables"),
            ]
            .into_iter()
            .map(|(dataplane, name)| {
                let theirs = row_of(results, services, dataplane);
                match theirs.and_then(|row| row.figure(load)) {
                    Some(theirs) => versus(figure, theirs, name),
                    None if theirs.is_some() => format!("{name} did not load"),
                    None => format!("{name} not measured"),
                }
            })
            .collect();
            let rate = if figure.invalid() {
                format!(
                    "invalid ({} of {} failed)",
                    figure.failures,
                    figure.count + figure.failures
                )
            } else {
                format!("{:.0}/s", figure.median.probe.rate)
            };
            parts.push(format!("{what} {rate} ({})", versus.join(", ")));
        }
        let peers_loaded: Vec<String> = [Dataplane::Iptables, Dataplane::Nftables]
            .into_iter()
            .filter_map(|dataplane| {
                let row = row_of(results, services, dataplane)?;
                Some(if row.short_connections.is_some() {
                    format!("{} {:.1} s", dataplane.label(), row.program_seconds)
                } else {
                    format!(
                        "{} not within {:.0} s",
                        dataplane.label(),
                        row.program_seconds
                    )
                })
            })
            .collect();
        let change = results
            .control_plane
            .iter()
            .find(|row| row.services == services)
            .map_or_else(String::new, |row| {
                format!(
                    "; an endpoint change reaches the map in {:.0} ms (p50, with the 100 ms --min-sync-period)",
                    row.change_p50_ms
                )
            });
        let _ = writeln!(
            out,
            "- **{services} Services:** {}; all programmed in {:.1} s (peers' rule load: {}){change}.",
            parts.join("; "),
            ours.program_seconds,
            peers_loaded.join(", "),
        );
    }
    if let Some(tunnel) = tunnel_row(&results.tunnel, TunnelVariant::OursTunnel) {
        let versus: Vec<String> = [
            (TunnelVariant::Direct, "the floor"),
            (TunnelVariant::Iptables, "iptables"),
            (TunnelVariant::Nftables, "nftables"),
        ]
        .into_iter()
        .filter_map(|(variant, name)| {
            let theirs = tunnel_row(&results.tunnel, variant)?;
            Some(versus(
                &tunnel.short_connections,
                &theirs.short_connections,
                name,
            ))
        })
        .collect();
        let _ = writeln!(
            out,
            "- **NodePort to a pod on another node (VXLAN tunnel, client address kept):** {:.0} new connections/s ({}).",
            tunnel.short_connections.median.probe.rate,
            versus.join(", ")
        );
    }
    let costs: Vec<String> = results
        .program_costs
        .iter()
        .map(|cost| {
            format!(
                "{} {:+.0} ns",
                cost.packet,
                cost.ns_per_packet - cost.floor_ns_per_packet
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "- **Interface programs, in-kernel per packet above a no-op program:** {}.",
        costs.join("; ")
    );
    let anomalies = anomalies(results);
    if !anomalies.is_empty() {
        let _ = writeln!(
            out,
            "- **Above the floor's range (not to be quoted until explained):** {}.",
            anomalies.join("; ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Run;

    fn figure(median: f64, min: f64, max: f64, failures: u64) -> Figure {
        let mut run = Run::default();
        run.probe.rate = median;
        Figure {
            median: run,
            rate_min: min,
            rate_max: max,
            count: 10_000,
            failures,
            runs: 5,
            lossless: false,
        }
    }

    #[test]
    fn overlapping_ranges_are_within_noise_whatever_the_medians() {
        let ours = figure(11_200.0, 10_500.0, 11_900.0, 0);
        let theirs = figure(10_000.0, 9_400.0, 10_600.0, 0);
        assert_eq!(compare(&ours, &theirs), "~1.0 (within noise)");
        assert_eq!(compare(&theirs, &ours), "~1.0 (within noise)");
    }

    #[test]
    fn a_sentence_names_the_peer_after_the_ratio() {
        let ours = figure(12_000.0, 11_000.0, 13_000.0, 0);
        let theirs = figure(10_000.0, 9_000.0, 10_000.0, 0);
        assert_eq!(
            versus(&ours, &theirs, "iptables"),
            "1.20x iptables [1.10..1.44]"
        );
        assert_eq!(
            versus(&ours, &ours, "the floor"),
            "within noise of the floor"
        );
    }

    #[test]
    fn separate_ranges_give_the_ratio_and_its_bounds() {
        let ours = figure(12_000.0, 11_000.0, 13_000.0, 0);
        let theirs = figure(10_000.0, 9_000.0, 10_000.0, 0);
        assert_eq!(compare(&ours, &theirs), "1.20 [1.10..1.44]");
    }

    #[test]
    fn a_figure_with_many_failures_is_no_comparison() {
        let broken = figure(50_000.0, 49_000.0, 51_000.0, 500);
        let floor = figure(10_000.0, 9_000.0, 11_000.0, 0);
        assert!(broken.invalid());
        assert_eq!(compare(&broken, &floor), "n/a (failures)");
        assert!(broken.cell(1.0, 0).starts_with("invalid: "));
    }

    #[test]
    fn one_or_two_rounds_give_no_ratio_and_bulk_loses_no_byte() {
        let mut ours = figure(12_000.0, 12_000.0, 12_000.0, 0);
        ours.runs = 1;
        let theirs = figure(10_000.0, 10_000.0, 10_000.0, 0);
        assert_eq!(compare(&ours, &theirs), "n/a (fewer than 3 rounds)");
        let mut bulk = figure(1e9, 1e9, 1e9, 1);
        bulk.lossless = true;
        assert!(bulk.invalid(), "one run lost bytes");
    }

    #[test]
    fn only_a_whole_range_above_the_floor_is_an_anomaly() {
        let floor = figure(10_000.0, 9_000.0, 11_000.0, 0);
        assert!(above_floor(
            &figure(12_000.0, 11_500.0, 12_500.0, 0),
            &floor
        ));
        assert!(!above_floor(
            &figure(12_000.0, 10_900.0, 12_500.0, 0),
            &floor
        ));
    }

    #[test]
    fn the_summary_says_within_noise_and_names_peers_that_did_not_load() {
        let row = |dataplane, rate: f64, min: f64, max: f64| Row {
            services: 10_000,
            dataplane: Some(dataplane),
            short_connections: Some(figure(rate, min, max, 0)),
            node_port_short: Some(figure(rate, min, max, 0)),
            program_seconds: 2.0,
            ..Row::default()
        };
        let results = Results {
            commit: "abc1234".into(),
            build: "release".into(),
            kernel: "6.18".into(),
            cores: 2,
            seconds_per_run: 3.0,
            parallel: 4,
            rounds: 5,
            tunnel: Vec::new(),
            control_plane: Vec::new(),
            rows: vec![
                row(Dataplane::Direct, 6_000.0, 5_800.0, 6_200.0),
                row(Dataplane::Ours, 6_100.0, 5_900.0, 6_300.0),
                Row {
                    services: 10_000,
                    dataplane: Some(Dataplane::Iptables),
                    program_seconds: 180.0,
                    ..Row::default()
                },
                row(Dataplane::Nftables, 4_000.0, 3_900.0, 4_100.0),
            ],
            program_costs: Vec::new(),
        };
        let summary = summary(&results);
        assert!(
            summary.contains("commit abc1234 (release build)"),
            "{summary}"
        );
        assert!(
            summary.contains(
                "ClusterIP new connections 6100/s (within noise of the floor, iptables did not load, 1.52x nftables [1.44..1.62])"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("kube-proxy iptables not within 180 s"),
            "{summary}"
        );
        assert!(!summary.contains("Above the floor"), "{summary}");
    }
}
