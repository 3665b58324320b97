//! The builder lifecycle: `remote provision` and `remote destroy` with real
//! Terraform on the offline loopback module (`tests/terraform/loopback`),
//! pointing at a real sshd and dockerd; `remote health` against a full disk
//! and a dead docker; `remote metrics`; and the state file under 20
//! concurrent writers and when corrupt.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::{free_port, skip_or_fail, tempdir};

/// Terraform on this machine's PATH (the tests' absconda gets a minimal PATH,
/// so it is passed as `ABSCONDA_TERRAFORM`).
fn terraform() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("terraform"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip_or_fail("`terraform` is not installed");
    }
    found
}

fn state_path(p: &Project) -> PathBuf {
    p.home.join(".local/share/absconda/remote-state.json")
}

fn state(p: &Project) -> serde_json::Value {
    match std::fs::read(state_path(p)) {
        Ok(t) => serde_json::from_slice(&t).unwrap(),
        Err(_) => serde_json::json!({}),
    }
}

fn run(p: &Project, args: &[&str]) -> Output {
    p.cmd().args(args).stdin(Stdio::null()).output().unwrap()
}

/// A copy of the loopback module in the project, aimed at `sshd` through
/// its own `terraform.auto.tfvars` (as a team would set module-specific
/// values), with `main.tf` passed through `edit`.
fn loopback_module(
    p: &Project,
    name: &str,
    sshd: &Sshd,
    tfvars: &str,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/terraform/loopback/main.tf");
    let dir = p.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let main = std::fs::read_to_string(src).unwrap();
    std::fs::write(dir.join("main.tf"), edit(main)).unwrap();
    std::fs::write(
        dir.join("terraform.auto.tfvars"),
        format!("address = \"127.0.0.1\"\nport    = {}\n{tfvars}", sshd.port),
    )
    .unwrap();
    dir
}

/// One builder without `host:` made from `module`.
fn builder_yaml(p: &Project, name: &str, sshd: &Sshd, module: &Path, extra: &str) -> String {
    format!(
        "  {name}:\n    provider: ssh\n    terraform_dir: {module}\n    user: root\n    identity_file: {key}\n    known_hosts: {kh}\n    workspace: {ws}\n    docker: {DOCKER_CLI}\n    ready_timeout: 30\n    connect_timeout: 5\n{extra}",
        module = module.display(),
        key = sshd.user_key.display(),
        kh = sshd.known_hosts.display(),
        ws = p.workspace.display(),
    )
}

fn write_config(p: &Project, builders: &[String]) {
    std::fs::write(
        &p.config,
        format!(
            "builders:\n{}defaults:\n  timeout: 600\n",
            builders.concat()
        ),
    )
    .unwrap();
}

/// A project whose builder `tf` is made by the loopback module.
fn provisioned_project(sshd: &Sshd, tf: &Path) -> Project {
    let mut p = Project::new(sshd);
    let module = loopback_module(&p, "module", sshd, "", |m| m);
    write_config(&p, &[builder_yaml(&p, "tf", sshd, &module, "")]);
    p.env
        .push(("ABSCONDA_TERRAFORM".into(), tf.display().to_string()));
    p
}

/// A project for tests that need no builder: a HOME and a config path.
fn bare_project() -> Project {
    let dir = tempdir();
    let p = Project {
        home: dir.path().join("home"),
        context: dir.path().join("ctx"),
        config: dir.path().join("absconda-remote.yaml"),
        workspace: dir.path().join("ws"),
        env: Vec::new(),
        dir,
    };
    std::fs::create_dir_all(&p.home).unwrap();
    p
}

fn services() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

#[test]
fn provision_records_the_builder_and_destroy_forgets_it() {
    if !services() {
        return;
    }
    let Some(tf) = terraform() else { return };
    let sshd = Sshd::start(Some(&docker().host));
    let p = provisioned_project(&sshd, &tf);

    let out = run(&p, &["remote", "provision", "tf"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Apply complete!"),
        "Terraform's output is streamed: {err}"
    );
    assert!(err.contains("builder `tf` is ready"), "{err}");

    let s = state(&p);
    let b = &s["builders"]["tf"];
    assert_eq!(b["provider"], "ssh");
    assert_eq!(b["status"], "running");
    assert_eq!(b["address"], format!("127.0.0.1:{}", sshd.port));
    assert_eq!(b["ssh_user"], "root");
    assert_eq!(
        b["instance"], "tf",
        "the loopback module's instance_name is the `name` variable"
    );
    assert!(b["provisioned_at"].is_string(), "{b}");
    let workdir = PathBuf::from(b["terraform_dir"].as_str().unwrap());
    assert!(
        workdir.starts_with(p.home.join(".local/share/absconda/terraform/tf")),
        "a per-builder working copy: {}",
        workdir.display()
    );
    // What absconda passed, as Terraform recorded it.
    let tfstate: serde_json::Value =
        serde_json::from_slice(&std::fs::read(workdir.join("terraform.tfstate")).unwrap()).unwrap();
    let input = &tfstate["resources"][0]["instances"][0]["attributes"]["input"]["value"];
    let pubkey = std::fs::read_to_string(sshd.user_key.with_extension("pub")).unwrap();
    assert_eq!(input["ssh_public_key"], pubkey.trim(), "{input}");
    assert_eq!(input["ssh_user"], "root");
    assert_eq!(input["name"], "tf");
    assert_eq!(input["workspace"], p.workspace.display().to_string());
    assert_eq!(input["port"], sshd.port, "from the module's own tfvars");
    assert!(
        !p.dir.path().join("module/terraform.tfstate").exists(),
        "the user's module folder stays untouched"
    );

    // The provisioned builder is healthy, found through the state's address.
    let out = run(&p, &["remote", "health", "tf", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["healthy"], true);
    assert_eq!(report["address"], format!("127.0.0.1:{}", sshd.port));
    assert_eq!(report["checks"][0]["name"], "ssh");
    assert_eq!(report["checks"][0]["status"], "ok");
    assert_eq!(report["checks"][1]["status"], "ok", "{report}");

    // Provisioning it again is refused, and Terraform is not run.
    let out = run(&p, &["remote", "provision", "tf"]);
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already provisioned"), "{err}");
    assert!(
        err.contains("remote destroy tf"),
        "the hint names the way out: {err}"
    );
    assert!(
        !err.contains("Terraform has been successfully initialized"),
        "{err}"
    );

    // Without a terminal and without --yes, nothing is destroyed.
    let out = run(&p, &["remote", "destroy", "tf"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin is not a terminal"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(state(&p)["builders"]["tf"]["provisioned_at"].is_string());
    assert!(workdir.join("terraform.tfstate").exists());

    let out = run(&p, &["remote", "destroy", "tf", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Destroy complete!"));
    assert!(state(&p)["builders"].get("tf").is_none(), "{}", state(&p));
    assert!(!workdir.exists(), "the working copy goes with the builder");

    let out = run(&p, &["remote", "destroy", "tf", "--yes"]);
    assert_eq!(out.status.code(), Some(11), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not provisioned"));

    // And it can be made again.
    let out = run(&p, &["remote", "provision", "tf"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&p, &["remote", "destroy", "tf", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn two_provisions_at_once_make_one_builder() {
    if !services() {
        return;
    }
    let Some(tf) = terraform() else { return };
    let sshd = Sshd::start(Some(&docker().host));
    let p = provisioned_project(&sshd, &tf);
    let spawn = || {
        p.cmd()
            .args(["remote", "provision", "tf"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{}\n{}", text(&outs[0]), text(&outs[1]));
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    assert_eq!(refused.status.code(), Some(11), "{}", text(refused));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already provisioned") || err.contains("is provisioning or destroying"),
        "{err}"
    );
    assert!(
        !err.contains("Apply complete!"),
        "only one apply ran: {err}"
    );
    let out = run(&p, &["remote", "destroy", "tf", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Enable once `absconda build` resolves a builder without `host:` through
/// `absconda::provisioned::endpoint` (or `provisioned_address`).
#[test]
fn a_build_goes_through_a_provisioned_builder() {
    if !services() {
        return;
    }
    let Some(tf) = terraform() else { return };
    let sshd = Sshd::start(Some(&docker().host));
    let p = provisioned_project(&sshd, &tf);
    let out = run(&p, &["remote", "provision", "tf"]);
    assert!(out.status.success(), "{}", text(&out));
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello.txt /\nRUN cat /hello.txt\n"),
    );
    p.file("hello.txt", "through a provisioned builder\n");
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "tf", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "provisioned/app",
            "--tag",
            "v1",
            "--network",
            "none",
        ])
        .stdin(Stdio::null());
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let inspect = docker().run(&["image", "inspect", "provisioned/app:v1"]);
    assert!(
        inspect.status.success(),
        "the image exists on the builder's docker"
    );
    let out = run(&p, &["remote", "destroy", "tf", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Host keys reported by the module are pinned: the right one among several
/// is accepted without any known_hosts entry; a module reporting only other
/// keys makes provisioning stop with a host key error (exit 4), and the
/// builder stays provisioned so it can be destroyed.
#[test]
fn host_keys_reported_by_the_module_are_pinned() {
    if !services() {
        return;
    }
    let Some(tf) = terraform() else { return };
    let sshd = Sshd::start(Some(&docker().host));
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let mut p = Project::new(&sshd);
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let with_fps = |fps: String| {
        move |main: String| {
            let out = main.replace(
                "output \"host_key_fingerprints\" {\n  value = []\n}",
                &format!("output \"host_key_fingerprints\" {{\n  value = {fps}\n}}"),
            );
            assert_ne!(
                out, main,
                "the loopback module's host_key_fingerprints output changed shape"
            );
            out
        }
    };
    let good = loopback_module(
        &p,
        "good",
        &sshd,
        "",
        with_fps(format!("[\"{wrong}\", \"{}\"]", sshd.fingerprint())),
    );
    let bad = loopback_module(&p, "bad", &sshd, "", with_fps(format!("[\"{wrong}\"]")));
    write_config(
        &p,
        &[
            builder_yaml(&p, "good", &sshd, &good, ""),
            builder_yaml(&p, "bad", &sshd, &bad, ""),
        ],
    );
    p.env
        .push(("ABSCONDA_TERRAFORM".into(), tf.display().to_string()));

    let out = run(&p, &["remote", "provision", "good"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned by the Terraform module"));
    assert_eq!(
        state(&p)["builders"]["good"]["host_key_fingerprints"],
        serde_json::json!([wrong, sshd.fingerprint()])
    );
    let out = run(&p, &["remote", "health", "good"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&sshd.known_hosts).unwrap(),
        "",
        "nothing recorded"
    );

    let out = run(&p, &["remote", "provision", "bad"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HOST KEY MISMATCH"), "{err}");
    assert!(
        err.contains(&sshd.fingerprint()),
        "the error shows what was presented: {err}"
    );
    assert!(state(&p)["builders"]["bad"]["provisioned_at"].is_string());
    let out = run(&p, &["remote", "health", "bad"]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));

    for b in ["good", "bad"] {
        let out = run(&p, &["remote", "destroy", b, "--yes"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(state(&p)["builders"], serde_json::json!({}));
}

#[test]
fn without_terraform_provision_says_what_to_install() {
    let mut p = bare_project();
    let empty = p.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    p.env.push(("PATH".into(), empty.display().to_string()));
    let module = p.dir.path().join("module");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(module.join("main.tf"), "variable \"name\" {}\n").unwrap();
    std::fs::write(
        &p.config,
        format!(
            "builders:\n  tf:\n    terraform_dir: {}\n    user: root\n",
            module.display()
        ),
    )
    .unwrap();
    let out = run(&p, &["remote", "provision", "tf"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Terraform is not installed"), "{err}");
    assert!(err.contains("install Terraform ≥ 1.5"), "{err}");
    assert!(state(&p).get("builders").is_none(), "nothing recorded");

    // An SSH host without a module has nothing to provision.
    std::fs::write(&p.config, "builders:\n  plain:\n    host: 127.0.0.1\n").unwrap();
    let out = run(&p, &["remote", "provision", "plain"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to provision"));
}

#[test]
fn a_module_variable_absconda_cannot_fill_names_the_key_to_set() {
    let Some(tf) = terraform() else { return };
    let mut p = bare_project();
    let module = p.dir.path().join("needs-project");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(
        module.join("main.tf"),
        "variable \"project\" {\n  type = string\n}\nvariable \"flavour\" {\n  default = \"x\"\n}\noutput \"instance_ip\" {\n  value = \"127.0.0.1\"\n}\n",
    )
    .unwrap();
    std::fs::write(
        &p.config,
        format!(
            "builders:\n  tf:\n    terraform_dir: {}\n    user: root\n",
            module.display()
        ),
    )
    .unwrap();
    p.env
        .push(("ABSCONDA_TERRAFORM".into(), tf.display().to_string()));
    let out = run(&p, &["remote", "provision", "tf"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires the variable `project`"), "{err}");
    assert!(err.contains("does not set `project`"), "{err}");
}

// ---------------------------------------------------------------------------
// Health

/// A tmpfs mounted on a folder for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        if st.is_ok_and(|s| s.success()) {
            Some(Tmpfs(dir.to_path_buf()))
        } else {
            skip_or_fail("cannot mount a tmpfs (needs root)");
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn checks(out: &Output) -> serde_json::Map<String, serde_json::Value> {
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)));
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

#[test]
fn health_fails_on_a_full_workspace_disk() {
    if !services() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let p = Project::new(&sshd);
    let Some(_tmpfs) = Tmpfs::mount(&p.workspace, "2m") else {
        return;
    };
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", p.workspace.join("fill").display()))
        .args(["bs=64k"])
        .stderr(Stdio::null())
        .status();
    let out = run(&p, &["remote", "health", "local", "--json"]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let c = checks(&out);
    assert_eq!(c["ssh"]["status"], "ok");
    assert_eq!(c["docker"]["status"], "ok");
    assert_eq!(c["disk"]["status"], "fail", "{c:?}");
    let detail = c["disk"]["detail"].as_str().unwrap();
    assert!(detail.contains("100% used"), "{detail}");
    assert!(
        detail.contains(&p.workspace.display().to_string()),
        "{detail}"
    );
    assert_eq!(c["registry"]["status"], "skip");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("builder `local` is unhealthy: disk"), "{err}");

    // Freed, it is healthy again.
    std::fs::remove_file(p.workspace.join("fill")).unwrap();
    let out = run(&p, &["remote", "health", "local"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("healthy"));
}

#[test]
fn health_fails_when_docker_is_down_and_checks_the_registry_port() {
    if !crate::support::require(SSHD) {
        return;
    }
    // sshd hands sessions a DOCKER_HOST whose socket nobody listens on.
    let dead = tempdir();
    let sock = format!("unix://{}", dead.path().join("docker.sock").display());
    let sshd = Sshd::start(Some(&sock));
    let p = Project::new(&sshd);
    std::fs::create_dir_all(&p.workspace).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let out = run(
        &p,
        &["remote", "health", "local", "--json", "--registry", &open],
    );
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let c = checks(&out);
    assert_eq!(c["ssh"]["status"], "ok");
    assert_eq!(c["docker"]["status"], "fail", "{c:?}");
    let detail = c["docker"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("docker.sock"),
        "names what it could not reach: {detail}"
    );
    assert_ne!(c["disk"]["status"], "skip");
    assert_eq!(c["registry"]["status"], "ok", "{c:?}");

    let closed = format!("127.0.0.1:{}", free_port());
    let out = run(&p, &["remote", "health", "local", "--registry", &closed]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("UNHEALTHY"), "{stdout}");
    assert!(
        stdout.contains(&format!("cannot connect to `{closed}`")),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy: docker, registry"));

    let out = run(
        &p,
        &["remote", "health", "local", "--registry", "bad host:1"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    drop(listener);
}

#[test]
fn health_of_an_unknown_address_says_how_to_get_one() {
    let p = bare_project();
    std::fs::write(
        &p.config,
        "builders:\n  tf:\n    terraform_dir: /nonexistent\n    user: root\n",
    )
    .unwrap();
    let out = run(&p, &["remote", "health", "tf"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no `host` and is not provisioned"),
        "{err}"
    );
    assert!(err.contains("absconda remote provision tf"), "{err}");
}

// ---------------------------------------------------------------------------
// Metrics and the state file

fn record(outcome: &str, seconds: f64, build: f64, vm: Option<f64>) -> serde_json::Value {
    serde_json::json!({
        "started_at": "2026-01-05T10:00:00Z",
        "seconds": seconds,
        "outcome": outcome,
        "bytes_sent": 1000,
        "phases": {"connect": 0.5, "upload": 1.0, "build": build},
        "vm_seconds": vm,
    })
}

#[test]
fn metrics_from_recorded_builds() {
    let p = bare_project();
    std::fs::write(
        &p.config,
        "builders:\n  gcp-builder:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n    machine_type: e2-standard-8\n  priced:\n    host: 127.0.0.1\n    hourly_cost: 1.5\n",
    )
    .unwrap();
    let mut history: Vec<serde_json::Value> = (1..=19)
        .map(|i| record("success", 10.0 + i as f64, i as f64, Some(360.0)))
        .collect();
    history.push(record("failed", 3.0, 100.0, Some(360.0)));
    let doc = serde_json::json!({
        "version": 1,
        "builders": {
            "gcp-builder": {"provider": "gcp", "builds_count": 25, "history": history, "vm_seconds": 7200.0},
            "priced": {"provider": "ssh", "builds_count": 1, "history": [record("success", 5.0, 4.0, Some(1800.0))]},
        }
    });
    std::fs::create_dir_all(state_path(&p).parent().unwrap()).unwrap();
    std::fs::write(state_path(&p), serde_json::to_vec(&doc).unwrap()).unwrap();

    let out = run(&p, &["remote", "metrics", "gcp-builder", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["builds"], 25);
    assert_eq!(m["in_history"], 20);
    assert_eq!(m["success_rate"], 0.95);
    let build = m["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "build")
        .unwrap();
    assert_eq!(build["p95_seconds"], 19.0, "{build}");
    assert_eq!(build["mean_seconds"], (190.0 + 100.0) / 20.0);
    assert_eq!(m["vm_seconds"], 7200.0);
    assert_eq!(m["cost"]["estimate"], true);
    assert_eq!(m["cost"]["machine_type"], "e2-standard-8");
    let usd = m["cost"]["usd"].as_f64().unwrap();
    assert!((usd - 2.0 * 0.268).abs() < 1e-9, "{usd}");

    let out = run(&p, &["remote", "metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ESTIMATE"), "{stdout}");
    assert!(stdout.contains("19 succeeded (95.0%)"), "{stdout}");
    assert!(
        stdout.contains("cost: USD 0.75 at `hourly_cost`"),
        "{stdout}"
    );

    let out = run(&p, &["remote", "metrics", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn a_corrupt_state_file_is_kept_aside_and_named() {
    let p = bare_project();
    let path = state_path(&p);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "{\"version\": 1, \"builders\": {\"a\": [truncated").unwrap();
    let out = run(&p, &["remote", "metrics"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was corrupt"), "{err}");
    let kept: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        err.contains(&kept[0].display().to_string()),
        "the error names where it was kept: {err}"
    );
    assert!(err.contains("hint:"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&kept[0]).unwrap(),
        "{\"version\": 1, \"builders\": {\"a\": [truncated"
    );
    assert!(!path.exists());
    // The next run starts from an empty state.
    let out = run(&p, &["remote", "metrics", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    // provision reads the state before anything else, and stops there.
    std::fs::write(&path, "\u{0}garbage").unwrap();
    std::fs::write(
        &p.config,
        "builders:\n  tf:\n    terraform_dir: /nonexistent\n    user: root\n",
    )
    .unwrap();
    let out = run(&p, &["remote", "provision", "tf"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was corrupt; it was moved to"), "{err}");
}

const RECORD_ENV: &str = "ABSCONDA_IT_RECORD_BUILD";

/// Not a test on its own: the child of the concurrency test below, which
/// re-runs this test binary with `--ignored` and `RECORD_ENV` set. Records
/// one build.
#[test]
#[ignore = "run in a child process by twenty_processes_recording_builds_lose_none"]
fn record_one_build_child() {
    let spec = std::env::var(RECORD_ENV).expect("RECORD_ENV names the state file");
    let (path, rest) = spec.split_once('|').unwrap();
    let (go, n) = rest.split_once('|').unwrap();
    // Start together, so the writers really overlap.
    std::fs::write(format!("{go}.ready-{n}"), "").unwrap();
    crate::support::wait_until("the start signal", Duration::from_secs(30), || {
        Path::new(go).exists()
    });
    let n: u64 = n.parse().unwrap();
    absconda::state::StateFile::new(PathBuf::from(path))
        .update(|s| {
            s.builders.entry("shared".into()).or_default().record_build(
                absconda::state::BuildRecord {
                    started_at: chrono::Utc::now(),
                    seconds: 1.0,
                    outcome: "success".into(),
                    bytes_sent: n,
                    phases: Default::default(),
                    vm_seconds: None,
                    pool: None,
                    queue_seconds: None,
                },
            )
        })
        .unwrap();
}

#[test]
fn twenty_processes_recording_builds_lose_none() {
    let dir = tempdir();
    let path = dir.path().join("state/remote-state.json");
    let go = dir.path().join("go");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..20)
        .map(|n| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "lifecycle::record_one_build_child",
                    "--ignored",
                    "--test-threads=1",
                    "--quiet",
                ])
                .env(
                    RECORD_ENV,
                    format!("{}|{}|{n}", path.display(), go.display()),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    crate::support::wait_until("every writer ready", Duration::from_secs(60), || {
        (0..20).all(|n| Path::new(&format!("{}.ready-{n}", go.display())).exists())
    });
    std::fs::write(&go, "").unwrap();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the child ran the recording test: {}",
            text(&out)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let shared = &doc["builders"]["shared"];
    assert_eq!(shared["builds_count"], 20, "{shared}");
    let mut seen: Vec<u64> = shared["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["bytes_sent"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..20).collect::<Vec<u64>>(),
        "every writer's record is there"
    );
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
