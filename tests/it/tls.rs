//! Trust roots of the cloud API clients: an HTTPS endpoint signed by a
//! private CA is trusted through `ca_file:` (or `ABSCONDA_CA_FILE`, or the
//! system store named by `SSL_CERT_FILE`) and refused with an
//! "unknown issuer" error otherwise; with no system store at all the
//! built-in roots are used and an `http://` endpoint works.
//!
//! The HTTPS endpoint is the GCE fake behind a TLS front written here with
//! tokio-rustls; the test CA and the server certificate come from `openssl`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::absconda::{BIN, text};
use crate::support::gce_fake::{Flow, GceFake};

/// A test CA and a certificate for 127.0.0.1 signed by it.
struct TestCa {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

fn make_ca(dir: &Path) -> TestCa {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=absconda test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    TestCa {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

/// A TLS front on loopback forwarding to the fake's plain HTTP API port.
/// Counts the TLS handshakes that completed.
struct TlsFront {
    port: u16,
    handshakes: Arc<AtomicUsize>,
}

fn tls_front(ca: &TestCa, backend: &str) -> TlsFront {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(&ca.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&ca.key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = backend.to_string();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, backend, count) = (acceptor.clone(), backend.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    }
                });
            }
        });
    });
    TlsFront { port, handshakes }
}

struct Setup {
    dir: tempfile::TempDir,
    fake: GceFake,
    ca: TestCa,
    front: TlsFront,
}

fn setup() -> Setup {
    crate::support::watch();
    let dir = crate::support::tempdir();
    let ca = make_ca(dir.path());
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let api = url::Url::parse(&fake.api_endpoint()).unwrap();
    let backend = format!("{}:{}", api.host_str().unwrap(), api.port().unwrap());
    let front = tls_front(&ca, &backend);
    Setup {
        dir,
        fake,
        ca,
        front,
    }
}

impl Setup {
    /// `absconda -v remote status cloud --json` with `endpoint` as the
    /// builder's `api_endpoint` and `extra` YAML lines; no system CA store.
    fn status(&self, endpoint: &str, extra: &str, env: &[(&str, &str)]) -> Output {
        let config = self.dir.path().join("absconda-remote.yaml");
        std::fs::write(
            &config,
            format!(
                "builders:\n  cloud:\n    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {endpoint}\n    host: 127.0.0.1\n    known_hosts: {}\n{extra}",
                self.fake.project(),
                self.fake.zone(),
                self.dir.path().join("known_hosts").display(),
            ),
        )
        .unwrap();
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .env("ABSCONDA_REMOTE_CONFIG", &config)
            .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
            .env("SSL_CERT_DIR", "/nonexistent")
            .current_dir(self.dir.path())
            .args(["-v", "remote", "status", "cloud", "--json"]);
        for (k, v) in self
            .fake
            .credential_env(Flow::ServiceAccountKey, self.dir.path())
        {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn https(&self) -> String {
        let api = url::Url::parse(&self.fake.api_endpoint()).unwrap();
        format!("https://127.0.0.1:{}{}", self.front.port, api.path())
    }
}

#[test]
fn a_private_ca_given_with_ca_file_is_trusted() {
    crate::require!("openssl");
    let s = setup();
    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TERMINATED"),
        "{}",
        text(&out)
    );
    assert!(s.front.handshakes.load(Ordering::SeqCst) > 0);
    // The system store is empty here, so the built-in roots were the base.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Mozilla's roots built into absconda"), "{err}");

    // The same through ABSCONDA_CA_FILE and through SSL_CERT_FILE.
    let ca = s.ca.ca.display().to_string();
    let out = s.status(&s.https(), "", &[("ABSCONDA_CA_FILE", &ca)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.status(&s.https(), "", &[("SSL_CERT_FILE", &ca)]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("built into absconda"), "{err}");
}

#[test]
fn an_unknown_ca_is_refused_as_an_unknown_issuer() {
    crate::require!("openssl");
    let s = setup();
    let before = s.front.handshakes.load(Ordering::SeqCst);
    let out = s.status(&s.https(), "", &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("unknownissuer") || err.contains("unknown issuer"),
        "{err}"
    );
    assert!(!err.contains("no ca certificates were loaded"), "{err}");
    assert!(!err.contains("did not finish within"), "not retried: {err}");
    assert_eq!(s.front.handshakes.load(Ordering::SeqCst), before);
    // A missing CA file is named, not a TLS failure.
    let out = s.status(
        &s.https(),
        "    ca_file: /nonexistent/private-ca.pem\n",
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/private-ca.pem"), "{err}");
}

#[test]
fn an_http_endpoint_works_with_no_trust_roots_on_the_system() {
    let s = setup();
    let out = s.status(&s.fake.api_endpoint(), "", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TERMINATED"),
        "{}",
        text(&out)
    );
    assert_eq!(s.fake.status("builder").as_deref(), Some("TERMINATED"));
}

/// The IAP tunnel's websocket trusts the same roots as the API clients:
/// `wss://` through a front signed by the private CA works with `ca_file:`
/// and is refused as an unknown issuer without it.
#[test]
fn the_iap_websocket_trusts_ca_file_like_the_api_clients() {
    crate::require!("openssl");
    if !crate::support::require(crate::support::sshd::SSHD) || !crate::support::require("dockerd") {
        return;
    }
    let dir = crate::support::tempdir();
    let ca = make_ca(dir.path());
    let s = crate::tunnels::iap_setup("");
    let relay = url::Url::parse(&s.iap.endpoint()).unwrap();
    let front = tls_front(
        &ca,
        &format!("{}:{}", relay.host_str().unwrap(), relay.port().unwrap()),
    );
    let yaml = std::fs::read_to_string(&s.project.config).unwrap();
    let wss = format!("wss://127.0.0.1:{}/v4", front.port);
    let with_wss = yaml.replace(&s.iap.endpoint(), &wss);
    assert_ne!(with_wss, yaml);
    let status = |yaml: &str| {
        std::fs::write(&s.project.config, yaml).unwrap();
        s.project
            .cmd()
            .args(["remote", "status", "local", "--json"])
            .output()
            .unwrap()
    };
    let out = status(&with_wss);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("unknownissuer") || err.contains("unknown issuer"),
        "{err}"
    );
    assert!(s.iap.requests().is_empty());

    let out = status(&with_wss.replace(
        "    tunnel: iap\n",
        &format!("    tunnel: iap\n    ca_file: {}\n", ca.ca.display()),
    ));
    assert!(out.status.success(), "{}", text(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["reachable"], true, "{st}");
    assert!(front.handshakes.load(Ordering::SeqCst) > 0);
    assert!(!s.iap.requests().is_empty());
}
