//! The seeded fuzz run, and the report that shows what its stream exercised
//! and how to replay any packet that broke a rule.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use dataplane_testbed::tc_harness::{Hook, Outcome, TcHarness, VERDICT_DROP};

use crate::{
    DEFAULT_PACKETS, DEFAULT_SEED,
    checker::{Checker, EFFECTS, Effect},
    generate::{Category, Generator},
    rng::Rng,
};

/// CONNTRACK (an LRU map) is emptied this often so it never evicts.
const CLEAR_EVERY: u64 = 50_000;
/// Failing packets shown per broken rule (all are counted).
const EXAMPLES_PER_RULE: usize = 3;

/// A failed check, with what it takes to look at it again.
pub(super) struct Failure {
    pub(super) what: String,
    pub(super) hook: Hook,
    pub(super) input: Vec<u8>,
    pub(super) outcome: Outcome,
    pub(super) detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {} ({:?}) {}", self.what, self.hook, self.detail)?;
        writeln!(f, "  in      {}", hex(&self.input))?;
        writeln!(f, "  verdict {}", self.outcome.verdict)?;
        writeln!(f, "  out     {}", hex(&self.outcome.packet))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Runs `frame`; `None` when BPF_PROG_TEST_RUN refuses the frame itself
/// (EINVAL).
pub(super) fn run(harness: &mut TcHarness, hook: Hook, frame: &[u8]) -> Option<Outcome> {
    match harness.run(hook, frame) {
        Ok(outcome) => Some(outcome),
        Err(err)
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.raw_os_error() == Some(libc::EINVAL)) =>
        {
            None
        }
        Err(err) => panic!("running {hook:?} on {}: {err:#}", hex(frame)),
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    let Ok(value) = std::env::var(name) else {
        return default;
    };
    let value = value.trim().replace('_', "");
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("{name}={value} is not a number"))
}

/// Packets, effects and drops of one category.
#[derive(Default)]
struct Tally {
    packets: u64,
    effects: BTreeMap<Effect, u64>,
    dropped: u64,
    /// Frames BPF_PROG_TEST_RUN refused (not run).
    refused: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        for (effect, count) in &other.effects {
            *self.effects.entry(*effect).or_default() += count;
        }
        self.dropped += other.dropped;
        self.refused += other.refused;
        self.failed += other.failed;
    }

    fn write_row(&self, out: &mut String) {
        let effects = EFFECTS.map(|effect| self.effects.get(&effect).copied().unwrap_or(0));
        for count in [self.packets].into_iter().chain(effects).chain([
            self.dropped,
            self.refused,
            self.failed,
        ]) {
            let _ = write!(out, " {count:>9}");
        }
    }
}

#[test]
fn random_packets_keep_the_invariants() {
    let packets = env_number("DATAPLANE_FUZZ_PACKETS", DEFAULT_PACKETS);
    let seed = env_number("DATAPLANE_FUZZ_SEED", DEFAULT_SEED);
    let mut harness = TcHarness::standard().unwrap();
    let mut checker = Checker::new(&harness);
    let mut tallies: BTreeMap<(Category, &str), Tally> = BTreeMap::new();
    let mut failures: BTreeMap<&str, (u64, Vec<Failure>)> = BTreeMap::new();
    let started = Instant::now();
    for index in 0..packets {
        if index > 0 && index % CLEAR_EVERY == 0 {
            harness.clear_conntrack().unwrap();
            checker.forget();
        }
        let (category, hook, frame) = Generator {
            rng: Rng::for_packet(seed, index),
            flows: &checker.flows,
            tunnelled_in: &checker.tunnelled_in,
        }
        .generate();
        let hook_name = if hook == Hook::Ingress {
            "ingress"
        } else {
            "egress"
        };
        let tally = tallies.entry((category, hook_name)).or_default();
        tally.packets += 1;
        let Some(outcome) = run(&mut harness, hook, &frame) else {
            tally.refused += 1;
            continue;
        };
        tally.dropped += u64::from(outcome.verdict == VERDICT_DROP);
        match checker.check(&harness, hook, &frame, &outcome) {
            Ok(effect) => *tally.effects.entry(effect).or_default() += 1,
            Err(violation) => {
                tally.failed += 1;
                let (count, examples) = failures.entry(violation.rule).or_default();
                *count += 1;
                if examples.len() < EXAMPLES_PER_RULE {
                    examples.push(Failure {
                        what: format!("seed {seed:#x} packet {index} {category:?}"),
                        hook,
                        input: frame,
                        outcome,
                        detail: violation.detail,
                    });
                }
            }
        }
    }
    let elapsed = started.elapsed();

    let columns = [
        "packets",
        "untouched",
        "rewritten",
        "wrapped",
        "unwrapped",
        "answered",
        "dropped",
        "refused",
        "failed",
    ];
    let mut report = format!(
        "tc fuzz: seed {seed:#x}, {packets} packets in {:.1} s ({} conntrack reads)\n{:<16} \
         {:<8}",
        elapsed.as_secs_f64(),
        checker.conntrack_reads,
        "category",
        "hook",
    );
    for column in columns {
        let _ = write!(report, " {column:>9}");
    }
    let mut total = Tally::default();
    for ((category, hook), tally) in &tallies {
        let _ = write!(report, "\n{:<16} {hook:<8}", format!("{category:?}"));
        tally.write_row(&mut report);
        total.add(tally);
    }
    let _ = write!(report, "\n{:<16} {:<8}", "all", "");
    total.write_row(&mut report);
    eprintln!("{report}");

    let mut broken = String::new();
    for (rule, (count, examples)) in &failures {
        let _ = writeln!(broken, "invariant {rule}: {count} packets, for example");
        for example in examples {
            let _ = write!(broken, "{example}");
        }
    }
    assert!(failures.is_empty(), "broken invariants:\n{broken}");
    assert!(
        total.refused * 100 <= packets,
        "{} of {packets} packets refused by BPF_PROG_TEST_RUN",
        total.refused
    );
}
