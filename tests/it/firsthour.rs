//! A newcomer's first hour: the builder chosen without `--remote-builder`,
//! and the errors met on the way, each with a next step.

use std::process::{Command, Output};

use crate::support::absconda::{BIN, Project, text};
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker, registry};
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
        first.contains("using builder `local`") && first.contains("`default_builder:`"),
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
        stderr(&out).starts_with("absconda: using builder `elsewhere`\n"),
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
            .is_some_and(|l| l.contains("using builder `solo` (the only builder in `")),
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

/// One error a newcomer can meet: how to provoke it, the exit code, what
/// the message says and the next step its hint names.
struct Case {
    name: &'static str,
    code: i32,
    message: &'static str,
    hint: &'static str,
}

fn check(case: &Case, out: &Output) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(case.code),
        "{}: {}",
        case.name,
        text(out)
    );
    assert!(err.contains(case.message), "{}: message: {err}", case.name);
    let hint = err
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("{}: no hint: {err}", case.name));
    assert!(hint.contains(case.hint), "{}: hint: {hint}", case.name);
    // A next step, never only a pointer to the documentation.
    assert!(!hint.contains("README"), "{}: {hint}", case.name);
}

#[test]
fn newcomer_errors_without_a_builder_end_with_a_next_step() {
    // No builders file anywhere.
    let t = crate::support::tempdir();
    std::fs::create_dir_all(t.path().join("home")).unwrap();
    let out = Command::new(BIN)
        .env_clear()
        .env("HOME", t.path().join("home"))
        .current_dir(t.path())
        .args(["build", "--repository", "x/y"])
        .output()
        .unwrap();
    check(
        &Case {
            name: "no config",
            code: 2,
            message: "no `absconda-remote.yaml` found",
            hint: "absconda init",
        },
        &out,
    );

    // A typo in the builder's name.
    let (_t, mut c) = with_config("builders:\n  gcp-builder:\n    host: 127.0.0.1\n");
    let out = c
        .args(["remote", "status", "gcp-buidler"])
        .output()
        .unwrap();
    check(
        &Case {
            name: "unknown builder",
            code: 2,
            message: "(did you mean `gcp-builder`?)",
            hint: "absconda remote list",
        },
        &out,
    );

    // Cloud builders with no credentials anywhere (and no metadata server).
    let (_t, mut c) = with_config(
        "builders:\n  g:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n    api_endpoint: http://127.0.0.1:1\n",
    );
    // No GCE_METADATA_HOST: the unconfigured metadata server is probed briefly.
    let out = c.args(["remote", "status", "g"]).output().unwrap();
    check(
        &Case {
            name: "no GCP credentials",
            code: 8,
            message: "authentication failed",
            hint: "gcloud auth application-default login",
        },
        &out,
    );
    let (_t, mut c) = with_config(
        "builders:\n  a:\n    provider: aws\n    region: us-east-1\n    instance_id: i-0123\n    api_endpoint: http://127.0.0.1:1\n",
    );
    let out = c
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1")
        .args(["remote", "status", "a"])
        .output()
        .unwrap();
    check(
        &Case {
            name: "no AWS credentials",
            code: 8,
            message: "authentication failed",
            hint: "AWS_ACCESS_KEY_ID",
        },
        &out,
    );
}

fn set_docker(p: &Project, docker: &str) {
    let yaml = std::fs::read_to_string(&p.config).unwrap().replace(
        &format!("docker: {DOCKER_CLI}\n"),
        &format!("docker: {docker}\n"),
    );
    std::fs::write(&p.config, yaml).unwrap();
}

#[test]
fn newcomer_errors_on_the_builder_end_with_a_next_step() {
    crate::require!(SSHD, "dockerd", "docker-registry", "htpasswd");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let dockerfile = format!("FROM {BASE_IMAGE}\nCOPY hi /hi\n");

    // A key the builder does not accept.
    let p = Project::new(&sshd);
    p.file("Dockerfile", &dockerfile);
    p.file("hi", "x\n");
    let other_key = p.home.join("other_key");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let yaml = std::fs::read_to_string(&p.config).unwrap().replace(
        &sshd.user_key.display().to_string(),
        &other_key.display().to_string(),
    );
    std::fs::write(&p.config, yaml).unwrap();
    let out = p.build("127.0.0.1:1/x/y", &[]);
    check(
        &Case {
            name: "key not accepted",
            code: 3,
            message: "refused every key offered",
            hint: &*Box::leak(format!("{}.pub", other_key.display()).into_boxed_str()),
        },
        &out,
    );

    // docker not installed on the builder.
    let p = Project::new(&sshd);
    set_docker(&p, "/nonexistent/docker");
    p.file("Dockerfile", &dockerfile);
    p.file("hi", "x\n");
    let out = p.build("127.0.0.1:1/x/y", &[]);
    check(
        &Case {
            name: "docker missing",
            code: 9,
            message: "docker on `local` is not usable",
            hint: "apt-get install",
        },
        &out,
    );

    // docker there, but the SSH user may not use it: a docker CLI that
    // answers as the real one does without access to the socket.
    let fake = p.dir.path().join("docker-no-access");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.24/version\": dial unix /var/run/docker.sock: connect: permission denied' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = Project::new(&sshd);
    set_docker(&p, &fake.display().to_string());
    p.file("Dockerfile", &dockerfile);
    p.file("hi", "x\n");
    let out = p.build("127.0.0.1:1/x/y", &[]);
    check(
        &Case {
            name: "docker not allowed",
            code: 9,
            message: "permission denied",
            hint: "usermod -aG docker root",
        },
        &out,
    );

    // A workspace the SSH user cannot create.
    let p = Project::with_builder(&sshd, "");
    let yaml = std::fs::read_to_string(&p.config).unwrap().replace(
        &format!("workspace: {}", p.workspace.display()),
        "workspace: /proc/absconda-workspace",
    );
    std::fs::write(&p.config, yaml).unwrap();
    p.file("Dockerfile", &dockerfile);
    p.file("hi", "x\n");
    let out = p.build("127.0.0.1:1/x/y", &[]);
    check(
        &Case {
            name: "workspace not writable",
            code: 1,
            message: "could not set up the workspace `/proc/absconda-workspace`",
            hint: "sudo install -d -o root /proc/absconda-workspace",
        },
        &out,
    );

    // The registry refuses the login.
    let mut p = Project::new(&sshd);
    p.env
        .push(("ABSCONDA_REGISTRY_USER".into(), reg.user.into()));
    p.env.push((
        "ABSCONDA_REGISTRY_PASSWORD".into(),
        "not-the-password".into(),
    ));
    p.file("Dockerfile", &dockerfile);
    p.file("hi", "x\n");
    let out = p.build(&format!("{}/x/y", reg.addr), &["--push"]);
    check(
        &Case {
            name: "registry login refused",
            code: 6,
            message: "`docker login`",
            hint: "ABSCONDA_REGISTRY_PASSWORD",
        },
        &out,
    );
    assert!(!stderr(&out).contains("not-the-password"));
}

#[test]
fn remote_list_and_status_read_like_a_person_and_json_keeps_rfc3339() {
    let (t, mut c) = with_config(
        "builders:\n  a:\n    host: 127.0.0.1\n    port: 1\n  a-builder-with-a-rather-long-name:\n    host: 127.0.0.1\n    port: 1\n",
    );
    let used = chrono::Utc::now() - chrono::Duration::seconds(185);
    let state = serde_json::json!({
        "version": 1,
        "builders": {"a": {
            "last_used": used.to_rfc3339(),
            "builds_count": 2,
            "history": [{
                "started_at": (used - chrono::Duration::seconds(65)).to_rfc3339(),
                "seconds": 65.2, "outcome": "success", "bytes_sent": 1000, "phases": {}
            }]
        }}
    });
    let dir = t.path().join("home/.local/share/absconda");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("remote-state.json"), state.to_string()).unwrap();

    let out = c.args(["remote", "list"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(
        lines[1].starts_with("a  ") && lines[1].ends_with("3 min ago"),
        "{list}"
    );
    // Columns line up whatever the names' lengths.
    let col = |l: &str| l.find("ssh").unwrap();
    assert_eq!(
        col(lines[0].replace("PROVIDER", "ssh     ").as_str()),
        col(lines[1])
    );
    assert_eq!(col(lines[1]), col(lines[2]), "{list}");
    assert_eq!(col(lines[2]), "a-builder-with-a-rather-long-name  ".len());

    let out = Command::new(BIN)
        .env_clear()
        .env("HOME", t.path().join("home"))
        .current_dir(t.path())
        .args(["remote", "list", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_used = v[0]["last_used"].as_str().unwrap();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(json_used).unwrap(),
        used,
        "{json_used}"
    );

    // status shows the same, and the last build's duration; port 1 refuses,
    // so it exits 3 after printing what it knows.
    let out = Command::new(BIN)
        .env_clear()
        .env("HOME", t.path().join("home"))
        .current_dir(t.path())
        .args(["remote", "status", "a"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("builds:     2 (last used 3 min ago)"),
        "{status}"
    );
    assert!(
        status.contains("last build: success, took 1 min 05 s, 4 min ago"),
        "{status}"
    );
}

#[test]
fn bash_loads_the_completions_and_completes_subcommands() {
    crate::require!("bash");
    let script = format!(
        "source <({BIN} completions bash) || exit 1\n\
         complete -p absconda || exit 1\n\
         COMP_WORDS=(absconda rem); COMP_CWORD=1; COMP_LINE='absconda rem'; COMP_POINT=12\n\
         _absconda absconda rem absconda\n\
         echo \"words: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(absconda build --remote-b); COMP_CWORD=2\n\
         _absconda absconda --remote-b build\n\
         echo \"flags: ${{COMPREPLY[*]}}\"\n"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(o.contains("-F _absconda absconda"), "{o}");
    assert!(o.contains("words: remote"), "{o}");
    assert!(o.contains("flags: --remote-builder"), "{o}");

    for shell in ["zsh", "fish", "powershell"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("remote-builder"),
            "{shell}"
        );
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn man_prints_a_manual_page() {
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH absconda 1"),
        "{page}"
    );
    assert!(page.contains(".TH absconda 1"));
    for sub in ["build", "generate", "remote", "completions"] {
        assert!(page.contains(sub), "{sub} missing from the page");
    }
    // Rendered by man(1) where it is installed (not needed in CI).
    if std::path::Path::new("/usr/bin/man").exists() {
        let t = crate::support::tempdir();
        let f = t.path().join("absconda.1");
        std::fs::write(&f, page.as_bytes()).unwrap();
        let out = Command::new("man")
            .arg("-l")
            .arg(&f)
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("remote builders"));
    }
}

/// A context with `mib` MiB of incompressible data.
fn big_context(p: &Project, mib: usize) {
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY small /small\n"),
    );
    p.file("small", "small\n");
    let mut data = vec![0u8; mib * 1024 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(p.context.join("random.bin"), data).unwrap();
}

#[test]
fn upload_progress_shows_total_and_percent_on_a_terminal_and_plain_lines_otherwise() {
    crate::require!(SSHD, "dockerd", "script");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    compression: gzip\n");
    big_context(&p, 48);

    // On a terminal (a pseudo-terminal made by script(1)).
    let mut build = vec![BIN.to_string(), "build".into(), "--context".into()];
    build.push(p.context.display().to_string());
    build.extend(["--repository".into(), "firsthour/progress".into()]);
    let line = build
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    // script(1) with the environment `p.cmd()` gives absconda.
    let mut c = Command::new("script");
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &p.home)
        .env("USER", "tester")
        .env("TERM", "xterm")
        .env("ABSCONDA_REMOTE_CONFIG", &p.config)
        .current_dir(p.dir.path())
        .args(["-qefc", &line, "/dev/null"]);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("sending the context ["), "no bar: {tty:?}");
    assert!(tty.contains("/48.00 MiB"), "no total: {tty:?}");
    assert!(tty.contains('%') && tty.contains(" left"), "{tty:?}");
    assert!(tty.contains("on the wire"), "{tty:?}");

    // Not a terminal: plain lines, no control characters at all.
    std::fs::write(p.context.join("small"), "changed\n").unwrap();
    let out = p.build("firsthour/progress", &["--no-incremental"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    for l in err.lines().filter(|l| l.starts_with("absconda:")) {
        assert!(!l.chars().any(|c| c.is_control()), "{l:?}");
    }
    assert!(
        !err.contains('\u{1b}'),
        "escape sequence in plain mode: {err:?}"
    );
    let done = err
        .lines()
        .find(|l| l.starts_with("absconda: upload done in"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        done.contains("48.0 MiB of content") && done.contains("on the wire"),
        "{done}"
    );
    // Phases are shown as they start.
    let sending = err.find("absconda: sending the context").unwrap();
    let building = err.find("absconda: building\n").unwrap();
    assert!(sending < building, "{err}");
}

#[test]
fn quiet_prints_only_the_image_names() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo noisy-step\n"),
    );
    let out = p.build(
        "firsthour/quiet",
        &["--tag", "a", "--tag", "b", "--quiet", "--network", "none"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "firsthour/quiet:a\nfirsthour/quiet:b\n"
    );
    assert_eq!(stderr(&out), "", "{}", text(&out));
    // The image was really built.
    let inspect = d.run(&["image", "inspect", "firsthour/quiet:b"]);
    assert!(inspect.status.success(), "{}", text(&inspect));

    // A failing build still shows why, with the kept output.
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo failing-step && exit 3\n"),
    );
    let out = p.build("firsthour/quiet", &["--quiet", "--network", "none"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(stderr(&out).contains("failing-step"), "{}", text(&out));
    assert!(stderr(&out).contains("error: build on builder `local` failed"));
    assert!(out.stdout.is_empty());
}

/// An empty folder and HOME whose known_hosts trusts `sshd`.
fn newcomer(sshd: &Sshd) -> (tempfile::TempDir, impl Fn() -> Command) {
    let t = crate::support::tempdir();
    let home = t.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::copy(&sshd.known_hosts, home.join(".ssh/known_hosts")).unwrap();
    std::fs::create_dir_all(t.path().join("project")).unwrap();
    let dir = t.path().to_path_buf();
    let cmd = move || {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir.join("home"))
            .env("USER", "tester")
            .current_dir(dir.join("project"));
        c
    };
    (t, cmd)
}

#[test]
fn init_by_flags_writes_a_checked_file_that_builds_and_remote_add_keeps_comments() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let (t, cmd) = newcomer(&sshd);
    let ws = t.path().join("ws");
    let port = sshd.port.to_string();
    let key = sshd.user_key.display().to_string();
    let init_args = [
        "init",
        "--host",
        &sshd.listen,
        "--port",
        &port,
        "--user",
        "root",
        "--identity-file",
        &key,
        "--workspace",
        ws.to_str().unwrap(),
    ];
    let out = cmd().args(init_args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("wrote `absconda-remote.yaml` with builder `local`"),
        "{err}"
    );
    assert!(err.contains("builder `local` is ready"), "{err}");
    let file = t.path().join("project/absconda-remote.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(yaml.starts_with("# Builders for absconda"), "{yaml}");
    assert!(yaml.contains("default_builder: local\n"), "{yaml}");
    assert!(yaml.contains(&format!("    port: {port}\n")), "{yaml}");

    // The first build works without naming the builder.
    std::fs::write(
        t.path().join("project/Dockerfile"),
        format!("FROM {BASE_IMAGE}\nCOPY Dockerfile /df\n"),
    )
    .unwrap();
    let out = cmd()
        .args(["build", "--repository", "firsthour/init", "--tag", "v1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        d.run(&["image", "inspect", "firsthour/init:v1"])
            .status
            .success()
    );

    // Never over an existing file without --force.
    let mut edited = yaml.replace("defaults:\n", "# my own note\ndefaults:\n");
    edited.push_str("# last words\n");
    std::fs::write(&file, &edited).unwrap();
    let out = cmd().args(init_args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("exists already"), "{}", text(&out));
    assert!(
        stderr(&out).contains("hint: `absconda remote add NAME"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), edited);

    // remote add inserts into `builders:` and keeps every other line.
    let out = cmd()
        .args([
            "remote",
            "add",
            "second",
            "--host",
            "127.0.0.1",
            "--port",
            "1",
            "--no-check",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let after = std::fs::read_to_string(&file).unwrap();
    for line in edited.lines() {
        assert!(after.contains(line), "lost {line:?}:\n{after}");
    }
    assert!(
        after.contains("  second:\n    provider: ssh\n    host: 127.0.0.1\n    port: 1\n"),
        "{after}"
    );
    let out = cmd().args(["remote", "list", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["local", "second"]);
    let out = cmd()
        .args(["remote", "add", "second", "--host", "x", "--no-check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // --force replaces it.
    let out = cmd().args(init_args).arg("--force").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !std::fs::read_to_string(&file)
            .unwrap()
            .contains("  second:")
    );
}

#[test]
fn init_says_what_is_missing_on_the_builder() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let (t, cmd) = newcomer(&sshd);
    std::fs::remove_file(t.path().join("home/.ssh/known_hosts")).unwrap();
    let port = sshd.port.to_string();
    let key = sshd.user_key.display().to_string();
    let out = cmd()
        .args([
            "init",
            "--host",
            &sshd.listen,
            "--port",
            &port,
            "--user",
            "root",
        ])
        .args(["--identity-file", &key])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("FAIL"), "{err}");
    assert!(err.contains("not ready yet"), "{err}");
}

#[test]
fn init_for_clouds_by_flags_and_missing_flags_are_named() {
    let t = crate::support::tempdir();
    std::fs::create_dir_all(t.path().join("home")).unwrap();
    let cmd = || {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("HOME", t.path().join("home"))
            // No credentials anywhere, and never the real clouds (the
            // unconfigured GCE metadata server is probed briefly).
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:1")
            .current_dir(t.path());
        c
    };
    let out = cmd()
        .args([
            "init",
            "--api-endpoint",
            "http://127.0.0.1:1",
            "--global",
            "--provider",
            "gcp",
            "--project",
            "p",
            "--zone",
            "europe-west1-b",
        ])
        .args(["--instance", "absconda-builder", "--user", "builder"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Written, then checked as far as the credentials allow.
    assert!(
        stderr(&out).contains("could not check builder `gcp-builder`: authentication failed"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("next: run `gcloud auth application-default login`"),
        "{}",
        text(&out)
    );
    let global = t.path().join("home/.config/absconda/absconda-remote.yaml");
    let yaml = std::fs::read_to_string(&global).unwrap();
    assert!(yaml.contains("    provider: gcp\n    project: p\n    zone: europe-west1-b\n    instance: absconda-builder\n"), "{yaml}");
    assert!(yaml.contains("host_key_alias: gcp-builder"), "{yaml}");
    assert!(
        yaml.contains("api_endpoint: \"http://127.0.0.1:1\"")
            || yaml.contains("api_endpoint: http"),
        "{yaml}"
    );

    let out = cmd()
        .args([
            "init",
            "--provider",
            "aws",
            "--region",
            "us-east-1",
            "--user",
            "ubuntu",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("`--instance-id` is required for provider `aws`"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("hint: pass `--instance-id VALUE`"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("could not list the instances to pick from"),
        "{}",
        text(&out)
    );
    assert!(!t.path().join("absconda-remote.yaml").exists());
    let out = cmd()
        .args([
            "init",
            "--provider",
            "aws",
            "--region",
            "us-east-1",
            "--instance-id",
            "i-0abc",
            "--user",
            "ubuntu",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let yaml = std::fs::read_to_string(t.path().join("absconda-remote.yaml")).unwrap();
    assert!(
        yaml.contains(
            "  aws-builder:\n    provider: aws\n    region: us-east-1\n    instance_id: i-0abc\n"
        ),
        "{yaml}"
    );
}

#[test]
fn init_asks_on_a_terminal() {
    crate::require!("script");
    let t = crate::support::tempdir();
    std::fs::create_dir_all(t.path().join("home")).unwrap();
    let mut child = Command::new("script")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", t.path().join("home"))
        .env("USER", "tester")
        .env("TERM", "dumb")
        .current_dir(t.path())
        .args(["-qefc", &format!("'{BIN}' init --no-check"), "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // provider, host, user (default), key file (none)
        stdin.write_all(b"ssh\nbuild.example.com\n\n\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("host (name or address): "), "{tty}");
    assert!(tty.contains("SSH user on the builder [tester]: "), "{tty}");
    let yaml = std::fs::read_to_string(t.path().join("absconda-remote.yaml")).unwrap();
    assert!(
        yaml.contains(
            "  local:\n    provider: ssh\n    host: build.example.com\n    user: tester\n"
        ),
        "{yaml}"
    );
}
