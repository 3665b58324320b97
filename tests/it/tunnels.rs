//! Builders reached through a cloud's tunnel instead of an address:
//! Google's IAP TCP forwarding (`tunnel: iap`) and EC2 Instance Connect
//! Endpoint (`tunnel: eice`). The relays are fakes written from the public
//! protocols; behind them is the real loopback sshd, and the builds push
//! to the real registry.

use std::process::Output;
use std::sync::Arc;

use serde_json::Value;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::eice_fake::{self, EiceFake};
use crate::support::gce_fake::{Flow, GceFake};
use crate::support::iap_fake::IapFake;
use crate::support::moto::Moto;
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

/// A gcp builder `local` on the fake's instance `builder`, which has no
/// external IP: no `host:`, reached only through the IAP fake.
pub(crate) struct IapSetup {
    pub sshd: Sshd,
    pub gce: Arc<GceFake>,
    pub iap: IapFake,
    pub project: Project,
}

pub(crate) fn iap_setup(extra: &str) -> IapSetup {
    let sshd = Sshd::start(Some(&docker().host));
    let gce = Arc::new(GceFake::start());
    gce.add_instance_in(gce.project(), gce.zone(), "builder", "RUNNING", false);
    // The guest agent publishes the host key; absconda records it under
    // the instance's name, since the VM has no address of its own.
    gce.set_guest_host_keys("builder", &[&sshd.host_key_pub]);
    let g = gce.clone();
    let iap = IapFake::start("builder", move |auth| g.principal_of(auth).is_some());
    let yaml = format!(
        "    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {}\n    access: key\n    tunnel: iap\n    iap_endpoint: {}\n    ready_timeout: 20\n{extra}",
        gce.project(),
        gce.zone(),
        gce.api_endpoint(),
        iap.endpoint(),
    );
    let mut p = Project::with_builder(&sshd, &yaml);
    drop_host_line(&p);
    for (k, v) in gce.credential_env(Flow::ServiceAccountKey, p.dir.path()) {
        if let Some(v) = v {
            p.env.push((k.to_string(), v));
        }
    }
    IapSetup {
        sshd,
        gce,
        iap,
        project: p,
    }
}

fn drop_host_line(p: &Project) {
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    let kept: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.starts_with("    host: "))
        .collect();
    std::fs::write(&p.config, kept.join("\n") + "\n").unwrap();
}

fn status(p: &Project) -> (Output, Value) {
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, v)
}

#[test]
fn iap_builds_a_builder_without_external_ip_and_survives_a_dropped_websocket() {
    if !ok() {
        return;
    }
    let reg = registry();
    let mut s = iap_setup("");
    // The first tunnel is told to re-authenticate; a later one loses its
    // websocket in the middle of the context upload.
    s.iap.reauth_once();
    s.iap.drop_after(300_000);
    let p = &mut s.project;
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\nCOPY big /big\n"),
    );
    p.file("hello", "through IAP\n");
    let big: String = (0..40_000)
        .map(|i| format!("{:024x}\n", (i as u64).wrapping_mul(0x9e3779b97f4a7c15)))
        .collect();
    p.file("big", &big);

    let out = p.build(
        &format!("{}/tunnel/iap", reg.addr),
        &["--tag", "v1", "--push", "-v"],
    );
    assert!(
        out.status.success(),
        "{}\n{:?}\n{}",
        text(&out),
        s.iap.refusals(),
        s.sshd.log()
    );
    let files = reg.files("tunnel/iap", "v1");
    assert_eq!(
        files.get("hello").map(|v| v.as_slice()),
        Some(&b"through IAP\n"[..])
    );
    assert_eq!(files.get("big").map(|v| v.len()), Some(big.len()));
    assert_eq!(s.iap.drops(), 1, "the websocket was dropped once");
    assert!(s.iap.reconnects() >= 1, "absconda reconnected the session");
    assert!(s.iap.refusals().is_empty(), "{:?}", s.iap.refusals());
    // The verbose output names the path.
    assert!(text(&out).contains("IAP tunnel"), "{}", text(&out));

    // What reached the relay: connects with the target in the query, a
    // token the fake minted, and reconnects naming the session.
    let reqs = s.iap.requests();
    let connects: Vec<_> = reqs.iter().filter(|r| r.path() == "/v4/connect").collect();
    assert!(connects.len() >= 2, "{reqs:#?}");
    for r in &connects {
        assert_eq!(r.param("project").as_deref(), Some(s.gce.project()));
        assert_eq!(r.param("zone").as_deref(), Some(s.gce.zone()));
        assert_eq!(r.param("instance").as_deref(), Some("builder"));
        assert_eq!(r.param("interface").as_deref(), Some("nic0"));
        assert_eq!(r.param("port"), Some(s.sshd.port.to_string()));
        assert_eq!(r.header("origin"), Some("bot:iap-tunneler"));
        assert_eq!(
            r.header("sec-websocket-protocol"),
            Some("relay.tunnel.cloudproxy.app")
        );
        assert!(
            s.gce
                .principal_of(r.header("authorization").unwrap())
                .is_some()
        );
    }
    // The first reconnect was told to re-authenticate; the next one, with
    // a fresh token, resumed the session.
    let reconnects: Vec<_> = reqs
        .iter()
        .filter(|r| r.path() == "/v4/reconnect")
        .collect();
    assert!(reconnects.len() >= 2, "{reqs:#?}");
    for r in &reconnects {
        assert!(r.param("sid").unwrap().starts_with("sid-"));
        assert!(r.param("ack").unwrap().parse::<u64>().is_ok());
        assert!(
            s.gce
                .principal_of(r.header("authorization").unwrap())
                .is_some()
        );
    }

    // `remote status` says how it got there.
    let (out, st) = status(p);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(st["reachable"], true, "{st}");
    assert!(st["path"].as_str().unwrap().contains("IAP tunnel"), "{st}");
    assert_eq!(st["access"], "key", "{st}");
    assert_eq!(st["user"], "root", "{st}");
}

#[test]
fn iap_close_codes_name_the_missing_role_or_firewall_rule() {
    if !ok() {
        return;
    }
    let cases: &[(u16, &str, &[&str], i32)] = &[
        (
            4033,
            "not authorized",
            &["not authorized", "roles/iap.tunnelResourceAccessor"],
            3,
        ),
        (
            4047,
            "failed to lookup instance",
            &["lookup failed", "`builder`", "zone"],
            3,
        ),
        (
            4003,
            "failed to connect to backend",
            &["failed to connect to backend", "35.235.240.0/20"],
            9,
        ),
    ];
    for (code, reason, wanted, exit) in cases {
        let s = iap_setup("");
        let yaml = std::fs::read_to_string(&s.project.config).unwrap();
        std::fs::write(
            &s.project.config,
            yaml.replace("ready_timeout: 20", "ready_timeout: 3"),
        )
        .unwrap();
        s.iap.close_with(*code, reason);
        s.project
            .file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
        let out = s
            .project
            .build("example.invalid/tunnel/never", &["--tag", "v1"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(*exit), "{code}: {err}");
        for w in *wanted {
            assert!(err.contains(w), "{code}: `{w}` missing in:\n{err}");
        }
        assert!(err.contains("hint:"), "{code}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn iap_refusing_the_token_fails_at_once_naming_the_role() {
    if !ok() {
        return;
    }
    let s = iap_setup("");
    s.iap.refuse_all_tokens();
    s.project
        .file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = s
        .project
        .build("example.invalid/tunnel/never", &["--tag", "v1"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("roles/iap.tunnelResourceAccessor"), "{err}");
    // Tried once, not again until `ready_timeout`.
    assert_eq!(s.iap.refusals().len(), 1, "{:?}", s.iap.refusals());
}

/// An aws builder `local` reached only through the EICE fake, in front of
/// moto; `None` when moto cannot run here.
pub(crate) struct EiceSetup {
    pub sshd: Sshd,
    pub moto: Moto,
    pub eice: EiceFake,
    pub project: Project,
    pub rt: tokio::runtime::Runtime,
}

pub(crate) fn eice_setup() -> Option<EiceSetup> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(Moto::start())?;
    rt.block_on(moto.run_instance(Some("absconda-builder")));
    let sshd = Sshd::start(Some(&docker().host));
    let (key, secret) = moto.access_key();
    let eice = EiceFake::start(moto.addr(), key, secret, "us-east-1");
    let yaml = format!(
        "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    tunnel: eice\n    eice_endpoint: {}\n    host_key: \"{}\"\n    ready_timeout: 60\n",
        eice.api_endpoint(),
        eice.tunnel_endpoint(),
        sshd.fingerprint(),
    );
    let mut p = Project::with_builder(&sshd, &yaml);
    drop_host_line(&p);
    p.env.push(("AWS_ACCESS_KEY_ID".into(), key.to_string()));
    p.env
        .push(("AWS_SECRET_ACCESS_KEY".into(), secret.to_string()));
    p.env
        .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    Some(EiceSetup {
        sshd,
        moto,
        eice,
        project: p,
        rt,
    })
}

#[test]
fn eice_builds_through_the_presigned_tunnel() {
    if !ok() {
        return;
    }
    let reg = registry();
    let Some(mut s) = eice_setup() else {
        return;
    };
    let p = &mut s.project;
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "through EICE\n");
    let out = p.build(
        &format!("{}/tunnel/eice", reg.addr),
        &["--tag", "v1", "--push"],
    );
    assert!(
        out.status.success(),
        "{}\n{:?}\n{}",
        text(&out),
        s.eice.refusals(),
        s.sshd.log()
    );
    assert_eq!(
        reg.files("tunnel/eice", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"through EICE\n"[..])
    );
    assert!(s.eice.described() >= 1);
    assert!(s.eice.refusals().is_empty(), "{:?}", s.eice.refusals());
    // The tunnel's URL names the endpoint, the port and the instance's
    // private address moto reports, and its signature verified.
    let opened = s.eice.opened();
    assert!(!opened.is_empty());
    let private_ip = s.rt.block_on(async {
        use absconda::cloud::ec2::Ec2Instance;
        s.moto
            .ec2(Ec2Instance::Name("absconda-builder".into()))
            .find()
            .await
            .unwrap()
            .private_ip
            .unwrap()
    });
    for o in &opened {
        assert_eq!(
            o.param("instanceConnectEndpointId").as_deref(),
            Some(eice_fake::ENDPOINT_ID)
        );
        assert_eq!(o.param("remotePort"), Some(s.sshd.port.to_string()));
        assert_eq!(o.param("privateIpAddress"), Some(private_ip.clone()));
        assert_eq!(o.param("maxTunnelDuration").as_deref(), Some("3600"));
    }
    let (out, st) = status(p);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        st["path"]
            .as_str()
            .unwrap()
            .contains("EC2 Instance Connect Endpoint"),
        "{st}"
    );
}

/// The EICE fake's signature check is what the build test relies on: an
/// `openTunnel` URL presigned with another secret, for another service, or
/// altered after signing is refused with 403 before any byte reaches sshd.
#[tokio::test]
async fn the_eice_fake_refuses_urls_not_signed_with_the_test_key() {
    use absconda::cloud::aws_auth::{CredentialSource, Credentials, presign};
    use absconda::cloud::websocket::{WebSocket, WsError};
    if !crate::support::require(SSHD) {
        return;
    }
    let sshd = Sshd::start(None);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let eice = EiceFake::start(
        dead.local_addr().unwrap(),
        "AKIDTEST",
        "right-secret",
        "us-east-1",
    );
    let base = format!(
        "{}/openTunnel?instanceConnectEndpointId={}&remotePort={}&privateIpAddress=10.0.0.7&maxTunnelDuration=3600",
        eice.tunnel_endpoint(),
        eice_fake::ENDPOINT_ID,
        sshd.port
    );
    let url = url::Url::parse(&base).unwrap();
    let creds =
        |secret: &str| Credentials::new("AKIDTEST", secret, None, CredentialSource::Explicit);
    let now = chrono::Utc::now();
    let good = presign(
        &url,
        &creds("right-secret"),
        "us-east-1",
        "ec2-instance-connect",
        now,
        60,
    );
    let other_secret = presign(
        &url,
        &creds("wrong-secret"),
        "us-east-1",
        "ec2-instance-connect",
        now,
        60,
    );
    let other_service = presign(&url, &creds("right-secret"), "us-east-1", "ec2", now, 60);
    let mut altered = good.clone();
    let q: Vec<(String, String)> = altered
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "remotePort" {
                "2222".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    altered.query_pairs_mut().clear().extend_pairs(q);
    let t = std::time::Duration::from_secs(10);
    for bad in [&other_secret, &other_service, &altered] {
        match WebSocket::connect(bad, &[], None, t).await {
            Err(WsError::Refused { status: 403, .. }) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(eice.refusals().len(), 3, "{:?}", eice.refusals());
    // The correctly signed one opens and reaches sshd's banner.
    let mut ws = WebSocket::connect(&good, &[], None, t).await.unwrap();
    match ws.recv().await.unwrap() {
        absconda::cloud::websocket::Incoming::Binary(b) => {
            assert!(b.starts_with(b"SSH-2.0-"), "{b:?}")
        }
        other => panic!("{other:?}"),
    }
}
