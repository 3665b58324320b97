//! The smaller `docker build` flags: `-f -`, `Dockerfile.dockerignore`,
//! `--add-host`, `--shm-size`, `--ulimit`, `--progress quiet`.

use std::process::Stdio;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

fn run_in_image(image: &str, script: &str) -> String {
    let out = docker().run(&[
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "sh",
        "-c",
        script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dockerfile_from_stdin_and_dockerfile_specific_ignore() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.file("a.txt", "a\n");
    p.file("b.txt", "b\n");
    p.file(".dockerignore", "a.txt\n");
    p.file(
        "app.Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"),
    );
    p.file("app.Dockerfile.dockerignore", "b.txt\n");

    // `-f -`: the Dockerfile from stdin, the context's `.dockerignore` applies.
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "parity/stdin",
            "-f",
            "-",
            "--progress",
            "quiet",
            "--network",
            "none",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        write!(
            stdin,
            "FROM {BASE_IMAGE}\nCOPY . /ctx/\nRUN echo from-stdin > /marker\n"
        )
        .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        !all.contains("#1 [internal] load build definition"),
        "--progress quiet still streamed BuildKit's progress: {all}"
    );
    let listing = run_in_image("parity/stdin:latest", "cat /marker; ls /ctx");
    assert!(listing.starts_with("from-stdin\n"), "{listing}");
    assert!(
        listing.contains("b.txt") && !listing.contains("a.txt"),
        "{listing}"
    );

    // `app.Dockerfile.dockerignore` wins over `.dockerignore`.
    let app = p.context.join("app.Dockerfile");
    let out = p.build("parity/specific", &["--dockerfile", app.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = run_in_image("parity/specific:latest", "ls /ctx");
    assert!(
        listing.contains("a.txt") && !listing.contains("b.txt"),
        "{listing}"
    );
}

#[test]
fn run_options_reach_the_steps() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let script = "grep fancy.test /etc/hosts > /hosts; \
                  ulimit -n > /nofile; \
                  busybox df -k /dev/shm | awk 'NR==2 {print $2}' > /shm";
    for mode in ["off", "on"] {
        let p = Project::with_builder(&sshd, &format!("    buildkit: {mode}\n"));
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {script}\n"));
        let repo = format!("parity/run-{mode}");
        let mut flags = vec!["--network", "none", "--add-host", "fancy.test:10.1.2.3"];
        if mode == "off" {
            // docker 20.10's BuildKit takes these flags but does not apply them.
            flags.extend(["--shm-size", "96m", "--ulimit", "nofile=1234:2345"]);
        }
        let out = p.build(&repo, &flags);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let got = run_in_image(&format!("{repo}:latest"), "cat /hosts /nofile /shm");
        let mut lines = got.lines();
        let hosts = lines.next().unwrap_or_default();
        assert!(
            hosts.contains("10.1.2.3") && hosts.contains("fancy.test"),
            "{mode}: {got}"
        );
        if mode == "off" {
            assert_eq!(lines.next(), Some("1234"), "{got}");
            assert_eq!(lines.next(), Some("98304"), "{got}");
        }
    }
}
