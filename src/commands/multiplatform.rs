//! `absconda build --platform a,b` on a pool: one native build per
//! platform, in parallel, then one image index over them.
//!
//! Each platform goes to a pool member of that platform (declared with
//! `platform:`, else asked from the member's docker) through the usual
//! pipeline — its own lease, sync, build and push — under the tag
//! `TAG-<os>-<arch>[-<variant>]` of the first `-t`. absconda then reads each
//! pushed manifest through the registry's HTTP API and PUTs an index (a
//! Docker manifest list over Docker manifests, else an OCI image index)
//! under every requested tag. No docker runs here: the requests go from
//! this machine, or, when it cannot reach the registry (or the pool says
//! `index_from: builder`), through the SSH connection of a builder that
//! built a platform (see [`registry_api::Route`]).
//!
//! With `emulate: true`, a platform no member has is built on another
//! member with `--platform`: its docker's emulation (BuildKit; `RUN` steps
//! need QEMU registered on the builder). Each image's config is read before
//! the index is written, so an image built for another platform than asked
//! (the classic builder's cache does not tell platforms apart) is never
//! listed under the wrong one.

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
    #[error(
        "builder `{builder}` built `{image}` for {got}, not {want}: its docker did not build for the platform it was asked"
    )]
    WrongPlatform {
        image: String,
        builder: String,
        want: String,
        got: String,
    },
    #[error("`{flag}` takes one image, but a build for several platforms makes one per platform")]
    OneImageFlag { flag: &'static str },
    #[error("the build for {platform} failed")]
    Failed {
        platform: String,
        /// It ran with emulation on a builder of another platform.
        emulated: bool,
        #[source]
        source: anyhow::Error,
    },
}

impl PlatformError {
    /// Whether the command line asked for something impossible.
    pub fn is_usage(&self) -> bool {
        !matches!(
            self,
            PlatformError::Failed { .. } | PlatformError::WrongPlatform { .. }
        )
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            PlatformError::OneBuilder { .. } => Some(
                "name a pool whose builders have these platforms (`pools:` in the config, each builder with `platform: os/arch`), or pass one platform".into(),
            ),
            PlatformError::NotOffered { .. } => Some(
                "add a builder of that platform to the pool (declare it with `platform: os/arch`), build it with emulation (`emulate: true` in the pool), or leave the platform out of `--platform`".into(),
            ),
            PlatformError::Failed { emulated: true, .. } => Some(
                "it was built with emulation on a builder of another platform: a `RUN` step there needs QEMU registered with binfmt_misc on the builder (`docker run --privileged --rm tonistiigi/binfmt --install all` on it), or add a builder of that platform to the pool".into(),
            ),
            PlatformError::NeedsPush => Some("add `--push`".into()),
            PlatformError::WrongPlatform { builder, .. } => Some(format!(
                "docker's classic builder does not keep platforms apart (its cache hands back an image of one platform for another): let `{builder}` use BuildKit (`buildkit: auto` with a docker that has it), or declare its real platform with `platform:`"
            )),
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

/// Whether some member builds `p` natively.
pub fn native(members: &[Member], p: &Platform) -> bool {
    members.iter().any(|m| pool::serves(m, Some(p)))
}

/// The members a build for `p` may use: those of that platform, or, for
/// a platform none has on a pool with `emulate: true`, all (`None`).
pub fn placement<'a>(
    pool: &config::Pool,
    members: &[Member],
    p: &'a Platform,
) -> Option<&'a Platform> {
    if pool.emulate && !native(members, p) {
        None
    } else {
        Some(p)
    }
}

/// Refuses platforms no member offers, before anything starts (with
/// `emulate: true`, any member builds them).
pub fn check_offered(
    pool: &config::Pool,
    members: &[Member],
    wanted: &[Platform],
) -> Result<(), PlatformError> {
    if pool.emulate && !members.is_empty() {
        return Ok(());
    }
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
    /// Where the index was written from: `this machine`, `builder `amd``.
    pub index_from: String,
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
    let (pool_name, index_from) = match target {
        super::build::Target::Pool { pool, .. } => (pool.name.clone(), pool.index_from),
        super::build::Target::One { builder, .. } => {
            (builder.name.clone(), config::IndexFrom::Auto)
        }
    };
    let started = std::time::Instant::now();
    let Some(first) = req.images.first() else {
        anyhow::bail!("no image to build");
    };
    let builds = futures_util::future::join_all(wanted.iter().map(|p| {
        let mut one = req.clone();
        one.images = vec![platform_image(first, p)];
        one.platform = Some(p.to_string());
        let on = match target {
            super::build::Target::Pool { pool, members, .. } => placement(pool, members, p),
            super::build::Target::One { .. } => Some(p),
        };
        let pool_name = &pool_name;
        async move {
            let tagged = Tagged {
                inner: printer,
                tag: p.to_string(),
            };
            if on.is_none() {
                tagged.info(&format!(
                    "no builder of pool `{pool_name}` is {p}: building it with emulation on another (`emulate: true`)"
                ));
            }
            let (result, report) =
                super::build::with_retries(target, &one, on, args, state, &tagged, cancel).await;
            (p, on.is_none(), one, result, report)
        }
    }))
    .await;
    let mut done = Vec::new();
    let mut first_err = None;
    for (p, emulated, one, result, report) in builds {
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
                        emulated,
                        source: e,
                    });
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }

    // The index, through the registry's API: from here, else through a
    // builder that built a platform (it reached the registry to push).
    let repo = registry_api::Repository::parse(&args.repository);
    let creds = crate::registry::lookup(&crate::registry::registry_of(&args.repository))?;
    let built: Vec<(Platform, String, String)> = done
        .iter()
        .map(|(p, image, r)| (p.clone(), image.clone(), r.builder.clone()))
        .collect();
    let mut used: Vec<String> = Vec::new();
    for (_, _, r) in &done {
        if !used.contains(&r.builder) {
            used.push(r.builder.clone());
        }
    }
    // From this machine first (unless told otherwise); through a builder
    // when told to, or when `auto` finds the registry unreachable from here.
    let from_here = match index_from {
        config::IndexFrom::Builder => None,
        config::IndexFrom::Client | config::IndexFrom::Auto => {
            let client = registry_api::Client::new(repo.clone(), creds.clone())?;
            match write_index(&client, &built, &req.images).await {
                Ok(w) => Some(w),
                Err(e) if index_from == config::IndexFrom::Auto && is_unreachable(&e) => {
                    printer.info(&format!(
                        "this machine cannot reach the registry `{}` ({}); writing the index through a builder",
                        repo.base,
                        root_cause(&e)
                    ));
                    None
                }
                Err(e) => return Err(e),
            }
        }
    };
    let written = match from_here {
        Some(w) => w,
        None => {
            through_builder(
                target,
                &used,
                &repo,
                &creds,
                &built,
                &req.images,
                state,
                cancel,
            )
            .await?
        }
    };
    let mut platforms = Vec::new();
    for ((p, image, report), d) in done.into_iter().zip(&written.entries) {
        platforms.push(PlatformBuild {
            platform: p,
            builder: report.builder.clone(),
            image,
            manifest_digest: d.0.digest.clone(),
            build: report,
        });
    }
    Ok(MultiReport {
        pool: pool_name,
        platforms,
        index_media_type: written.media_type,
        index_from: written.from,
        digests: written.digests,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The index as written: its entries (in the order of the platforms),
/// media type, digest per image, and the route it took.
struct Written {
    entries: Vec<(Descriptor, Platform)>,
    media_type: String,
    digests: BTreeMap<String, String>,
    from: String,
}

/// Reads each platform's manifest and puts the index under every image.
async fn write_index(
    client: &registry_api::Client,
    built: &[(Platform, String, String)],
    images: &[String],
) -> anyhow::Result<Written> {
    let mut entries: Vec<(Descriptor, Platform)> = Vec::new();
    for (p, image, builder) in built {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let url = client.manifest_url(tag);
        let manifest = client.manifest(tag).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot read the manifest of `{image}`"))
        })?;
        let d = registry_api::descriptor_for(&manifest, p, &url)?;
        // The index must not call an image what it is not: a builder of
        // another platform (emulation, a wrong `platform:`) may have built
        // for its own.
        let got = client.image_platform(&d).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot read the image config of `{image}`"))
        })?;
        if !got.serves(p) {
            return Err(PlatformError::WrongPlatform {
                image: image.clone(),
                builder: builder.clone(),
                want: p.to_string(),
                got: got.to_string(),
            }
            .into());
        }
        entries.push((d, p.clone()));
    }
    let (media_type, body) = registry_api::index_json(&entries);
    let mut digests = BTreeMap::new();
    for image in images {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        let digest = client
            .put_manifest(tag, &media_type, &body)
            .await
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("cannot push the image index `{image}`"))
            })?;
        digests.insert(image.clone(), digest);
    }
    let from = match client.route() {
        registry_api::Route::Direct(_) => "this machine".to_string(),
        registry_api::Route::Builder { name, .. } => format!("builder `{name}`"),
    };
    Ok(Written {
        entries,
        media_type,
        digests,
        from,
    })
}

/// Writes the index through the first of `used` (the builders that built
/// a platform) that can be connected to.
#[allow(clippy::too_many_arguments)]
async fn through_builder(
    target: &super::build::Target,
    used: &[String],
    repo: &registry_api::Repository,
    creds: &Option<crate::registry::Credentials>,
    built: &[(Platform, String, String)],
    images: &[String],
    state: &StateFile,
    cancel: &CancellationToken,
) -> anyhow::Result<Written> {
    let mut last: Option<anyhow::Error> = None;
    for name in used {
        let (builder, cloud) = match target {
            super::build::Target::Pool { members, .. } => {
                match members.iter().find(|m| &m.builder.name == name) {
                    Some(m) => (&m.builder, m.cloud.as_ref()),
                    None => continue,
                }
            }
            super::build::Target::One { builder, cloud } => (builder, cloud.as_ref()),
        };
        let ready = match crate::lifecycle::bring_up(
            builder,
            cloud,
            false,
            state,
            &crate::report::Silent,
            cancel,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                last = Some(e.context(format!("cannot connect to builder `{name}`")));
                continue;
            }
        };
        let client = registry_api::Client::with_route(
            repo.clone(),
            creds.clone(),
            registry_api::Route::Builder {
                name: name.clone(),
                session: std::sync::Arc::new(ready.session),
            },
        );
        let result = write_index(&client, built, images).await;
        if let Some(session) = client
            .into_session()
            .and_then(|s| std::sync::Arc::try_unwrap(s).ok())
        {
            session.close().await;
        }
        return result;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no builder to write the image index through")))
}

/// Whether the registry could not be dialled (not refused, not a bad answer).
fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<registry_api::RegistryApiError>()
            .is_some_and(|r| r.is_unreachable())
    })
}

/// The innermost cause, for a one-line message.
fn root_cause(e: &anyhow::Error) -> String {
    e.chain().last().map(|c| c.to_string()).unwrap_or_default()
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
            "{} · index {} (written from {}) · total {:.1}s",
            built.join(", "),
            index
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.index_from,
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
