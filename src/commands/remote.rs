//! `absconda remote …`: list, status, start, stop.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::build;
use crate::cli::{ListArgs, NameArgs};
use crate::commands::human;
use crate::commands::printer::Printer;
use crate::config::{self, Builder, ProviderKind};
use crate::lifecycle::{self, Cloud, LifecycleError};
use crate::state::StateFile;

/// What `remote status` reports.
#[derive(Debug, Default, serde::Serialize)]
pub struct Status {
    pub name: String,
    pub provider: String,
    /// The cloud's view (`running`, `stopped`, …); `running` for SSH hosts.
    pub status: String,
    /// The status exactly as the cloud spells it.
    pub cloud_status: Option<String>,
    pub address: Option<String>,
    pub reachable: bool,
    /// How SSH reached it: `direct`, `jump chain …`, `through proxy …`.
    pub path: Option<String>,
    /// The user SSH logged in as.
    pub user: Option<String>,
    pub error: Option<String>,
    pub host_key: Option<String>,
    pub docker_server: Option<String>,
    /// What it builds natively: `platform:`, else its docker's `os/arch`.
    pub platform: Option<String>,
    pub buildkit: Option<bool>,
    pub disk_avail_bytes: Option<u64>,
    pub disk_used_percent: Option<f64>,
    pub lease_holder: Option<String>,
    /// When the holder took the lease (RFC 3339).
    pub lease_since: Option<String>,
    /// Builds waiting for the lease, first come first.
    pub queue: Vec<Waiter>,
    pub last_used: Option<String>,
    pub builds_count: u64,
    /// How the key is trusted: `key`, `oslogin`, `metadata`, `instance-connect`.
    pub access: Option<String>,
    /// The workspace's content store and context copies.
    pub store: Option<crate::sync::store::StoreStatus>,
}

/// A build waiting in a builder's queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Waiter {
    pub holder: String,
    /// Since when it waits (RFC 3339).
    pub since: Option<String>,
}

fn rfc3339(epoch: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(epoch, 0).map(|t| t.to_rfc3339())
}

fn base_status(b: &Builder, state: &StateFile) -> Status {
    let saved = state
        .load()
        .ok()
        .and_then(|s| s.builders.get(&b.name).cloned())
        .unwrap_or_default();
    Status {
        name: b.name.clone(),
        provider: b.provider.to_string(),
        status: "unknown".into(),
        address: b.host.clone().map(|h| format!("{h}:{}", b.port)),
        last_used: saved.last_used.map(|t| t.to_rfc3339()),
        builds_count: saved.builds_count,
        platform: b.platform.as_ref().map(|p| p.to_string()),
        ..Default::default()
    }
}

/// Asks the cloud (if any) and then the builder itself.
async fn status_of(
    b: &Builder,
    state: &StateFile,
    probe_ssh: bool,
) -> (Status, anyhow::Result<()>) {
    let mut st = base_status(b, state);
    if b.provider.is_service() {
        // Nothing runs between builds on a build service.
        st.status = "service".into();
        return (st, Ok(()));
    }
    let cloud = match Cloud::for_builder(b) {
        Ok(c) => c,
        Err(e) => {
            st.error = Some(e.to_string());
            return (st, Err(e.into()));
        }
    };
    let host = match &cloud {
        Some(c) => match c.describe().await {
            Ok(info) => {
                st.status = info.status.to_string();
                st.cloud_status = Some(info.raw_status.clone());
                lifecycle::record_status(state, b, &info, false);
                let host = lifecycle::builder_address(b, &info);
                st.address = host.as_ref().map(|h| format!("{h}:{}", b.port));
                if info.status != crate::cloud::Status::Running {
                    return (st, Ok(()));
                }
                host
            }
            Err(e) => {
                st.error = Some(e.to_string());
                return (st, Err(e.into()));
            }
        },
        None => {
            st.status = "running".into();
            None
        }
    };
    if let (Some(cloud), Some(h)) = (&cloud, &host) {
        st.address = Some(format!("{h}:{}", b.port));
        if !probe_ssh {
            return (st, Ok(()));
        }
        let connected = lifecycle::connect_cloud_builder(b, cloud, h, &crate::report::Silent).await;
        let result = match connected {
            Ok((session, access)) => {
                st.access = Some(access.mode.into());
                probe_into(&mut st, b, session).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            st.error = Some(crate::exit::one_line(e));
        }
        return (st, result);
    }
    let endpoint = match host {
        Some(h) => Ok(crate::provisioned::Endpoint {
            target: build::ssh_target(b, &h),
            pins: Vec::new(),
            provisioned: None,
        }),
        None => state
            .load()
            .map_err(anyhow::Error::from)
            .and_then(|saved| crate::provisioned::endpoint(b, &saved).map_err(Into::into)),
    };
    let endpoint = match endpoint {
        Ok(e) => e,
        Err(e) => {
            st.error = Some(crate::exit::one_line(&e));
            return (st, Err(e));
        }
    };
    st.address = Some(endpoint.address());
    if !probe_ssh {
        return (st, Ok(()));
    }
    let result = match crate::provisioned::connect(&endpoint).await {
        Ok(session) => {
            st.access = Some("key".into());
            probe_into(&mut st, b, session).await
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    if let Err(e) = &result {
        st.error = Some(crate::exit::one_line(e));
    }
    (st, result)
}

/// Fills `st` from the builder's docker, disk and lease.
async fn probe_into(
    st: &mut Status,
    b: &Builder,
    session: crate::ssh::Session,
) -> anyhow::Result<()> {
    st.reachable = true;
    st.path = Some(session.route().to_string());
    st.user = Some(session.user().to_string());
    st.host_key = Some(crate::ssh::known_hosts::fingerprint(session.host_key()));
    let probe = build::probe(&session, b).await;
    st.store = store_status(&session, b).await;
    session.close().await;
    let p = probe?;
    st.buildkit = Some(p.buildkit_available());
    st.disk_avail_bytes = p.disk_avail_kb.map(|k| k * 1024);
    st.disk_used_percent = p.disk_used_pct();
    st.lease_holder = p.lease_holder.clone();
    st.lease_since = p.lease_since.and_then(rfc3339);
    st.queue = p
        .queue
        .iter()
        .map(|(since, holder)| Waiter {
            holder: build::printable(holder, 200),
            since: since.and_then(rfc3339),
        })
        .collect();
    st.error = p.docker_error.clone();
    st.docker_server = p.docker_server;
    if st.platform.is_none() {
        st.platform = p.platform;
    }
    Ok(())
}

/// The store's size, files, copies and oldest use, if the builder answers.
async fn store_status(
    session: &crate::ssh::Session,
    b: &Builder,
) -> Option<crate::sync::store::StoreStatus> {
    let cmd = crate::sync::store::status_command(&b.workspace);
    let out = session
        .output_limited("the content store status", &cmd, b"", 4096)
        .await
        .ok()?;
    crate::sync::store::StoreStatus::parse(&String::from_utf8_lossy(&out.stdout))
}

/// An SSH session to a running builder (a cloud one is asked for its address).
async fn connect(b: &Builder, state: &StateFile) -> anyhow::Result<crate::ssh::Session> {
    if let Some(cloud) = Cloud::for_builder(b)? {
        let info = cloud.describe().await?;
        if info.status != crate::cloud::Status::Running {
            anyhow::bail!(
                "`{}` is {}; start it with `absconda remote start {}`",
                b.name,
                info.status,
                b.name
            );
        }
        let host = lifecycle::builder_address(b, &info)
            .ok_or_else(|| anyhow::anyhow!("`{}` has no address", b.name))?;
        let (session, _) =
            lifecycle::connect_cloud_builder(b, &cloud, &host, &crate::report::Silent).await?;
        return Ok(session);
    }
    let endpoint = match &b.host {
        Some(h) => crate::provisioned::Endpoint {
            target: build::ssh_target(b, h),
            pins: Vec::new(),
            provisioned: None,
        },
        None => crate::provisioned::endpoint(b, &state.load()?)?,
    };
    Ok(crate::provisioned::connect(&endpoint).await?)
}

/// `remote prune NAME [--all] [--dry-run]`: context copies past `cache_ttl`
/// (every copy with `--all`) that no build is using, then store content no
/// copy links, then down to `cache_max`.
pub async fn prune(args: crate::cli::PruneArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let state = StateFile::default_location();
    let builder = lifecycle::with_provisioned(&file.builder(&args.name)?, &state);
    let session = connect(&builder, &state).await?;
    let cmd = crate::sync::store::prune_command(
        &builder.workspace,
        (builder.cache_max, builder.cache_ttl),
        args.all,
        args.dry_run,
    );
    let out = session
        .output_limited("pruning the content store", &cmd, b"", 16 << 20)
        .await;
    session.close().await;
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let msg = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error "))
            .unwrap_or(stderr.trim());
        anyhow::bail!("pruning `{}` failed: {msg}", builder.name);
    }
    let pruned = crate::sync::store::parse_pruned(&String::from_utf8_lossy(&out.stdout));
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "dry_run": args.dry_run, "removed": pruned })
        );
        return Ok(());
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let now = chrono::Utc::now().timestamp();
    for p in &pruned {
        match p {
            crate::sync::store::Pruned::Copy { key, last_use, kib } => eprintln!(
                "{verb} copy {key} ({}, last synced {} ago)",
                build::human_bytes(kib * 1024),
                human::duration(std::time::Duration::from_secs(
                    now.saturating_sub(*last_use).max(0) as u64
                ))
            ),
            crate::sync::store::Pruned::Blobs { count, kib } => eprintln!(
                "{verb} {count} store files no copy links ({})",
                build::human_bytes(kib * 1024)
            ),
        }
    }
    Ok(())
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let state = StateFile::default_location();
    let mut rows = Vec::new();
    for name in file.names() {
        match file.builder(name) {
            // Cloud state only: connecting to every builder would be slow.
            Ok(b) => rows.push(status_of(&b, &state, false).await.0),
            Err(e) => rows.push(Status {
                name: name.clone(),
                status: "invalid".into(),
                error: Some(e.to_string()),
                ..Default::default()
            }),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let now = chrono::Utc::now();
        let mut table = Vec::new();
        for r in &rows {
            table.push(vec![
                r.name.clone(),
                r.provider.clone(),
                r.status.clone(),
                r.address.clone().unwrap_or_else(|| "-".into()),
                r.builds_count.to_string(),
                r.last_used
                    .as_deref()
                    .map(|t| human::ago_rfc3339(t, now))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        let text = human::table(
            &[
                "NAME",
                "PROVIDER",
                "STATUS",
                "ADDRESS",
                "BUILDS",
                "LAST USED",
            ],
            &table,
            &[4],
        );
        for (line, r) in text
            .lines()
            .zip(std::iter::once(None).chain(rows.iter().map(Some)))
        {
            println!("{line}");
            if let Some(e) = r.and_then(|r| r.error.as_ref()) {
                println!("  error: {e}");
            }
        }
    }
    Ok(())
}

pub async fn status(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let state = StateFile::default_location();
    if let Some(pool) = file.pool(&args.name) {
        return pool_status(&file, pool, &state, args.json).await;
    }
    let builder = lifecycle::with_provisioned(&file.builder(&args.name)?, &state);
    let (st, result) = status_of(&builder, &state, true).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("builder:    {} ({})", st.name, st.provider);
        println!(
            "status:     {}{}",
            st.status,
            st.cloud_status
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
        println!("address:    {}", st.address.as_deref().unwrap_or("-"));
        println!("reachable:  {}", if st.reachable { "yes" } else { "no" });
        if let (Some(path), Some(user)) = (&st.path, &st.user) {
            println!("ssh:        {path}, as `{user}`");
        }
        if let Some(k) = &st.host_key {
            println!("host key:   {k}");
        }
        if let Some(access) = &st.access {
            println!("access:     {access}");
        }
        println!("docker:     {}", st.docker_server.as_deref().unwrap_or("-"));
        println!("platform:   {}", st.platform.as_deref().unwrap_or("-"));
        println!(
            "buildkit:   {}",
            st.buildkit
                .map(|b| if b { "yes" } else { "no" })
                .unwrap_or("-")
        );
        if let (Some(a), Some(p)) = (st.disk_avail_bytes, st.disk_used_percent) {
            println!("disk:       {} free ({p:.0}% used)", build::human_bytes(a));
        }
        if let Some(s) = &st.store {
            let now = chrono::Utc::now().timestamp();
            println!(
                "store:      {} in {} files; {} context copies{}; workspace {} (limit {}, ttl {})",
                build::human_bytes(s.store_bytes),
                s.blobs,
                s.copies,
                s.oldest_use
                    .map(|t| format!(
                        ", least recently used {}",
                        human::duration(std::time::Duration::from_secs(
                            now.saturating_sub(t).max(0) as u64
                        )) + " ago"
                    ))
                    .unwrap_or_default(),
                build::human_bytes(s.workspace_bytes),
                match builder.cache_max {
                    crate::sync::store::CacheMax::Bytes(b) => build::human_bytes(b),
                    crate::sync::store::CacheMax::Percent(p) => format!("{p}% of the disk"),
                },
                human::duration(builder.cache_ttl),
            );
        }
        println!(
            "lease:      {}",
            st.lease_holder
                .as_deref()
                .map(|h| format!("held by {h}"))
                .unwrap_or_else(|| "free".into())
        );
        let now = chrono::Utc::now();
        for (i, w) in st.queue.iter().enumerate() {
            println!(
                "queue {}:    {} (waiting since {})",
                i + 1,
                if w.holder.is_empty() {
                    "a build"
                } else {
                    &w.holder
                },
                w.since
                    .as_deref()
                    .map(|t| human::ago_rfc3339(t, now))
                    .unwrap_or_else(|| "-".into())
            );
        }
        println!(
            "builds:     {} (last used {})",
            st.builds_count,
            st.last_used
                .as_deref()
                .map(|t| human::ago_rfc3339(t, now))
                .unwrap_or_else(|| "never".into())
        );
        if let Some(last) = state.load().ok().and_then(|s| {
            s.builders
                .get(&st.name)
                .and_then(|b| b.history.back().cloned())
        }) {
            println!(
                "last build: {}, took {}, {}",
                last.outcome.replace('_', " "),
                human::duration(std::time::Duration::from_secs_f64(last.seconds.max(0.0))),
                human::ago(last.started_at, now)
            );
        }
    }
    result
}

/// `remote status POOL`: every member's state, lease holder and queue.
async fn pool_status(
    file: &config::ConfigFile,
    pool: &config::Pool,
    state: &StateFile,
    json: bool,
) -> anyhow::Result<()> {
    let mut builders = Vec::new();
    for name in &pool.members {
        builders.push(lifecycle::with_provisioned(&file.builder(name)?, state));
    }
    let rows: Vec<Status> =
        futures_util::future::join_all(builders.iter().map(|b| status_of(b, state, true)))
            .await
            .into_iter()
            .map(|(st, _)| st)
            .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "pool": pool.name,
                "prefer": pool.prefer,
                "max_running": pool.max_running,
                "emulate": pool.emulate,
                "index_from": pool.index_from,
                "builders": rows,
            }))?
        );
        return Ok(());
    }
    let now = chrono::Utc::now();
    let ago = |t: &Option<String>| {
        t.as_deref()
            .map(|t| human::ago_rfc3339(t, now))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "pool `{}`: {} builder(s), prefer {}{}{}",
        pool.name,
        rows.len(),
        serde_json::to_value(pool.prefer)?
            .as_str()
            .unwrap_or_default(),
        pool.max_running
            .map(|m| format!(", at most {m} VM(s) running"))
            .unwrap_or_default(),
        if pool.emulate {
            ", other platforms with emulation"
        } else {
            ""
        }
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.status.clone(),
                r.platform.clone().unwrap_or_else(|| "-".into()),
                match (&r.lease_holder, r.reachable) {
                    (Some(h), _) => format!("{h} (since {})", ago(&r.lease_since)),
                    (None, true) => "free".into(),
                    (None, false) => "-".into(),
                },
                r.queue.len().to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        human::table(
            &["BUILDER", "STATUS", "PLATFORM", "HELD BY", "WAITING"],
            &table,
            &[4]
        )
    );
    for r in &rows {
        if let Some(e) = &r.error {
            println!("`{}`: {e}", r.name);
        }
        for (i, w) in r.queue.iter().enumerate() {
            println!(
                "`{}` queue {}: {} (waiting since {})",
                r.name,
                i + 1,
                if w.holder.is_empty() {
                    "a build"
                } else {
                    &w.holder
                },
                ago(&w.since)
            );
        }
    }
    Ok(())
}

fn print_short(json: bool, b: &Builder, status: &str, address: Option<&str>) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": b.name,
                "provider": b.provider,
                "status": status,
                "address": address,
            }))?
        );
    } else {
        eprintln!(
            "absconda: builder `{}` is {status}{}",
            b.name,
            address.map(|a| format!(" at {a}")).unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn start(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let state = StateFile::default_location();
    let builder = lifecycle::with_provisioned(&file.builder(&args.name)?, &state);
    let printer = Printer::new(args.json);
    let cloud = Cloud::for_builder(&builder)?;
    let t = Instant::now();
    let ready = lifecycle::bring_up(
        &builder,
        cloud.as_ref(),
        true,
        &state,
        &printer,
        &CancellationToken::new(),
    )
    .await?;
    ready.session.close().await;
    if builder.provider == ProviderKind::Ssh {
        eprintln!(
            "absconda: builder `{}` is an always-on SSH host",
            builder.name
        );
    } else {
        eprintln!("absconda: ready after {:.1}s", t.elapsed().as_secs_f64());
    }
    print_short(args.json, &builder, "running", Some(&ready.address))
}

pub async fn stop(args: NameArgs) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let state = StateFile::default_location();
    let builder = lifecycle::with_provisioned(&file.builder(&args.name)?, &state);
    let printer = Printer::new(args.json);
    let Some(cloud) = Cloud::for_builder(&builder)? else {
        return Err(LifecycleError::AlwaysOn {
            builder: builder.name.clone(),
        }
        .into());
    };
    let info = lifecycle::stop(&builder, &cloud, &state, &printer).await?;
    print_short(args.json, &builder, &info.status.to_string(), None)
}
