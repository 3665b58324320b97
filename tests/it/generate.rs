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
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid.yaml") && err.contains("line 6"),
        "{err}"
    );
}
