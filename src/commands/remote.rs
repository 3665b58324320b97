//! `absconda remote …`: list, status, start, stop.

use anyhow::Context;

use crate::build;
use crate::cli::{ListArgs, NameArgs};
use crate::config::{self, ProviderKind};
use crate::ssh::Session;

/// What `remote status` reports.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub name: String,
    pub provider: ProviderKind,
    pub address: Option<String>,
    pub reachable: bool,
    pub error: Option<String>,
    pub host_key: Option<String>,
    pub docker_server: Option<String>,
    pub buildkit: Option<bool>,
    pub disk_avail_bytes: Option<u64>,
    pub disk_used_percent: Option<f64>,
    pub lease_holder: Option<String>,
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let mut rows = Vec::new();
    for name in file.names() {
        match file.builder(name) {
            Ok(b) => rows.push(serde_json::json!({
                "name": b.name,
                "provider": b.provider,
                "address": b.host,
                "user": b.user,
                "workspace": b.workspace,
            })),
            Err(e) => rows.push(serde_json::json!({ "name": name, "error": e.to_string() })),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<20} {:<8} ADDRESS", "NAME", "PROVIDER");
        for r in &rows {
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            if r.get("error").is_some() {
                println!("{:<20} {:<8} error: {}", s("name"), "-", s("error"));
            } else {
                println!("{:<20} {:<8} {}", s("name"), s("provider"), s("address"));
            }
        }
    }
    Ok(())
}

pub async fn status(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let builder = file.builder(&args.name)?;
    let host = builder
        .host
        .clone()
        .with_context(|| format!("builder `{}` has no `host`", builder.name))?;
    let mut st = Status {
        name: builder.name.clone(),
        provider: builder.provider,
        address: Some(format!("{host}:{}", builder.port)),
        reachable: false,
        error: None,
        host_key: None,
        docker_server: None,
        buildkit: None,
        disk_avail_bytes: None,
        disk_used_percent: None,
        lease_holder: None,
    };
    let target = build::ssh_target(&builder, &host);
    let connected = Session::connect(&target).await;
    let result = match connected {
        Ok(session) => {
            st.reachable = true;
            st.host_key = Some(crate::ssh::known_hosts::fingerprint(session.host_key()));
            let probe = build::probe(&session, &builder).await;
            session.close().await;
            match probe {
                Ok(p) => {
                    st.buildkit = Some(p.buildkit_available());
                    st.disk_avail_bytes = p.disk_avail_kb.map(|k| k * 1024);
                    st.disk_used_percent = p.disk_used_pct();
                    st.lease_holder = p.lease_holder.clone();
                    st.error = p.docker_error.clone();
                    st.docker_server = p.docker_server;
                    Ok(())
                }
                Err(e) => Err(anyhow::Error::from(e)),
            }
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    if let Err(e) = &result {
        st.error = Some(format!("{e:#}"));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("builder:    {} ({})", st.name, st.provider);
        println!("address:    {}", st.address.as_deref().unwrap_or("-"));
        println!("reachable:  {}", if st.reachable { "yes" } else { "no" });
        if let Some(k) = &st.host_key {
            println!("host key:   {k}");
        }
        println!("docker:     {}", st.docker_server.as_deref().unwrap_or("-"));
        println!(
            "buildkit:   {}",
            st.buildkit
                .map(|b| if b { "yes" } else { "no" })
                .unwrap_or("-")
        );
        if let (Some(a), Some(p)) = (st.disk_avail_bytes, st.disk_used_percent) {
            println!("disk:       {} free ({p:.0}% used)", build::human_bytes(a));
        }
        println!(
            "lease:      {}",
            st.lease_holder
                .as_deref()
                .map(|h| format!("held by {h}"))
                .unwrap_or_else(|| "free".into())
        );
    }
    result
}

pub async fn start(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let builder = file.builder(&args.name)?;
    anyhow::bail!(
        "builder `{}` (provider `{}`) is always on: there is nothing to start",
        builder.name,
        builder.provider
    )
}

pub async fn stop(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let builder = file.builder(&args.name)?;
    anyhow::bail!(
        "builder `{}` (provider `{}`) is always on: absconda never stops an SSH host",
        builder.name,
        builder.provider
    )
}
