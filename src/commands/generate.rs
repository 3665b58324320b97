//! `absconda generate`: print the Dockerfile absconda would build with.
//!
//! Users run it to read or keep the Dockerfile, so stdout carries the
//! Dockerfile and nothing else (warnings and hints go to stderr), and
//! `--output` replaces the file atomically: an editor or a `docker build`
//! reading it never sees half a Dockerfile.
//!
//! The flags that shape the Dockerfile live in [`SourceArgs`] and
//! [`DockerfileArgs`] so that `absconda build` can flatten the same ones.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;

use crate::dockerfile::{self, Generated, Options, Source};

/// `absconda generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub dockerfile: DockerfileArgs,

    /// Record TAG as the image version (`org.opencontainers.image.version`).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// Write the Dockerfile to PATH (replaced atomically) instead of stdout.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,
}

/// What the image is made from: exactly one of the three.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// A conda environment file (environment.yaml).
    #[arg(long, short = 'f', value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// A pip requirements file: a python:<version>-slim image.
    #[arg(long, short = 'r', value_name = "PATH")]
    pub requirements: Option<PathBuf>,

    /// A conda-pack archive (.tar.gz), unpacked into the runtime image.
    #[arg(long, short = 't', value_name = "PATH")]
    pub tarball: Option<PathBuf>,
}

impl SourceArgs {
    /// The chosen input. clap's group guarantees exactly one is set; the
    /// error is for callers that build the struct by hand.
    pub fn source(&self) -> anyhow::Result<Source> {
        match (&self.file, &self.requirements, &self.tarball) {
            (Some(path), None, None) => Ok(Source::Environment(path.clone())),
            (None, Some(path), None) => Ok(Source::Requirements(path.clone())),
            (None, None, Some(path)) => Ok(Source::Tarball(path.clone())),
            _ => anyhow::bail!("give exactly one of `--file`, `--requirements` and `--tarball`"),
        }
    }
}

/// How the Dockerfile is shaped and labelled (shared with `build`).
#[derive(Debug, Clone, Default, Args)]
pub struct DockerfileArgs {
    /// Build and run in one micromamba image instead of a builder stage and
    /// a slim runtime stage.
    #[arg(long)]
    pub single_stage: bool,

    /// Image of the stage that creates the environment
    /// [default: mambaorg/micromamba:1.5.5].
    #[arg(long, value_name = "IMAGE")]
    pub builder_base: Option<String>,

    /// Image the environment runs in [default: debian:bookworm-slim, or
    /// python:3.11-slim with --requirements].
    #[arg(long, value_name = "IMAGE")]
    pub runtime_base: Option<String>,

    /// Absolute directory the environment is placed under; it lives at
    /// DIR/<name> [default: /opt/conda/envs].
    #[arg(long, value_name = "DIR")]
    pub env_prefix: Option<String>,

    /// Add a label to the image (repeatable); overrides absconda's own.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Leave out the creation time label, so the same inputs give the same
    /// Dockerfile byte for byte.
    #[arg(long)]
    pub reproducible: bool,
}

impl DockerfileArgs {
    /// The library's options for these flags.
    pub fn options(&self, tag: Option<String>, created: DateTime<Utc>) -> Options {
        Options {
            single_stage: self.single_stage,
            builder_base: self.builder_base.clone(),
            runtime_base: self.runtime_base.clone(),
            env_prefix: self.env_prefix.clone(),
            labels: self.labels.clone(),
            tag,
            reproducible: self.reproducible,
            created,
        }
    }
}

fn parse_label(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got `{arg}`")),
    }
}

/// The creation time: `SOURCE_DATE_EPOCH` when set (the reproducible-builds
/// convention), the clock otherwise.
pub fn creation_time() -> anyhow::Result<DateTime<Utc>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => {
            let seconds: i64 = value
                .trim()
                .parse()
                .with_context(|| format!("`SOURCE_DATE_EPOCH` is not a number: `{value}`"))?;
            DateTime::from_timestamp(seconds, 0)
                .with_context(|| format!("`SOURCE_DATE_EPOCH` is out of range: `{value}`"))
        }
        Err(_) => Ok(Utc::now()),
    }
}

/// Runs `absconda generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let source = args.source.source()?;
    let opts = args.dockerfile.options(args.tag.clone(), creation_time()?);
    let generated = dockerfile::generate(&source, &opts).with_context(|| {
        format!(
            "cannot generate a Dockerfile from `{}`",
            source.path().display()
        )
    })?;

    match &args.output {
        Some(path) => {
            write_atomically(path, generated.dockerfile.as_bytes())
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            eprintln!("wrote `{}`", path.display());
        }
        None => {
            let mut stdout = io::stdout().lock();
            stdout
                .write_all(generated.dockerfile.as_bytes())
                .and_then(|()| stdout.flush())
                .context("cannot write the Dockerfile to stdout")?;
        }
    }
    print_context_hint(&generated);
    Ok(())
}

/// The Dockerfile takes its inputs from the build context; a user who runs
/// `docker build` on it by hand has to put them there.
fn print_context_hint(generated: &Generated) {
    for file in &generated.files {
        eprintln!(
            "hint: `docker build` needs `{local}` in the build context as `{name}` \
             (`absconda build` puts it there): mkdir -p {dir} && cp {quoted} {name}",
            local = file.local_path.display(),
            name = file.name_in_context,
            dir = dockerfile::CONTEXT_DIR,
            quoted = dockerfile::sh_quote(&file.local_path.to_string_lossy()),
        );
    }
}

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk and
/// renames it over `path`, so readers see the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".absconda-{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        generate: GenerateArgs,
    }

    fn parse(args: &[&str]) -> Result<GenerateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("absconda-generate").chain(args.iter().copied()))
            .map(|cli| cli.generate)
    }

    #[test]
    fn exactly_one_source() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--file", "a.yaml", "--tarball", "b.tar.gz"]).is_err());
        let Ok(args) = parse(&["-f", "env.yaml"]) else {
            panic!("-f should parse");
        };
        assert!(
            matches!(args.source.source(), Ok(Source::Environment(p)) if p == Path::new("env.yaml"))
        );
        let Ok(args) = parse(&["--requirements", "req.txt"]) else {
            panic!("--requirements should parse");
        };
        assert!(matches!(args.source.source(), Ok(Source::Requirements(_))));
    }

    #[test]
    fn options_from_flags() {
        let Ok(args) = parse(&[
            "--file",
            "env.yaml",
            "--single-stage",
            "--builder-base",
            "b:1",
            "--runtime-base",
            "r:2",
            "--env-prefix",
            "/srv/envs",
            "--label",
            "team=genomics",
            "--label",
            "note=a=b",
            "--tag",
            "2026-11",
            "--reproducible",
            "-o",
            "Dockerfile",
        ]) else {
            panic!("flags should parse");
        };
        let now = Utc::now();
        let opts = args.dockerfile.options(args.tag.clone(), now);
        assert!(opts.single_stage && opts.reproducible);
        assert_eq!(opts.builder_base.as_deref(), Some("b:1"));
        assert_eq!(opts.runtime_base.as_deref(), Some("r:2"));
        assert_eq!(opts.env_prefix.as_deref(), Some("/srv/envs"));
        assert_eq!(
            opts.labels,
            [
                ("team".to_string(), "genomics".to_string()),
                ("note".to_string(), "a=b".to_string())
            ]
        );
        assert_eq!(opts.tag.as_deref(), Some("2026-11"));
        assert_eq!(opts.created, now);
        assert_eq!(args.output.as_deref(), Some(Path::new("Dockerfile")));
    }

    #[test]
    fn bad_label_is_rejected_by_clap() {
        assert!(parse(&["-f", "e.yaml", "--label", "novalue"]).is_err());
        assert!(parse(&["-f", "e.yaml", "--label", "=v"]).is_err());
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(err) => panic!("{err}"),
        };
        let path = dir.path().join("Dockerfile");
        for content in ["first\n", "second\n"] {
            if let Err(err) = write_atomically(&path, content.as_bytes()) {
                panic!("{err}");
            }
            assert_eq!(fs::read_to_string(&path).ok().as_deref(), Some(content));
        }
        let leftovers: Vec<_> = match fs::read_dir(dir.path()) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect(),
            Err(err) => panic!("{err}"),
        };
        assert_eq!(leftovers, [std::ffi::OsString::from("Dockerfile")]);
    }

    #[test]
    fn run_writes_the_dockerfile_to_output() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(err) => panic!("{err}"),
        };
        let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conda/analysis.yaml");
        let out = dir.path().join("Dockerfile");
        let (Some(env_arg), Some(out_arg)) = (env.to_str(), out.to_str()) else {
            panic!("non-UTF-8 temp path");
        };
        let Ok(args) = parse(&["--file", env_arg, "--reproducible", "--output", out_arg]) else {
            panic!("flags should parse");
        };
        if let Err(err) = run(&args) {
            panic!("{err:#}");
        }
        let written = fs::read_to_string(&out).unwrap_or_default();
        let opts = args.dockerfile.options(None, Utc::now());
        let Ok(want) = dockerfile::generate(&Source::Environment(env), &opts) else {
            panic!("generation failed");
        };
        assert_eq!(written, want.dockerfile);
        assert!(written.ends_with("CMD [\"python\"]\n"));
    }

    #[test]
    fn run_reports_the_file_and_line_of_a_bad_environment() {
        let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conda/invalid.yaml");
        let Some(env_arg) = env.to_str() else {
            panic!("non-UTF-8 path");
        };
        let Ok(args) = parse(&["--file", env_arg]) else {
            panic!("flags should parse");
        };
        let Err(err) = run(&args) else {
            panic!("an invalid file must fail");
        };
        let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
        assert!(
            chain[0].starts_with("cannot generate a Dockerfile from `"),
            "{chain:?}"
        );
        assert!(chain[1].contains("invalid.yaml` at line 6"), "{chain:?}");
    }
}
