//! `absconda remote health NAME`: the checks of [`crate::health`], printed,
//! with a non-zero exit when one fails so scripts and monitors can act on it.

use crate::cli::HealthArgs;
use crate::config;
use crate::health::{self, HealthError, Level, RegistryAddr};
use crate::provisioned;
use crate::state::{State, StateFile};

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let builder = file.builder(&args.name)?;
    let registry = args
        .registry
        .as_deref()
        .map(RegistryAddr::parse)
        .transpose()?;
    // A builder with `host:` does not depend on the state file at all.
    let state = if builder.host.is_some() {
        State::default()
    } else {
        StateFile::default_location().load()?
    };
    let ep = provisioned::endpoint(&builder, &state)?;
    let report = health::check(&builder, &ep, registry.as_ref()).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "builder `{}` at {}@{}: {}",
            report.builder,
            report.user,
            report.address,
            if report.healthy {
                "healthy"
            } else {
                "UNHEALTHY"
            }
        );
        for c in &report.checks {
            let mark = match c.status {
                Level::Fail => "FAIL",
                other => other.as_str(),
            };
            println!("  {mark:<5} {:<9} {}", c.name, c.detail);
        }
    }
    if report.healthy {
        Ok(())
    } else {
        Err(HealthError::Unhealthy {
            builder: report.builder.clone(),
            failed: report.failed(),
        }
        .into())
    }
}
