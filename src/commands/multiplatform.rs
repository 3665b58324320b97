//! `absconda build --platform a,b` on a pool: one native build per
//! platform, in parallel, then one image index over them.
//!
//! Each platform goes to a pool member of that platform (declared with
//! `platform:`, else asked from the member's docker) through the usual
//! pipeline — its own lease, sync, build and push — under the tag
//! `TAG-<os>-<arch>[-<variant>]` of the first `-t`. absconda then reads each
//! pushed manifest through the registry's HTTP API and PUTs an index (a
//! Docker manifest list over Docker manifests, else an OCI image index)
//! under every requested tag, from this machine: no docker runs here.

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

use crate::build::{BuildReport, BuildRequest};
use crate::cli::BuildArgs;
use crate::commands::printer::Printer;
use crate::config;
use crate::platform::Platform;
use crate::pool::{self, Member};
use crate::registry_api::{self, Descriptor};
use crate::report::Reporter;
use crate::state::StateFile;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("`--platform {given}`: {message}")]
    Invalid { given: String, message: String },
    #[error(
        "`--platform` names {count} platforms but `{builder}` is one builder, which builds natively only its own"
    )]
    OneBuilder { builder: String, count: usize },
    #[error("no builder of pool `{pool}` offers {missing}; the pool offers {offered}")]
    NotOffered {
        pool: String,
        missing: String,
        offered: String,
    },
    #[error(
        "a build for several platforms needs `--push`: each platform is built on its own builder and they meet only in the registry"
    )]
    NeedsPush,
    #[error("`{flag}` takes one image, but a build for several platforms makes one per platform")]
    OneImageFlag { flag: &'static str },
    #[error("the build for {platform} failed")]
    Failed {
        platform: String,
        #[source]
        source: anyhow::Error,
    },
}

impl PlatformError {
    /// Whether the command line asked for something impossible.
    pub fn is_usage(&self) -> bool {
        !matches!(self, PlatformError::Failed { .. })
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            PlatformError::OneBuilder { .. } => Some(
                "name a pool whose builders have these platforms (`pools:` in the config, each builder with `platform: os/arch`), or pass one platform".into(),
            ),
            PlatformError::NotOffered { .. } => Some(
                "add a builder of that platform to the pool (declare it with `platform: os/arch`), or leave the platform out of `--platform`".into(),
            ),
            PlatformError::NeedsPush => Some("add `--push`".into()),
            _ => None,
        }
    }
}

/// Parses `--platform` (`Invalid` names what is wrong).
pub fn parse(given: &str) -> Result<Vec<Platform>, PlatformError> {
    Platform::parse_list(given).map_err(|message| PlatformError::Invalid {
        given: given.to_string(),
        message,
    })
}

/// Fills in the platform of members that do not declare one, from their
/// docker; members that cannot be reached now, and VMs that are not
/// running, stay unknown (nothing is started to ask).
pub async fn probe_members(
    members: &mut [Member],
    state: &StateFile,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
) {
    let found = futures_util::future::join_all(members.iter().map(|m| async move {
        if m.platform.is_some() {
            return None;
        }
        // Only a running VM is asked: starting one to learn its platform
        // would start something before the build is known to be possible.
        if let Some(cloud) = &m.cloud {
            match cloud.describe().await {
                Ok(info) if info.status == crate::cloud::Status::Running => {}
                Ok(info) => {
                    reporter.info(&format!(
                        "builder `{}` is {}, so its platform is unknown (declare it with `platform:`)",
                        m.builder.name, info.raw_status
                    ));
                    return None;
                }
                Err(e) => {
                    reporter.info(&format!(
                        "cannot ask builder `{}` for its platform: {} (declare it with `platform:`)",
                        m.builder.name,
                        crate::exit::one_line(&anyhow::Error::new(e))
                    ));
                    return None;
                }
            }
        }
        let ready = match crate::lifecycle::bring_up(
            &m.builder,
            m.cloud.as_ref(),
            false,
            state,
            &crate::report::Silent,
            cancel,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                reporter.info(&format!(
                    "cannot ask builder `{}` for its platform: {} (declare it with `platform:`)",
                    m.builder.name,
                    crate::exit::one_line(&e)
                ));
                return None;
            }
        };
        let probed = crate::build::probe(&ready.session, &m.builder).await;
        ready.session.close().await;
        let text = probed.ok().and_then(|r| r.platform)?;
        let p = Platform::parse(&text).ok();
        if let Some(p) = &p {
            tracing::info!("builder `{}` is {p} (its docker says)", m.builder.name);
        }
        p
    }))
    .await;
    for (m, p) in members.iter_mut().zip(found) {
        if p.is_some() {
            m.platform = p;
        }
    }
}

/// Refuses platforms no member offers, before anything starts.
pub fn check_offered(
    pool: &config::Pool,
    members: &[Member],
    wanted: &[Platform],
) -> Result<(), PlatformError> {
    let missing: Vec<String> = wanted
        .iter()
        .filter(|w| !members.iter().any(|m| pool::serves(m, Some(w))))
        .map(|w| format!("`{w}`"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut offered: Vec<String> = members
        .iter()
        .filter_map(|m| {
            m.platform
                .as_ref()
                .map(|p| format!("`{p}` (`{}`)", m.builder.name))
        })
        .collect();
    let unknown: Vec<String> = members
        .iter()
        .filter(|m| m.platform.is_none())
        .map(|m| format!("`{}`", m.builder.name))
        .collect();
    if offered.is_empty() {
        offered.push("no known platform".into());
    }
    let mut offered = offered.join(", ");
    if !unknown.is_empty() {
        offered.push_str(&format!(
            "; unknown for {} (not reachable and no `platform:`)",
            unknown.join(", ")
        ));
    }
    Err(PlatformError::NotOffered {
        pool: pool.name.clone(),
        missing: missing.join(", "),
        offered,
    })
}

/// One platform's part of a multi-platform build.
#[derive(Debug, serde::Serialize)]
pub struct PlatformBuild {
    pub platform: Platform,
    pub builder: String,
    /// The per-platform image (`REPO:TAG-os-arch`).
    pub image: String,
    /// The digest of its manifest in the registry (what the index lists).
    pub manifest_digest: String,
    pub build: BuildReport,
}

/// What a multi-platform build did, for the summary and `--json`.
#[derive(Debug, serde::Serialize)]
pub struct MultiReport {
    pub pool: String,
    pub platforms: Vec<PlatformBuild>,
    pub index_media_type: String,
    /// The index digest under every requested image reference.
    pub digests: BTreeMap<String, String>,
    pub total_seconds: f64,
}

/// The per-platform image of the first requested one: `REPO:TAG-linux-arm64`.
pub fn platform_image(first: &str, platform: &Platform) -> String {
    format!("{first}-{}", platform.tag_suffix())
}

/// Builds every platform on its own member at once, then pushes the index.
pub(super) async fn run(
    target: &super::build::Target,
    wanted: &[Platform],
    req: &BuildRequest,
    args: &BuildArgs,
    state: &StateFile,
    printer: &Printer,
    cancel: &CancellationToken,
) -> anyhow::Result<MultiReport> {
    let pool_name = match target {
        super::build::Target::Pool { pool, .. } => pool.name.clone(),
        super::build::Target::One { builder, .. } => builder.name.clone(),
    };
    let started = std::time::Instant::now();
    let Some(first) = req.images.first() else {
        anyhow::bail!("no image to build");
    };
    let builds = futures_util::future::join_all(wanted.iter().map(|p| {
        let mut one = req.clone();
        one.images = vec![platform_image(first, p)];
        one.platform = Some(p.to_string());
        async move {
            let tagged = Tagged {
                inner: printer,
                tag: p.to_string(),
            };
            let (result, report) =
                super::build::with_retries(target, &one, Some(p), args, state, &tagged, cancel)
                    .await;
            (p, one, result, report)
        }
    }))
    .await;
    let mut done = Vec::new();
    let mut first_err = None;
    for (p, one, result, report) in builds {
        match result {
            Ok(()) => done.push((p.clone(), one.images[0].clone(), report)),
            Err(e) => {
                printer.info(&format!(
                    "{p} on `{}` failed: {}",
                    report.builder,
                    crate::exit::one_line(&e)
                ));
                if first_err.is_none() {
                    first_err = Some(PlatformError::Failed {
                        platform: p.to_string(),
                        source: e,
                    });
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }

    // The index, through the registry's API.
    let repo = registry_api::Repository::parse(&args.repository);
    let creds = crate::registry::lookup(&crate::registry::registry_of(&args.repository))?;
    let client = registry_api::Client::new(repo, creds)?;
    let mut entries: Vec<(Descriptor, Platform)> = Vec::new();
    let mut platforms = Vec::new();
    for (p, image, report) in done {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let url = client.manifest_url(tag);
        let manifest = client.manifest(tag).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot read the manifest of `{image}`"))
        })?;
        let d = registry_api::descriptor_for(&manifest, &p, &url)?;
        platforms.push(PlatformBuild {
            platform: p.clone(),
            builder: report.builder.clone(),
            image,
            manifest_digest: d.digest.clone(),
            build: report,
        });
        entries.push((d, p));
    }
    let (media_type, body) = registry_api::index_json(&entries);
    let mut digests = BTreeMap::new();
    for image in &req.images {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let digest = client
            .put_manifest(tag, &media_type, &body)
            .await
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("cannot push the image index `{image}`"))
            })?;
        digests.insert(image.clone(), digest);
    }
    Ok(MultiReport {
        pool: pool_name,
        platforms,
        index_media_type: media_type,
        digests,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// One platform's progress, its lines marked with the platform: the
/// builds run at once and share stderr. Upload counters are left out (the
/// printer keeps one upload at a time); docker's output goes through as is.
struct Tagged<'a> {
    inner: &'a Printer,
    tag: String,
}

impl Reporter for Tagged<'_> {
    fn phase(&self, phase: crate::report::Phase) {
        self.inner.info(&format!("{}: {}", self.tag, phase.name()));
    }
    fn phase_done(&self, phase: crate::report::Phase, took: std::time::Duration) {
        use crate::report::Phase;
        if matches!(phase, Phase::Upload | Phase::Start | Phase::Ready) {
            self.inner.info(&format!(
                "{}: {} done in {:.1}s",
                self.tag,
                phase.name(),
                took.as_secs_f64()
            ));
        }
    }
    fn info(&self, message: &str) {
        if message.contains(&self.tag) {
            self.inner.info(message);
        } else {
            self.inner.info(&format!("{}: {message}", self.tag));
        }
    }
    fn output(&self, stderr: bool, data: &[u8]) {
        self.inner.output(stderr, data)
    }
}

impl MultiReport {
    /// `linux/amd64 on `a` (sha256:…), linux/arm64 on `b` (…) · index sha256:… · total 31.0s`
    pub fn summary(&self) -> String {
        let built: Vec<String> = self
            .platforms
            .iter()
            .map(|b| format!("{} on `{}` ({})", b.platform, b.builder, b.manifest_digest))
            .collect();
        let mut index: Vec<&String> = self.digests.values().collect();
        index.dedup();
        format!(
            "{} · index {} · total {:.1}s",
            built.join(", "),
            index
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.total_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_platform_images_take_the_first_tag() {
        let p = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(
            platform_image("127.0.0.1:5000/app:1.0", &p),
            "127.0.0.1:5000/app:1.0-linux-arm-v7"
        );
    }
}
