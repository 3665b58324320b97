//! `environment.yaml` → Dockerfile.
//!
//! absconda's users describe their software as a conda environment, not as a
//! Dockerfile; this module writes the Dockerfile for them, following the
//! Python original's shape (see `render`). It also covers the two other
//! inputs the original took: a pip `requirements.txt` and a conda-pack
//! archive.
//!
//! The Dockerfile never embeds an input file (the original used heredocs,
//! which the legacy builder cannot read). It `COPY`s them from the build
//! context instead, under names in `.absconda/` that cannot collide with the
//! user's files, and [`Generated::files`] says which local file goes where:
//! the build pipeline must put exactly those into the context it sends. The
//! original forgot that for remote builds, which then failed or silently used
//! a stale file.
//!
//! Generation is pure apart from reading the inputs: identical inputs and
//! options give identical bytes, except the `org.opencontainers.image.created`
//! label, which [`Options::reproducible`] leaves out.

pub mod env;
mod render;

#[cfg(test)]
mod golden_tests;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use self::env::Environment;
pub use self::render::sh_quote;
use self::render::{Common, Layout};

/// The builder stage's image, pinned by version as in the original.
pub const DEFAULT_BUILDER_IMAGE: &str = "mambaorg/micromamba:1.5.5";
/// The runtime stage's image for conda environments and archives.
pub const DEFAULT_RUNTIME_IMAGE: &str = "debian:bookworm-slim";
/// The image for `--requirements`, pinned as in the original.
pub const DEFAULT_PYTHON_IMAGE: &str = "python:3.11-slim";
/// The directory environments are placed under, as in the original.
pub const DEFAULT_ENV_PREFIX: &str = "/opt/conda/envs";

/// Label carrying the sha256 of the input file, so an image can be traced to
/// the exact spec it was built from.
pub const SOURCE_SHA256_LABEL: &str = "org.absconda.source.sha256";
/// Label carrying the input file's name.
pub const SOURCE_FILE_LABEL: &str = "org.absconda.source.file";

/// The directory in the build context that holds absconda's inputs.
pub const CONTEXT_DIR: &str = ".absconda";

/// What the image is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A conda `environment.yaml`.
    Environment(PathBuf),
    /// A pip `requirements.txt`.
    Requirements(PathBuf),
    /// A conda-pack archive (`.tar.gz`, `.tar.bz2`, `.tar.xz` or `.tar`).
    Tarball(PathBuf),
}

impl Source {
    /// The input file.
    pub fn path(&self) -> &Path {
        match self {
            Source::Environment(p) | Source::Requirements(p) | Source::Tarball(p) => p,
        }
    }
}

/// How the Dockerfile is shaped and labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// One micromamba stage instead of builder + runtime (environment only).
    pub single_stage: bool,
    /// Default: [`DEFAULT_BUILDER_IMAGE`].
    pub builder_base: Option<String>,
    /// Default: [`DEFAULT_RUNTIME_IMAGE`], or [`DEFAULT_PYTHON_IMAGE`] for
    /// requirements.
    pub runtime_base: Option<String>,
    /// The absolute directory the environment is placed under; it lives at
    /// `<env_prefix>/<name>`. Default: [`DEFAULT_ENV_PREFIX`].
    pub env_prefix: Option<String>,
    /// Extra `LABEL`s (`--label k=v`); they override built-in ones.
    pub labels: Vec<(String, String)>,
    /// Becomes `org.opencontainers.image.version`.
    pub tag: Option<String>,
    /// Leaves `org.opencontainers.image.created` out.
    pub reproducible: bool,
    /// The value of `org.opencontainers.image.created`.
    pub created: DateTime<Utc>,
}

impl Options {
    /// Defaults everywhere, created now.
    pub fn new(created: DateTime<Utc>) -> Self {
        Options {
            single_stage: false,
            builder_base: None,
            runtime_base: None,
            env_prefix: None,
            labels: Vec::new(),
            tag: None,
            reproducible: false,
            created,
        }
    }
}

/// A local file the Dockerfile expects in the build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// Its path inside the context, `/`-separated (e.g.
    /// `.absconda/environment.yaml`).
    pub name_in_context: String,
    /// The file to put there.
    pub local_path: PathBuf,
}

/// A generated Dockerfile and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The Dockerfile, ending in exactly one newline.
    pub dockerfile: String,
    /// Every file the Dockerfile `COPY`s or `ADD`s from the context.
    pub files: Vec<ContextFile>,
    /// The (safe) name of the conda environment in the image; `None` for
    /// requirements, which make no conda environment.
    pub env_name: Option<String>,
}

/// Why no Dockerfile could be generated.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{}` is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },

    #[error("`{}` is empty: an environment file needs at least `dependencies`", path.display())]
    EmptyEnvironment { path: PathBuf },

    #[error(
        "invalid environment file `{}`{}: {reason}",
        path.display(),
        at_line(*line, *column)
    )]
    InvalidEnvironment {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        reason: String,
    },

    #[error(
        "`{}` is not a tar archive (conda-pack writes one with `--format tar.gz`)",
        path.display()
    )]
    NotATarball { path: PathBuf },

    #[error("invalid {option} `{}`: {reason}", value.escape_debug())]
    InvalidOption {
        option: &'static str,
        value: String,
        reason: String,
    },
}

fn at_line(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" at line {line}, column {column}"),
        (Some(line), None) => format!(" at line {line}"),
        _ => String::new(),
    }
}

/// The tag `build --file` uses when none is given: the UTC date, `YYYYMMDD`,
/// as the original did.
pub fn default_tag(now: DateTime<Utc>) -> String {
    now.format("%Y%m%d").to_string()
}

/// Writes the Dockerfile for `source`.
///
/// Reads the input file (all of it: its sha256 goes into a label), warns
/// through `tracing` about what it ignores, and returns the Dockerfile with
/// the list of files the build context must hold.
pub fn generate(source: &Source, opts: &Options) -> Result<Generated, DockerfileError> {
    let checked = CheckedOptions::new(opts)?;
    match source {
        Source::Environment(path) => generate_environment(path, opts, &checked),
        Source::Requirements(path) => generate_requirements(path, opts, &checked),
        Source::Tarball(path) => generate_tarball(path, opts, &checked),
    }
}

/// The file's text and the hex sha256 of its bytes (for the image's label).
fn read_text(path: &Path) -> Result<(String, String), DockerfileError> {
    let bytes = std::fs::read(path).map_err(|source| DockerfileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|_| DockerfileError::NotUtf8 {
        path: path.to_path_buf(),
    })?;
    Ok((text, sha256))
}

fn generate_environment(
    path: &Path,
    opts: &Options,
    checked: &CheckedOptions,
) -> Result<Generated, DockerfileError> {
    let (text, sha256) = read_text(path)?;
    let env = env::parse(&text, path)?;
    warn_about_environment(&env, path);

    let name = env.safe_name();
    let env_dir = join_prefix(&checked.env_prefix, &name);
    let layout = Layout {
        name: &name,
        env_dir: &env_dir,
        env_prefix: &checked.env_prefix,
    };
    let in_context = format!("{CONTEXT_DIR}/environment.yaml");
    let labels = labels(opts, &name, path, &sha256);
    let mut header = header_lines(path, &in_context, "file");
    header.push(String::new());
    header.extend(environment_summary(&env));
    let common = Common {
        header,
        labels: &labels,
    };
    let builder_base = checked
        .builder_base
        .as_deref()
        .unwrap_or(DEFAULT_BUILDER_IMAGE);
    let dockerfile = if opts.single_stage {
        if checked.runtime_base.is_some() {
            tracing::warn!("`--runtime-base` has no effect with `--single-stage`");
        }
        render::single_stage(&common, &env, &layout, builder_base, &in_context)
    } else {
        let runtime_base = checked
            .runtime_base
            .as_deref()
            .unwrap_or(DEFAULT_RUNTIME_IMAGE);
        render::multi_stage(
            &common,
            &env,
            &layout,
            builder_base,
            runtime_base,
            &in_context,
        )
    };
    Ok(Generated {
        dockerfile,
        files: vec![ContextFile {
            name_in_context: in_context,
            local_path: path.to_path_buf(),
        }],
        env_name: Some(name),
    })
}

fn generate_requirements(
    path: &Path,
    opts: &Options,
    checked: &CheckedOptions,
) -> Result<Generated, DockerfileError> {
    let (text, sha256) = read_text(path)?;
    let requirements = requirement_lines(&text);
    warn_about_requirements(&requirements, path);
    warn_unused(
        opts,
        checked,
        "--requirements",
        &["builder", "env-prefix", "single-stage"],
    );

    let name = requirements_name(path);
    let in_context = format!("{CONTEXT_DIR}/requirements.txt");
    let labels = labels(opts, &name, path, &sha256);
    let mut header = header_lines(path, &in_context, "file");
    header.push(String::new());
    header.push("pip requirements:".to_string());
    header.extend(requirements.iter().map(|r| format!("  - {r}")));
    let common = Common {
        header,
        labels: &labels,
    };
    let runtime_base = checked
        .runtime_base
        .as_deref()
        .unwrap_or(DEFAULT_PYTHON_IMAGE);
    Ok(Generated {
        dockerfile: render::requirements(&common, runtime_base, &in_context),
        files: vec![ContextFile {
            name_in_context: in_context,
            local_path: path.to_path_buf(),
        }],
        env_name: None,
    })
}

fn generate_tarball(
    path: &Path,
    opts: &Options,
    checked: &CheckedOptions,
) -> Result<Generated, DockerfileError> {
    let (sha256, kind) = hash_archive(path)?;
    warn_unused(opts, checked, "--tarball", &["builder", "single-stage"]);

    let name = env::safe_name(&archive_stem(path));
    let env_dir = join_prefix(&checked.env_prefix, &name);
    let layout = Layout {
        name: &name,
        env_dir: &env_dir,
        env_prefix: &checked.env_prefix,
    };
    let in_context = format!("{CONTEXT_DIR}/environment{}", kind.extension());
    let labels = labels(opts, &name, path, &sha256);
    let common = Common {
        header: header_lines(path, &in_context, "archive"),
        labels: &labels,
    };
    let runtime_base = checked
        .runtime_base
        .as_deref()
        .unwrap_or(DEFAULT_RUNTIME_IMAGE);
    Ok(Generated {
        dockerfile: render::tarball(&common, &layout, runtime_base, &in_context),
        files: vec![ContextFile {
            name_in_context: in_context,
            local_path: path.to_path_buf(),
        }],
        env_name: Some(name),
    })
}

/// Options after validation: everything that reaches the Dockerfile
/// unquoted is known to be a single, harmless word.
struct CheckedOptions {
    builder_base: Option<String>,
    runtime_base: Option<String>,
    env_prefix: String,
}

impl CheckedOptions {
    fn new(opts: &Options) -> Result<Self, DockerfileError> {
        let builder_base = opts
            .builder_base
            .as_deref()
            .map(|image| check_image("--builder-base", image))
            .transpose()?;
        let runtime_base = opts
            .runtime_base
            .as_deref()
            .map(|image| check_image("--runtime-base", image))
            .transpose()?;
        let env_prefix = match &opts.env_prefix {
            Some(prefix) => check_prefix(prefix)?,
            None => DEFAULT_ENV_PREFIX.to_string(),
        };
        for (key, value) in &opts.labels {
            check_label(key, value)?;
        }
        if let Some(tag) = &opts.tag
            && tag.chars().any(char::is_control)
        {
            return Err(DockerfileError::InvalidOption {
                option: "--tag",
                value: tag.clone(),
                reason: "it holds a line break or control character".to_string(),
            });
        }
        Ok(CheckedOptions {
            builder_base,
            runtime_base,
            env_prefix,
        })
    }
}

/// An image reference goes into `FROM` as is: it must be one word.
fn check_image(option: &'static str, image: &str) -> Result<String, DockerfileError> {
    let image = image.trim();
    let ok = !image.is_empty()
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@".contains(&b));
    if ok {
        Ok(image.to_string())
    } else {
        Err(DockerfileError::InvalidOption {
            option,
            value: image.to_string(),
            reason: "expected an image reference such as `debian:bookworm-slim`".to_string(),
        })
    }
}

/// The prefix is used in shell commands and `COPY` destinations unquoted,
/// so it is held to plain path characters.
fn check_prefix(prefix: &str) -> Result<String, DockerfileError> {
    let invalid = |reason: &str| DockerfileError::InvalidOption {
        option: "--env-prefix",
        value: prefix.to_string(),
        reason: reason.to_string(),
    };
    if !prefix.starts_with('/') {
        return Err(invalid("it must be an absolute path"));
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./+@".contains(&b))
    {
        return Err(invalid(
            "only letters, digits and `-_./+@` are allowed in the path",
        ));
    }
    if prefix.split('/').any(|part| part == "." || part == "..") {
        return Err(invalid("`.` and `..` are not allowed in the path"));
    }
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("the environment cannot live directly in `/`"));
    }
    // Collapse `//` so the path prints the way users expect.
    let parts: Vec<&str> = trimmed.split('/').filter(|p| !p.is_empty()).collect();
    Ok(format!("/{}", parts.join("/")))
}

fn check_label(key: &str, value: &str) -> Result<(), DockerfileError> {
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !key_ok {
        return Err(DockerfileError::InvalidOption {
            option: "--label",
            value: format!("{key}={value}"),
            reason: "the key may hold only letters, digits and `-_./`".to_string(),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(DockerfileError::InvalidOption {
            option: "--label",
            value: format!("{key}={value}"),
            reason: "the value holds a line break or control character".to_string(),
        });
    }
    Ok(())
}

fn join_prefix(prefix: &str, name: &str) -> String {
    format!("{prefix}/{name}")
}

/// The input's file name, fit for a comment or a label value.
fn display_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned());
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The comment on top: where the Dockerfile came from and which file the
/// build context must hold.
fn header_lines(path: &Path, in_context: &str, what: &str) -> Vec<String> {
    vec![
        format!(
            "Generated by absconda from `{}`; change that {what} rather than this Dockerfile.",
            display_name(path)
        ),
        format!("The build context must hold that {what} as `{in_context}`."),
    ]
}

/// The environment as micromamba will see it, as comments: the original
/// printed the whole file inline, and a reader of the Dockerfile should still
/// see what goes into the image.
fn environment_summary(env: &Environment) -> Vec<String> {
    let mut lines = vec![if env.uses_default_channel() {
        "channels (the file lists none; this default is passed with --channel):".to_string()
    } else {
        "channels:".to_string()
    }];
    lines.extend(env.effective_channels().iter().map(|c| format!("  - {c}")));
    lines.push("dependencies:".to_string());
    lines.extend(env.conda.iter().map(|d| format!("  - {d}")));
    if env.adds_pip() {
        lines.push("  - pip  (added by micromamba for the pip: list)".to_string());
    }
    if !env.pip.is_empty() {
        lines.push("  - pip:".to_string());
        lines.extend(env.pip.iter().map(|p| format!("    - {p}")));
    }
    lines
}

/// The built-in labels in a fixed order, then `--label`s; a `--label` with a
/// built-in key replaces that label in place.
fn labels(opts: &Options, title: &str, path: &Path, sha256: &str) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = Vec::new();
    if !opts.reproducible {
        labels.push((
            "org.opencontainers.image.created".to_string(),
            opts.created.to_rfc3339_opts(SecondsFormat::Secs, true),
        ));
    }
    labels.push((
        "org.opencontainers.image.title".to_string(),
        title.to_string(),
    ));
    if let Some(tag) = &opts.tag {
        labels.push(("org.opencontainers.image.version".to_string(), tag.clone()));
    }
    labels.push((SOURCE_FILE_LABEL.to_string(), display_name(path)));
    labels.push((SOURCE_SHA256_LABEL.to_string(), sha256.to_string()));
    for (key, value) in &opts.labels {
        match labels.iter_mut().find(|(k, _)| k == key) {
            Some(existing) => existing.1 = value.clone(),
            None => labels.push((key.clone(), value.clone())),
        }
    }
    labels
}

fn warn_about_environment(env: &Environment, path: &Path) {
    let shown = path.display();
    for (key, line) in &env.ignored_keys {
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        if key == "prefix" {
            tracing::warn!(
                "`prefix` in `{shown}`{at} is ignored: the image places the environment \
                 under `--env-prefix`"
            );
        } else {
            tracing::warn!(
                "unknown key `{key}` in `{shown}`{at} is ignored: absconda reads `name`, \
                 `channels`, `dependencies` and `variables`"
            );
        }
    }
    if let Some(raw) = &env.name {
        let safe = env.safe_name();
        if *raw != safe {
            tracing::warn!(
                "environment name `{raw}` in `{shown}` is used as `{safe}`, which is safe \
                 for paths and image names"
            );
        }
    }
    if env.conda.is_empty() && env.pip.is_empty() {
        tracing::warn!("`{shown}` lists no dependencies: the image will hold an empty environment");
    }
    for requirement in &env.pip {
        if refers_to_local_file(requirement) {
            tracing::warn!(
                "pip requirement `{requirement}` in `{shown}` refers to a local file, which \
                 is not sent to the builder"
            );
        }
    }
    for (name, _) in &env.variables {
        if matches!(name.as_str(), "PATH" | "CONDA_PREFIX" | "CONDA_DEFAULT_ENV") {
            tracing::warn!(
                "variable `{name}` in `{shown}` replaces the value absconda sets for the \
                 environment"
            );
        }
    }
}

fn warn_about_requirements(requirements: &[String], path: &Path) {
    let shown = path.display();
    if requirements.is_empty() {
        tracing::warn!("`{shown}` lists no requirements: the image will be the bare Python image");
    }
    for requirement in requirements {
        if refers_to_local_file(requirement) {
            tracing::warn!(
                "requirement `{requirement}` in `{shown}` refers to a local file, which is \
                 not sent to the builder"
            );
        }
    }
}

/// Warns about options that do not apply to the chosen input.
fn warn_unused(opts: &Options, checked: &CheckedOptions, mode: &str, which: &[&str]) {
    if which.contains(&"builder") && checked.builder_base.is_some() {
        tracing::warn!("`--builder-base` has no effect with `{mode}`");
    }
    if which.contains(&"env-prefix") && opts.env_prefix.is_some() {
        tracing::warn!("`--env-prefix` has no effect with `{mode}`");
    }
    if which.contains(&"single-stage") && opts.single_stage {
        tracing::warn!("`--single-stage` has no effect with `{mode}`: its image has one stage");
    }
}

/// pip lines that name other files (`-r other.txt`, `-e .`, `./pkg`): those
/// files are not in the build context.
fn refers_to_local_file(requirement: &str) -> bool {
    let r = requirement.trim_start();
    [
        "-r",
        "-c",
        "--requirement",
        "--constraint",
        "-e",
        "--editable",
        "./",
        "../",
        "/",
        "file:",
    ]
    .iter()
    .any(|prefix| r.starts_with(prefix))
        || r == "."
}

/// The lines of a requirements file that are requirements or options.
fn requirement_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| match line.find(" #") {
            Some(at) => &line[..at],
            None => line,
        })
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.chars().filter(|c| !c.is_control()).collect())
        .collect()
}

/// The original named a requirements image after the file, and `python-app`
/// when the file is the usual `requirements.txt`.
fn requirements_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem.is_empty() || stem == "requirements" {
        "python-app".to_string()
    } else {
        env::safe_name(&stem)
    }
}

/// `analysis.tar.gz` → `analysis`, as the original named archive images.
fn archive_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [
        ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar",
    ] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return stem.to_string();
        }
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The archive formats `ADD` unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Gzip,
    Bzip2,
    Xz,
    Tar,
}

impl ArchiveKind {
    fn extension(self) -> &'static str {
        match self {
            ArchiveKind::Gzip => ".tar.gz",
            ArchiveKind::Bzip2 => ".tar.bz2",
            ArchiveKind::Xz => ".tar.xz",
            ArchiveKind::Tar => ".tar",
        }
    }

    /// Recognises an archive by its first bytes, as `ADD` does: a zip or
    /// zstd archive would be copied in as a file, not unpacked.
    fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(ArchiveKind::Gzip)
        } else if head.starts_with(b"BZh") {
            Some(ArchiveKind::Bzip2)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(ArchiveKind::Xz)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(ArchiveKind::Tar)
        } else {
            None
        }
    }
}

/// Hashes an archive without holding it in memory (they run to gigabytes)
/// and recognises its format from the first block.
fn hash_archive(path: &Path) -> Result<(String, ArchiveKind), DockerfileError> {
    let read_error = |source| DockerfileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut head: Vec<u8> = Vec::with_capacity(512);
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(read_error(err)),
        };
        if head.len() < 512 {
            let take = (512 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
    }
    let kind = ArchiveKind::sniff(&head).ok_or_else(|| DockerfileError::NotATarball {
        path: path.to_path_buf(),
    })?;
    Ok((hex::encode(hasher.finalize()), kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn fixed_time() -> DateTime<Utc> {
        match Utc.with_ymd_and_hms(2026, 11, 5, 9, 30, 0) {
            chrono::LocalResult::Single(t) => t,
            other => panic!("bad fixed time: {other:?}"),
        }
    }

    #[test]
    fn default_tag_is_the_utc_date() {
        assert_eq!(default_tag(fixed_time()), "20261105");
    }

    #[test]
    fn prefixes() {
        let ok = [
            ("/opt/conda/envs", "/opt/conda/envs"),
            ("/opt/envs/", "/opt/envs"),
            ("//srv//envs", "/srv/envs"),
        ];
        for (input, want) in ok {
            match check_prefix(input) {
                Ok(got) => assert_eq!(got, want, "{input:?}"),
                Err(err) => panic!("{input:?}: {err}"),
            }
        }
        for bad in [
            "relative/envs",
            "/",
            "/opt/../etc",
            "/opt/my envs",
            "/opt/$HOME",
            "",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn images() {
        for ok in [
            "debian:bookworm-slim",
            "ghcr.io/lab/base:1.0",
            "127.0.0.1:5000/micromamba@sha256:abc123",
        ] {
            assert!(check_image("--runtime-base", ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "debian bookworm", "debian\nRUN rm -rf /", "a;b"] {
            assert!(check_image("--runtime-base", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_checks() {
        assert!(check_label("org.example.team", "genomics lab").is_ok());
        assert!(check_label("a", "").is_ok());
        assert!(check_label("", "x").is_err());
        assert!(check_label("with space", "x").is_err());
        assert!(check_label("k", "two\nlines").is_err());
    }

    #[test]
    fn user_labels_override_built_in_ones_in_place() {
        let mut opts = Options::new(fixed_time());
        opts.tag = Some("v1".into());
        opts.labels = vec![
            ("org.opencontainers.image.title".into(), "Custom".into()),
            ("team".into(), "genomics".into()),
        ];
        let got = labels(&opts, "analysis", Path::new("dir/env.yaml"), "abc");
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "org.opencontainers.image.created",
                "org.opencontainers.image.title",
                "org.opencontainers.image.version",
                SOURCE_FILE_LABEL,
                SOURCE_SHA256_LABEL,
                "team",
            ]
        );
        assert_eq!(got[0].1, "2026-11-05T09:30:00Z");
        assert_eq!(got[1].1, "Custom");
        assert_eq!(got[3].1, "env.yaml");
    }

    #[test]
    fn archive_names_and_kinds() {
        let stems = [
            ("analysis.tar.gz", "analysis"),
            ("dir/env.tgz", "env"),
            ("x.tar.bz2", "x"),
            ("x.tar", "x"),
            ("weird.zip", "weird"),
        ];
        for (input, want) in stems {
            assert_eq!(archive_stem(Path::new(input)), want, "{input:?}");
        }
        let mut tar_block = vec![0u8; 512];
        tar_block[257..262].copy_from_slice(b"ustar");
        assert_eq!(
            ArchiveKind::sniff(&[0x1f, 0x8b, 8, 0]),
            Some(ArchiveKind::Gzip)
        );
        assert_eq!(ArchiveKind::sniff(b"BZh91AY"), Some(ArchiveKind::Bzip2));
        assert_eq!(ArchiveKind::sniff(&tar_block), Some(ArchiveKind::Tar));
        assert_eq!(ArchiveKind::sniff(b"PK\x03\x04"), None);
        assert_eq!(ArchiveKind::sniff(b""), None);
    }

    #[test]
    fn requirements_parsing_and_naming() {
        let text = "# pinned\nrequests==2.31.0  # http\n\n  rich\n-r other.txt\n";
        assert_eq!(
            requirement_lines(text),
            ["requests==2.31.0", "rich", "-r other.txt"]
        );
        assert!(refers_to_local_file("-r other.txt"));
        assert!(refers_to_local_file("-e ."));
        assert!(refers_to_local_file("./pkg"));
        assert!(!refers_to_local_file("requests"));
        assert!(!refers_to_local_file("git+https://github.com/org/repo.git"));
        assert_eq!(
            requirements_name(Path::new("requirements.txt")),
            "python-app"
        );
        assert_eq!(requirements_name(Path::new("dev/Web-API.txt")), "web-api");
    }
}
