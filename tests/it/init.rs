//! `absconda init` beyond writing the file: picking a cloud instance from
//! what the credentials see (the GCE fake, moto), the host key offer and
//! the health report against the loopback builder, and `--from-ssh-config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::absconda::{BIN, text};
use crate::support::docker::docker;
use crate::support::gce_fake::{Flow, GceFake, Route};
use crate::support::sshd::{SSHD, Sshd};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An empty project folder and HOME (with `~/.ssh`), and `absconda` run in it.
struct Newcomer {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Newcomer {
    fn new() -> Newcomer {
        let dir = crate::support::tempdir();
        std::fs::create_dir_all(dir.path().join("home/.ssh")).unwrap();
        std::fs::create_dir_all(dir.path().join("project")).unwrap();
        Newcomer {
            dir,
            env: Vec::new(),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    fn yaml(&self) -> String {
        std::fs::read_to_string(self.project().join("absconda-remote.yaml")).unwrap_or_default()
    }

    fn known_hosts(&self) -> String {
        std::fs::read_to_string(self.home().join(".ssh/known_hosts")).unwrap_or_default()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.home())
            .env("USER", "tester")
            // Never the real metadata servers.
            .env("GCE_METADATA_HOST", "127.0.0.1:1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.project());
        c
    }

    fn with_gce(&mut self, fake: &GceFake) {
        let dir = self.dir.path().join("gcloud");
        std::fs::create_dir_all(&dir).unwrap();
        for (k, v) in fake.credential_env(Flow::ServiceAccountKey, &dir) {
            if let Some(v) = v {
                self.env.push((k.to_string(), v));
            }
        }
    }
}

/// Five VMs in two zones; three carry `role=builder`.
fn gce_with_instances() -> GceFake {
    let fake = GceFake::start();
    let project = fake.project();
    for (zone, name, status, role) in [
        ("us-central1-a", "builder-a", "RUNNING", Some("builder")),
        ("us-central1-a", "web-1", "RUNNING", Some("web")),
        ("europe-west1-b", "builder-b", "TERMINATED", Some("builder")),
        ("europe-west1-b", "db-1", "RUNNING", None),
        ("us-east1-c", "builder-c", "RUNNING", Some("builder")),
    ] {
        fake.add_instance_in(project, zone, name, status, true);
        if let Some(role) = role {
            fake.set_labels(name, &[("role", role), ("team", "infra")]);
        }
    }
    fake
}

#[test]
fn init_lists_gce_instances_by_label_over_pages_and_names_the_flag_to_pick_one() {
    let fake = gce_with_instances();
    fake.set_list_page_size(2);
    let mut n = Newcomer::new();
    n.with_gce(&fake);
    let base = [
        "init",
        "--provider",
        "gcp",
        "--project",
        fake.project(),
        "--api-endpoint",
        &fake.api_endpoint(),
        "--label",
        "role=builder",
    ];
    fake.clear_log();
    let out = n.cmd().args(base).arg("--list").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list = stdout(&out);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    assert!(
        lines[0].starts_with("ZONE") && lines[0].contains("LABELS"),
        "{list}"
    );
    // Sorted by zone, then name; the other VMs are filtered out by the API.
    assert!(lines[1].starts_with("europe-west1-b") && lines[1].contains("builder-b"));
    assert!(lines[1].contains("TERMINATED"), "{list}");
    assert!(lines[2].contains("builder-a") && lines[2].contains("RUNNING"));
    assert!(lines[3].starts_with("us-east1-c") && lines[3].contains("builder-c"));
    assert!(lines[2].contains("role=builder,team=infra"), "{list}");
    assert!(!list.contains("web-1") && !list.contains("db-1"), "{list}");
    assert!(
        stderr(&out).contains("3 instance(s) in project `absconda-test` with `role=builder`"),
        "{}",
        text(&out)
    );
    // What was sent: the filter expression on every page, the second page
    // asked for with the token the first one returned.
    let asked: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.route == Route::AggregatedList)
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    let param = |q: &str, k: &str| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    for r in &asked {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.method, "GET");
        assert_eq!(
            r.path,
            "/compute/v1/projects/absconda-test/aggregated/instances"
        );
        assert_eq!(
            param(&r.query, "filter").as_deref(),
            Some("labels.role = \"builder\"")
        );
    }
    assert_eq!(param(&asked[0].query, "pageToken"), None);
    assert!(param(&asked[1].query, "pageToken").is_some());
    assert!(!n.project().join("absconda-remote.yaml").exists());

    // Without a terminal and without --instance: the list, and the flag.
    let out = n.cmd().args(base).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stdout(&out).contains("builder-c"), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "`--instance` is required for provider `gcp`: pick one of the 3 instances listed above"
        ),
        "{err}"
    );
    assert!(
        err.contains("hint: pass `--zone ZONE --instance NAME`"),
        "{err}"
    );
    assert!(!n.project().join("absconda-remote.yaml").exists());

    // Several labels, and a label that no VM has.
    let out = n
        .cmd()
        .args(&base[..7])
        .args(["--label", "team=infra", "--label", "role", "--list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).lines().count(), 5, "{}", text(&out));
    let last = fake
        .requests()
        .into_iter()
        .rfind(|r| r.route == Route::AggregatedList)
        .unwrap();
    assert_eq!(
        param(&last.query, "filter").as_deref(),
        Some("(labels.team = \"infra\") (labels.role:*)")
    );
    let out = n
        .cmd()
        .args(&base[..7])
        .args(["--label", "role=nobody"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("the credentials see no instances matching `role=nobody`"),
        "{}",
        text(&out)
    );
    let out = n
        .cmd()
        .args(&base[..7])
        .args(["--label", "Role=X", "--list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("hint: write `--label KEY=VALUE`"));
}

#[test]
fn init_on_a_terminal_picks_a_gce_instance_from_a_menu() {
    crate::require!("script");
    let fake = gce_with_instances();
    let mut n = Newcomer::new();
    n.with_gce(&fake);
    let line = format!(
        "'{BIN}' init --provider gcp --project {} --api-endpoint '{}' --label role=builder --no-check",
        fake.project(),
        fake.api_endpoint()
    );
    let mut c = Command::new("script");
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", n.home())
        .env("USER", "tester")
        .env("TERM", "dumb")
        .env("GCE_METADATA_HOST", "127.0.0.1:1")
        .envs(n.env.iter().map(|(k, v)| (k, v)))
        .current_dir(n.project())
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // A number out of range is asked again; then the third VM (us-east1-c),
        // the user, no key file.
        stdin.write_all(b"9\n3\nbuilder\n\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let tty = stdout(&out);
    assert!(tty.contains("  1) europe-west1-b"), "{tty}");
    assert!(tty.contains("  3) us-east1-c"), "{tty}");
    assert!(tty.contains("builder VM [1-3]: "), "{tty}");
    assert!(tty.contains("type a number from 1 to 3"), "{tty}");
    let yaml = n.yaml();
    assert!(
        yaml.contains(
            "    provider: gcp\n    project: absconda-test\n    zone: us-east1-c\n    instance: builder-c\n"
        ),
        "{yaml}"
    );
    assert!(yaml.contains("    user: builder\n"), "{yaml}");
}

#[tokio::test]
async fn init_lists_ec2_instances_by_tag() {
    let Some(moto) = crate::support::moto::Moto::start().await else {
        return;
    };
    let tagged = moto.run_instance(Some("builder-one")).await;
    let tagged2 = moto.run_instance(Some("builder-two")).await;
    let untagged = moto.run_instance(Some("web")).await;
    let gone = moto.run_instance(Some("builder-old")).await;
    let ec2 = moto.ec2(absconda::cloud::ec2::Ec2Instance::Id(tagged.clone()));
    for id in [&tagged, &tagged2, &gone] {
        ec2.query(
            "CreateTags",
            &[
                ("ResourceId.1", id.as_str()),
                ("Tag.1.Key", "role"),
                ("Tag.1.Value", "builder"),
            ],
        )
        .await
        .unwrap();
    }
    moto.terminate(&gone).await;
    let mut n = Newcomer::new();
    let (key, secret) = moto.access_key();
    n.env.extend([
        ("AWS_ACCESS_KEY_ID".to_string(), key.to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), secret.to_string()),
        (
            "AWS_ENDPOINT_URL_EC2".to_string(),
            moto.endpoint().to_string(),
        ),
    ]);
    let base = [
        "init",
        "--provider",
        "aws",
        "--region",
        "us-east-1",
        "--tag",
        "role=builder",
    ];
    let out = n.cmd().args(base).arg("--list").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list = stdout(&out);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("INSTANCE ID"), "{list}");
    assert!(lines[1].starts_with(&tagged) && lines[1].contains("builder-one"));
    assert!(lines[1].contains("running"), "{list}");
    assert!(lines[2].starts_with(&tagged2) && lines[2].contains("builder-two"));
    // Untagged and terminated instances are left out.
    assert!(!list.contains(&untagged) && !list.contains(&gone), "{list}");
    assert!(
        stderr(&out).contains("2 instance(s) in region `us-east-1` with `role=builder`"),
        "{}",
        text(&out)
    );

    // Without a terminal and without --instance-id: the list and the flag.
    let out = n.cmd().args(base).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stdout(&out).contains(&tagged2), "{}", text(&out));
    assert!(
        stderr(&out).contains("hint: pass `--instance-id ID` of one of them"),
        "{}",
        text(&out)
    );
    // A tag key alone matches any value.
    let out = n
        .cmd()
        .args(&base[..5])
        .args(["--tag", "Name", "--list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).lines().count(), 4, "{}", text(&out));

    // Picked by flag, the file names it.
    let out = n
        .cmd()
        .args(base)
        .args(["--instance-id", &tagged2, "--user", "ubuntu", "--no-check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        n.yaml().contains(&format!(
            "    region: us-east-1\n    instance_id: {tagged2}\n"
        )),
        "{}",
        n.yaml()
    );
}

fn ssh_flags(sshd: &Sshd, port: &str) -> Vec<String> {
    [
        "--host",
        sshd.listen.as_str(),
        "--port",
        port,
        "--user",
        "root",
        "--identity-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([sshd.user_key.display().to_string()])
    .collect()
}

#[test]
fn init_offers_an_unknown_host_key_and_records_it_when_asked() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let n = Newcomer::new();
    let port = sshd.port.to_string();
    let ws = n.dir.path().join("ws");
    let mut args = vec!["init".to_string()];
    args.extend(ssh_flags(&sshd, &port));
    args.extend(["--workspace".into(), ws.display().to_string()]);
    let fp = sshd.fingerprint();

    // Unknown key, no flag: the file is written, the report says what to do.
    let out = n.cmd().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("presents ssh-ed25519 key {fp}"))
            || err.contains(&format!("key {fp}")),
        "{err}"
    );
    assert!(err.contains("  FAIL  ssh"), "{err}");
    assert!(
        err.contains(&format!(
            "next: if {fp} is what `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints on the builder, run this command again with `--force --accept-new-host-key`"
        )),
        "{err}"
    );
    assert!(err.contains("not ready yet (ssh failed)"), "{err}");
    assert!(n.yaml().contains("default_builder: local"));
    assert!(
        !n.known_hosts().contains("ssh-ed25519"),
        "{}",
        n.known_hosts()
    );

    // On a terminal it asks; `n` records nothing, `y` records the key.
    if crate::support::require("script") {
        let line = args
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let on_tty = |answer: &[u8]| {
            let mut child = Command::new("script")
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("HOME", n.home())
                .env("USER", "tester")
                .env("TERM", "dumb")
                .current_dir(n.project())
                .args(["-qefc", &format!("'{BIN}' {line} --force"), "/dev/null"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(answer).unwrap();
            }
            child.wait_with_output().unwrap()
        };
        let out = on_tty(b"n\n");
        assert!(out.status.success(), "{}", text(&out));
        let tty = stdout(&out);
        assert!(
            tty.contains("record it in known_hosts? compare it first with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the builder [y/N]: "),
            "{tty}"
        );
        assert!(tty.contains("FAIL  ssh"), "{tty}");
        assert!(!n.known_hosts().contains("ssh-ed25519"));
        let out = on_tty(b"y\n");
        assert!(out.status.success(), "{}", text(&out));
        let tty = stdout(&out);
        assert!(tty.contains("on first use, as you answered"), "{tty}");
        assert!(tty.contains("builder `local` is ready"), "{tty}");
        assert!(n.known_hosts().contains("ssh-ed25519"));
        std::fs::remove_file(n.home().join(".ssh/known_hosts")).unwrap();
    }

    // With --accept-new-host-key: recorded, and every check passes.
    let out = n
        .cmd()
        .args(&args)
        .args(["--force", "--accept-new-host-key"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("recorded the host key of"), "{err}");
    assert!(
        err.contains("on first use, as `--accept-new-host-key` asked"),
        "{err}"
    );
    for check in ["ok    ssh", "ok    docker", "ok    workspace"] {
        assert!(err.contains(check), "{check}: {err}");
    }
    assert!(err.contains("builder `local` is ready"), "{err}");
    let key_b64 = sshd.host_key_pub.split_whitespace().nth(1).unwrap();
    assert!(n.known_hosts().contains(key_b64), "{}", n.known_hosts());

    // Known now: a workspace the user cannot create is reported with the fix.
    let mut bad = vec!["init".to_string()];
    bad.extend(ssh_flags(&sshd, &port));
    bad.extend([
        "--workspace".into(),
        "/proc/absconda-ws".into(),
        "--force".into(),
    ]);
    let out = n.cmd().args(&bad).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(!err.contains("does not record"), "{err}");
    assert!(err.contains("ok    ssh"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("FAIL  workspace"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("`root` cannot create `/proc/absconda-ws`")
            && line.contains("run `sudo install -d -o root /proc/absconda-ws` on the builder"),
        "{line}"
    );
    // (`/proc` also has no disk space to speak of.)
    assert!(err.contains("workspace failed);"), "{err}");

    // A key the builder does not accept: the next step names its `.pub`.
    let other = n.dir.path().join("other_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let mut refused = vec!["init".to_string()];
    refused.extend(ssh_flags(&sshd, &port));
    *refused.last_mut().unwrap() = other.display().to_string();
    refused.push("--force".into());
    let out = n.cmd().args(&refused).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("FAIL  ssh"), "{err}");
    assert!(
        err.contains(&format!(
            "next: authorise `{}.pub` for `root`",
            other.display()
        )),
        "{err}"
    );
}

#[test]
fn init_records_the_host_key_the_cloud_confirms() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.set_guest_host_keys("builder", &[&sshd.host_key_pub]);
    let mut n = Newcomer::new();
    n.with_gce(&fake);
    let port = sshd.port.to_string();
    let mut args: Vec<String> = [
        "init",
        "--provider",
        "gcp",
        "--project",
        fake.project(),
        "--zone",
        fake.zone(),
        "--instance",
        "builder",
        "--api-endpoint",
        &fake.api_endpoint(),
        "--workspace",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(n.dir.path().join("ws").display().to_string());
    // The fake's natIP is not routable: the loopback sshd stands in for it.
    args.extend(ssh_flags(&sshd, &port));

    let out = n.cmd().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the cloud confirms this key (guest attributes)"),
        "{err}"
    );
    assert!(
        err.contains("next: the cloud confirms the key: run this command again with `--force --trust-cloud-host-key`"),
        "{err}"
    );
    assert!(!n.known_hosts().contains("ssh-ed25519"));

    let out = n
        .cmd()
        .args(&args)
        .args(["--force", "--trust-cloud-host-key"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("recorded the host key of"), "{err}");
    assert!(err.contains("confirmed by the cloud"), "{err}");
    assert!(err.contains("builder `gcp-builder` is ready"), "{err}");
    assert!(fake.count(Route::GuestAttributes) >= 2);

    // A key the cloud does not report is never recorded, whatever the flags.
    let (other, _) = {
        let dir = crate::support::tempdir();
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
            .arg(dir.path().join("k"))
            .status()
            .unwrap();
        assert!(st.success());
        (
            std::fs::read_to_string(dir.path().join("k.pub"))
                .unwrap()
                .trim()
                .to_string(),
            dir,
        )
    };
    fake.set_guest_host_keys("builder", &[&other]);
    std::fs::remove_file(n.home().join(".ssh/known_hosts")).unwrap();
    let out = n
        .cmd()
        .args(&args)
        .args(["--force", "--trust-cloud-host-key", "--accept-new-host-key"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("the cloud reports other keys"), "{err}");
    assert!(!err.contains("recorded the host key"), "{err}");
    assert!(!n.known_hosts().contains("ssh-ed25519"));
}

/// A `~/.ssh/config` as people write them: defaults for every host, a
/// bastion, hosts behind it, wildcards and comments.
fn write_ssh_config(home: &Path, sshd: &Sshd) {
    let cfg = format!(
        "# personal ssh config\n\
         Host *\n\
         \x20   ServerAliveInterval 30\n\
         \x20   AddKeysToAgent yes\n\
         \n\
         Host github.com\n\
         \x20   User git\n\
         \n\
         Host bastion\n\
         \x20   HostName bastion.example.net\n\
         \x20   User jump\n\
         \n\
         Host buildbox build\n\
         \x20   HostName {}\n\
         \x20   Port {}\n\
         \x20   User root\n\
         \x20   IdentityFile {}\n\
         \x20   IdentitiesOnly yes\n\
         \n\
         Host behind-bastion\n\
         \x20   HostName 10.1.2.3\n\
         \x20   ProxyJump bastion\n\
         \n\
         Host *.internal !skip.internal\n\
         \x20   User ops\n",
        sshd.listen,
        sshd.port,
        sshd.user_key.display()
    );
    std::fs::write(home.join(".ssh/config"), cfg).unwrap();
}

#[test]
fn init_from_an_ssh_config_alias_keeps_the_alias_and_shows_what_it_resolves_to() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let n = Newcomer::new();
    write_ssh_config(&n.home(), &sshd);
    std::fs::copy(&sshd.known_hosts, n.home().join(".ssh/known_hosts")).unwrap();
    let ws = n.dir.path().join("ws");
    let out = n
        .cmd()
        .args(["init", "--from-ssh-config", "buildbox", "--workspace"])
        .arg(&ws)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "`Host buildbox` in `{}`: HostName {}, User root, Port {}, ProxyJump none",
            n.home().join(".ssh/config").display(),
            sshd.listen,
            sshd.port
        )),
        "{err}"
    );
    assert!(err.contains("builder `buildbox` is ready"), "{err}");
    let yaml = n.yaml();
    assert!(
        yaml.contains("default_builder: buildbox\n")
            && yaml.contains("  buildbox:\n    provider: ssh\n    host: buildbox\n"),
        "{yaml}"
    );
    // Nothing the ssh config says is copied: it keeps applying.
    assert!(!yaml.contains("port:") && !yaml.contains("user:"), "{yaml}");

    // A host behind a jump host, added to the file.
    let out = n
        .cmd()
        .args([
            "remote",
            "add",
            "far",
            "--from-ssh-config",
            "behind-bastion",
            "--no-check",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("HostName 10.1.2.3, User tester, Port 22, ProxyJump bastion"),
        "{}",
        text(&out)
    );

    // A typo gets a did-you-mean and the way out.
    let out = n
        .cmd()
        .args(["init", "--force", "--from-ssh-config", "buildbx"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no `Host buildbx` in `") && err.contains("(did you mean `buildbox`?)"),
        "{err}"
    );
    assert!(err.contains("hint: add a `Host buildbx` block"), "{err}");
    // Wildcards are not aliases.
    let out = n
        .cmd()
        .args(["init", "--force", "--from-ssh-config", "*.internal"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = n
        .cmd()
        .args([
            "init",
            "--force",
            "--from-ssh-config",
            "build",
            "--host",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("cannot go with `--host`"),
        "{}",
        text(&out)
    );
}
