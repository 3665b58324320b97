//! `remote metrics`: what the builds on a builder took and cost, from the
//! state file's history.
//!
//! Every build records its phases, outcome and the VM time it caused (see
//! [`crate::state`]); this turns the bounded history into numbers a team
//! uses to size and pay for builders: success rate, mean and 95th-percentile
//! duration per phase, VM-seconds and a cost. The cost uses the builder's
//! `hourly_cost` when set, else a small built-in table of on-demand prices
//! for common machine types, which is an estimate and always labelled so.

use std::collections::BTreeMap;

use crate::config::Builder;
use crate::state::BuilderState;

/// Phases in pipeline order; phases not listed here come after, by name.
const PHASE_ORDER: &[&str] = &[
    "start", "ready", "connect", "lease", "upload", "build", "push", "cleanup", "stop",
];

/// Approximate on-demand prices in USD per hour (Linux, us-central1 /
/// us-east-1, 2024–2025 list prices, no sustained-use or savings discounts).
/// They are estimates: regions, discounts and spot prices differ.
pub const PRICES: &[(&str, f64)] = &[
    // Google Compute Engine
    ("e2-standard-2", 0.067),
    ("e2-standard-4", 0.134),
    ("e2-standard-8", 0.268),
    ("e2-standard-16", 0.536),
    ("e2-highcpu-8", 0.198),
    ("n1-standard-4", 0.190),
    ("n1-standard-8", 0.380),
    ("n1-standard-16", 0.760),
    ("n2-standard-4", 0.194),
    ("n2-standard-8", 0.389),
    ("n2-standard-16", 0.777),
    ("n2d-standard-8", 0.338),
    ("c2-standard-8", 0.418),
    ("c2d-standard-8", 0.363),
    ("c3-standard-4", 0.201),
    ("c3-standard-8", 0.403),
    ("t2d-standard-8", 0.338),
    // Amazon EC2
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("t3.2xlarge", 0.3328),
    ("t3a.xlarge", 0.1504),
    ("t3a.2xlarge", 0.3008),
    ("c5.2xlarge", 0.340),
    ("c6i.2xlarge", 0.340),
    ("c6i.4xlarge", 0.680),
    ("c7i.2xlarge", 0.357),
    ("c6g.2xlarge", 0.272),
    ("c7g.2xlarge", 0.290),
    ("m5.2xlarge", 0.384),
    ("m6i.2xlarge", 0.384),
    ("m7i.2xlarge", 0.403),
    ("m6g.2xlarge", 0.308),
];

/// The built-in estimate of a build service's price per build minute
/// (USD, list prices of the smallest default machine: CodeBuild
/// `BUILD_GENERAL1_SMALL` on Linux in us-east-1, Cloud Build's default
/// `e2-standard-2`); `build_minute_cost:` overrides it.
pub fn service_minute_price(b: &Builder) -> Option<f64> {
    match b.provider {
        crate::config::ProviderKind::CodeBuild => Some(0.005),
        crate::config::ProviderKind::CloudBuild => Some(0.003),
        _ => None,
    }
}

/// The built-in estimate for a machine type.
pub fn price(machine_type: &str) -> Option<f64> {
    PRICES
        .iter()
        .find(|(m, _)| *m == machine_type)
        .map(|(_, p)| *p)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Durations {
    pub count: usize,
    pub mean_seconds: f64,
    pub p50_seconds: f64,
    pub p95_seconds: f64,
    pub max_seconds: f64,
}

/// Mean, nearest-rank median and 95th percentile, and maximum.
pub fn durations(values: &[f64]) -> Option<Durations> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let rank = |q: f64| ((q * n as f64).ceil() as usize).clamp(1, n);
    Some(Durations {
        count: n,
        mean_seconds: v.iter().sum::<f64>() / n as f64,
        p50_seconds: v[rank(0.5) - 1],
        p95_seconds: v[rank(0.95) - 1],
        max_seconds: v[n - 1],
    })
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseDurations {
    pub phase: String,
    #[serde(flatten)]
    pub durations: Durations,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cost {
    pub usd: f64,
    pub hourly_usd: f64,
    /// `hourly_cost` (the builder's setting) or `estimate` (the built-in table).
    pub source: &'static str,
    /// True unless the rate came from `hourly_cost`.
    pub estimate: bool,
    pub machine_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BuilderMetrics {
    pub builder: String,
    pub provider: Option<String>,
    /// Every build ever recorded (the history keeps the latest ones).
    pub builds: u64,
    /// Builds in the history the numbers below come from.
    pub in_history: usize,
    pub succeeded: usize,
    /// Succeeded / in history; `None` without history.
    pub success_rate: Option<f64>,
    pub outcomes: BTreeMap<String, usize>,
    pub first_build: Option<chrono::DateTime<chrono::Utc>>,
    pub last_build: Option<chrono::DateTime<chrono::Utc>>,
    /// Whole builds.
    pub total: Option<Durations>,
    /// Per phase, in pipeline order.
    pub phases: Vec<PhaseDurations>,
    pub bytes_sent: u64,
    pub vm_seconds: f64,
    pub cost: Option<Cost>,
    /// Why there is no cost, when there is none.
    pub cost_note: Option<String>,
}

fn phase_rank(name: &str) -> (usize, String) {
    (
        PHASE_ORDER
            .iter()
            .position(|p| *p == name)
            .unwrap_or(PHASE_ORDER.len()),
        name.to_string(),
    )
}

/// The metrics of one builder; `config` supplies `hourly_cost` and the machine type.
pub fn compute(name: &str, state: &BuilderState, config: Option<&Builder>) -> BuilderMetrics {
    let history = &state.history;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in history {
        *outcomes.entry(r.outcome.clone()).or_default() += 1;
        for (p, s) in &r.phases {
            per_phase.entry(p.clone()).or_default().push(*s);
        }
    }
    let succeeded = outcomes.get("success").copied().unwrap_or(0);
    let totals: Vec<f64> = history.iter().map(|r| r.seconds).collect();
    let mut phases: Vec<PhaseDurations> = per_phase
        .into_iter()
        .filter_map(|(phase, v)| durations(&v).map(|durations| PhaseDurations { phase, durations }))
        .collect();
    phases.sort_by_key(|p| phase_rank(&p.phase));
    // The builder-wide counter covers VM time of builds that fell out of the
    // history too; without it, add up what the builds recorded.
    let vm_seconds = if state.vm_seconds > 0.0 {
        state.vm_seconds
    } else {
        // (A float sum of nothing is -0.0.)
        history
            .iter()
            .filter_map(|r| r.vm_seconds)
            .fold(0.0, |a, b| a + b)
    };
    let machine_type = config.and_then(|b| b.machine_type.clone().or(b.instance_type.clone()));
    let service = config.filter(|b| b.provider.is_service());
    let (rate, source) = match (service, config.and_then(|b| b.hourly_cost)) {
        // A build service bills build minutes (recorded rounded up).
        (Some(b), _) => match b.build_minute_cost {
            Some(per_minute) => (Some(per_minute * 60.0), "build_minute_cost"),
            None => (service_minute_price(b).map(|p| p * 60.0), "estimate"),
        },
        (None, Some(r)) => (Some(r), "hourly_cost"),
        (None, None) => (machine_type.as_deref().and_then(price), "estimate"),
    };
    let (cost, cost_note) = match rate {
        Some(hourly_usd) => (
            Some(Cost {
                usd: hourly_usd * vm_seconds / 3600.0,
                hourly_usd,
                source,
                estimate: source == "estimate",
                machine_type: machine_type.clone(),
            }),
            (vm_seconds == 0.0).then(|| {
                "no VM time recorded (an always-on SSH host, or absconda never started or stopped it)".to_string()
            }),
        ),
        None => (
            None,
            Some(match (&machine_type, config) {
                (Some(m), _) => format!(
                    "no price for machine type `{m}` in the built-in table; set `hourly_cost`"
                ),
                (None, Some(_)) => "set `hourly_cost` (USD per hour) to see a cost".to_string(),
                (None, None) => "the builder is not in the builders file".to_string(),
            }),
        ),
    };
    BuilderMetrics {
        builder: name.to_string(),
        provider: state
            .provider
            .clone()
            .or(config.map(|b| b.provider.to_string())),
        builds: state.builds_count,
        in_history: history.len(),
        succeeded,
        success_rate: (!history.is_empty()).then(|| succeeded as f64 / history.len() as f64),
        outcomes,
        first_build: history.iter().map(|r| r.started_at).min(),
        last_build: history.iter().map(|r| r.started_at).max(),
        total: durations(&totals),
        phases,
        bytes_sent: history.iter().map(|r| r.bytes_sent).sum(),
        vm_seconds,
        cost,
        cost_note,
    }
}

/// The numbers of one pool: its builds (those sent to the pool, on any
/// member), how long they waited for a free builder, and its members' VM
/// time and cost.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolMetrics {
    pub pool: String,
    /// Builds in the members' histories that were sent to this pool.
    pub builds: usize,
    pub succeeded: usize,
    /// Builds of the pool per member.
    pub per_builder: BTreeMap<String, usize>,
    /// Time spent waiting for a free builder.
    pub queue_wait: Option<Durations>,
    pub vm_seconds: f64,
    /// The members' costs added up, when every member with VM time has one.
    pub cost_usd: Option<f64>,
    pub members: Vec<BuilderMetrics>,
}

/// The metrics of `pool` from its members' states; `config` resolves a
/// member's settings (for costs).
pub fn compute_pool(
    pool: &crate::config::Pool,
    states: &BTreeMap<String, BuilderState>,
    config: impl Fn(&str) -> Option<Builder>,
) -> PoolMetrics {
    let empty = BuilderState::default();
    let mut per_builder = BTreeMap::new();
    let mut waits = Vec::new();
    let mut succeeded = 0;
    let mut members = Vec::new();
    for name in &pool.members {
        let st = states.get(name).unwrap_or(&empty);
        let mine: Vec<_> = st
            .history
            .iter()
            .filter(|r| r.pool.as_deref() == Some(&pool.name))
            .collect();
        per_builder.insert(name.clone(), mine.len());
        succeeded += mine.iter().filter(|r| r.outcome == "success").count();
        waits.extend(mine.iter().filter_map(|r| r.queue_seconds));
        members.push(compute(name, st, config(name).as_ref()));
    }
    let vm_seconds = members.iter().map(|m| m.vm_seconds).sum();
    let cost_usd = members
        .iter()
        .filter(|m| m.vm_seconds > 0.0)
        .map(|m| m.cost.as_ref().map(|c| c.usd))
        .sum::<Option<f64>>();
    PoolMetrics {
        pool: pool.name.clone(),
        builds: per_builder.values().sum(),
        succeeded,
        per_builder,
        queue_wait: durations(&waits),
        vm_seconds,
        cost_usd,
        members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BuildRecord;

    #[test]
    fn percentile_table() {
        let cases: &[(&[f64], f64, f64)] = &[
            (&[5.0], 5.0, 5.0),
            (&[1.0, 2.0, 3.0, 4.0], 2.5, 4.0),
            (
                &[
                    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                    15.0, 16.0, 17.0, 18.0, 19.0, 100.0,
                ],
                14.5,
                19.0,
            ),
        ];
        for (values, mean, p95) in cases {
            let d = durations(values).unwrap();
            assert!((d.mean_seconds - mean).abs() < 1e-9, "{values:?}: {d:?}");
            assert_eq!(d.p95_seconds, *p95, "{values:?}");
        }
        assert_eq!(durations(&[]), None);
    }

    fn record(outcome: &str, seconds: f64, build: f64, vm: Option<f64>) -> BuildRecord {
        BuildRecord {
            started_at: chrono::Utc::now(),
            seconds,
            outcome: outcome.into(),
            bytes_sent: 10,
            phases: [("build".to_string(), build), ("connect".to_string(), 0.5)]
                .into_iter()
                .collect(),
            vm_seconds: vm,
            pool: None,
            queue_seconds: None,
        }
    }

    #[test]
    fn metrics_from_history_with_an_estimated_cost() {
        let mut s = BuilderState::default();
        s.record_build(record("success", 10.0, 8.0, Some(1800.0)));
        s.record_build(record("failed", 4.0, 2.0, Some(1800.0)));
        s.record_build(record("success", 12.0, 10.0, None));
        s.record_build(record("success", 11.0, 9.0, None));
        let m = compute("b", &s, None);
        assert_eq!(m.builds, 4);
        assert_eq!(m.success_rate, Some(0.75));
        assert_eq!(m.phases[0].phase, "connect", "pipeline order");
        assert_eq!(m.phases[1].durations.p95_seconds, 10.0);
        assert_eq!(m.vm_seconds, 3600.0);
        assert!(m.cost.is_none());
        assert!(m.cost_note.is_some());

        let cfg = crate::config::ConfigFile::parse(
            std::path::Path::new("/x/absconda-remote.yaml"),
            "builders:\n  b:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n    machine_type: e2-standard-8\n  c:\n    host: h\n    hourly_cost: 0.5\n",
        )
        .unwrap();
        let b = cfg.builder("b").unwrap();
        let cost = compute("b", &s, Some(&b)).cost.unwrap();
        assert!(cost.estimate);
        assert!((cost.usd - 0.268).abs() < 1e-9, "{cost:?}");
        let c = cfg.builder("c").unwrap();
        let cost = compute("c", &s, Some(&c)).cost.unwrap();
        assert!(!cost.estimate);
        assert_eq!(cost.source, "hourly_cost");
        assert!((cost.usd - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_build_service_costs_its_billed_minutes() {
        let mut s = BuilderState::default();
        // 61 s and 30 s of build: billed 2 and 1 minutes.
        s.record_build(record("success", 70.0, 61.0, Some(120.0)));
        s.record_build(record("success", 40.0, 30.0, Some(60.0)));
        let cfg = crate::config::ConfigFile::parse(
            std::path::Path::new("/x/absconda-remote.yaml"),
            "builders:\n  cb:\n    provider: codebuild\n    bucket: b\n    codebuild_project: p\n  gb:\n    provider: cloudbuild\n    bucket: b\n    project: p\n    build_minute_cost: 0.016\n",
        )
        .unwrap();
        let cb = cfg.builder("cb").unwrap();
        let cost = compute("cb", &s, Some(&cb)).cost.unwrap();
        assert!(cost.estimate);
        assert!((cost.usd - 3.0 * 0.005).abs() < 1e-9, "{cost:?}");
        let gb = cfg.builder("gb").unwrap();
        let cost = compute("gb", &s, Some(&gb)).cost.unwrap();
        assert_eq!(cost.source, "build_minute_cost");
        assert!(!cost.estimate);
        assert!((cost.usd - 3.0 * 0.016).abs() < 1e-9, "{cost:?}");
    }

    #[test]
    fn every_listed_price_is_plausible() {
        for (m, p) in PRICES {
            assert!(*p > 0.01 && *p < 5.0, "{m}: {p}");
        }
        for m in [
            "n1-standard-8",
            "e2-standard-4",
            "e2-standard-8",
            "n2-standard-8",
            "c3-standard-8",
            "t3.xlarge",
            "t3.2xlarge",
            "c6i.2xlarge",
            "m6i.2xlarge",
        ] {
            assert!(price(m).is_some(), "{m}");
        }
    }
}
