//! Builder pools: several real sshd builders behind one name, concurrent
//! clients, affinity measured on the wire, failover past dead builders and
//! VMs the cloud cannot start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use crate::support::absconda::{BIN, text};
use crate::support::counting_proxy::CountingProxy;
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker};
use crate::support::gce_fake::{Flow, GceFake};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::tempdir;

fn services() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

/// A builder as seen through a counting proxy: its sshd, its own
/// workspace, and the bytes that went to it.
struct Member {
    name: String,
    sshd: Sshd,
    proxy: CountingProxy,
    workspace: PathBuf,
}

impl Member {
    fn start(name: &str, dir: &Path) -> Member {
        let sshd = Sshd::start(Some(&docker().host));
        let upstream = format!("{}:{}", sshd.listen, sshd.port).parse().unwrap();
        let proxy = CountingProxy::start("127.0.0.1:0", upstream);
        let workspace = dir.join(format!("ws-{name}"));
        Member {
            name: name.into(),
            sshd,
            proxy,
            workspace,
        }
    }

    /// The builder's lines in the builders file (the host key pinned, since
    /// it is reached through the proxy's port).
    fn yaml(&self, extra: &str) -> String {
        format!(
            "  {name}:\n    host: 127.0.0.1\n    port: {port}\n    user: root\n    identity_file: {key}\n    host_key: {fp}\n    workspace: {ws}\n    docker: {DOCKER_CLI}\n{extra}",
            name = self.name,
            port = self.proxy.addr.port(),
            key = self.sshd.user_key.display(),
            fp = self.sshd.fingerprint(),
            ws = self.workspace.display(),
        )
    }
}

/// One user's machine: its own HOME (state, sync cache) and context.
struct Client {
    home: PathBuf,
    context: PathBuf,
}

impl Client {
    fn new(dir: &Path, name: &str, dockerfile: &str) -> Client {
        let home = dir.join(format!("home-{name}"));
        let context = dir.join(format!("ctx-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
        std::fs::write(context.join("who.txt"), name).unwrap();
        Client { home, context }
    }

    fn build(
        &self,
        config: &Path,
        builder: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Output {
        self.build_to(config, builder, "local/pool-test", extra, env)
    }

    fn build_to(
        &self,
        config: &Path,
        builder: &str,
        repository: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Output {
        self.build_via(&[], config, builder, repository, extra, env)
    }

    /// [`Client::build_to`] with absconda started by `wrapper` (`ip netns
    /// exec NS`), when given.
    fn build_via(
        &self,
        wrapper: &[&str],
        config: &Path,
        builder: &str,
        repository: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Output {
        let mut c = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("USER", "tester")
            .env("ABSCONDA_REMOTE_CONFIG", config)
            .args(["build", "--remote-builder", builder, "--context"])
            .arg(&self.context)
            .args(["--repository", repository])
            .args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

/// The builder a pool build ran on, from its `building on` line.
fn built_on(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains(": building on `"))
        .unwrap_or_else(|| panic!("no `building on` line:\n{}", text(out)));
    line.rsplit('`').nth(1).unwrap().to_string()
}

/// `(start, end)` of the RUN step, in the kernel's uptime (one clock for
/// every container on this machine), printed by the step itself.
fn run_span(out: &Output, nonce: &str) -> (f64, f64) {
    let err = String::from_utf8_lossy(&out.stderr);
    let mut start = None;
    let mut end = None;
    for l in err.lines() {
        let Some(rest) = l.split("span ").nth(1) else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() >= 3 && words[2] == nonce {
            let t: f64 = words[0].parse().unwrap();
            match words[1] {
                "start" => start = Some(t),
                "end" => end = Some(t),
                _ => {}
            }
        }
    }
    match (start, end) {
        (Some(s), Some(e)) => (s, e),
        _ => panic!("no span for {nonce}:\n{}", text(out)),
    }
}

const SPAN_DOCKERFILE: &str = "FROM BASE\nARG NONCE\nRUN echo \"span $(cut -d' ' -f1 /proc/uptime) start $NONCE\" && sleep 4 && echo \"span $(cut -d' ' -f1 /proc/uptime) end $NONCE\"\n";

#[test]
fn concurrent_clients_share_a_pool_one_build_per_builder_at_a_time() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let members: Vec<Member> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| Member::start(n, dir.path()))
        .collect();
    let config = dir.path().join("absconda-remote.yaml");
    let mut yaml = String::from("builders:\n");
    for m in &members {
        yaml.push_str(&m.yaml(""));
    }
    yaml.push_str("pools:\n  farm:\n    builders: [b1, b2, b3]\n    prefer: idle\n");
    std::fs::write(&config, yaml).unwrap();
    // Each build's step sleeps 12 s: the builders share this machine's two
    // cores, so a step that waits, not one that computes, shows what the
    // pool does for throughput.
    let dockerfile = SPAN_DOCKERFILE
        .replace("BASE", BASE_IMAGE)
        .replace("sleep 4", "sleep 12");

    // Six clients, two builds each, all at once.
    let clients: Vec<Client> = (0..6)
        .map(|i| Client::new(dir.path(), &format!("c{i}"), &dockerfile))
        .collect();
    let started = Instant::now();
    let results: Vec<(String, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let config = &config;
                s.spawn(move || {
                    (0..2)
                        .map(|j| {
                            let nonce = format!("c{i}b{j}");
                            let out = c.build(
                                config,
                                "farm",
                                &[
                                    "--no-cache",
                                    "--network",
                                    "none",
                                    "--progress",
                                    "plain",
                                    "--build-arg",
                                    &format!("NONCE={nonce}"),
                                ],
                                &[],
                            );
                            (nonce, out)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();

    let mut spans: BTreeMap<String, Vec<(f64, f64, String)>> = BTreeMap::new();
    for (nonce, out) in &results {
        assert!(out.status.success(), "{nonce}: {}", text(out));
        let (s, e) = run_span(out, nonce);
        spans
            .entry(built_on(out))
            .or_default()
            .push((s, e, nonce.clone()));
    }
    // No builder ever ran two builds at once.
    for (builder, list) in &mut spans {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in list.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "`{builder}` ran {} and {} at once: {list:?}",
                w[0].2,
                w[1].2
            );
        }
    }
    assert_eq!(spans.len(), 3, "every builder took builds: {spans:?}");
    // Builds ran side by side on different builders: at some moment, the
    // steps of at least two builders were running. (How much faster than
    // one builder that makes a pool is measured in benches/, on machines
    // whose cores are not shared by all three builders as here.)
    let all: Vec<(f64, f64, &String)> = spans
        .iter()
        .flat_map(|(b, l)| l.iter().map(move |(s, e, _)| (*s, *e, b)))
        .collect();
    let overlapping = all
        .iter()
        .any(|a| all.iter().any(|b| a.2 != b.2 && a.0 < b.1 && b.0 < a.1));
    assert!(
        overlapping,
        "no two builders ever built at the same time (whole run {wall:.1}s): {spans:?}"
    );
    for (builder, list) in &spans {
        assert!(list.len() >= 2, "`{builder}` took only {list:?}: {spans:?}");
    }
    // Close to serial ÷ 3: one builder would run the twelve steps one
    // after the other (their sum); the pool ran them, from the first
    // step's start to the last one's end as the steps themselves printed,
    // in at most half of that (÷ 2 leaves room for the lease hand-over,
    // sync and docker start between one builder's builds).
    let serial: f64 = all.iter().map(|(s, e, _)| e - s).sum();
    let first = all.iter().map(|a| a.0).fold(f64::INFINITY, f64::min);
    let last = all.iter().map(|a| a.1).fold(0.0, f64::max);
    eprintln!(
        "pool of 3: steps {serial:.1}s one after another, {:.1}s in the pool ({:.2}x)",
        last - first,
        serial / (last - first)
    );
    assert!(
        last - first <= serial / 2.0,
        "the pool took {:.1}s for steps that take {serial:.1}s one after another: {spans:?}",
        last - first
    );
    // `remote metrics POOL` on one client: its builds, where they ran and
    // how long they queued.
    let metrics = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &clients[0].home)
        .env("ABSCONDA_REMOTE_CONFIG", &config)
        .args(["remote", "metrics", "farm", "--json"])
        .output()
        .unwrap();
    assert!(metrics.status.success(), "{}", text(&metrics));
    let m: serde_json::Value = serde_json::from_slice(&metrics.stdout).unwrap();
    assert_eq!(m["builds"], 2, "{m:#}");
    assert_eq!(m["succeeded"], 2, "{m:#}");
    assert_eq!(m["queue_wait"]["count"], 2, "{m:#}");
    for (nonce, out) in results.iter().filter(|(n, _)| n.starts_with("c0")) {
        let b = built_on(out);
        assert!(
            m["per_builder"][&b].as_u64().unwrap_or(0) >= 1,
            "{nonce} ran on {b}: {m:#}"
        );
    }
    // Nothing left in any builder's queue or runs.
    for m in &members {
        let runs = std::fs::read_dir(m.workspace.join("runs")).unwrap().count();
        assert_eq!(runs, 0, "{}: run folders left", m.name);
        let waiters = std::fs::read_dir(m.workspace.join(".waiters"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(waiters, 0, "{}: queue tickets left", m.name);
    }
}

#[test]
fn a_pool_sends_a_context_to_the_builder_that_holds_its_copy() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let members: Vec<Member> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| Member::start(n, dir.path()))
        .collect();
    let config = dir.path().join("absconda-remote.yaml");
    let mut yaml = String::from("builders:\n");
    for m in &members {
        yaml.push_str(&m.yaml(""));
    }
    yaml.push_str("pools:\n  farm:\n    builders: [b1, b2, b3]\n");
    std::fs::write(&config, yaml).unwrap();
    let client = Client::new(
        dir.path(),
        "alice",
        &format!("FROM {BASE_IMAGE}\nCOPY . /app/\n"),
    );
    // 2 MiB that does not compress.
    let mut blob = vec![0u8; 2 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut blob {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(client.context.join("data.bin"), &blob).unwrap();

    // The first build goes to b3 by name: b3 now holds the copy.
    let out = client.build(&config, "b3", &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let first = members[2].proxy.up();
    assert!(first > 2 << 20, "the first build sent the context: {first}");
    assert_eq!(members[0].proxy.up() + members[1].proxy.up(), 0);

    // Through the pool, whose first builder is b1, it goes to b3 again,
    // and sends almost nothing; b1 and b2 are not even dialled.
    let out = client.build(&config, "farm", &[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(built_on(&out), "b3");
    let second = members[2].proxy.up() - first;
    assert!(
        second < 256 << 10,
        "the repeated build sent {second} bytes to the builder that had the copy"
    );
    assert_eq!(
        members[0].proxy.up() + members[1].proxy.up(),
        0,
        "other builders were contacted"
    );
    // The copy exists once, on b3.
    for m in &members[..2] {
        let copies = std::fs::read_dir(m.workspace.join("contexts"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(copies, 0, "{} got a copy", m.name);
    }
}

#[test]
fn a_pool_skips_an_unreachable_builder_and_a_vm_the_zone_cannot_start() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let fake = GceFake::start();
    fake.add_instance("full-vm", "TERMINATED");
    fake.add_instance("good-vm", "TERMINATED");
    fake.fail_next_operation(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone does not have enough resources available to fulfill the request.",
    );
    let sshd = Sshd::start(Some(&docker().host));
    // A port nothing listens on.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gcp = |instance: &str| {
        format!(
            "    provider: gcp\n    project: {}\n    zone: {}\n    instance: {instance}\n    api_endpoint: {}\n    ready_timeout: 60\n    host: {}\n    port: {}\n    user: root\n    identity_file: {}\n    known_hosts: {}\n    workspace: {}\n    docker: {DOCKER_CLI}\n",
            fake.project(),
            fake.zone(),
            fake.api_endpoint(),
            sshd.listen,
            sshd.port,
            sshd.user_key.display(),
            sshd.known_hosts.display(),
            dir.path().join(format!("ws-{instance}")).display(),
        )
    };
    let config = dir.path().join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n  gone:\n    host: 127.0.0.1\n    port: {dead_port}\n    user: root\n    identity_file: {key}\n    known_hosts: {kh}\n    connect_timeout: 5\n  full:\n{full}  good:\n{good}pools:\n  farm:\n    builders: [gone, full, good]\n",
            key = sshd.user_key.display(),
            kh = sshd.known_hosts.display(),
            full = gcp("full-vm"),
            good = gcp("good-vm"),
        ),
    )
    .unwrap();
    let client = Client::new(
        dir.path(),
        "ci",
        &format!("FROM {BASE_IMAGE}\nCOPY who.txt /\n"),
    );
    let mut env = Vec::new();
    for (k, v) in fake.credential_env(Flow::ServiceAccountKey, dir.path()) {
        if let Some(v) = v {
            env.push((k.to_string(), v));
        }
    }
    let out = client.build(&config, "farm", &["--remote-off"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(built_on(&out), "good");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipping builder `gone`"),
        "the dead builder is named: {err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("skipping builder `full`")
                && l.contains("ZONE_RESOURCE_POOL_EXHAUSTED")),
        "the full zone is named with the cloud's reason: {err}"
    );
    // The VM that could not start stays off; the one used was stopped again.
    assert_eq!(fake.status("full-vm").as_deref(), Some("TERMINATED"));
    fake.wait_for_status("good-vm", "TERMINATED", std::time::Duration::from_secs(60));
}

/// Live queue tickets in a workspace (see the lease script).
fn tickets(ws: &Path) -> usize {
    std::fs::read_dir(ws.join(".waiters"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn builds_waiting_for_a_busy_builder_go_first_come_first_served() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let m = Member::start("b1", dir.path());
    let config = dir.path().join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n{}pools:\n  farm:\n    builders: [b1]\n",
            m.yaml("")
        ),
    )
    .unwrap();
    // Someone holds the builder: a flock on its lease, as a build takes it.
    std::fs::create_dir_all(m.workspace.join("runs")).unwrap();
    std::fs::write(
        m.workspace.join(".lease-holder"),
        "dana@ci (pid 1) since a while",
    )
    .unwrap();
    let mut holder = Command::new("flock")
        .arg(m.workspace.join(".lease"))
        .args(["-c", "read x"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::support::wait_until("the lease held", std::time::Duration::from_secs(10), || {
        Command::new("flock")
            .args(["-n"])
            .arg(m.workspace.join(".lease"))
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    });

    let dockerfile = SPAN_DOCKERFILE
        .replace("BASE", BASE_IMAGE)
        .replace("sleep 4", "sleep 1");
    let names = ["alice", "bob", "carol"];
    let clients: Vec<Client> = names
        .iter()
        .map(|n| Client::new(dir.path(), n, &dockerfile))
        .collect();
    let outputs = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let config = &config;
            let user = names[i];
            handles.push(s.spawn(move || {
                c.build(
                    config,
                    "farm",
                    &[
                        "--no-cache",
                        "--network",
                        "none",
                        "--progress",
                        "plain",
                        "--build-arg",
                        &format!("NONCE={user}"),
                    ],
                    &[("USER".to_string(), user.to_string())],
                )
            }));
            // The next one comes only once this one is in the queue.
            crate::support::wait_until(
                &format!("{user} in the queue"),
                std::time::Duration::from_secs(60),
                || tickets(&m.workspace) == i + 1,
            );
        }
        // `remote status` shows the holder and the queue in order.
        let status = Command::new(BIN)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("ABSCONDA_REMOTE_CONFIG", &config)
            .args(["remote", "status", "farm", "--json"])
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", text(&status));
        let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let b = &v["builders"][0];
        assert_eq!(b["lease_holder"], "dana@ci (pid 1) since a while", "{v:#}");
        let queue: Vec<String> = b["queue"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["holder"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(queue.len(), 3, "{v:#}");
        for (w, n) in queue.iter().zip(names) {
            assert!(w.starts_with(&format!("{n}@")), "queue order {queue:?}");
        }
        assert!(b["queue"][0]["since"].is_string(), "{v:#}");

        // Released: they build in the order they came.
        drop(holder.stdin.take());
        holder.wait().unwrap();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut starts: Vec<(f64, &str)> = Vec::new();
    for (out, n) in outputs.iter().zip(names) {
        assert!(out.status.success(), "{n}: {}", text(out));
        starts.push((run_span(out, n).0, n));
    }
    starts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<&str> = starts.iter().map(|s| s.1).collect();
    assert_eq!(order, names, "served out of order: {starts:?}");
    assert_eq!(tickets(&m.workspace), 0, "tickets left");
}

#[test]
fn a_pool_moves_on_when_ec2_has_no_capacity_for_a_vm() {
    if !services() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(moto) = rt.block_on(crate::support::moto::Moto::start()) else {
        return;
    };
    let full = rt.block_on(moto.run_instance(Some("full-vm")));
    let good = rt.block_on(moto.run_instance(Some("good-vm")));
    rt.block_on(async {
        use absconda::cloud::Provider;
        for id in [&full, &good] {
            moto.ec2(absconda::cloud::ec2::Ec2Instance::Id(id.clone()))
                .stop()
                .await
                .unwrap();
        }
    });
    // The zone of `full` has no room: EC2 answers StartInstances with
    // InsufficientInstanceCapacity (HTTP 500, as AWS does).
    let proxy = rt.block_on(crate::support::faulty_proxy::FaultyProxy::start(
        moto.addr(),
    ));
    proxy.fail_action(
        "StartInstances",
        crate::support::faulty_proxy::Fault::Ec2Error {
            status: 500,
            code: "InsufficientInstanceCapacity",
        },
    );
    let dir = tempdir();
    let sshd = Sshd::start(Some(&docker().host));
    let aws = |id: &str, endpoint: &str| {
        format!(
            "    provider: aws\n    region: us-east-1\n    instance_id: {id}\n    api_endpoint: {endpoint}\n    ready_timeout: 60\n    host: {}\n    port: {}\n    user: root\n    identity_file: {}\n    known_hosts: {}\n    workspace: {}\n    docker: {DOCKER_CLI}\n",
            sshd.listen,
            sshd.port,
            sshd.user_key.display(),
            sshd.known_hosts.display(),
            dir.path().join(format!("ws-{id}")).display(),
        )
    };
    let config = dir.path().join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n  full:\n{}  good:\n{}pools:\n  farm:\n    builders: [full, good]\n",
            aws(&full, &proxy.url()),
            aws(&good, moto.endpoint()),
        ),
    )
    .unwrap();
    let client = Client::new(
        dir.path(),
        "ci",
        &format!("FROM {BASE_IMAGE}\nCOPY who.txt /\n"),
    );
    let (key, secret) = moto.access_key();
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), key.to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), secret.to_string()),
        ("AWS_EC2_METADATA_DISABLED".to_string(), "true".to_string()),
    ];
    let out = client.build(&config, "farm", &["--remote-off"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(built_on(&out), "good");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("skipping builder `full`")
                && l.contains("InsufficientInstanceCapacity")),
        "the full zone is named with EC2's reason: {err}"
    );
    // Asked once, not retried for minutes; the VM stays off, and the one
    // used was stopped again.
    let starts = proxy
        .actions()
        .iter()
        .filter(|a| *a == "StartInstances")
        .count();
    assert_eq!(starts, 1, "{:?}", proxy.actions());
    assert_eq!(rt.block_on(moto.state(&full)), "stopped");
    assert_eq!(rt.block_on(moto.state(&good)), "stopped");
}

#[test]
fn a_build_lost_on_one_member_is_retried_on_another() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let members: Vec<Member> = ["b1", "b2"]
        .iter()
        .map(|n| Member::start(n, dir.path()))
        .collect();
    let config = dir.path().join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n{}{}pools:\n  farm:\n    builders: [b1, b2]\n",
            members[0].yaml(""),
            members[1].yaml("")
        ),
    )
    .unwrap();
    let client = Client::new(
        dir.path(),
        "ci",
        &format!("FROM {BASE_IMAGE}\nRUN sleep 3.27 && echo slept > /slept\n"),
    );
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &client.home)
        .env("USER", "tester")
        .env("ABSCONDA_REMOTE_CONFIG", &config)
        .args(["build", "--remote-builder", "farm", "--context"])
        .arg(&client.context)
        .args([
            "--repository",
            "local/pool-retry",
            "--no-cache",
            "--network",
            "none",
            "--retries",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    // The first attempt runs on b1 (the pool's first, both idle); cut it
    // there once its RUN step runs, as a preempted VM would.
    crate::support::wait_until(
        "the RUN step started",
        std::time::Duration::from_secs(60),
        || {
            let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
            String::from_utf8_lossy(&ps.stdout).contains("sleep 3.27")
        },
    );
    members[0].sshd.drop_connections();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let on: Vec<&str> = err
        .lines()
        .filter_map(|l| l.split(": building on `").nth(1))
        .map(|rest| rest.trim_end_matches('`'))
        .collect();
    assert_eq!(on, ["b1", "b2"], "{err}");
    assert!(err.contains("attempt 1 failed"), "{err}");
}

const INDEX_TYPES: &str = "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json";
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// An amd64 and an arm64 builder (declared) in one pool.
fn two_platform_pool(dir: &Path) -> (Member, Member, PathBuf) {
    let amd = Member::start("amd", dir);
    let arm = Member::start("arm", dir);
    let config = dir.join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n{}{}pools:\n  farm:\n    builders: [amd, arm]\n",
            amd.yaml("    platform: linux/amd64\n"),
            arm.yaml("    platform: linux/arm64\n"),
        ),
    )
    .unwrap();
    (amd, arm, config)
}

#[test]
fn a_pool_builds_each_platform_natively_and_pushes_an_index() {
    if !services() {
        return;
    }
    let reg = crate::support::docker::registry();
    let dir = tempdir();
    let (amd, arm, config) = two_platform_pool(dir.path());
    let client = Client::new(dir.path(), "multi", "FROM scratch\nCOPY who.txt /\n");
    let env = vec![
        ("ABSCONDA_REGISTRY_USER".to_string(), reg.user.to_string()),
        (
            "ABSCONDA_REGISTRY_PASSWORD".to_string(),
            reg.password.to_string(),
        ),
    ];
    let repo = format!("{}/multi/app", reg.addr);
    let meta = dir.path().join("metadata.json");
    let out = client.build_to(
        &config,
        "farm",
        &repo,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--push",
            "--tag",
            "v1",
            "--tag",
            "latest",
            "--json",
            "--metadata-file",
            meta.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Each platform on the builder of that platform, each in its workspace.
    for (platform, builder) in [("linux/amd64", "amd"), ("linux/arm64", "arm")] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{platform}: building on `{builder}`"))),
            "{platform} on `{builder}`:\n{err}"
        );
    }
    for m in [&amd, &arm] {
        assert!(m.workspace.is_dir(), "`{}` was used", m.name);
    }

    // Through the registry's API: both tags are one index over both platforms.
    let index = |tag: &str| {
        let (code, body) = reg.api(&format!("/v2/multi/app/manifests/{tag}"), INDEX_TYPES);
        assert_eq!(code, 200, "{tag}: {}", String::from_utf8_lossy(&body));
        body
    };
    let body = index("v1");
    assert_eq!(
        sha256(&index("latest")),
        sha256(&body),
        "every tag names the index"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json",
        "docker pushed Docker manifests, so the index is a manifest list: {v}"
    );
    let entries = v["manifests"].as_array().unwrap();
    let mut archs: Vec<&str> = entries
        .iter()
        .map(|e| e["platform"]["architecture"].as_str().unwrap())
        .collect();
    archs.sort();
    assert_eq!(archs, ["amd64", "arm64"], "{v}");
    for e in entries {
        let arch = e["platform"]["architecture"].as_str().unwrap();
        assert_eq!(e["platform"]["os"], "linux");
        // The entry is the per-platform manifest, byte for byte.
        let (code, manifest) = reg.api(
            &format!("/v2/multi/app/manifests/v1-linux-{arch}"),
            MANIFEST_TYPES,
        );
        assert_eq!(code, 200);
        assert_eq!(e["digest"].as_str().unwrap(), sha256(&manifest), "{arch}");
        assert_eq!(e["size"].as_u64().unwrap(), manifest.len() as u64);
        let (code, by_digest) = reg.api(
            &format!("/v2/multi/app/manifests/{}", e["digest"].as_str().unwrap()),
            MANIFEST_TYPES,
        );
        assert_eq!((code, &by_digest), (200, &manifest));
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(m["mediaType"], e["mediaType"]);
        // The image's config says the architecture it was built for.
        let (code, cfg) = reg.api(
            &format!(
                "/v2/multi/app/blobs/{}",
                m["config"]["digest"].as_str().unwrap()
            ),
            "*/*",
        );
        assert_eq!(code, 200);
        let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(cfg["architecture"], arch, "{cfg}");
        assert_eq!(cfg["os"], "linux");
    }
    // The summary and `--json` name the index digest per tag.
    assert!(err.contains(&format!("index {}", sha256(&body))), "{err}");
    for tag in ["v1", "latest"] {
        assert_eq!(
            report["digests"][format!("{repo}:{tag}")].as_str(),
            Some(sha256(&body).as_str()),
            "{report}"
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(
        meta["containerimage.digest"].as_str(),
        Some(sha256(&body).as_str()),
        "{meta}"
    );
    let mut built: Vec<(String, String)> = report["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().unwrap().to_string(),
                p["builder"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    built.sort();
    assert_eq!(
        built,
        [
            ("linux/amd64".to_string(), "amd".to_string()),
            ("linux/arm64".to_string(), "arm".to_string())
        ]
    );
}

#[test]
fn a_platform_no_builder_offers_is_refused_before_anything_starts() {
    if !services() {
        return;
    }
    let dir = tempdir();
    let (amd, arm, config) = two_platform_pool(dir.path());
    let client = Client::new(dir.path(), "nope", "FROM scratch\nCOPY who.txt /\n");
    let out = client.build(
        &config,
        "farm",
        &["--platform", "linux/amd64,linux/s390x", "--push"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no builder of pool `farm` offers `linux/s390x`")
            && err.contains("`linux/amd64` (`amd`), `linux/arm64` (`arm`)"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
    // Nothing started on either builder.
    for m in [&amd, &arm] {
        assert!(!m.workspace.exists(), "`{}` was touched", m.name);
    }

    // A member without `platform:` is asked its docker's (this one's is amd64).
    let probed = Member::start("probed", dir.path());
    let config2 = dir.path().join("probed.yaml");
    std::fs::write(
        &config2,
        format!(
            "builders:\n{}{}pools:\n  mixed:\n    builders: [probed, arm]\n",
            probed.yaml(""),
            arm.yaml("    platform: linux/arm64\n"),
        ),
    )
    .unwrap();
    let out = client.build(
        &config2,
        "mixed",
        &["--platform", "linux/s390x,linux/arm64", "--push"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "offers `linux/s390x`; the pool offers `linux/amd64` (`probed`), `linux/arm64` (`arm`)"
        ),
        "{err}"
    );
    assert!(!arm.workspace.exists());
    // `remote status` shows each member's platform, declared or asked.
    let status = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("ABSCONDA_REMOTE_CONFIG", &config2)
        .args(["remote", "status", "mixed"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let shown = String::from_utf8_lossy(&status.stdout);
    for (name, platform) in [("probed", "linux/amd64"), ("arm", "linux/arm64")] {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(name) && l.contains(platform)),
            "{shown}"
        );
    }

    // One platform on a pool: built on the member of that platform.
    let out = client.build(&config, "farm", &["--platform", "linux/arm64"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(built_on(&out), "arm");
    assert!(arm.workspace.is_dir() && !amd.workspace.exists());

    // Several platforms on one builder: use a pool.
    let out = client.build(
        &config,
        "amd",
        &["--platform", "linux/amd64,linux/arm64", "--push"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`amd` is one builder") && err.contains("name a pool"),
        "{err}"
    );
}

/// The same against a registry that takes only Bearer tokens from its token
/// service: the builders' docker and absconda each get their own.
#[test]
fn the_index_goes_to_a_registry_that_wants_bearer_tokens() {
    if !services() || !crate::support::require("openssl") {
        return;
    }
    let dir = tempdir();
    let reg = crate::support::token_registry::TokenRegistry::start(dir.path());
    let (_amd, _arm, config) = two_platform_pool(dir.path());
    let client = Client::new(dir.path(), "bearer", "FROM scratch\nCOPY who.txt /\n");
    let env = vec![
        ("ABSCONDA_REGISTRY_USER".to_string(), reg.user.to_string()),
        (
            "ABSCONDA_REGISTRY_PASSWORD".to_string(),
            reg.password.to_string(),
        ),
    ];
    let repo = format!("{}/bearer/app", reg.addr);
    let out = client.build_to(
        &config,
        "farm",
        &repo,
        &[
            "--platform",
            "linux/arm64,linux/amd64",
            "--push",
            "-t",
            "2.0",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let (code, body) = reg.api("bearer/app", "/v2/bearer/app/manifests/2.0", INDEX_TYPES);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let entries = v["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{v}");
    for e in entries {
        let arch = e["platform"]["architecture"].as_str().unwrap();
        let (code, manifest) = reg.api(
            "bearer/app",
            &format!("/v2/bearer/app/manifests/2.0-linux-{arch}"),
            MANIFEST_TYPES,
        );
        assert_eq!(code, 200);
        assert_eq!(e["digest"].as_str().unwrap(), sha256(&manifest));
    }
    // absconda (not docker) asked the token service with the credentials,
    // the challenge's service and a scope for this repository.
    let ours: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("absconda/"))
        .collect();
    assert!(!ours.is_empty(), "absconda asked for no token");
    for r in &ours {
        assert_eq!(
            r.basic,
            Some((reg.user.to_string(), reg.password.to_string()))
        );
        assert!(
            r.query
                .iter()
                .any(|(k, v)| k == "service" && v == crate::support::token_registry::SERVICE),
            "{r:?}"
        );
        assert!(
            r.query
                .iter()
                .any(|(k, v)| k == "scope" && v == "repository:bearer/app:pull,push"),
            "{r:?}"
        );
    }

    // `index_from: builder`: the same exchanges, token included, over a
    // builder's SSH connection.
    let mut yaml = std::fs::read_to_string(&config).unwrap();
    yaml.push_str("    index_from: builder\n");
    std::fs::write(&config, yaml).unwrap();
    let out = client.build_to(
        &config,
        "farm",
        &repo,
        &[
            "--platform",
            "linux/arm64,linux/amd64",
            "--push",
            "-t",
            "3.0",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(written from builder `"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    let (code, body) = reg.api("bearer/app", "/v2/bearer/app/manifests/3.0", INDEX_TYPES);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2, "{v}");
    let more: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("absconda/"))
        .collect();
    assert!(
        more.len() > ours.len(),
        "no token asked through the builder"
    );
    assert_eq!(
        more.last().unwrap().basic,
        Some((reg.user.to_string(), reg.password.to_string()))
    );
}

/// The index under `name:tag`, checked through the registry's API: every
/// entry is the per-platform manifest `tag-os-arch`, byte for byte, whose
/// image config says the entry's platform. Returns the architectures.
fn checked_index(reg: &crate::support::docker::Registry, name: &str, tag: &str) -> Vec<String> {
    let (code, body) = reg.api(&format!("/v2/{name}/manifests/{tag}"), INDEX_TYPES);
    assert_eq!(code, 200, "{tag}: {}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut archs = Vec::new();
    for e in v["manifests"].as_array().unwrap() {
        let arch = e["platform"]["architecture"].as_str().unwrap();
        assert_eq!(e["platform"]["os"], "linux");
        let (code, manifest) = reg.api(
            &format!("/v2/{name}/manifests/{tag}-linux-{arch}"),
            MANIFEST_TYPES,
        );
        assert_eq!(code, 200, "{arch}");
        assert_eq!(e["digest"].as_str().unwrap(), sha256(&manifest), "{arch}");
        assert_eq!(e["size"].as_u64().unwrap(), manifest.len() as u64);
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let (code, cfg) = reg.api(
            &format!(
                "/v2/{name}/blobs/{}",
                m["config"]["digest"].as_str().unwrap()
            ),
            "*/*",
        );
        assert_eq!(code, 200);
        let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(cfg["architecture"], arch, "{cfg}");
        assert_eq!(cfg["os"], "linux");
        archs.push(arch.to_string());
    }
    archs.sort();
    archs
}

fn ip_program() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("`ip` is required")
}

/// A builder's lines for an sshd reached directly (its host key pinned).
fn direct_yaml(name: &str, sshd: &Sshd, dir: &Path, extra: &str) -> String {
    format!(
        "  {name}:\n    host: {host}\n    port: {port}\n    user: root\n    identity_file: {key}\n    host_key: {fp}\n    workspace: {ws}\n    docker: {DOCKER_CLI}\n{extra}",
        host = sshd.listen,
        port = sshd.port,
        key = sshd.user_key.display(),
        fp = sshd.fingerprint(),
        ws = dir.join(format!("ws-{name}")).display(),
    )
}

/// absconda runs in a network namespace whose only way out is a veth to
/// the builders' sshd: the registry, on this machine's loopback, is out of
/// its reach but not of the builders'. The index goes through a builder's
/// SSH connection (a `direct-tcpip` channel its sshd dials), and with
/// `index_from: client` the build says it cannot be written.
#[test]
fn the_index_goes_through_a_builder_when_this_machine_cannot_reach_the_registry() {
    if !services() || !crate::support::require("ip") {
        return;
    }
    let Some(ns) = crate::support::netns::NetNs::new() else {
        return;
    };
    let reg = crate::support::docker::registry();
    let dir = tempdir();
    let d = docker();
    // DEBUG1 logs each `direct-tcpip` request with its destination.
    let amd = Sshd::start_with(Some(&d.host), &ns.host_ip, None, "LogLevel DEBUG1\n");
    let arm = Sshd::start_with(Some(&d.host), &ns.host_ip, None, "LogLevel DEBUG1\n");
    let config = |index_from: &str| {
        let path = dir.path().join(format!("farm-{index_from}.yaml"));
        std::fs::write(
            &path,
            format!(
                "builders:\n{}{}pools:\n  farm:\n    builders: [amd, arm]\n    index_from: {index_from}\n",
                direct_yaml("amd", &amd, dir.path(), "    platform: linux/amd64\n"),
                direct_yaml("arm", &arm, dir.path(), "    platform: linux/arm64\n"),
            ),
        )
        .unwrap();
        path
    };
    let client = Client::new(dir.path(), "tunnel", "FROM scratch\nCOPY who.txt /\n");
    let env = vec![
        ("ABSCONDA_REGISTRY_USER".to_string(), reg.user.to_string()),
        (
            "ABSCONDA_REGISTRY_PASSWORD".to_string(),
            reg.password.to_string(),
        ),
    ];
    let repo = format!("{}/tunnel/app", reg.addr);
    let inside = [ip_program(), "netns", "exec", ns.name.as_str()];
    let out = client.build_via(
        &inside,
        &config("auto"),
        "farm",
        &repo,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--push",
            "-t",
            "v1",
            "--json",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "this machine cannot reach the registry `http://{}`",
                reg.addr
            ))
        })
        .collect();
    assert_eq!(said.len(), 1, "one line says why:\n{err}");
    assert!(
        said[0].ends_with("writing the index through a builder"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let via = report["index_from"].as_str().unwrap().to_string();
    let sshd = match via.as_str() {
        "builder `amd`" => &amd,
        "builder `arm`" => &arm,
        other => panic!("index written from {other}: {report}"),
    };
    // That builder's sshd dialled the registry for absconda.
    let port = reg.addr.rsplit(':').next().unwrap();
    let log = sshd.log();
    assert!(
        log.lines()
            .any(|l| l.contains("server_request_direct_tcpip")
                && l.contains(&format!("target 127.0.0.1 port {port}"))),
        "{log}"
    );

    // Through the registry's API: one index over both platforms' manifests.
    assert_eq!(checked_index(reg, "tunnel/app", "v1"), ["amd64", "arm64"]);
    let (_, body) = reg.api("/v2/tunnel/app/manifests/v1", INDEX_TYPES);
    assert_eq!(
        report["digests"][format!("{repo}:v1")].as_str(),
        Some(sha256(&body).as_str()),
        "{report}"
    );

    // `index_from: client`: no detour, a clear error.
    let out = client.build_via(
        &inside,
        &config("client"),
        "farm",
        &repo,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--push",
            "-t",
            "v2",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach the registry at `http://{}",
            reg.addr
        )) && err.contains("from this machine")
            && err.contains("hint:")
            && err.contains("index_from:"),
        "{err}"
    );
    assert!(
        !err.contains("writing the index through a builder"),
        "{err}"
    );
    let (code, _) = reg.api("/v2/tunnel/app/manifests/v2", INDEX_TYPES);
    assert_eq!(code, 404);
}

/// With `emulate: true`, a platform no member has is built on another
/// member with its docker's emulation (a `FROM scratch` + `COPY` image
/// needs no QEMU): the index has both platforms, the arm64 image's config
/// says arm64. Without it the same build is refused before anything starts.
#[test]
fn a_pool_with_emulate_builds_a_platform_no_builder_has() {
    if !services() {
        return;
    }
    let reg = crate::support::docker::registry();
    let dir = tempdir();
    let amd = Member::start("amd", dir.path());
    let config = |emulate: bool| {
        let path = dir.path().join(format!("solo-{emulate}.yaml"));
        std::fs::write(
            &path,
            format!(
                "builders:\n{}pools:\n  solo:\n    builders: [amd]\n    emulate: {emulate}\n",
                amd.yaml("    platform: linux/amd64\n"),
            ),
        )
        .unwrap();
        path
    };
    let client = Client::new(dir.path(), "emu", "FROM scratch\nCOPY who.txt /\n");
    let env = vec![
        ("ABSCONDA_REGISTRY_USER".to_string(), reg.user.to_string()),
        (
            "ABSCONDA_REGISTRY_PASSWORD".to_string(),
            reg.password.to_string(),
        ),
    ];
    let repo = format!("{}/emu/app", reg.addr);
    let args = [
        "--platform",
        "linux/amd64,linux/arm64",
        "--push",
        "-t",
        "v1",
    ];

    let out = client.build_to(&config(false), "solo", &repo, &args, &env);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no builder of pool `solo` offers `linux/arm64`")
            && err.contains("emulate: true"),
        "{err}"
    );
    assert!(!amd.workspace.exists(), "nothing starts");

    let out = client.build_to(&config(true), "solo", &repo, &args, &env);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l
                .contains("no builder of pool `solo` is linux/arm64: building it with emulation")),
        "{err}"
    );
    for platform in ["linux/amd64", "linux/arm64"] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{platform}: building on `amd`"))),
            "{platform} on `amd`:\n{err}"
        );
    }
    assert!(
        !err.contains("linux/amd64: no builder"),
        "amd64 is native:\n{err}"
    );
    assert_eq!(checked_index(reg, "emu/app", "v1"), ["amd64", "arm64"]);
    let status = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("ABSCONDA_REMOTE_CONFIG", config(true))
        .args(["remote", "status", "solo", "--json"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (&st["emulate"], &st["index_from"]),
        (&true.into(), &"auto".into())
    );
    // One platform that no member has: emulated too (no index, no push).
    let out = client.build(&config(true), "solo", &["--platform", "linux/arm64"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(built_on(&out), "amd");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no builder of pool `solo` is linux/arm64: building it with emulation"),
        "{}",
        text(&out)
    );

    // docker 20.10's classic builder takes `--platform`, but its cache does
    // not tell platforms apart: the second platform's build comes back as
    // the first's image. The configs are read before the index is written,
    // and the mismatch stops it.
    let classic = dir.path().join("solo-classic.yaml");
    std::fs::write(
        &classic,
        format!(
            "builders:\n{}pools:\n  solo:\n    builders: [amd]\n    emulate: true\n",
            amd.yaml("    platform: linux/amd64\n    buildkit: off\n"),
        ),
    )
    .unwrap();
    let args = [
        "--platform",
        "linux/amd64,linux/arm64",
        "--push",
        "-t",
        "v2",
    ];
    let out = client.build_to(&classic, "solo", &repo, &args, &env);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    // The two builds queue for the one builder in either order.
    let wrong = [("arm64", "amd64"), ("amd64", "arm64")]
        .iter()
        .any(|(want, got)| {
            err.contains(&format!(
                "builder `amd` built `{repo}:v2-linux-{want}` for linux/{got}, not linux/{want}"
            ))
        });
    assert!(
        wrong && err.contains("hint:") && err.contains("BuildKit"),
        "{err}"
    );
    let (code, _) = reg.api("/v2/emu/app/manifests/v2", INDEX_TYPES);
    assert_eq!(code, 404, "no index that lies");
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The registry API through a builder over HTTPS: TLS runs end to end over
/// the `direct-tcpip` channel, against a real registry serving a
/// certificate of a private CA. Without that CA among the trust roots the
/// certificate is refused (and that is no "unreachable": nothing would be
/// gained by another route); with it (`ca_file:` / `ABSCONDA_CA_FILE`) an
/// index is PUT and read back, byte for byte.
#[test]
fn the_registry_api_speaks_tls_through_a_builders_ssh_channel() {
    use absconda::registry_api::{Client as Api, OCI_INDEX, Repository, Route};
    if !crate::support::require(SSHD)
        || !crate::support::require("docker-registry")
        || !crate::support::require("openssl")
    {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=absconda-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
        ],
    );
    std::fs::write(d.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            "srv.pem",
        ],
    );
    let port = crate::support::free_port();
    std::fs::write(
        d.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {cert}\n    key: {key}\n",
            data = d.join("data").display(),
            cert = d.join("srv.pem").display(),
            key = d.join("srv.key").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(d.join("registry.yml"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.join("registry.log")).unwrap());
    let _registry = Killed(crate::support::spawn_daemon(cmd).expect("start docker-registry"));
    crate::support::wait_until(
        "TLS registry listening",
        std::time::Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let sshd = Sshd::start_with(None, "127.0.0.1", None, "LogLevel DEBUG1\n");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut target = absconda::ssh::Target::new(
            "127.0.0.1",
            sshd.port,
            "root",
            sshd.known_hosts.clone(),
        );
        target.identity_files = vec![sshd.user_key.clone()];
        target.identities_only = true;
        target.identity_agent = Some("none".into());
        let session = std::sync::Arc::new(absconda::ssh::Session::connect(&target).await.unwrap());
        let api = |session: &std::sync::Arc<absconda::ssh::Session>| {
            Api::with_route(
                Repository {
                    base: format!("https://127.0.0.1:{port}"),
                    name: "tls/app".into(),
                },
                None,
                Route::Builder {
                    name: "b".into(),
                    session: session.clone(),
                },
            )
        };
        let index = br#"{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#;

        // The private CA is not trusted: the certificate is refused.
        absconda::cloud::http::set_ca_file(None);
        let e = api(&session)
            .put_manifest("v1", OCI_INDEX, index)
            .await
            .unwrap_err();
        assert!(!e.is_unreachable(), "{e:?}");
        assert!(
            absconda::cloud::http::is_certificate_error(&e),
            "{:?}",
            anyhow::Error::new(e)
        );

        // Trusted: PUT and GET over TLS through the channel.
        absconda::cloud::http::set_ca_file(Some(d.join("ca.pem")));
        let client = api(&session);
        let put = client.put_manifest("v1", OCI_INDEX, index).await;
        let got = client.manifest("v1").await;
        let by_digest = match &put {
            Ok(digest) => Some(client.manifest(digest).await),
            Err(_) => None,
        };
        absconda::cloud::http::set_ca_file(None);
        let digest = put.unwrap_or_else(|e| panic!("{:?}", anyhow::Error::new(e)));
        let got = got.unwrap();
        assert_eq!(got.bytes, index);
        assert_eq!(got.media_type, OCI_INDEX);
        assert_eq!(got.digest, digest);
        assert_eq!(by_digest.unwrap().unwrap().bytes, index);
        drop(client);
        if let Ok(s) = std::sync::Arc::try_unwrap(session) {
            s.close().await;
        }
    });
    // The builder's sshd made the connections to the registry.
    let log = sshd.log();
    assert!(
        log.lines()
            .any(|l| l.contains("server_request_direct_tcpip")
                && l.contains(&format!("target 127.0.0.1 port {port}"))),
        "{log}"
    );
}

#[test]
fn a_pool_whose_builders_are_busy_overflows_to_its_build_service() {
    if !services() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(svc) = rt.block_on(crate::services::Setup::start()) else {
        return;
    };
    let dir = tempdir();
    let m = Member::start("b1", dir.path());
    let config = dir.path().join("absconda-remote.yaml");
    std::fs::write(
        &config,
        format!(
            "builders:\n{}{}pools:\n  farm:\n    builders: [b1]\n    overflow: cb\n",
            m.yaml(""),
            svc.cb_yaml
        ),
    )
    .unwrap();
    // Someone holds the only builder.
    std::fs::create_dir_all(m.workspace.join("runs")).unwrap();
    let mut holder = Command::new("flock")
        .arg(m.workspace.join(".lease"))
        .args(["-c", "read x"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::support::wait_until("the lease held", std::time::Duration::from_secs(10), || {
        Command::new("flock")
            .args(["-n"])
            .arg(m.workspace.join(".lease"))
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    });
    svc.gate.finish("SUCCEEDED", None);
    let client = Client::new(dir.path(), "alice", "FROM scratch\nCOPY who.txt /\n");
    let started = Instant::now();
    // A wait of an hour: the build must not queue for the busy builder.
    let out = client.build(&config, "farm", &["--remote-wait", "3600"], &svc.env);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pool `farm`: every builder is busy; building on the overflow service `cb`"),
        "{err}"
    );
    assert_eq!(svc.gate.started().len(), 1, "one CodeBuild build");
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
    assert!(
        rt.block_on(svc.objects()).is_empty(),
        "the context was deleted"
    );
    // Still held by the other build, and no ticket of ours left in its queue.
    assert!(holder.try_wait().unwrap().is_none());
    assert_eq!(tickets(&m.workspace), 0, "tickets left");
    drop(holder.stdin.take());
    holder.wait().unwrap();
}
