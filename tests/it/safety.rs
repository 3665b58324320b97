//! Secrets stay secret, hostile input runs nothing, bad input gets a clear
//! error, and absconda runs no other program.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::absconda::{BIN, Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

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

/// Files under `roots` changed since `since` (every file when `since` is
/// `None`) that contain one of `needles`; `skip` names folders not walked.
fn files_containing(
    roots: &[&std::path::Path],
    since: Option<std::time::SystemTime>,
    needles: &[&[u8]],
    skip: &[&str],
) -> Vec<std::path::PathBuf> {
    fn visit(
        dir: &std::path::Path,
        since: Option<std::time::SystemTime>,
        needles: &[&[u8]],
        skip: &[&str],
        hits: &mut Vec<std::path::PathBuf>,
    ) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = p.symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                if !skip.iter().any(|s| p.ends_with(s)) {
                    visit(&p, since, needles, skip, hits);
                }
            } else if md.is_file()
                && md.len() < 256 << 20
                && since.is_none_or(|t| md.modified().is_ok_and(|m| m >= t))
                && std::fs::read(&p)
                    .is_ok_and(|d| needles.iter().any(|n| d.windows(n.len()).any(|w| w == *n)))
            {
                hits.push(p);
            }
        }
    }
    let mut hits = Vec::new();
    for r in roots {
        visit(r, since, needles, skip, &mut hits);
    }
    hits
}

#[test]
fn the_registry_password_never_leaks() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN sleep 2\nCOPY x /x\n"),
    );
    p.file("x", "x\n");
    let mut c = p.cmd();
    c.args(["-vv", "build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            &format!("{}/secret/app", reg.addr),
            "--tag",
            "v1",
            "--push",
            "--network",
            "none",
            "--no-cache",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The builder is this machine, its SSH user root: what a build could
    // touch is root's home, the workspace and /tmp (the toolchains in
    // ~/.rustup and ~/.cargo are not walked: no build writes there).
    let home = std::path::PathBuf::from("/root");
    let t0 = std::time::SystemTime::now() - Duration::from_secs(2);
    let encoded = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", reg.user, reg.password),
    );
    let needles: [Vec<u8>; 2] = [
        reg.password.as_bytes().to_vec(),
        encoded.clone().into_bytes(),
    ];
    // (Nor are cargo's `target` folders of the programs built here, nor the
    // test harness's own docker client folders, where it logs in itself.)
    let skip = [".rustup", ".cargo", "target", "client-config"];
    let child = c.spawn().unwrap();
    // Search the builder's files while the build runs: the workspace over
    // and over, root's home and /tmp (files changed since the start) as
    // often as a walk of them allows.
    let search = |roots: Vec<std::path::PathBuf>, since: Option<std::time::SystemTime>| {
        let needles = needles.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            let mut hits = std::collections::BTreeSet::new();
            let mut rounds = 0;
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let n: Vec<&[u8]> = needles.iter().map(Vec::as_slice).collect();
                let r: Vec<&std::path::Path> = roots.iter().map(|p| p.as_path()).collect();
                hits.extend(files_containing(&r, since, &n, &skip));
                rounds += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (hits, rounds)
        })
    };
    let during_ws = search(vec![p.workspace.clone()], None);
    let during = search(vec![home.clone(), "/tmp".into()], Some(t0));
    // Watch the process list for the whole build.
    let mut seen_in_ps = Vec::new();
    let pid = child.id();
    let watcher = std::thread::spawn(move || {
        let mut samples = 0;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && samples < 2000 {
            let out = Command::new("ps").args(["-eo", "args"]).output().unwrap();
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            for line in s.lines() {
                if line.contains("s3cret-Pa55word") {
                    seen_in_ps.push(line.to_string());
                }
            }
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (seen_in_ps, samples)
    });
    let out = child.wait_with_output().unwrap();
    let (seen, samples) = watcher.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        samples > 5,
        "the process list was not sampled during the build"
    );
    assert!(seen.is_empty(), "password in the process list: {seen:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("TRACE") || all.contains("DEBUG"),
        "-vv gave no debug output"
    );
    assert!(!all.contains(reg.password), "password in absconda's output");
    for needle in [reg.password.as_bytes(), encoded.as_bytes()] {
        let hits = grep_tree(&p.workspace, needle);
        assert!(
            hits.is_empty(),
            "credentials left on the builder in {hits:?}"
        );
    }
    // During the build they were only in the run folder's own DOCKER_CONFIG
    // (`docker login` writes them there; the lease deletes the folder).
    let (mut hits, rounds) = during.join().unwrap();
    let (ws_hits, ws_rounds) = during_ws.join().unwrap();
    hits.extend(ws_hits);
    assert!(
        rounds >= 1 && ws_rounds >= 1,
        "the builder's files were not searched during the build"
    );
    let runs = p.workspace.join("runs");
    let elsewhere: Vec<_> = hits.iter().filter(|h| !h.starts_with(&runs)).collect();
    assert!(
        elsewhere.is_empty(),
        "credentials on the builder during the build in {elsewhere:?}"
    );
    // After it: nowhere on the builder, nor in absconda's local state and cache.
    let n: Vec<&[u8]> = needles.iter().map(Vec::as_slice).collect();
    let after = files_containing(&[&p.workspace, &p.home], None, &n, &[]);
    assert!(after.is_empty(), "credentials left in {after:?}");
    let after = files_containing(&[&home, std::path::Path::new("/tmp")], Some(t0), &n, &skip);
    assert!(
        after.is_empty(),
        "credentials left on the builder in {after:?}"
    );
    eprintln!(
        "searched the workspace {ws_rounds} and the rest {rounds} times during the build; found the credentials only in {hits:?}"
    );
    assert_eq!(reg.tags("secret/app"), ["v1"]);
}

#[test]
fn hostile_strings_arrive_byte_exact_and_run_nothing() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    let marker = p.dir.path().join("pwned");
    let evil = format!(
        "a b'c\"d $(touch {m}) `touch {m}`; touch {m} && echo\nnext | cat",
        m = marker.display()
    );
    let evil_name = "we ird 'q\" $(x);&.txt";
    p.file(evil_name, "odd file\n");
    p.file("line\nbreak.txt", "newline name\n");
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE}\nARG EVIL\nRUN printf '%s' \"$EVIL\" > /evil-arg\nCOPY . /ctx/\n"
        ),
    );
    let out = p.build(
        &format!("{}/hostile/app", reg.addr),
        &[
            "--tag",
            "v1",
            "--push",
            "--network",
            "none",
            "--build-arg",
            &format!("EVIL={evil}"),
            "--label",
            &format!("evil={evil}"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!marker.exists(), "a hostile string ran a command");
    let files = reg.files("hostile/app", "v1");
    assert_eq!(
        files
            .get("evil-arg")
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        Some(evil.clone())
    );
    assert_eq!(
        files.get(&format!("ctx/{evil_name}")).map(|v| v.as_slice()),
        Some(&b"odd file\n"[..])
    );
    assert_eq!(
        files.get("ctx/line\nbreak.txt").map(|v| v.as_slice()),
        Some(&b"newline name\n"[..])
    );
    let inspect = d.run(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        &format!("{}/hostile/app:v1", reg.addr),
    ]);
    let labels: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(labels["evil"], evil.as_str());

    // A hostile tag is refused by docker as a bad reference, byte-exact, and runs nothing.
    let bad_tag = format!("v1;touch {}", marker.display());
    let out = p.build(
        &format!("{}/hostile/app", reg.addr),
        &["--tag", &bad_tag, "--network", "none"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(!marker.exists(), "a hostile tag ran a command");
}

#[test]
fn bad_input_gives_a_clear_error_and_exit_code() {
    if !crate::support::require(SSHD) {
        return;
    }
    let sshd = Sshd::start(None);
    let p = Project::new(&sshd);
    p.file("Dockerfile", "FROM scratch\n");

    // A broken config: exit 2, the file, the line, the key, a suggestion.
    std::fs::write(
        &p.config,
        "builders:\n  local:\n    host: 127.0.0.1\n    prot: 22\n",
    )
    .unwrap();
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 4, builder `local`, key `prot`: unknown key (did you mean `port`?)"),
        "{err}"
    );
    assert!(err.lines().count() <= 12, "not one screen: {err}");

    // Broken YAML.
    std::fs::write(&p.config, "builders:\n  local: [\n").unwrap();
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid YAML"));

    // Rejected keys of the Python original name the replacement.
    std::fs::write(&p.config, "builders:\n  local:\n    host: h\n    ssh_options: [\"-o\", \"StrictHostKeyChecking=no\"]\n").unwrap();
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host_key_policy"));

    // An unreachable host: exit 3 with a hint.
    let dead = crate::support::free_port();
    std::fs::write(
        &p.config,
        format!("builders:\n  local:\n    host: 127.0.0.1\n    port: {dead}\n    user: root\n    identity_file: {}\n    known_hosts: {}\n", sshd.user_key.display(), sshd.known_hosts.display()),
    )
    .unwrap();
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("could not connect to `127.0.0.1:{dead}`")),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn absconda_executes_no_other_program() {
    if !(ok() && crate::support::require("strace")) {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let mut p = Project::new(&sshd);
    build_under_strace(&mut p, "app");
}

#[test]
fn absconda_executes_no_other_program_through_proxies() {
    if !(ok() && crate::support::require("strace")) {
        return;
    }
    use crate::support::tunnel_proxy::{Kind, TunnelProxy};
    let sshd = Sshd::start(Some(&docker().host));
    for (kind, name) in [(Kind::Http, "http"), (Kind::Socks5, "socks5")] {
        let proxy = TunnelProxy::start(kind, Some(("u", "pw")));
        let mut p = Project::with_builder(&sshd, &format!("    proxy: {}\n", proxy.url()));
        build_under_strace(&mut p, name);
        assert!(!proxy.tunnels().is_empty());
    }
}

#[test]
fn absconda_executes_no_other_program_through_jump_hosts() {
    if !(ok() && crate::support::require("strace") && crate::support::require("ip")) {
        return;
    }
    let chain = crate::sshnet::Chain::start();
    let mut p = Project::with_builder(&chain.target, &chain.jump_yaml());
    build_under_strace(&mut p, "jumps");
}

/// With `--ssh ID=KEYFILE` (absconda answers the agent protocol itself)
/// and `-o` (the download): still no other program.
#[test]
fn absconda_executes_no_other_program_serving_keys_and_outputs() {
    if !(ok() && crate::support::require("strace") && crate::support::require("ssh-keygen")) {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    let key = p.dir.path().join("deploy_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let out = p.dir.path().join("out.tar");
    build_under_strace_with(
        &mut p,
        "keys",
        &format!(
            "FROM {BASE_IMAGE}\nCOPY f /f\nRUN --mount=type=ssh,id=deploy test -S \"$SSH_AUTH_SOCK\"\n"
        ),
        &[
            "--network".into(),
            "none".into(),
            "--ssh".into(),
            format!("deploy={}", key.display()),
            "-o".into(),
            format!("type=tar,dest={}", out.display()),
        ],
    );
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
}

/// Builds and pushes `strace/NAME:v1` under strace and checks that the only
/// program executed was absconda itself.
fn build_under_strace(p: &mut Project, name: &str) {
    build_under_strace_with(p, name, &format!("FROM {BASE_IMAGE}\nCOPY f /f\n"), &[]);
}

fn build_under_strace_with(p: &mut Project, name: &str, dockerfile: &str, extra: &[String]) {
    let reg = registry();
    p.with_registry_credentials(reg);
    p.file("Dockerfile", dockerfile);
    p.file("f", "static\n");
    let bin = std::env::var("ABSCONDA_BIN").unwrap_or_else(|_| BIN.to_string());
    let trace = p.dir.path().join("strace.log");
    let mut c = p.cmd();
    c.env("PATH", "/nonexistent");
    let args: Vec<String> = ["build", "--remote-builder", "local", "--context"]
        .iter()
        .map(|s| s.to_string())
        .chain([p.context.display().to_string()])
        .chain([
            "--repository".into(),
            format!("{}/strace/{name}", reg.addr),
            "--tag".into(),
            "v1".into(),
            "--push".into(),
        ])
        .chain(extra.iter().cloned())
        .collect();
    let out = Command::new("/usr/bin/strace")
        .args(["-f", "-qq", "-e", "trace=execve,execveat", "-o"])
        .arg(&trace)
        .arg(&bin)
        .args(&args)
        .env_clear()
        .envs(
            c.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let log = std::fs::read_to_string(&trace).unwrap();
    let execs: Vec<&str> = log.lines().filter(|l| l.contains("execve")).collect();
    assert_eq!(execs.len(), 1, "absconda executed other programs:\n{log}");
    assert!(execs[0].contains(&bin));
    assert_eq!(reg.tags(&format!("strace/{name}")), ["v1"]);
}

/// A push the registry refuses, without credentials or with a wrong
/// password, exits 6 with one clear error that names the registry and
/// never prints the password; nothing reaches the registry.
#[test]
fn a_refused_push_exits_6_with_a_clear_message() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let wrong = "not-the-Pa55word-91";
    for creds in [None, Some(wrong)] {
        let mut p = Project::new(&sshd);
        if let Some(pw) = creds {
            p.env
                .push(("ABSCONDA_REGISTRY_USER".into(), reg.user.into()));
            p.env.push(("ABSCONDA_REGISTRY_PASSWORD".into(), pw.into()));
        }
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY x /x\n"));
        p.file("x", "x\n");
        let out = p.build(
            &format!("{}/refused/app", reg.addr),
            &["--tag", "v1", "--push"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{creds:?}: {}", text(&out));
        // One `error:` and its causes, naming the push and the registry.
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        let block = err
            .lines()
            .skip_while(|l| !l.starts_with("error:"))
            .take_while(|l| {
                l.starts_with("error:") || l.starts_with("  caused by:") || l.starts_with("hint:")
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            block.contains("docker push") || block.contains("docker login"),
            "{block}"
        );
        assert!(
            block.contains(&reg.addr),
            "the error names the registry: {block}"
        );
        assert!(!err.contains(wrong) && !err.contains(reg.password), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(reg.tags("refused/app").is_empty());
    }
}

/// The cloud access paths (OS Login, metadata keys, EC2 Instance Connect)
/// are native too: each whole build with push executes nothing but absconda.
#[test]
fn absconda_executes_no_other_program_through_cloud_access() {
    use crate::access::{SA, guest_sshd, project};
    use crate::support::gce_fake::GceFake;
    use crate::support::instance_connect_tap::InstanceConnectTap;
    use crate::support::moto::Moto;
    if !(ok() && crate::support::require("strace")) {
        return;
    }
    for access in ["oslogin", "metadata"] {
        let keys = tempfile::tempdir().unwrap();
        let sshd = guest_sshd(keys.path());
        let fake = GceFake::start();
        fake.add_instance("builder", "RUNNING");
        fake.serve_guest_keys("builder", keys.path());
        fake.oslogin(|o| o.set_username(SA, "root"));
        if access == "oslogin" {
            fake.set_instance_metadata("builder", "enable-oslogin", "TRUE");
        }
        let mut p = project(&fake, &sshd, &format!("    access: {access}\n"));
        build_under_strace(&mut p, access);
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(moto) = rt.block_on(Moto::start()) else {
        return;
    };
    rt.block_on(moto.run_instance(Some("absconda-builder")));
    let keys = tempfile::tempdir().unwrap();
    let sshd = guest_sshd(keys.path());
    let tap = InstanceConnectTap::start(
        moto.addr(),
        keys.path().to_path_buf(),
        absconda::cloud::instance_connect::KEY_WINDOW,
    );
    let yaml = format!(
        "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    instance_connect_endpoint: {}\n    access: instance-connect\n    ready_timeout: 60\n",
        moto.endpoint(),
        tap.endpoint(),
    );
    let mut p = Project::with_builder(&sshd, &yaml);
    let (key, secret) = moto.access_key();
    p.env.push(("AWS_ACCESS_KEY_ID".into(), key.to_string()));
    p.env
        .push(("AWS_SECRET_ACCESS_KEY".into(), secret.to_string()));
    p.env
        .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    build_under_strace(&mut p, "eic");
    assert!(!tap.pushed().is_empty());
}

/// The cloud tunnels (IAP TCP forwarding, EC2 Instance Connect Endpoint)
/// are native websockets: a whole build with push through each executes
/// nothing but absconda.
#[test]
fn absconda_executes_no_other_program_through_cloud_tunnels() {
    if !(ok() && crate::support::require("strace")) {
        return;
    }
    let mut iap = crate::tunnels::iap_setup("");
    build_under_strace(&mut iap.project, "iap");
    assert!(!iap.iap.requests().is_empty());
    let Some(mut eice) = crate::tunnels::eice_setup() else {
        return;
    };
    build_under_strace(&mut eice.project, "eice");
    assert!(!eice.eice.opened().is_empty());
}
