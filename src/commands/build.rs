//! `absconda build`.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::build::{self, BuildReport, BuildRequest};
use crate::cli::BuildArgs;
use crate::commands::generate;
use crate::commands::printer::Printer;
use crate::config::{self, ProviderKind};
use crate::dockerfile::{self, Source};
use crate::report::{Phase, Reporter};
use crate::ssh::Session;

pub async fn run(args: BuildArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let file = config::load(args.config.remote_config.as_deref())?;
    let builder = file.builder(&args.remote_builder)?;
    let printer = Printer::new(args.json);

    let source = match (&args.file, &args.requirements, &args.tarball) {
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
    };

    let started = Instant::now();
    let prepared = build::prepare_context(&req).await?;
    let mut report = BuildReport {
        builder: builder.name.clone(),
        images: req.images.clone(),
        ..Default::default()
    };

    if builder.provider != ProviderKind::Ssh {
        anyhow::bail!(
            "builder `{}` uses provider `{}`, which this build of absconda cannot start yet",
            builder.name,
            builder.provider
        );
    }
    let host = builder
        .host
        .clone()
        .with_context(|| format!("builder `{}` has no `host`", builder.name))?;

    printer.phase(Phase::Connect);
    let t = Instant::now();
    let target = build::ssh_target(&builder, &host);
    let session = tokio::select! {
        s = Session::connect(&target) => s?,
        _ = cancel.cancelled() => return Err(build::BuildError::Interrupted.into()),
    };
    report
        .phases
        .push((Phase::Connect, t.elapsed().as_secs_f64()));

    let job = build::Job {
        builder: &builder,
        req: &req,
        self_stop: None,
        reporter: &printer,
        cancel: &cancel,
    };
    let result = build::build_on(&session, &job, prepared, &mut report).await;
    session.close().await;
    report.total_seconds = started.elapsed().as_secs_f64();
    result.with_context(|| format!("build on builder `{}` failed", builder.name))?;

    eprintln!("absconda: built {}", report.images.join(", "));
    eprintln!("absconda: {}", report.summary());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
