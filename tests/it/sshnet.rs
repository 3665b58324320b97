//! Reaching builders through proxies and jump hosts, against real OpenSSH
//! sshd, real proxies (tinyproxy, dante) and the harness's own proxies.

use std::process::Command;
use std::time::Duration;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::netns::NetNs;
use crate::support::sshd::{SSHD, Sshd};
use crate::support::tunnel_proxy::{Kind, TunnelProxy};
use crate::support::{free_port, spawn_daemon, tempdir, wait_until};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

fn status(p: &Project) -> std::process::Output {
    p.cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap()
}

fn status_json(p: &Project) -> serde_json::Value {
    let out = status(p);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A build with push whose image is checked in the registry.
fn build_and_check(p: &mut Project, name: &str) {
    let reg = registry();
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello.txt /hello.txt\n"),
    );
    p.file("hello.txt", &format!("hello through {name}\n"));
    let repo = format!("{}/sshnet/{name}", reg.addr);
    let out = p.build(&repo, &["--tag", "v1", "--push"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(reg.tags(&format!("sshnet/{name}")), ["v1"]);
    let files = reg.files(&format!("sshnet/{name}"), "v1");
    assert_eq!(
        files.get("hello.txt").map(|v| v.as_slice()),
        Some(format!("hello through {name}\n").as_bytes())
    );
    assert!(
        p.run_folders().is_empty(),
        "run folder left: {:?}",
        p.run_folders()
    );
}

#[test]
fn ssh_through_an_http_connect_proxy_with_and_without_credentials() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let target = format!("127.0.0.1:{}", sshd.port);

    let open = TunnelProxy::start(Kind::Http, None);
    let p = Project::with_builder(&sshd, &format!("    proxy: {}\n", open.url()));
    let st = status_json(&p);
    assert_eq!(st["reachable"], true);
    assert_eq!(open.tunnels(), std::slice::from_ref(&target));
    assert_eq!(st["path"], format!("through proxy {}", open.url()));
    assert_eq!(st["user"], "root");

    let locked = TunnelProxy::start(Kind::Http, Some(("alice", "pr0xy-s3cret")));
    let mut p = Project::with_builder(&sshd, &format!("    proxy: {}\n", locked.url()));
    let st = status_json(&p);
    assert_eq!(st["reachable"], true);
    assert_eq!(locked.tunnels(), std::slice::from_ref(&target));
    let shown = serde_json::to_string(&st).unwrap();
    assert!(!shown.contains("pr0xy-s3cret"), "{shown}");
    assert!(shown.contains("alice:***@"), "{shown}");
    build_and_check(&mut p, "http-proxy");
    assert!(locked.tunnels().len() >= 2, "{:?}", locked.tunnels());

    // A wrong password: a clear error that does not repeat it, nothing tunnelled.
    let p = Project::with_builder(
        &sshd,
        &format!(
            "    proxy: http://alice:wrong-pw@127.0.0.1:{}\n",
            locked.port
        ),
    );
    let before = locked.tunnels().len();
    let out = p
        .cmd()
        .args(["remote", "status", "local"])
        .output()
        .unwrap();
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("the proxy refused the credentials"), "{err}");
    assert!(err.contains("407"), "{err}");
    assert!(!err.contains("wrong-pw"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(locked.tunnels()[before..], [format!("refused {target}")]);

    // No credentials for a proxy that wants them: the hint says where they go.
    let p = Project::with_builder(
        &sshd,
        &format!("    proxy: http://127.0.0.1:{}\n", locked.port),
    );
    let err = text(
        &p.cmd()
            .args(["remote", "status", "local"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("the proxy requires credentials"), "{err}");
}

#[test]
fn ssh_through_a_socks5_proxy_with_a_whole_build() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let socks = TunnelProxy::start(Kind::Socks5, Some(("bob", "s0cks-pw")));
    let mut p = Project::with_builder(&sshd, &format!("    proxy: {}\n", socks.url()));
    build_and_check(&mut p, "socks5");
    assert!(
        socks
            .tunnels()
            .iter()
            .all(|t| *t == format!("127.0.0.1:{}", sshd.port)),
        "{:?}",
        socks.tunnels()
    );
    assert!(!socks.tunnels().is_empty());

    let p = Project::with_builder(
        &sshd,
        &format!("    proxy: socks5://bob:nope@127.0.0.1:{}\n", socks.port),
    );
    let out = status(&p);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("the proxy refused the credentials"), "{err}");
    assert!(!err.contains("nope"), "{err}");
}

/// `proxy: env` takes `ALL_PROXY`; without it `ALL_PROXY` is ignored.
#[test]
fn all_proxy_applies_only_when_the_config_asks() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let socks = TunnelProxy::start(Kind::Socks5, None);
    let mut p = Project::new(&sshd);
    p.env.push(("ALL_PROXY".into(), socks.url()));
    status_json(&p);
    assert!(socks.tunnels().is_empty(), "{:?}", socks.tunnels());

    let mut p = Project::with_builder(&sshd, "    proxy: env\n");
    p.env.push(("ALL_PROXY".into(), socks.url()));
    let st = status_json(&p);
    assert_eq!(socks.tunnels(), [format!("127.0.0.1:{}", sshd.port)]);
    assert_eq!(st["path"], format!("through proxy {}", socks.url()));
}

/// Debian's tinyproxy (HTTP CONNECT with Basic auth) and dante (SOCKS5).
#[test]
fn ssh_through_tinyproxy_and_dante() {
    if !(ok() && crate::support::require("tinyproxy") && crate::support::require("danted")) {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let dir = tempdir();
    let d = dir.path();

    let tp_port = free_port();
    std::fs::write(
        d.join("tinyproxy.conf"),
        format!(
            "Port {tp_port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 20\nAllow 127.0.0.1\n\
             BasicAuth carol t1ny-pw\nConnectPort {}\nLogFile \"{}\"\nLogLevel Connect\n",
            sshd.port,
            d.join("tinyproxy.log").display()
        ),
    )
    .unwrap();
    let mut c = Command::new("tinyproxy");
    c.args(["-d", "-c"]).arg(d.join("tinyproxy.conf"));
    let _tinyproxy = Kid(spawn_daemon(c).unwrap());
    wait_until("tinyproxy listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", tp_port)).is_ok()
    });
    let p = Project::with_builder(
        &sshd,
        &format!("    proxy: http://carol:t1ny-pw@127.0.0.1:{tp_port}\n"),
    );
    assert_eq!(status_json(&p)["reachable"], true);
    let log = std::fs::read_to_string(d.join("tinyproxy.log")).unwrap_or_default();
    assert!(log.contains(&format!("127.0.0.1:{}", sshd.port)), "{log}");
    let p = Project::with_builder(
        &sshd,
        &format!("    proxy: http://carol:bad@127.0.0.1:{tp_port}\n"),
    );
    let err = text(&status(&p));
    assert!(err.contains("the proxy refused the credentials"), "{err}");

    let dante_port = free_port();
    std::fs::write(
        d.join("danted.conf"),
        format!(
            "logoutput: {log}\ninternal: 127.0.0.1 port = {dante_port}\nexternal: 127.0.0.1\n\
             socksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{\n  from: 127.0.0.1/32 to: 0.0.0.0/0\n}}\n\
             socks pass {{\n  from: 127.0.0.1/32 to: 127.0.0.1/32\n  command: connect\n  log: connect\n}}\n",
            log = d.join("danted.log").display()
        ),
    )
    .unwrap();
    let mut c = Command::new("danted");
    c.args(["-f"])
        .arg(d.join("danted.conf"))
        .args(["-p"])
        .arg(d.join("danted.pid"));
    let _dante = Kid(spawn_daemon(c).unwrap());
    wait_until("dante listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", dante_port)).is_ok()
    });
    let p = Project::with_builder(
        &sshd,
        &format!("    proxy: socks5://127.0.0.1:{dante_port}\n"),
    );
    assert_eq!(status_json(&p)["reachable"], true);
    let log = std::fs::read_to_string(d.join("danted.log")).unwrap_or_default();
    assert!(log.contains(&format!("127.0.0.1.{}", sshd.port)), "{log}");
}

struct Kid(std::process::Child);

impl Drop for Kid {
    fn drop(&mut self) {
        // SIGTERM, so that dante's mother process takes its children along.
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A chain: `hop1` on this machine's loopback, `hop2` on a namespace's veth
/// address, and the builder on the namespace's own loopback, which this
/// machine cannot dial.
pub(crate) struct Chain {
    pub ns: NetNs,
    pub hop1: Sshd,
    pub hop2: Sshd,
    pub target: Sshd,
}

impl Chain {
    pub(crate) fn start() -> Chain {
        let ns = NetNs::new().expect("`ip` is required for a namespace");
        // DEBUG1 logs each `direct-tcpip` request with its destination.
        let debug = "LogLevel DEBUG1\n";
        let hop1 = Sshd::start_with(None, "127.0.0.1", None, debug);
        let hop2 = Sshd::start_with(None, &ns.ns_ip.clone(), Some(&ns.name), debug);
        let target = Sshd::start_with(Some(&docker().host), "127.0.0.1", Some(&ns.name), "");
        // One key for all three, one known_hosts with each under its own name.
        let key = std::fs::read_to_string(target.user_key.with_extension("pub")).unwrap();
        let mut known = std::fs::read_to_string(&target.known_hosts).unwrap();
        for hop in [&hop1, &hop2] {
            std::fs::write(hop.dir.path().join("authorized_keys"), &key).unwrap();
            known.push_str(&std::fs::read_to_string(&hop.known_hosts).unwrap());
        }
        std::fs::write(&target.known_hosts, known).unwrap();
        Chain {
            ns,
            hop1,
            hop2,
            target,
        }
    }

    pub(crate) fn jump_yaml(&self) -> String {
        format!(
            "    jump:\n      - root@127.0.0.1:{}\n      - root@{}:{}\n",
            self.hop1.port, self.ns.ns_ip, self.hop2.port
        )
    }
}

#[test]
fn a_builder_behind_two_jump_hosts_builds_and_pushes() {
    if !(ok() && crate::support::require("ip")) {
        return;
    }
    let chain = Chain::start();
    // Not reachable directly: the builder listens on the namespace's loopback.
    let p = Project::new(&chain.target);
    let out = status(&p);
    assert!(
        !out.status.success(),
        "the target must not be reachable directly"
    );

    let mut p = Project::with_builder(&chain.target, &chain.jump_yaml());
    let st = status_json(&p);
    assert_eq!(st["reachable"], true);
    assert_eq!(
        st["path"],
        format!(
            "jump chain root@127.0.0.1:{} -> root@{}:{} -> root@127.0.0.1:{}",
            chain.hop1.port, chain.ns.ns_ip, chain.hop2.port, chain.target.port
        )
    );
    build_and_check(&mut p, "two-hops");
    // Each hop authenticated the user itself and forwarded to the next one.
    for (hop, next) in [
        (
            &chain.hop1,
            format!("{}:{}", chain.ns.ns_ip, chain.hop2.port),
        ),
        (&chain.hop2, format!("127.0.0.1:{}", chain.target.port)),
    ] {
        let log = hop.log();
        assert!(log.contains("Accepted publickey for root"), "{log}");
        assert!(
            log.lines().any(|l| l.contains("direct_tcpip")
                && l.contains(&format!("target {}", next.replace(':', " port ")))),
            "hop did not forward to {next}:\n{log}"
        );
    }
    assert!(chain.target.log().contains("Accepted publickey for root"));
}

#[test]
fn a_wrong_host_key_on_the_middle_hop_is_refused_before_the_next_hop_is_dialled() {
    if !(ok() && crate::support::require("ip")) {
        return;
    }
    let chain = Chain::start();
    // Record another key under hop2's name.
    let known = std::fs::read_to_string(&chain.target.known_hosts).unwrap();
    let hop2_line = std::fs::read_to_string(&chain.hop2.known_hosts).unwrap();
    let forged = hop2_line.replace(
        chain.hop2.host_key_pub.trim(),
        chain.hop1.host_key_pub.trim(),
    );
    std::fs::write(
        &chain.target.known_hosts,
        known.replace(&hop2_line, &forged),
    )
    .unwrap();
    let p = Project::with_builder(&chain.target, &chain.jump_yaml());
    let out = status(&p);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("HOST KEY MISMATCH"), "{err}");
    assert!(
        err.contains(&format!("[{}]:{}", chain.ns.ns_ip, chain.hop2.port)),
        "the error must name the hop: {err}"
    );
    // hop2 never authenticated anyone and the builder saw no connection.
    assert!(
        !chain.hop2.log().contains("Accepted publickey"),
        "{}",
        chain.hop2.log()
    );
    assert!(
        !chain.target.log().contains("Connection from"),
        "{}",
        chain.target.log()
    );
}

#[test]
fn a_dead_hop_fails_with_a_message_naming_it() {
    if !(ok() && crate::support::require("ip")) {
        return;
    }
    let mut chain = Chain::start();
    chain.hop2.stop();
    let p = Project::with_builder(&chain.target, &chain.jump_yaml());
    let out = status(&p);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "`127.0.0.1:{} (jump host 1 of 2)`",
            chain.hop1.port
        )) && err.contains(&format!("{}:{}", chain.ns.ns_ip, chain.hop2.port)),
        "{err}"
    );
    assert!(err.contains("jump host"), "{err}");
}

/// `host:` is a Host alias of `~/.ssh/config`, whose ProxyJump names two
/// more aliases: a whole build goes through the chain they describe.
#[test]
fn an_ssh_config_alias_with_proxyjump_builds_and_pushes() {
    if !(ok() && crate::support::require("ip")) {
        return;
    }
    let chain = Chain::start();
    let mut p = Project::new(&chain.target);
    let ssh = p.home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::copy(&chain.target.user_key, ssh.join("builder_key")).unwrap();
    std::fs::copy(&chain.target.known_hosts, ssh.join("kh")).unwrap();
    std::fs::write(
        ssh.join("extra.conf"),
        format!(
            "Host inner-bastion\n  HostName {}\n  Port {}\n",
            chain.ns.ns_ip, chain.hop2.port
        ),
    )
    .unwrap();
    std::fs::write(
        ssh.join("config"),
        format!(
            "Include extra.conf\n\
             Host bastion\n  HostName 127.0.0.1\n  Port {}\n\
             Host my-builder\n  HostName 127.0.0.1\n  Port {}\n  ProxyJump bastion,inner-bastion\n\
             Host other\n  ProxyCommand nc %h %p\n\
             Host *\n  User root\n  IdentityFile ~/.ssh/builder_key\n  UserKnownHostsFile ~/.ssh/kh\n",
            chain.hop1.port, chain.target.port
        ),
    )
    .unwrap();
    std::fs::write(
        &p.config,
        format!(
            "builders:\n  local:\n    provider: ssh\n    host: my-builder\n    workspace: {}\n    docker: {}\n",
            p.workspace.display(),
            crate::support::docker::DOCKER_CLI
        ),
    )
    .unwrap();
    let st = status_json(&p);
    assert_eq!(
        st["path"],
        format!(
            "jump chain root@127.0.0.1:{} -> root@{}:{} -> root@127.0.0.1:{}",
            chain.hop1.port, chain.ns.ns_ip, chain.hop2.port, chain.target.port
        )
    );
    build_and_check(&mut p, "ssh-config-alias");
    assert!(chain.hop2.log().contains("Accepted publickey for root"));

    // `ssh_config: false`: the alias means nothing any more.
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        yaml.replace(
            "    host: my-builder\n",
            "    host: my-builder\n    ssh_config: false\n",
        ),
    )
    .unwrap();
    assert!(!status(&p).status.success());

    // ProxyCommand would run a program: refused, naming the native replacement.
    std::fs::write(&p.config, yaml.replace("host: my-builder", "host: other")).unwrap();
    let out = status(&p);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ProxyCommand") && err.contains("ProxyJump") && err.contains("proxy:"),
        "{err}"
    );
}

/// A key file others can read is refused as OpenSSH refuses it, unless
/// ABSCONDA_ALLOW_OPEN_KEYS=1 (with a warning).
#[test]
fn an_open_key_file_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let mut p = Project::new(&sshd);
    let key = &sshd.user_key;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = status(&p);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("permissions 0644"), "{err}");
    assert!(err.contains("are too open"), "{err}");
    assert!(
        err.contains(&format!("hint: `chmod 600 {}`", key.display())),
        "{err}"
    );
    assert!(
        !sshd.log().contains("Accepted publickey"),
        "the key must not be offered"
    );

    p.env.push(("ABSCONDA_ALLOW_OPEN_KEYS".into(), "1".into()));
    let out = status(&p);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("accessible by others"),
        "{}",
        text(&out)
    );

    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.env.clear();
    let out = status(&p);
    assert!(out.status.success(), "{}", text(&out));
}

fn keygen(args: &[&str]) {
    let st = Command::new("ssh-keygen").args(args).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// OpenSSH user certificates against sshd's `TrustedUserCAKeys`: a valid one
/// logs in with a key sshd does not list; an expired one and one for another
/// principal get clear errors before anything is offered.
#[test]
fn openssh_user_certificates_log_in_and_bad_ones_are_explained() {
    if !ok() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let ca = d.join("ca");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "",
        "-f",
        ca.to_str().unwrap(),
    ]);
    let sshd = Sshd::start_with(
        Some(&docker().host),
        "127.0.0.1",
        None,
        &format!("TrustedUserCAKeys {}.pub\n", ca.display()),
    );
    let key = d.join("certkey");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "",
        "-f",
        key.to_str().unwrap(),
    ]);
    let sign = |name: &str, principal: &str, validity: &str| -> std::path::PathBuf {
        let k = d.join(name);
        std::fs::copy(&key, &k).unwrap();
        std::fs::copy(key.with_extension("pub"), d.join(format!("{name}.pub"))).unwrap();
        keygen(&[
            "-q",
            "-s",
            ca.to_str().unwrap(),
            "-I",
            name,
            "-n",
            principal,
            "-V",
            validity,
            d.join(format!("{name}.pub")).to_str().unwrap(),
        ]);
        d.join(format!("{name}-cert.pub"))
    };
    let project = |cert: &std::path::Path, key: &std::path::Path| {
        let mut p = Project::with_builder(
            &sshd,
            &format!("    certificate_file: {}\n", cert.display()),
        );
        let yaml = std::fs::read_to_string(&p.config).unwrap();
        std::fs::write(
            &p.config,
            yaml.replace(
                &sshd.user_key.display().to_string(),
                &key.display().to_string(),
            ),
        )
        .unwrap();
        p.env.clear();
        p
    };

    let good = sign("good", "root", "-5m:+1h");
    let mut p = project(&good, &d.join("good"));
    build_and_check(&mut p, "certificate");
    assert!(
        sshd.log().contains("Accepted certificate ID \"good\""),
        "{}",
        sshd.log()
    );

    let expired = sign("old", "root", "20200101:20200102");
    let out = status(&project(&expired, &d.join("old")));
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("old-cert.pub` expired (valid until 2020-01-02"),
        "{err}"
    );

    let other = sign("other", "alice,bob", "-5m:+1h");
    let out = status(&project(&other, &d.join("other")));
    let err = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("is not valid for the user `root` (its principals: alice, bob)"),
        "{err}"
    );
    assert!(!sshd.log().contains("ID \"old\"") && !sshd.log().contains("ID \"other\""));
}
