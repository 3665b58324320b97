//! A newcomer's first hour: the builder chosen without `--remote-builder`,
//! and the errors met on the way, each with a next step.

use std::process::{Command, Output};

use crate::support::absconda::{BIN, Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `absconda` in an empty HOME and folder, with `yaml` as its builders file.
fn with_config(yaml: &str) -> (tempfile::TempDir, Command) {
    let t = crate::support::tempdir();
    let cfg = t.path().join("absconda-remote.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    std::fs::create_dir_all(t.path().join("home")).unwrap();
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", t.path().join("home"))
        .current_dir(t.path());
    (t, c)
}

#[test]
fn default_builder_is_used_and_named_in_the_first_line() {
    crate::require!(SSHD, "dockerd", "docker-registry", "htpasswd");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    // A second builder nobody can reach: the build must not try it.
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    let yaml = yaml.replace(
        "builders:\n",
        "default_builder: local\nbuilders:\n  elsewhere:\n    host: 127.0.0.1\n    port: 1\n",
    );
    std::fs::write(&p.config, yaml).unwrap();
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY hi /hi\n"));
    p.file("hi", "chosen by default\n");
    let repo = format!("{}/firsthour/default", reg.addr);
    let out = p
        .cmd()
        .args(["build", "--context"])
        .arg(&p.context)
        .args(["--repository", &repo, "--tag", "v1", "--push"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains("building on `local`") && first.contains("`default_builder:`"),
        "first line: {first}\n{err}"
    );
    assert_eq!(
        reg.files("firsthour/default", "v1")
            .get("hi")
            .map(|v| v.as_slice()),
        Some(&b"chosen by default\n"[..])
    );

    // ABSCONDA_REMOTE_BUILDER still wins over `default_builder:`.
    let out = p
        .cmd()
        .env("ABSCONDA_REMOTE_BUILDER", "elsewhere")
        .args(["build", "--context"])
        .arg(&p.context)
        .args(["--repository", &repo])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).starts_with("absconda: building on `elsewhere`\n"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_only_builder_is_chosen_without_the_flag() {
    // Port 1 on loopback refuses: the point is which builder was tried.
    let (t, mut c) = with_config("builders:\n  solo:\n    host: 127.0.0.1\n    port: 1\n");
    std::fs::write(t.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let out = c
        .args(["build", "--repository", "x/y", "--context", "."])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.contains("building on `solo` (the only builder in `")),
        "{err}"
    );
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn two_builders_and_no_default_is_a_usage_error_with_the_fix() {
    let (_t, mut c) =
        with_config("builders:\n  one:\n    host: 127.0.0.1\n  two:\n    host: 127.0.0.2\n");
    let out = c.args(["build", "--repository", "x/y"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("no builder chosen"), "{err}");
    assert!(err.contains("(one, two)"), "{err}");
    assert!(
        err.contains("hint: pass `--remote-builder one`") && err.contains("`default_builder: one`"),
        "{err}"
    );
}

#[test]
fn a_default_builder_that_does_not_exist_gets_a_did_you_mean() {
    let (_t, mut c) = with_config(
        "default_builder: buidler\nbuilders:\n  builder:\n    host: 127.0.0.1\n  other:\n    host: 127.0.0.2\n",
    );
    let out = c.args(["build", "--repository", "x/y"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("no builder named `buidler`")
            && stderr(&out).contains("(did you mean `builder`?)"),
        "{}",
        text(&out)
    );
}
