//! What the client refuses before anything reaches the builder: inputs
//! that would be written through a symlink in the context, and a Dockerfile
//! that is a symlink out of the context.

use std::os::unix::fs::symlink;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
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
        err.starts_with("error:")
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
        err.starts_with("error:")
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
