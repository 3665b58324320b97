//! `absconda build`.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::build::{self, BuildReport, BuildRequest};
use crate::cli::BuildArgs;
use crate::cloud::Status;
use crate::commands::generate;
use crate::commands::multiplatform;
use crate::commands::printer::Printer;
use crate::config::{self, Builder};
use crate::dockerfile::{self, Source};
use crate::lifecycle::{self, Cloud, LifecycleError};
use crate::platform::Platform;
use crate::pool;
use crate::report::{Phase, Reporter};
use crate::state::{BuildRecord, StateFile};

pub async fn run(args: BuildArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let (name, why) = match &args.remote_builder {
        Some(name) => (name.clone(), None),
        None => {
            let (name, why) = file.default_builder()?;
            (name, Some(why))
        }
    };
    let state = StateFile::default_location();
    let target = match file.pool(&name) {
        Some(pool) => {
            let mut members = Vec::new();
            for m in &pool.members {
                let builder = lifecycle::with_provisioned(&file.builder(m)?, &state);
                let cloud = Cloud::for_builder(&builder)?;
                let platform = builder.platform.clone();
                members.push(pool::Member {
                    builder,
                    cloud,
                    platform,
                });
            }
            let overflow = match &pool.overflow {
                Some(name) => Some(file.builder(name)?),
                None => None,
            };
            Target::Pool {
                pool: pool.clone(),
                members,
                overflow,
            }
        }
        None => {
            let builder = lifecycle::with_provisioned(&file.builder(&name)?, &state);
            let cloud = if builder.provider.is_service() {
                None
            } else {
                Cloud::for_builder(&builder)?
            };
            Target::One { builder, cloud }
        }
    };
    let printer = Printer::new(args.json);
    let what = match &target {
        Target::One { .. } => "builder",
        Target::Pool { .. } => "pool",
    };
    printer.info(&match why {
        Some(why) => format!("using {what} `{name}` ({why} in `{}`)", file.path.display()),
        None => format!("using {what} `{name}`"),
    });

    // `-f -` or `--dockerfile -`: the Dockerfile comes from stdin.
    let stdin_dockerfile = [&args.file, &args.dockerfile]
        .into_iter()
        .any(|p| p.as_deref() == Some(std::path::Path::new("-")));
    let source = match (&args.file, &args.requirements, &args.tarball) {
        (Some(_), _, _) if stdin_dockerfile => None,
        (Some(p), _, _) => Some(Source::Environment(p.clone())),
        (_, Some(p), _) => Some(Source::Requirements(p.clone())),
        (_, _, Some(p)) => Some(Source::Tarball(p.clone())),
        _ => None,
    };
    let created = generate::creation_time()?;
    let tags = if !args.tags.is_empty() {
        args.tags.clone()
    } else if source.is_some() {
        vec![dockerfile::default_tag(created)]
    } else {
        vec!["latest".to_string()]
    };
    let mut generated_dockerfile = None;
    let mut extra_files = Vec::new();
    let mut labels: Vec<String> = args
        .generate
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if let Some(source) = &source {
        let opts = args.generate.options(tags.first().cloned(), created);
        let generated = dockerfile::generate(source, &opts).with_context(|| {
            format!(
                "cannot generate a Dockerfile from `{}`",
                source.path().display()
            )
        })?;
        generated_dockerfile = Some(generated.dockerfile);
        extra_files = generated
            .files
            .into_iter()
            .map(|f| (f.name_in_context, f.local_path))
            .collect();
        // The labels are in the generated Dockerfile already.
        labels.clear();
    }
    if stdin_dockerfile {
        let text = tokio::task::spawn_blocking(|| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
        })
        .await?
        .context("cannot read the Dockerfile from stdin (`-f -`)")?;
        generated_dockerfile = Some(text);
    }
    let context_dir = match (&args.context, &source) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(".".into()),
    };
    let req = BuildRequest {
        dockerfile: args.dockerfile.clone().unwrap_or_else(|| {
            context_dir
                .clone()
                .unwrap_or_else(|| ".".into())
                .join("Dockerfile")
        }),
        context_dir,
        generated_dockerfile,
        extra_files,
        images: tags
            .iter()
            .map(|t| format!("{}:{t}", args.repository))
            .collect(),
        build_args: args.build_args.clone(),
        labels,
        target: args.target.clone(),
        platform: args.platform.clone(),
        network: args.network.clone(),
        no_cache: args.no_cache,
        pull: args.pull,
        push: args.push,
        remote_wait: Duration::from_secs(args.remote_wait),
        incremental: !args.no_incremental,
        verify: args.verify,
        add_hosts: args.add_hosts.clone(),
        shm_size: args.shm_size.clone(),
        ulimits: args.ulimits.clone(),
        quiet: args.progress.as_deref() == Some("quiet"),
        output: match &args.output {
            Some(o) => {
                let spec = crate::outputs::OutputSpec::parse(o)?;
                spec.check_dest()?;
                Some(spec)
            }
            None => None,
        },
        ssh: crate::secrets::ssh_forward(&args.ssh)?,
        build_contexts: crate::named_contexts::parse_all(&args.build_contexts)?,
        cache_from: args.cache_from.clone(),
        cache_to: args.cache_to.clone(),
        secrets: args
            .secrets
            .iter()
            .map(|s| crate::secrets::BuildSecret::read(s))
            .collect::<Result<_, _>>()?,
    };

    // `--platform`: on a pool, the members of that platform; several
    // platforms are built each on its own member, then joined in an index.
    let mut target = target;
    let mut wanted: Option<Vec<Platform>> = None;
    if let Some(given) = &args.platform {
        match &mut target {
            Target::One { builder, .. } => {
                if given.contains(',') {
                    let list = multiplatform::parse(given)?;
                    if list.len() > 1 {
                        return Err(multiplatform::PlatformError::OneBuilder {
                            builder: builder.name.clone(),
                            count: list.len(),
                        }
                        .into());
                    }
                }
            }
            Target::Pool { pool, members, .. } => {
                let list = multiplatform::parse(given)?;
                if list.len() > 1 {
                    if !args.push {
                        return Err(multiplatform::PlatformError::NeedsPush.into());
                    }
                    for (set, flag) in [
                        (args.output.is_some(), "--output"),
                        (args.iidfile.is_some(), "--iidfile"),
                    ] {
                        if set {
                            return Err(multiplatform::PlatformError::OneImageFlag { flag }.into());
                        }
                    }
                }
                multiplatform::probe_members(members, &state, &printer, &cancel).await;
                multiplatform::check_offered(pool, members, &list)?;
                wanted = Some(list);
            }
        }
    }
    if let Some(list) = wanted.as_ref().filter(|l| l.len() > 1) {
        let report =
            multiplatform::run(&target, list, &req, &args, &state, &printer, &cancel).await?;
        if let Some(path) = &args.metadata_file {
            // `containerimage.digest` is the index's, as buildx writes it.
            let index = BuildReport {
                images: req.images.clone(),
                digests: report.digests.clone(),
                ..Default::default()
            };
            let json = serde_json::to_vec_pretty(&crate::outputs::metadata(&index))?;
            crate::outputs::write_atomic(path, &json)?;
        }
        if crate::commands::printer::quiet() {
            if !args.json {
                for image in report.digests.keys() {
                    println!("{image}");
                }
            }
        } else {
            eprintln!(
                "absconda: built and pushed the index {}",
                report
                    .digests
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            eprintln!("absconda: {}", report.summary());
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        return Ok(());
    }
    let one_platform = wanted.as_ref().and_then(|l| l.first());
    let mut req = req;
    if let Some(p) = one_platform {
        req.platform = Some(p.to_string());
    }
    // With `emulate: true`, a platform no member has goes to any member.
    let on = match (&target, one_platform) {
        (Target::Pool { pool, members, .. }, Some(p)) => {
            let on = multiplatform::placement(pool, members, p);
            if on.is_none() {
                printer.info(&format!(
                    "no builder of pool `{}` is {p}: building it with emulation on another (`emulate: true`)",
                    pool.name
                ));
            }
            on
        }
        _ => one_platform,
    };
    let (result, report) = with_retries(&target, &req, on, &args, &state, &printer, &cancel).await;
    if result.is_err() {
        printer.show_kept_output();
    }
    result.with_context(|| format!("build on builder `{}` failed", report.builder))?;
    if let (Some(path), Some(id)) = (&args.iidfile, &report.image_id) {
        crate::outputs::write_atomic(path, id.as_bytes())?;
    }
    if let Some(path) = &args.metadata_file {
        let json = serde_json::to_vec_pretty(&crate::outputs::metadata(&report))?;
        crate::outputs::write_atomic(path, &json)?;
    }

    if crate::commands::printer::quiet() {
        if !args.json {
            for image in &report.images {
                println!("{image}");
            }
        }
    } else {
        eprintln!("absconda: built {}", report.images.join(", "));
        eprintln!("absconda: {}", report.summary());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Builds with `--retries`, a retry going to another pool member, and
/// records the build in the state file.
pub(super) async fn with_retries(
    target: &Target,
    req: &BuildRequest,
    platform: Option<&Platform>,
    args: &BuildArgs,
    state: &StateFile,
    printer: &dyn Reporter,
    cancel: &CancellationToken,
) -> (anyhow::Result<()>, BuildReport) {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mut attempt = 0;
    // Pool members a failed attempt ran on: a retry goes to another one.
    let mut failed_on: Vec<String> = Vec::new();
    let (result, report) = loop {
        let recorder = Recorder::new(printer);
        let mut report = BuildReport {
            builder: target.name().to_string(),
            images: req.images.clone(),
            ..Default::default()
        };
        let result = attempt_build(
            target,
            req,
            platform,
            args,
            state,
            &recorder,
            cancel,
            &mut report,
            attempt > 0,
            &failed_on,
        )
        .await;
        let mut phases = recorder.take();
        phases.append(&mut report.phases);
        report.phases = phases;
        report.total_seconds = started.elapsed().as_secs_f64();
        match &result {
            Err(e) if attempt < args.retries && is_transient(e) => {
                attempt += 1;
                let cloud = match target {
                    Target::One { cloud, .. } => cloud.as_ref(),
                    Target::Pool { .. } => {
                        failed_on.push(report.builder.clone());
                        None
                    }
                };
                let why = match cloud {
                    Some(c) => match c.describe().await {
                        Ok(info) if info.status != Status::Running => format!(
                            "; the builder is {} (stopped or preempted under the build), so it is started again",
                            info.raw_status
                        ),
                        _ => String::new(),
                    },
                    None => String::new(),
                };
                printer.info(&format!(
                    "attempt {attempt} failed: {}{why}; retrying ({attempt}/{})",
                    crate::exit::one_line(e),
                    args.retries
                ));
                continue;
            }
            _ => break (result, report),
        }
    };

    let outcome = match &result {
        Ok(()) => "success".to_string(),
        Err(e) => match crate::exit::code(e) {
            crate::exit::INTERRUPTED => "interrupted".into(),
            crate::exit::BUILD_FAILED => "build_failed".into(),
            crate::exit::PUSH_FAILED => "push_failed".into(),
            _ => "error".into(),
        },
    };
    if !matches!(&result, Err(e) if crate::exit::code(e) == crate::exit::USAGE) {
        let record = BuildRecord {
            started_at,
            seconds: report.total_seconds,
            outcome,
            bytes_sent: report.bytes_sent,
            phases: report
                .phases
                .iter()
                .map(|(p, s)| (p.name().to_string(), *s))
                .collect(),
            vm_seconds: report.billed_seconds,
            pool: report.pool.clone(),
            queue_seconds: report.queue_seconds,
        };
        if let Err(e) = state.update(|s| {
            s.builders
                .entry(report.builder.clone())
                .or_default()
                .record_build(record)
        }) {
            tracing::warn!("could not record the build in the state file: {e}");
        }
    }
    (result, report)
}

fn is_transient(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(b) = cause.downcast_ref::<build::BuildError>() {
            return b.is_transient();
        }
        if let Some(s) = cause.downcast_ref::<crate::ssh::SshError>() {
            return !s.is_host_key()
                && matches!(
                    s,
                    crate::ssh::SshError::Lost { .. }
                        | crate::ssh::SshError::Connect { .. }
                        | crate::ssh::SshError::ConnectTimeout { .. }
                        | crate::ssh::SshError::Handshake { .. }
                        | crate::ssh::SshError::Channel { .. }
                );
        }
        if cause.downcast_ref::<LifecycleError>().is_some() {
            return matches!(
                cause.downcast_ref::<LifecycleError>(),
                Some(LifecycleError::NotReady { .. })
            );
        }
    }
    false
}

/// What `--remote-builder` named: one builder, or a pool of them.
// Made once per build: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Target {
    One {
        builder: Builder,
        cloud: Option<Cloud>,
    },
    Pool {
        pool: config::Pool,
        members: Vec<pool::Member>,
        /// The build service that takes builds when every member is busy.
        overflow: Option<Builder>,
    },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::One { builder, .. } => &builder.name,
            Target::Pool { pool, .. } => &pool.name,
        }
    }
}

/// One attempt: bring the builder up (for a pool: choose one), build, and
/// stop it if asked.
#[allow(clippy::too_many_arguments)]
async fn attempt_build(
    target: &Target,
    req: &BuildRequest,
    platform: Option<&Platform>,
    args: &BuildArgs,
    state: &StateFile,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
    report: &mut BuildReport,
    retrying: bool,
    failed_on: &[String],
) -> anyhow::Result<()> {
    let prepared = build::prepare_context(req).await?;
    if let Target::One { builder, .. } = target
        && builder.provider.is_service()
    {
        return crate::service::build(builder, req, prepared, reporter, cancel, report).await;
    }
    let (builder, cloud, ready, held) = match target {
        Target::One { builder, cloud } => {
            // A retry after preemption starts the builder again even without auto_start.
            let ready =
                lifecycle::bring_up(builder, cloud.as_ref(), retrying, state, reporter, cancel)
                    .await?;
            (builder, cloud.as_ref(), ready, None)
        }
        Target::Pool {
            pool,
            members,
            overflow,
        } => {
            // The overflow service takes a build of one platform only when
            // it declares that platform (`platform:`): it may not emulate others.
            let overflow = overflow
                .as_ref()
                .filter(|s| platform.is_none_or(|p| s.platform.as_ref() == Some(p)));
            let without_overflow;
            let choice_pool = if overflow.is_none() && pool.overflow.is_some() {
                without_overflow = config::Pool {
                    overflow: None,
                    ..pool.clone()
                };
                &without_overflow
            } else {
                pool
            };
            let chosen = match pool::choose(
                choice_pool,
                members,
                req,
                platform,
                failed_on,
                state,
                args.remote_off,
                reporter,
                cancel,
            )
            .await
            {
                Ok(chosen) => chosen,
                Err(e) => match (e.downcast_ref::<pool::PoolError>(), overflow) {
                    (Some(pool::PoolError::AllBusy { .. }), Some(service)) => {
                        reporter.info(&format!(
                            "pool `{}`: every builder is busy; building on the overflow service `{}`",
                            pool.name, service.name
                        ));
                        report.pool = Some(pool.name.clone());
                        report.queue_seconds = Some(0.0);
                        return crate::service::build(
                            service, req, prepared, reporter, cancel, report,
                        )
                        .await;
                    }
                    _ => return Err(e),
                },
            };
            let m = &members[chosen.index];
            // An emulated platform chose among all members, but is named too.
            let named = platform.map(|p| p.to_string()).or(req.platform.clone());
            reporter.info(&match named {
                Some(p) => format!(
                    "pool `{}`: {p}: building on `{}`",
                    pool.name, m.builder.name
                ),
                None => format!("pool `{}`: building on `{}`", pool.name, m.builder.name),
            });
            report.pool = Some(pool.name.clone());
            report.queue_seconds = Some(chosen.queued.as_secs_f64());
            (
                &m.builder,
                m.cloud.as_ref(),
                chosen.ready,
                Some(chosen.lease),
            )
        }
    };
    report.builder = builder.name.clone();
    let self_stop = if args.remote_off {
        None
    } else {
        lifecycle::self_stop(builder, cloud, &ready)
    };
    let job = build::Job {
        builder,
        req,
        self_stop: self_stop.as_ref(),
        reporter,
        cancel,
    };
    let result = build::build_on(&ready.session, &job, prepared, report, held).await;

    if let (Some(cloud), true) = (cloud, args.remote_off) {
        // Stop right away only when the builder proves, under its lease,
        // that no build holds or waits for it; the check keeps the lease
        // through the stop call so none can start in between.
        match build::idle_for_stop(&ready.session, builder).await {
            Err(why) => {
                ready.session.close().await;
                reporter.info(&format!(
                    "leaving builder `{}` running: {why} (--remote-off)",
                    builder.name
                ));
            }
            Ok(held) => {
                let stopped = lifecycle::stop(builder, cloud, state, reporter).await;
                drop(held);
                ready.session.close().await;
                if let Err(e) = stopped {
                    reporter.info(&format!(
                        "could not stop builder `{}`: {e:#}; stop it with `absconda remote stop {}`",
                        builder.name, builder.name
                    ));
                    if result.is_ok() {
                        return Err(e);
                    }
                } else {
                    reporter.info(&format!("builder `{}` stopped", builder.name));
                }
            }
        }
    } else {
        ready.session.close().await;
    }
    result.map_err(Into::into)
}

/// Forwards to the printer and remembers how long each lifecycle phase took.
struct Recorder<'a> {
    inner: &'a dyn Reporter,
    phases: std::sync::Mutex<Vec<(Phase, f64)>>,
}

impl<'a> Recorder<'a> {
    fn new(inner: &'a dyn Reporter) -> Recorder<'a> {
        Recorder {
            inner,
            phases: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Vec<(Phase, f64)> {
        std::mem::take(&mut *self.phases.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Reporter for Recorder<'_> {
    fn phase(&self, phase: Phase) {
        self.inner.phase(phase)
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        if matches!(
            phase,
            Phase::Start | Phase::Ready | Phase::Connect | Phase::Stop
        ) {
            self.phases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((phase, took.as_secs_f64()));
        }
        self.inner.phase_done(phase, took)
    }
    fn info(&self, message: &str) {
        self.inner.info(message)
    }
    fn upload_progress(&self, sent: u64) {
        self.inner.upload_progress(sent)
    }
    fn upload_content(&self, done: u64, total: u64) {
        self.inner.upload_content(done, total)
    }
    fn download_progress(&self, received: u64, total: Option<u64>) {
        self.inner.download_progress(received, total)
    }
    fn download_done(&self, received: u64, took: Duration) {
        self.inner.download_done(received, took)
    }
    fn output(&self, stderr: bool, data: &[u8]) {
        self.inner.output(stderr, data)
    }
}
