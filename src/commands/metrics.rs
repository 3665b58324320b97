//! `absconda remote metrics [NAME]`: the numbers of [`crate::metrics`] as a
//! table or JSON. Works without a builders file (then without costs), since
//! the history lives in the state file.

use crate::cli::MetricsArgs;
use crate::config::{self, ConfigError, ConfigFile};
use crate::metrics::{self, BuilderMetrics};
use crate::state::{BuilderState, StateFile};

fn secs(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.1}h", s / 3600.0)
    } else if s >= 90.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{s:.1}s")
    }
}

fn print(m: &BuilderMetrics) {
    println!(
        "builder `{}`{}: {} build{} recorded, {} in history{}",
        m.builder,
        m.provider
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default(),
        m.builds,
        if m.builds == 1 { "" } else { "s" },
        m.in_history,
        m.success_rate
            .map(|r| format!(", {} succeeded ({:.1}%)", m.succeeded, r * 100.0))
            .unwrap_or_default()
    );
    if m.outcomes.len() > 1 {
        let parts: Vec<String> = m.outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!("  outcomes: {}", parts.join(", "));
    }
    if m.total.is_some() || !m.phases.is_empty() {
        println!(
            "  {:<10} {:>8} {:>8} {:>8} {:>6}",
            "phase", "mean", "p95", "max", "n"
        );
        let rows = m
            .phases
            .iter()
            .map(|p| (p.phase.as_str(), &p.durations))
            .chain(m.total.as_ref().map(|t| ("total", t)));
        for (name, d) in rows {
            println!(
                "  {:<10} {:>8} {:>8} {:>8} {:>6}",
                name,
                secs(d.mean_seconds),
                secs(d.p95_seconds),
                secs(d.max_seconds),
                d.count
            );
        }
    }
    println!(
        "  VM time: {} ({:.0} VM-seconds)",
        secs(m.vm_seconds),
        m.vm_seconds
    );
    match &m.cost {
        Some(c) if c.estimate => println!(
            "  cost: ~USD {:.2} — ESTIMATE from the built-in on-demand price of `{}` (~USD {:.4}/h; regions, discounts and spot differ; set `hourly_cost` for your rate)",
            c.usd,
            c.machine_type.as_deref().unwrap_or("?"),
            c.hourly_usd
        ),
        Some(c) => println!(
            "  cost: USD {:.2} at `hourly_cost` USD {:.4}/h",
            c.usd, c.hourly_usd
        ),
        None => {}
    }
    if let Some(n) = &m.cost_note {
        println!("  cost note: {n}");
    }
}

fn print_pool(p: &metrics::PoolMetrics) {
    println!(
        "pool `{}`: {} build{} sent to it, {} succeeded; per builder: {}",
        p.pool,
        p.builds,
        if p.builds == 1 { "" } else { "s" },
        p.succeeded,
        p.per_builder
            .iter()
            .map(|(b, n)| format!("`{b}` {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(q) = &p.queue_wait {
        println!(
            "  queue wait: p50 {}, p95 {}, max {} ({} builds)",
            secs(q.p50_seconds),
            secs(q.p95_seconds),
            secs(q.max_seconds),
            q.count
        );
    }
    println!(
        "  VM time: {} ({:.0} VM-seconds){}",
        secs(p.vm_seconds),
        p.vm_seconds,
        p.cost_usd
            .map(|c| format!(", cost ~USD {c:.2} (see each builder for how it is priced)"))
            .unwrap_or_default()
    );
    for m in &p.members {
        println!();
        print(m);
    }
}

pub fn run(args: MetricsArgs) -> anyhow::Result<()> {
    // The builders file only adds prices; metrics work without one.
    let file: Option<ConfigFile> = match config::load(args.config.remote_config.as_deref()) {
        Ok(f) => Some(f),
        Err(ConfigError::NotFound { .. }) if args.config.remote_config.is_none() => None,
        Err(ConfigError::Read { source, .. })
            if args.config.remote_config.is_none()
                && source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    let state = StateFile::default_location().load()?;
    let config_of = |name: &str| file.as_ref().and_then(|f| f.builder(name).ok());
    let empty = BuilderState::default();
    if let (Some(name), Some(f)) = (&args.name, &file)
        && let Some(pool) = f.pool(name)
    {
        let m = metrics::compute_pool(pool, &state.builders, config_of);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            print_pool(&m);
        }
        return Ok(());
    }
    match &args.name {
        Some(name) => {
            let st = match state.builders.get(name) {
                Some(s) => s,
                None => {
                    // Unknown everywhere: let the config say so, with its suggestions.
                    if let Some(f) = &file {
                        f.builder(name)?;
                    } else {
                        anyhow::bail!("no builds recorded for builder `{name}`");
                    }
                    &empty
                }
            };
            let m = metrics::compute(name, st, config_of(name).as_ref());
            if args.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print(&m);
            }
        }
        None => {
            let all: Vec<BuilderMetrics> = state
                .builders
                .iter()
                .map(|(name, st)| metrics::compute(name, st, config_of(name).as_ref()))
                .collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                eprintln!(
                    "absconda: no builds recorded yet (state file `{}`)",
                    StateFile::default_location().path().display()
                );
            } else {
                for (i, m) in all.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print(m);
                }
            }
        }
    }
    Ok(())
}
