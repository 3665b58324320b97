//! `--secret`: the value reaches a `RUN --mount=type=secret` step, and is
//! found nowhere else: not in the image, not on the builder's disk, not in
//! the process list, not in absconda's output or state file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::Digest;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::wait_until;

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

fn random_value(what: &str) -> String {
    format!("{what}-{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u128::from_le_bytes(b)
}

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Files under `roots` (recursively) that contain `needle`.
fn files_containing(roots: &[&Path], needle: &str) -> Vec<String> {
    let mut cmd = Command::new("grep");
    cmd.args(["-rlsF", "--", needle]);
    for r in roots {
        if r.exists() {
            cmd.arg(r);
        }
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn process_list() -> String {
    let out = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The secrets folders the workspace's builds recorded (one per run).
fn recorded_secret_folders(ws: &Path) -> Vec<(PathBuf, PathBuf)> {
    match std::fs::read_dir(ws.join(".secrets")) {
        Ok(rd) => rd
            .map(|e| {
                let record = e.unwrap().path();
                let dir = std::fs::read_to_string(&record).unwrap();
                (record, PathBuf::from(dir.trim()))
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_secret_reaches_the_step_and_nothing_else() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    let file_secret = random_value("file-secret");
    let env_secret = random_value("env-secret");
    let secret_file = p.dir.path().join("token.txt");
    std::fs::write(&secret_file, &file_secret).unwrap();
    p.env.push(("API_TOKEN".into(), env_secret.clone()));
    let marker = format!("step-{:08x}", rand_u128() as u32);
    // The step proves it read both values (their hashes) and then holds
    // still until the test has looked at the machine.
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE}\n\
             RUN --mount=type=secret,id=token --mount=type=secret,id=api \
             sha256sum < /run/secrets/token > /proof-token && \
             sha256sum < /run/secrets/api > /proof-api && \
             echo {marker} && sleep 4 && echo {marker} done\n"
        ),
    );
    let image = "secrets/app:t";
    let mut c = p.cmd();
    c.args(["-vv", "build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "secrets/app",
            "--tag",
            "t",
            "--network",
            "none",
        ])
        .args(["--no-cache", "--secret"])
        .arg(format!("id=token,src={}", secret_file.display()))
        .args(["--secret", "id=api,env=API_TOKEN"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();

    // While the step runs: the values are in no process's arguments, and
    // on the builder only in the run's tmpfs folder.
    let ws = p.workspace.clone();
    let mut during = Vec::new();
    wait_until(
        "the secret-reading step running",
        Duration::from_secs(120),
        || {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            let ps = process_list();
            if ps.contains(&marker) && !recorded_secret_folders(&ws).is_empty() {
                during.push(ps);
                true
            } else {
                false
            }
        },
    );
    if let Ok(Some(_)) = child.try_wait() {
        panic!(
            "the build ended early: {}",
            text(&child.wait_with_output().unwrap())
        );
    }
    for ps in &during {
        assert!(!ps.contains(&file_secret) && !ps.contains(&env_secret));
    }
    let folders = recorded_secret_folders(&ws);
    assert_eq!(folders.len(), 1, "{folders:?}");
    let (record, folder) = folders[0].clone();
    assert!(
        folder.to_string_lossy().starts_with("/dev/shm/absconda-"),
        "not on the tmpfs: {}",
        folder.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", folder.display());
    // BuildKit itself mounts a tmpfs for the step's secrets under its data
    // root; nothing may be on a disk-backed file system.
    let disk_roots = [ws.as_path(), p.home.as_path(), d.root.as_path()];
    let on_disk: Vec<String> = files_containing(&disk_roots, &file_secret)
        .into_iter()
        .filter(|f| {
            let t = Command::new("stat")
                .args(["-f", "-c", "%T", f])
                .output()
                .unwrap();
            String::from_utf8_lossy(&t.stdout).trim() != "tmpfs"
        })
        .collect();
    assert_eq!(
        on_disk,
        Vec::<String>::new(),
        "a secret on disk during the build"
    );

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        !all.contains(&file_secret) && !all.contains(&env_secret),
        "a secret in absconda's -vv output"
    );
    assert!(all.contains(&marker), "the step did not run: {all}");

    // The step saw both values.
    let run = d.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "cat",
        "/proof-token",
        "/proof-api",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        format!(
            "{}  -\n{}  -\n",
            sha256_hex(file_secret.as_bytes()),
            sha256_hex(env_secret.as_bytes())
        ),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Not in the image: its layers, config and history.
    let saved = d.run(&["save", image]);
    assert!(saved.status.success());
    assert!(!saved.stdout.is_empty());
    for v in [&file_secret, &env_secret] {
        assert!(
            !saved.stdout.windows(v.len()).any(|w| w == v.as_bytes()),
            "a secret is in `docker save`"
        );
    }
    let history = d.run(&["history", "--no-trunc", image]);
    assert!(!String::from_utf8_lossy(&history.stdout).contains(&file_secret));

    // Gone from the builder: the tmpfs folder and its record removed.
    assert!(!folder.exists(), "{} left behind", folder.display());
    assert!(!record.exists());
    let shm = PathBuf::from("/dev/shm");
    for v in [&file_secret, &env_secret] {
        let mut roots = disk_roots.to_vec();
        roots.push(&shm);
        let found: Vec<String> = files_containing(&roots, v);
        assert_eq!(found, Vec::<String>::new(), "a secret left on the builder");
    }
    let state = std::fs::read_to_string(p.home.join(".local/share/absconda/remote-state.json"))
        .unwrap_or_default();
    assert!(!state.contains(&file_secret) && !state.contains(&env_secret));
    assert!(p.run_folders().is_empty());
}

#[test]
fn a_killed_supervisor_leaves_the_secret_to_the_next_lease() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    let value = random_value("killed");
    p.env.push(("TOKEN".into(), value.clone()));
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN --mount=type=secret,id=TOKEN test -s /run/secrets/TOKEN && sleep 3\n"),
    );
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args(["--repository", "secrets/killed", "--network", "none"])
        .args(["--no-cache", "--secret", "id=TOKEN"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let ws = p.workspace.clone();
    wait_until("the secrets stored", Duration::from_secs(120), || {
        !recorded_secret_folders(&ws).is_empty()
    });
    let (record, folder) = recorded_secret_folders(&ws)[0].clone();
    // Kill the lease supervisor of this workspace, as an OOM killer would.
    let ws_text = ws.display().to_string();
    let ps = Command::new("ps")
        .args(["-eo", "pid=,args="])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains("absconda-lease") && l.contains(&ws_text))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert!(!pids.is_empty(), "no supervisor found");
    for pid in &pids {
        Command::new("kill").args(["-KILL", pid]).status().unwrap();
    }
    let _ = child.wait_with_output().unwrap();
    assert!(
        folder.exists() && record.exists(),
        "the killed supervisor could not have removed the secret"
    );

    // The next lease on this workspace sweeps it.
    let out = p.build("secrets/next", &["--network", "none"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!folder.exists(), "{} not swept", folder.display());
    assert!(!record.exists());
    assert_eq!(
        files_containing(&[Path::new("/dev/shm"), ws.as_path()], &value),
        Vec::<String>::new()
    );
}

#[test]
fn secrets_with_the_legacy_builder_are_refused() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: off\n");
    p.env.push(("TOKEN".into(), "x".into()));
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p.build("secrets/legacy", &["--secret", "id=TOKEN"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("need BuildKit") && err.contains("hint: set `buildkit: on`"),
        "{err}"
    );
    assert!(recorded_secret_folders(&p.workspace).is_empty());

    // A missing variable or file is a usage error before anything runs.
    let out = p.build("secrets/legacy", &["--secret", "id=NOPE"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`NOPE` is not set"));
}
