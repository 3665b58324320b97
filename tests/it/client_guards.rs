//! What the client keeps from the builder: inputs that would be written
//! through a symlink in the context, a Dockerfile that is a symlink out of
//! the context, registry credentials meant for another registry.

use std::os::unix::fs::symlink;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

/// Files under `dir` (not following symlinks) whose bytes contain `needle`.
fn grep_tree(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = p.symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            hits.extend(grep_tree(&p, needle));
        } else if md.is_file()
            && std::fs::read(&p).is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle))
        {
            hits.push(p);
        }
    }
    hits
}

#[test]
fn an_input_under_a_symlinked_absconda_folder_is_refused_and_nothing_is_written_outside() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    // The builder is this machine: `outside` is a folder on the builder.
    let outside = p.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    symlink(&outside, p.context.join(".absconda")).unwrap();
    // A first build keeps the symlink in the builder's copy.
    let out = p.build("guards/first", &["--tag", "t"]);
    assert!(out.status.success(), "{}", text(&out));

    let req = p.dir.path().join("req.txt");
    std::fs::write(&req, "requests==2.31.0\n").unwrap();
    let out = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .arg("--requirements")
        .arg(&req)
        .args(["--repository", "guards/second", "--tag", "t"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("error:"))
            && err.contains(".absconda/requirements.txt")
            && err.contains(&format!("{}", p.context.join(".absconda").display()))
            && err.contains("symlink"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written through the symlink"
    );
}

#[test]
fn a_dockerfile_linking_out_of_the_context_is_refused_and_one_linking_inside_is_used() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    let secret = p.dir.path().join("secret.txt");
    std::fs::write(&secret, "SECRETWORD4711 do not send\n").unwrap();
    p.file("x", "x\n");
    symlink("../secret.txt", p.context.join("Dockerfile")).unwrap();
    let out = p.build("guards/outside", &["--tag", "t"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let all = text(&out);
    assert!(!all.contains("SECRETWORD4711"), "{all}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("error:"))
            && err.contains("outside the build context")
            && err.contains("secret.txt"),
        "{err}"
    );
    assert!(
        grep_tree(&p.workspace, b"SECRETWORD4711").is_empty(),
        "the file reached the builder"
    );

    // A link to a Dockerfile inside the context is resolved on the client.
    std::fs::remove_file(p.context.join("Dockerfile")).unwrap();
    p.file(
        "docker/Dockerfile.real",
        &format!("FROM {BASE_IMAGE}\nCOPY x /from-inside\n"),
    );
    symlink("docker/Dockerfile.real", p.context.join("Dockerfile")).unwrap();
    let out = p.build("guards/inside", &["--tag", "t"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = d.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "guards/inside:t",
        "cat",
        "/from-inside",
    ]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "x\n");
}

#[test]
fn scoped_registry_credentials_reach_only_their_registry() {
    if !ok() || !crate::support::require("docker-registry") {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY x /x\n"));
    p.file("x", "x\n");
    // The builder's docker records every `docker login` it is asked for.
    let logins = p.dir.path().join("logins");
    let wrapper = p.dir.path().join("docker-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = login ] && echo \"$*\" >>'{}'\nexec {DOCKER_CLI} \"$@\"\n",
            logins.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap().replace(
        &format!("docker: {DOCKER_CLI}"),
        &format!("docker: {}", wrapper.display()),
    );
    std::fs::write(&p.config, config).unwrap();
    let repo = format!("{}/scoped/app", reg.addr);

    // Scoped to another registry: not sent.
    p.env
        .push(("ABSCONDA_REGISTRY".into(), "127.0.0.1:1".into()));
    let out = p.build(&repo, &["-v", "--tag", "t1", "--push"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!logins.exists(), "docker login ran: {}", text(&out));
    assert!(
        err.contains("are for `127.0.0.1:1` (ABSCONDA_REGISTRY)") && err.contains("not sent"),
        "{err}"
    );
    assert!(!text(&out).contains(reg.password));

    // Scoped to the repository's registry: sent, and -v says so.
    p.env.retain(|(k, _)| k != "ABSCONDA_REGISTRY");
    p.env.push(("ABSCONDA_REGISTRY".into(), reg.addr.clone()));
    let out = p.build(&repo, &["-v", "--tag", "t2", "--push"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "credentials for `{}` (user `{}`) from ABSCONDA_REGISTRY_USER",
            reg.addr, reg.user
        )),
        "{err}"
    );
    assert!(!text(&out).contains(reg.password));
    let recorded = std::fs::read_to_string(&logins).unwrap();
    assert!(
        recorded.contains(&reg.addr) && recorded.contains(reg.user),
        "{recorded}"
    );
    assert!(reg.tags("scoped/app").contains(&"t2".to_string()));
}

/// Runs `cmd` and returns its exit code, stderr and peak resident memory in
/// KiB: the kernel's high-water mark (`VmHWM` in `/proc/<pid>/status`) of
/// that process, sampled until it exits. (`wait4`'s `ru_maxrss` would not
/// do: a child spawned with vfork inherits its parent's high-water mark at
/// `exec`.)
fn run_measured(mut cmd: std::process::Command, dir: &std::path::Path) -> (i32, String, u64) {
    let err_path = dir.join("measured.err");
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "absconda did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let err = std::fs::read_to_string(&err_path).unwrap();
    (status.code().unwrap_or(-1), err, peak)
}

#[test]
fn a_builder_docker_printing_a_gigabyte_in_the_probe_leaves_the_client_small() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY x /x\n"));
    p.file("x", "x\n");
    // `docker version` on the builder prints 1 GiB without a newline.
    let wrapper = p.dir.path().join("docker-flood");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = version ]; then head -c 1073741824 /dev/zero | tr '\\0' x; exit 0; fi\nexec {DOCKER_CLI} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap().replace(
        &format!("docker: {DOCKER_CLI}"),
        &format!("docker: {}", wrapper.display()),
    );
    std::fs::write(&p.config, config).unwrap();
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args(["--repository", "flood/app", "--tag", "t"]);
    let (code, err, max_rss_kib) = run_measured(c, p.dir.path());
    eprintln!("client peak RSS with a 1 GiB probe: {max_rss_kib} KiB");
    assert!(max_rss_kib < 64 * 1024, "peak RSS {max_rss_kib} KiB: {err}");
    assert_eq!(code, 9, "{err}");
    assert!(
        err.contains("error: build on builder `local` failed")
            && err.contains("docker on `local` is not usable")
            && err.contains("more than 1.0 MiB on stdout"),
        "{err}"
    );
}
