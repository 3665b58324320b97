//! `absconda remote provision` and `remote destroy`: a builder's machine made
//! and removed with Terraform.
//!
//! The state file is the record of what exists: `provision` refuses a builder
//! it already records, and `destroy` forgets a builder only after Terraform
//! has destroyed it, so a failed destroy can simply be run again. Destroying
//! deletes the builder's disk and build cache, so it asks the user to type
//! the builder's name, and never proceeds silently without a terminal.
//!
//! A new cloud VM's host keys are made at its first boot, after Terraform is
//! done, so the bundled modules output no `host_key_fingerprints`. For a
//! `gcp` or `aws` builder absconda then asks the cloud (guest attributes,
//! console output) until the VM has published them, and saves those in the
//! state, where every later connection pins them: no trust-on-first-use.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::{DestroyArgs, ProvisionArgs};
use crate::commands::printer::Printer;
use crate::config::{self, Builder, ProviderKind};
use crate::lifecycle::{self, Cloud};
use crate::provisioned::{self, ProvisionError, join_address};
use crate::report::{Phase, Reporter};
use crate::state::StateFile;
use crate::terraform::{self, Terraform, Workdir};

/// Terraform with the builder's cloud identity in its environment.
async fn terraform_for(builder: &Builder) -> Result<Terraform, terraform::TerraformError> {
    let tf = Terraform::find().await?;
    Ok(match (&builder.provider, &builder.profile) {
        (ProviderKind::Aws, Some(profile)) => tf.with_env("AWS_PROFILE", profile),
        _ => tf,
    })
}

fn args(fixed: &[&str], vars: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    let mut a: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    a.extend(terraform::color_args());
    a.extend(terraform::var_args(vars));
    a
}

/// `terraform init`, then `terraform <verb> -auto-approve` with `vars`.
async fn init_then(
    tf: &Terraform,
    module: &std::path::Path,
    verb: &str,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<(), terraform::TerraformError> {
    tf.run(
        module,
        &args(&["init", "-input=false"], &Default::default()),
        terraform::INIT_TIMEOUT,
    )
    .await?;
    tf.run(
        module,
        &args(&[verb, "-auto-approve", "-input=false"], vars),
        terraform::APPLY_TIMEOUT,
    )
    .await
}

pub async fn provision(args_in: ProvisionArgs) -> anyhow::Result<()> {
    let file = config::load(args_in.config.remote_config.as_deref())?;
    let builder = file.builder(&args_in.name)?;
    let printer = Printer::new(false);
    let states = StateFile::default_location();
    let refuse_if_provisioned =
        |state: &crate::state::State| match state.builders.get(&builder.name) {
            Some(b) if b.provisioned_at.is_some() => Err(ProvisionError::AlreadyProvisioned {
                builder: builder.name.clone(),
                at: b.provisioned_at.unwrap_or_default(),
                address: b.address.clone().unwrap_or_else(|| "-".into()),
            }),
            _ => Ok(()),
        };
    refuse_if_provisioned(&states.load()?)?;
    let source = terraform::module_source(&builder)?;
    let tf = terraform_for(&builder).await?;
    let _lock = terraform::lock(&builder.name)?;
    // Another absconda may have finished provisioning while we looked for Terraform.
    refuse_if_provisioned(&states.load()?)?;

    let work = terraform::prepare_workdir(&builder.name, &source)?;
    let vars = terraform::variables_for(&builder, &work.module)?;
    terraform::save_vars(&work, &vars)?;
    printer.info(&format!(
        "provisioning builder `{}` with Terraform {} from `{}` (working copy `{}`)",
        builder.name,
        tf.version,
        source.display(),
        work.module.display()
    ));
    let started = Instant::now();
    let fail = || format!("could not provision builder `{}`", builder.name);
    init_then(&tf, &work.module, "apply", &vars)
        .await
        .with_context(fail)?;
    let outputs = tf.outputs(&work.module).await.with_context(fail)?;

    let port = outputs.ssh_port.unwrap_or(builder.port);
    let address = join_address(&outputs.instance_ip, port);
    let now = chrono::Utc::now();
    let instance = outputs.instance(builder.provider);
    states
        .update(|s| {
            let e = s.builders.entry(builder.name.clone()).or_default();
            e.provider = Some(builder.provider.to_string());
            e.set_status("running", Some(&address));
            e.provisioned_at = Some(now);
            e.instance = instance.clone();
            e.ssh_user = outputs.ssh_user.clone();
            e.host_key_fingerprints = outputs.host_key_fingerprints.clone();
            e.terraform_dir = Some(work.module.clone());
        })
        .with_context(|| {
            format!(
                "builder `{}` was created but could not be recorded; its Terraform state is in `{}`",
                builder.name,
                work.module.display()
            )
        })?;
    printer.info(&format!(
        "provisioned builder `{}` in {:.0}s: {}{}",
        builder.name,
        started.elapsed().as_secs_f64(),
        address,
        instance
            .as_deref()
            .map(|i| format!(" (instance `{i}`)"))
            .unwrap_or_default()
    ));

    printer.phase(Phase::Ready);
    let t = Instant::now();
    let deadline = t + builder.ready_timeout;
    // Only where the saved pins will be used: not with a `host_key:` pin or
    // a `host:` of the config, which win over the state.
    let from_cloud = outputs.host_key_fingerprints.is_empty()
        && builder.host_key.is_none()
        && builder.host.is_none()
        && matches!(
            builder.provider,
            ProviderKind::Gcp | ProviderKind::Aws | ProviderKind::Azure
        );
    if from_cloud {
        let fingerprints = host_keys_from_cloud(&builder, &states, deadline, &printer).await?;
        if !fingerprints.is_empty() {
            states
                .update(|s| {
                    if let Some(e) = s.builders.get_mut(&builder.name) {
                        e.host_key_fingerprints = fingerprints.clone();
                    }
                })
                .with_context(|| {
                    format!(
                        "could not record the host keys of builder `{}`",
                        builder.name
                    )
                })?;
        }
    }
    let ep = provisioned::endpoint(&builder, &states.load()?)?;
    // What the wait for host keys left of `ready_timeout`, and a little
    // more so that a slow cloud still leaves SSH one real try.
    let within = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(10));
    let version = provisioned::wait_ready(&builder, &ep, within, &printer).await?;
    printer.phase_done(Phase::Ready, t.elapsed());
    states.update(|s| {
        if let Some(e) = s.builders.get_mut(&builder.name) {
            e.set_status("running", None);
        }
    })?;
    printer.info(&format!(
        "builder `{}` is ready at `{}` (docker {version}); host key checked with {}",
        builder.name,
        ep.address(),
        ep.trust()
    ));
    Ok(())
}

/// The host key fingerprints the cloud reports for a just-provisioned
/// builder, polled until the VM has published some or `deadline` passes
/// (then empty: the builder's `host_key_policy` decides, and a strict one
/// refuses the unknown key with a hint).
///
/// A cloud error is reported and treated like no keys, for the same
/// reason: the builder exists and is recorded, and the host key check that
/// follows is what keeps the connection safe.
async fn host_keys_from_cloud(
    builder: &Builder,
    states: &StateFile,
    deadline: Instant,
    reporter: &dyn Reporter,
) -> Result<Vec<String>, ProvisionError> {
    // The instance name or id comes from the module's outputs, now in the state.
    let b = lifecycle::with_provisioned(builder, states);
    let cloud = match Cloud::for_builder(&b) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => {
            reporter.info(&format!(
                "warning: cannot ask the cloud for the host keys of builder `{}`: {e}",
                b.name
            ));
            return Ok(Vec::new());
        }
    };
    let source = cloud.host_key_source();
    let mut delay = Duration::from_secs(1);
    let mut said = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let asked = tokio::select! {
            r = tokio::time::timeout(remaining, cloud.host_key_fingerprints()) => r,
            _ = tokio::signal::ctrl_c() => return Err(ProvisionError::Interrupted),
        };
        match asked {
            Ok(Ok(fingerprints)) if !fingerprints.is_empty() => {
                reporter.info(&format!(
                    "builder `{}` published its host keys ({source}): {}; only these are accepted",
                    b.name,
                    fingerprints.join(", ")
                ));
                return Ok(fingerprints);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                reporter.info(&format!(
                    "warning: could not read the host keys of builder `{}` from the cloud ({source}): {}",
                    b.name,
                    crate::util::chain(&e)
                ));
                return Ok(Vec::new());
            }
            Err(_) => {}
        }
        if Instant::now() + delay >= deadline {
            reporter.info(&format!(
                "warning: builder `{}` published no host keys ({source}) within {}s; its `host_key_policy` decides whether its key is trusted",
                b.name,
                builder.ready_timeout.as_secs()
            ));
            return Ok(Vec::new());
        }
        if !said {
            reporter.info(&format!(
                "waiting for builder `{}` to publish its host keys ({source})",
                b.name
            ));
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tokio::signal::ctrl_c() => return Err(ProvisionError::Interrupted),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Asks the user to type the builder's name (unless `--yes`).
async fn confirm(builder: &Builder, what: String, yes: bool) -> Result<(), ProvisionError> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(ProvisionError::NoTerminal {
            builder: builder.name.clone(),
        });
    }
    let name = builder.name.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "This destroys builder `{name}`{what} with everything on it, its build cache included.\nType the builder's name to confirm: "
        );
        let _ = err.flush();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await;
    match answer {
        Ok(Ok(line)) if line.trim() == builder.name => Ok(()),
        _ => Err(ProvisionError::NotConfirmed {
            builder: builder.name.clone(),
        }),
    }
}

pub async fn destroy(args_in: DestroyArgs) -> anyhow::Result<()> {
    let file = config::load(args_in.config.remote_config.as_deref())?;
    let builder = file.builder(&args_in.name)?;
    let printer = Printer::new(false);
    let states = StateFile::default_location();
    let state = states.load()?;
    let entry = state.builders.get(&builder.name).cloned();
    let provisioned = entry.as_ref().is_some_and(|e| e.provisioned_at.is_some());
    let mut work = Workdir::of(&builder.name);
    if let Some(dir) = entry.as_ref().and_then(|e| e.terraform_dir.clone())
        && dir.is_dir()
    {
        work.module = dir;
    }
    let terraform_knows = work.module.is_dir() && (work.has_resources() || work.has_backend());
    if !provisioned && !terraform_knows {
        return Err(ProvisionError::NotProvisioned {
            builder: builder.name.clone(),
            state: states.path().to_path_buf(),
        }
        .into());
    }
    if !work.module.is_dir() {
        return Err(ProvisionError::WorkdirGone {
            builder: builder.name.clone(),
            dir: work.module.clone(),
        }
        .into());
    }
    let tf = terraform_for(&builder).await?;
    let what = match &entry {
        Some(e) => {
            let mut parts = Vec::new();
            if let Some(i) = &e.instance {
                parts.push(format!("instance `{i}`"));
            }
            if let Some(a) = &e.address {
                parts.push(format!("at `{a}`"));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!(" ({})", parts.join(" "))
            }
        }
        None => String::new(),
    };
    confirm(&builder, what, args_in.yes).await?;
    let _lock = terraform::lock(&builder.name)?;
    // The exact variables `apply` had; recomputed only if they were lost.
    let vars = match terraform::saved_vars(&work) {
        Some(v) => v,
        None => terraform::variables_for(&builder, &work.module)?,
    };
    printer.info(&format!(
        "destroying builder `{}` with Terraform {} in `{}`",
        builder.name,
        tf.version,
        work.module.display()
    ));
    let fail = || format!("could not destroy builder `{}`", builder.name);
    init_then(&tf, &work.module, "destroy", &vars)
        .await
        .with_context(fail)?;
    // Only now that Terraform destroyed it does absconda forget it.
    states
        .update(|s| s.builders.remove(&builder.name))
        .with_context(|| {
            format!(
                "builder `{}` was destroyed, but the state file still records it",
                builder.name
            )
        })?;
    if let Err(e) = work.remove() {
        tracing::warn!(
            "could not remove the Terraform working copy `{}`: {e}",
            work.root.display()
        );
    }
    printer.info(&format!("destroyed builder `{}`", builder.name));
    Ok(())
}
