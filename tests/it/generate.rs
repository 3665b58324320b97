//! `absconda build --file/--requirements/--tarball` end to end: the generated
//! Dockerfile is built on the test dockerd and the pushed image is run.
//!
//! Real base images cannot be pulled here and conda cannot download
//! packages, so `tests/fixtures/standin/` makes busybox images named like
//! the real bases, with small `micromamba`/`conda-pack`/`python` scripts.
//! These builds prove the Dockerfile's structure — stages, COPY paths, the
//! files absconda puts into the context, ENV lines, labels — not conda's solver.

use std::path::Path;
use std::sync::OnceLock;

use sha2::Digest;

use crate::support::absconda::{Project, run_pulled, text};
use crate::support::docker::{docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conda")
        .join(name)
        .display()
        .to_string()
}

fn standin_images() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let d = docker();
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/standin/build-images.sh");
        let out = std::process::Command::new("sh")
            .arg(script)
            .arg(crate::support::docker::DOCKER_CLI)
            .env("DOCKER_HOST", &d.host)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stand-in images: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn project(sshd: &Sshd) -> Project {
    let mut p = Project::new(sshd);
    p.with_registry_credentials(registry());
    p
}

#[test]
fn an_environment_file_becomes_an_image_whose_python_is_the_environments() {
    if !ok() {
        return;
    }
    standin_images();
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    for (mode, repo) in [
        ("off", "gen/analysis-legacy"),
        ("on", "gen/analysis-buildkit"),
    ] {
        let p = Project::with_builder(&sshd, &format!("    buildkit: {mode}\n"));
        let mut p = p;
        p.with_registry_credentials(reg);
        let env_file = fixture("analysis.yaml");
        let full = format!("{}/{repo}", reg.addr);
        let mut c = p.cmd();
        c.args([
            "build",
            "--remote-builder",
            "local",
            "--file",
            &env_file,
            "--repository",
            &full,
            "--push",
            "--network",
            "none",
        ]);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{mode}: {}", text(&out));
        // Without --tag the image is tagged with today's date.
        let today = chrono::Utc::now().format("%Y%m%d").to_string();
        assert_eq!(reg.tags(repo), std::slice::from_ref(&today));
        let image = format!("{full}:{today}");
        let run = run_pulled(d, reg, &image, &[]);
        assert_eq!(
            String::from_utf8_lossy(&run.stdout).trim(),
            "absconda stand-in python in /opt/conda/envs/analysis",
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let inspect = d.run(&["image", "inspect", "--format", "{{json .Config}}", &image]);
        let config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let env: Vec<&str> = config["Env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(env.contains(&"CONDA_DEFAULT_ENV=analysis"), "{env:?}");
        assert!(
            env.contains(&"CONDA_PREFIX=/opt/conda/envs/analysis"),
            "{env:?}"
        );
        assert!(env.contains(&"GREETING=hello \"lab\" $USER"), "{env:?}");
        assert!(
            env.iter()
                .any(|e| e.starts_with("PATH=/opt/conda/envs/analysis/bin:")),
            "{env:?}"
        );
        let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&env_file).unwrap()));
        let labels = &config["Labels"];
        assert!(
            labels
                .as_object()
                .unwrap()
                .values()
                .any(|v| v == sha.as_str()),
            "no label with the file's sha256: {labels}"
        );
        assert_eq!(labels["org.opencontainers.image.version"], today.as_str());
        // The environment file travelled in the context and reached the image unchanged.
        let files = reg.files(repo, &today);
        let arrived = files
            .iter()
            .find(|(k, _)| k.ends_with("envs/analysis/conda-meta/environment.yaml"))
            .map(|(_, v)| v.clone());
        assert_eq!(arrived, Some(std::fs::read(&env_file).unwrap()));
    }
}

#[test]
fn requirements_and_conda_pack_tarballs_are_sent_and_built() {
    if !ok() {
        return;
    }
    standin_images();
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let p = project(&sshd);

    let full = format!("{}/gen/pip", reg.addr);
    let out = p
        .cmd()
        .args([
            "build",
            "--remote-builder",
            "local",
            "--requirements",
            &fixture("requirements.txt"),
            "--repository",
            &full,
            "--tag",
            "r1",
            "--push",
            "--network",
            "none",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let files = reg.files("gen/pip", "r1");
    let requested: Vec<&String> = files
        .keys()
        .filter(|k| k.ends_with(".dist-info/REQUESTED"))
        .collect();
    assert!(
        !requested.is_empty(),
        "pip installed nothing: {:?}",
        files.keys().collect::<Vec<_>>()
    );

    let full = format!("{}/gen/tarball", reg.addr);
    let out = p
        .cmd()
        .args([
            "build",
            "--remote-builder",
            "local",
            "--tarball",
            &fixture("analysis.tar.gz"),
            "--repository",
            &full,
            "--tag",
            "t1",
            "--push",
            "--network",
            "none",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = run_pulled(d, reg, &format!("{full}:t1"), &[]);
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("absconda stand-in python in"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn generate_prints_only_the_dockerfile_and_names_the_line_of_a_broken_file() {
    let sshd_free = crate::support::tempdir();
    let bin = crate::support::absconda::BIN;
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--file",
            &fixture("analysis.yaml"),
            "--reproducible",
        ])
        .current_dir(sshd_free.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let df = String::from_utf8(out.stdout).unwrap();
    assert!(
        df.starts_with('#')
            || df.starts_with("ARG")
            || df.starts_with("FROM")
            || df.starts_with("# syntax"),
        "{df}"
    );
    assert!(df.ends_with("\n") && !df.ends_with("\n\n"));
    assert!(!df.contains("org.opencontainers.image.created"));
    let again = std::process::Command::new(bin)
        .args([
            "generate",
            "--file",
            &fixture("analysis.yaml"),
            "--reproducible",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(again.stdout).unwrap(),
        df,
        "not byte-identical"
    );

    let out = std::process::Command::new(bin)
        .args(["generate", "--file", &fixture("invalid.yaml")])
        .output()
        .unwrap();
    // Exit 12: a bad input file (README's exit-code table).
    assert_eq!(out.status.code(), Some(12), "{}", text(&out));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid.yaml") && err.contains("line 6"),
        "{err}"
    );
}

#[test]
fn input_file_errors_exit_12_and_bad_options_exit_2() {
    let dir = crate::support::tempdir();
    let bin = crate::support::absconda::BIN;
    let unclosed = dir.path().join("unclosed.yaml");
    std::fs::write(
        &unclosed,
        "name: x\ndependencies:\n  - numpy: [1.2\n  - scipy\n",
    )
    .unwrap();
    let deep = dir.path().join("deep.yaml");
    std::fs::write(&deep, format!("dependencies: {}", "[".repeat(100_000))).unwrap();
    let missing = dir.path().join("missing.yaml");
    for (file, needle) in [
        (&unclosed, "YAML syntax error"),
        (&deep, "nested more than 64 levels deep"),
        (&missing, "cannot read"),
    ] {
        let start = std::time::Instant::now();
        let out = std::process::Command::new(bin)
            .args(["generate", "--file"])
            .arg(file)
            .output()
            .unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(out.status.code(), Some(12), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && err.starts_with("error:"), "{err}");
        assert!(!err.contains("unsupported"), "{err}");
    }
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--file",
            &fixture("analysis.yaml"),
            "--env-prefix",
            "relative/dir",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn an_environment_without_python_at_another_prefix_is_not_left_with_stale_prefixes() {
    if !ok() {
        return;
    }
    standin_images();
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let p = project(&sshd);
    let dir = crate::support::tempdir();
    let env_file = dir.path().join("rtools.yaml");
    std::fs::write(
        &env_file,
        "name: rtools\nchannels:\n  - bioconda\n  - nodefaults\ndependencies:\n  - r-base=4.3\n  - samtools\n",
    )
    .unwrap();
    let full = format!("{}/gen/rtools", reg.addr);
    let out = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--file"])
        .arg(&env_file)
        .args([
            "--env-prefix",
            "/srv/envs",
            "--repository",
            &full,
            "--tag",
            "r1",
            "--push",
            "--network",
            "none",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let image = format!("{full}:r1");
    // The environment's files name the prefix it lives at.
    let run = run_pulled(d, reg, &image, &["absconda-tool"]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "absconda stand-in tool in /srv/envs/rtools",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // micromamba got the file's channel, and not `nodefaults` as a channel.
    let files = reg.files("gen/rtools", "r1");
    let log = files
        .iter()
        .find(|(k, _)| k.ends_with("srv/envs/rtools/conda-meta/absconda-standin.log"))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    assert!(log.contains("create channels: bioconda file:"), "{log}");
    assert!(!log.contains("nodefaults"), "{log}");
    assert!(!files.keys().any(|k| k.ends_with("rtools/bin/python")));
    // No python, so no `CMD ["python"]`: the runtime image's own applies.
    let inspect = d.run(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Cmd}}",
        &image,
    ]);
    let cmd = String::from_utf8_lossy(&inspect.stdout);
    assert!(!cmd.contains("python"), "{cmd}");

    // A conda-pack archive without python cannot be relocated: the build
    // fails instead of leaving the packed prefix in the files.
    let staging = dir.path().join("env");
    std::fs::create_dir_all(staging.join("bin")).unwrap();
    std::fs::create_dir_all(staging.join("conda-meta")).unwrap();
    let standin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/standin");
    std::fs::copy(
        standin.join("conda-unpack"),
        staging.join("bin/conda-unpack"),
    )
    .unwrap();
    std::fs::write(
        staging.join("bin/absconda-tool"),
        "#!/bin/sh\necho absconda stand-in tool in /opt/conda/envs/rtools\n",
    )
    .unwrap();
    std::fs::write(
        staging.join("conda-meta/absconda-packed-prefix"),
        "/opt/conda/envs/rtools\n",
    )
    .unwrap();
    let archive = dir.path().join("rtools.tar.gz");
    let tar = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&staging)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    let out = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--tarball"])
        .arg(&archive)
        .args([
            "--env-prefix",
            "/srv/envs",
            "--repository",
            &full,
            "--tag",
            "t1",
            "--push",
            "--network",
            "none",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("conda-unpack needs a python"),
        "{}",
        text(&out)
    );
    assert!(!reg.tags("gen/rtools").contains(&"t1".to_string()));
}
