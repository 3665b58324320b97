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
use crate::support::gce_fake::{Flow, GceFake, Route};

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

/// gcloud user credentials whose `token_uri` is behind the TLS front: the
/// token fetch takes the same roots as the API calls.
#[test]
fn the_token_fetch_of_user_credentials_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    let adc = s.dir.path().join("adc.json");
    s.fake.write_authorized_user(&adc);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&adc).unwrap()).unwrap();
    let token_uri = format!("https://127.0.0.1:{}/token", s.front.port);
    json["token_uri"] = token_uri.clone().into();
    std::fs::write(&adc, json.to_string()).unwrap();
    let adc = adc.display().to_string();
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", adc.as_str())];

    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.fake.count(Route::Token), 1);

    let out = s.status(&s.https(), "", &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains(&format!("`{token_uri}`")), "{err}");
    assert!(
        err.contains("hint: ") && err.contains("`ca_file:`"),
        "{err}"
    );
    assert_eq!(s.fake.count(Route::Token), 1);
}

/// An impersonated service account (a user's login as the source): both
/// token requests — the user's refresh and IAM Credentials'
/// `generateAccessToken` — are behind the TLS front and take `ca_file:`.
#[test]
fn impersonation_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    let file = s.dir.path().join("impersonated.json");
    s.fake.write_impersonated(&file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let front = format!("https://127.0.0.1:{}", s.front.port);
    json["source_credentials"]["token_uri"] = format!("{front}/token").into();
    let url = json["service_account_impersonation_url"]
        .as_str()
        .unwrap()
        .replace(&s.fake.api_endpoint(), &front);
    json["service_account_impersonation_url"] = url.clone().into();
    std::fs::write(&file, json.to_string()).unwrap();
    let file = file.display().to_string();
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", file.as_str())];

    let extra = format!(
        "    ca_file: {}
",
        s.ca.ca.display()
    );
    let out = s.status(&s.https(), &extra, &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.fake.count(Route::Token), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    let sa = s.fake.service_account().client_email;
    assert!(
        s.fake
            .requests()
            .iter()
            .filter(|l| l.route == Route::GetInstance)
            .all(|l| l.principal.as_deref() == Some(&format!("serviceAccount:{sa}"))),
        "{:#?}",
        s.fake.requests()
    );

    // Without the CA: the first request (the user's token) is refused as
    // an unknown issuer; nothing is sent.
    let out = s.status(&s.https(), "", &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(s.fake.count(Route::Token), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
}

/// Workload identity federation (a CI system's OIDC token in a file,
/// exchanged at STS, then a service account impersonated): both requests
/// are behind the TLS front and take `ca_file:`.
#[test]
fn workload_identity_federation_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    let front = format!("https://127.0.0.1:{}", s.front.port);
    let subject = s.dir.path().join("oidc-token.json");
    std::fs::write(&subject, r#"{"value": "eyJ.ci-oidc.token"}"#).unwrap();
    s.fake.federate("eyJ.ci-oidc.token");
    let sa = s.fake.service_account().client_email;
    let file = s.dir.path().join("federation.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/gh",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": format!("{front}/v1/token"),
            "service_account_impersonation_url": format!(
                "{front}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken"
            ),
            "credential_source": {
                "file": subject.display().to_string(),
                "format": {"type": "json", "subject_token_field_name": "value"}
            }
        })
        .to_string(),
    )
    .unwrap();
    let file = file.display().to_string();
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", file.as_str())];
    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.fake.count(Route::Sts), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    let log = s.fake.requests();
    let generated = log
        .iter()
        .find(|l| l.route == Route::GenerateAccessToken)
        .unwrap();
    assert!(
        generated
            .principal
            .as_deref()
            .is_some_and(|p| p.starts_with("principal://iam.googleapis.com/")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .filter(|l| l.route == Route::GetInstance)
            .all(|l| l.principal.as_deref() == Some(&format!("serviceAccount:{sa}"))),
        "{log:#?}"
    );

    // Without the CA: an unknown issuer at the STS, nothing exchanged.
    let out = s.status(&s.https(), "", &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"));
    assert_eq!(s.fake.count(Route::Sts), 1);
}

/// An impersonated service account whose source is another service
/// account's key: the source's JWT-bearer grant (an RS256 assertion the fake
/// verifies with the key's public half) and `generateAccessToken` are both
/// behind the TLS front and take `ca_file:`; a key Google does not know is
/// refused with an error naming the credentials file.
#[test]
fn impersonation_from_a_service_account_key_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    let file = s.dir.path().join("impersonated.json");
    let source = s.fake.write_impersonated_from_key(&file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let front = format!("https://127.0.0.1:{}", s.front.port);
    let token_uri = format!("{front}/token");
    s.fake.accept_token_uri(&token_uri);
    json["source_credentials"]["token_uri"] = token_uri.clone().into();
    let url = json["service_account_impersonation_url"]
        .as_str()
        .unwrap()
        .replace(&s.fake.api_endpoint(), &front);
    json["service_account_impersonation_url"] = url.into();
    std::fs::write(&file, json.to_string()).unwrap();
    let shown = file.display().to_string();
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", shown.as_str())];

    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(
        out.status.success(),
        "{}\n{:?}",
        text(&out),
        s.fake.refusals()
    );
    assert_eq!(s.fake.count(Route::Token), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    let log = s.fake.requests();
    let generated = log
        .iter()
        .find(|l| l.route == Route::GenerateAccessToken)
        .unwrap();
    assert_eq!(
        generated.principal.as_deref(),
        Some(format!("serviceAccount:{}", source.client_email).as_str()),
        "{log:#?}"
    );
    let target = s.fake.service_account().client_email;
    assert!(
        log.iter()
            .filter(|l| l.route == Route::GetInstance)
            .all(|l| l.principal.as_deref() == Some(&format!("serviceAccount:{target}"))),
        "{log:#?}"
    );

    // Without the CA: an unknown issuer at the token endpoint, nothing sent.
    let out = s.status(&s.https(), "", &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"));
    assert_eq!(s.fake.count(Route::Token), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);

    // A key Google does not know (deleted, or from another account): the
    // assertion is refused, and the error names the file.
    let mut stranger = crate::support::gce_fake::ServiceAccount::generate(&source.client_email);
    stranger.private_key_id = source.private_key_id.clone();
    json["source_credentials"]["private_key"] = stranger.private_key_pem.into();
    std::fs::write(&file, json.to_string()).unwrap();
    let out = s.status(&s.https(), &extra, &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&shown), "{err}");
    assert!(err.contains("invalid_grant"), "{err}");
    assert!(err.contains("`source_credentials`"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    assert!(
        s.fake
            .refusals()
            .iter()
            .any(|r| r.contains("bad signature")),
        "{:?}",
        s.fake.refusals()
    );
}

/// An impersonation file whose source is a federation file (no
/// impersonation of its own): the STS exchange, then `generateAccessToken`
/// with the federated principal's token, both behind the TLS front.
#[test]
fn impersonation_from_a_federated_identity_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    let front = format!("https://127.0.0.1:{}", s.front.port);
    let subject = s.dir.path().join("oidc-token");
    std::fs::write(&subject, "eyJ.ci-oidc.plain\n").unwrap();
    s.fake.federate("eyJ.ci-oidc.plain");
    let sa = s.fake.service_account().client_email;
    let file = s.dir.path().join("impersonated-federation.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "type": "impersonated_service_account",
            "service_account_impersonation_url": format!(
                "{front}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken"
            ),
            "delegates": [],
            "source_credentials": {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/gl",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": format!("{front}/v1/token"),
                "credential_source": {"file": subject.display().to_string()}
            }
        })
        .to_string(),
    )
    .unwrap();
    let file = file.display().to_string();
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", file.as_str())];
    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(
        out.status.success(),
        "{}\n{:?}",
        text(&out),
        s.fake.refusals()
    );
    assert_eq!(s.fake.count(Route::Sts), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    let log = s.fake.requests();
    assert!(
        log.iter()
            .filter(|l| l.route == Route::GetInstance)
            .all(|l| l.principal.as_deref() == Some(&format!("serviceAccount:{sa}"))),
        "{log:#?}"
    );
}

/// A workload identity federation file for AWS (`environment_id: aws1`)
/// as `gcloud iam workload-identity-pools create-cred-config --aws` writes
/// it, pointed at `imds` for the metadata URLs and at `front` for STS and
/// IAM Credentials.
fn write_aws_federation(s: &Setup, front: &str, imds: &str, imdsv2: bool) -> String {
    let sa = s.fake.service_account().client_email;
    let mut source = serde_json::json!({
        "environment_id": "aws1",
        "region_url": format!("{imds}/latest/meta-data/placement/availability-zone"),
        "url": format!("{imds}/latest/meta-data/iam/security-credentials"),
        "regional_cred_verification_url":
            "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
    });
    if imdsv2 {
        source["imdsv2_session_token_url"] = format!("{imds}/latest/api/token").into();
    }
    let file = s.dir.path().join("aws-federation.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "type": "external_account",
            "audience": AWS_AUDIENCE,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "token_url": format!("{front}/v1/token"),
            "service_account_impersonation_url": format!(
                "{front}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken"
            ),
            "credential_source": source
        })
        .to_string(),
    )
    .unwrap();
    file.display().to_string()
}

const AWS_AUDIENCE: &str =
    "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/aws";

/// AWS-sourced federation with keys and region from the environment: the
/// subject token is a SigV4-signed `GetCallerIdentity` request that the
/// fake STS verifies with the secret, exchanged behind the TLS front with
/// `ca_file:`, then a service account impersonated. A wrong secret is
/// refused with an error naming the file.
#[test]
fn aws_workload_identity_federation_takes_the_same_roots() {
    crate::require!("openssl");
    let s = setup();
    s.fake.federate_aws(
        "AKIAFAKEFEDERATION",
        "fake/secret+key",
        Some("fake-session"),
    );
    let front = format!("https://127.0.0.1:{}", s.front.port);
    // Metadata URLs where nothing listens: the environment must suffice.
    let file = write_aws_federation(&s, &front, "http://127.0.0.1:9", true);
    let mut env = vec![
        ("GOOGLE_APPLICATION_CREDENTIALS", file.as_str()),
        ("AWS_REGION", "eu-west-3"),
        ("AWS_ACCESS_KEY_ID", "AKIAFAKEFEDERATION"),
        ("AWS_SECRET_ACCESS_KEY", "fake/secret+key"),
        ("AWS_SESSION_TOKEN", "fake-session"),
    ];
    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(
        out.status.success(),
        "{}\n{:?}",
        text(&out),
        s.fake.refusals()
    );
    assert_eq!(s.fake.count(Route::Sts), 1);
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
    let log = s.fake.requests();
    let generated = log
        .iter()
        .find(|l| l.route == Route::GenerateAccessToken)
        .unwrap();
    assert_eq!(
        generated.principal.as_deref(),
        Some(format!("principal:{AWS_AUDIENCE}/aws/AKIAFAKEFEDERATION").as_str()),
        "{log:#?}"
    );
    let sa = s.fake.service_account().client_email;
    assert!(
        log.iter()
            .filter(|l| l.route == Route::GetInstance)
            .all(|l| l.principal.as_deref() == Some(&format!("serviceAccount:{sa}"))),
        "{log:#?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("fake/secret+key"), "{err}");

    // Without the CA: an unknown issuer at the STS, nothing exchanged.
    let out = s.status(&s.https(), "", &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"));
    assert_eq!(s.fake.count(Route::Sts), 1);

    // A wrong secret: the signature does not verify, the STS refuses, and
    // the error names the file.
    env[3] = ("AWS_SECRET_ACCESS_KEY", "not/the+secret");
    let out = s.status(&s.https(), &extra, &env);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file)
            && err.contains("invalid_grant")
            && err.contains("workload identity pool provider"),
        "{err}"
    );
    assert!(!err.contains("not/the+secret"), "{err}");
    assert_eq!(
        s.fake.refusals(),
        ["aws subject token: signature does not match"]
    );
    assert_eq!(s.fake.count(Route::GenerateAccessToken), 1);
}

/// AWS-sourced federation on an EC2 instance: no keys or region in the
/// environment, so the region comes from the availability zone and the
/// role's keys from the metadata URLs of the file, with an IMDSv2 session
/// token (the local IMDS fake requires one).
#[test]
fn aws_federation_takes_region_and_keys_from_the_instance_metadata() {
    crate::require!("openssl");
    let s = setup();
    let imds = crate::support::imds_fake::ImdsFake::start(
        "i-0123456789abcdef0",
        "ci-runner",
        Some(("ASIAFAKEROLE", "role/secret", "role-session-token")),
    );
    s.fake
        .federate_aws("ASIAFAKEROLE", "role/secret", Some("role-session-token"));
    let front = format!("https://127.0.0.1:{}", s.front.port);
    let file = write_aws_federation(&s, &front, &imds.endpoint(), true);
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", file.as_str())];
    let extra = format!("    ca_file: {}\n", s.ca.ca.display());
    let out = s.status(&s.https(), &extra, &env);
    assert!(
        out.status.success(),
        "{}\n{:?}",
        text(&out),
        s.fake.refusals()
    );
    assert_eq!(s.fake.count(Route::Sts), 1);
    let seen = imds.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "PUT" && r.ttl.is_some() && r.status == 200),
        "{seen:#?}"
    );
    let gets: Vec<&str> = seen
        .iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(
        gets,
        [
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/iam/security-credentials",
            "/latest/meta-data/iam/security-credentials/ci-runner",
        ],
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.token_ok),
        "{seen:#?}"
    );
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

// ---- the static binary in an empty container ---------------------------------

/// Where the static (musl) binary is: `ABSCONDA_BIN` (which `.ci/run` sets
/// after building it), else the release build for musl in `target/`. `None`
/// when neither exists: the caller skips outside CI and fails in CI.
fn static_binary() -> Option<PathBuf> {
    let path = match std::env::var_os("ABSCONDA_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-musl/release/absconda"),
    };
    if !path.exists() {
        crate::support::skip_or_fail(&format!(
            "the static binary `{}` does not exist: build it with `CC_x86_64_unknown_linux_musl=musl-gcc \
             cargo build --release --target x86_64-unknown-linux-musl` (or set ABSCONDA_BIN)",
            path.display()
        ));
        return None;
    }
    let elf = std::fs::read(&path).unwrap();
    assert!(
        !needs_a_loader(&elf),
        "`{}` is linked dynamically; an empty image cannot run it: build the musl target",
        path.display()
    );
    Some(path)
}

/// Whether an ELF64 file names a program interpreter (`PT_INTERP`), which a
/// static binary does not.
fn needs_a_loader(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// An image holding only `binary` as `/absconda` (what `FROM scratch` plus
/// one `COPY` makes), imported into the test dockerd once per run.
fn empty_image(binary: &Path) -> &'static str {
    use std::sync::OnceLock;
    const IMAGE: &str = "local/absconda-static:test";
    static MADE: OnceLock<()> = OnceLock::new();
    MADE.get_or_init(|| {
        let d = crate::support::docker::docker();
        let dir = crate::support::tempdir();
        std::fs::copy(binary, dir.path().join("absconda")).unwrap();
        let tar = Command::new("tar")
            .arg("-C")
            .arg(dir.path())
            .args(["--owner=0", "--group=0", "-c", "absconda"])
            .output()
            .unwrap();
        assert!(tar.status.success(), "{}", text(&tar));
        let mut import = d.cmd();
        import
            .args(["import", "-", IMAGE])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = import.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
        assert!(child.wait().unwrap().success(), "docker import failed");
        // Nothing but the binary: no CA bundle, no /etc/passwd, no shell.
        let ls = d.run(&["create", IMAGE, "/absconda"]);
        assert!(ls.status.success(), "{}", text(&ls));
        let id = String::from_utf8_lossy(&ls.stdout).trim().to_string();
        let export = d.cmd().args(["export", &id]).output().unwrap();
        let _ = d.run(&["rm", &id]);
        let mut names = Command::new("tar")
            .arg("-t")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        names
            .stdin
            .take()
            .unwrap()
            .write_all(&export.stdout)
            .unwrap();
        let names = names.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&names.stdout);
        assert!(
            !listing.contains("etc/ssl") && !listing.contains("ca-certificates"),
            "the image has a CA bundle:\n{listing}"
        );
    });
    IMAGE
}

/// The files a containerised absconda sees under `/w`: owned by the
/// container's uid, which has no passwd entry and no writable HOME.
const UID: u32 = 54321;

struct Job {
    /// Mounted as `/w`.
    dir: PathBuf,
}

impl Job {
    fn new(s: &Setup) -> Job {
        let dir = s.dir.path().join("w");
        std::fs::create_dir_all(dir.join("no-gcloud")).unwrap();
        std::fs::copy(&s.ca.ca, dir.join("ca.pem")).unwrap();
        Job { dir }
    }

    /// Writes the builders file (`api_endpoint`, plus `extra` lines) and a
    /// gcloud user credentials file whose `token_uri` is `token_uri`.
    fn configure(&self, s: &Setup, api_endpoint: &str, token_uri: &str, extra: &str) {
        std::fs::write(
            self.dir.join("absconda-remote.yaml"),
            format!(
                "builders:\n  cloud:\n    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {api_endpoint}\n    host: 127.0.0.1\n    known_hosts: /w/known_hosts\n{extra}",
                s.fake.project(),
                s.fake.zone(),
            ),
        )
        .unwrap();
        let adc = self.dir.join("adc.json");
        s.fake.write_authorized_user(&adc);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&adc).unwrap()).unwrap();
        json["token_uri"] = token_uri.into();
        std::fs::write(&adc, json.to_string()).unwrap();
    }

    /// `absconda -v remote status cloud --json` in the empty image, as
    /// uid 54321, on the host's network; `env` adds variables.
    fn status(&self, image: &str, env: &[(&str, &str)]) -> Output {
        for e in walk(&self.dir) {
            std::os::unix::fs::chown(&e, Some(UID), Some(UID)).unwrap();
        }
        let d = crate::support::docker::docker();
        let mut c = d.cmd();
        c.args(["run", "--rm", "--network", "host", "--user"])
            .arg(format!("{UID}:{UID}"))
            .arg("-v")
            .arg(format!("{}:/w", self.dir.display()))
            .args(["-w", "/w"]);
        for (k, v) in [
            ("ABSCONDA_REMOTE_CONFIG", "/w/absconda-remote.yaml"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/w/adc.json"),
            ("CLOUDSDK_CONFIG", "/w/no-gcloud"),
            ("XDG_DATA_HOME", "/w/data"),
            ("XDG_CACHE_HOME", "/w/cache"),
        ]
        .iter()
        .chain(env)
        {
            c.arg("-e").arg(format!("{k}={v}"));
        }
        c.args([
            image,
            "/absconda",
            "-v",
            "remote",
            "status",
            "cloud",
            "--json",
        ]);
        c.output().unwrap()
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            all.extend(walk(&e.path()));
        } else {
            all.push(e.path());
        }
    }
    all
}

/// The issue's check: the static binary in an image with nothing else,
/// run as an unknown uid, against endpoints signed by a private CA. The
/// compute API and the token endpoint (gcloud user credentials, so the
/// token is fetched, not signed locally) are both behind the TLS front.
#[test]
fn the_static_binary_in_an_empty_image_trusts_ca_file_and_names_an_unknown_issuer() {
    crate::require!("openssl", "dockerd");
    let Some(binary) = static_binary() else {
        return;
    };
    let s = setup();
    let image = empty_image(&binary);
    let job = Job::new(&s);
    let https_token = format!("https://127.0.0.1:{}/token", s.front.port);

    // (a) With `ca_file:` the token fetch and the API call succeed.
    job.configure(&s, &s.https(), &https_token, "    ca_file: /w/ca.pem\n");
    let tokens = s.fake.count(Route::Token);
    let out = job.status(image, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TERMINATED"),
        "{}",
        text(&out)
    );
    assert_eq!(s.fake.count(Route::Token), tokens + 1, "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trust roots for HTTPS: Mozilla's roots built into absconda")
            && err.contains("plus 1 from the CA file `/w/ca.pem`"),
        "{err}"
    );

    // The same with ABSCONDA_CA_FILE instead of `ca_file:`.
    job.configure(&s, &s.https(), &https_token, "");
    let out = job.status(image, &[("ABSCONDA_CA_FILE", "/w/ca.pem")]);
    assert!(out.status.success(), "{}", text(&out));

    // (b) Without it: an unknown issuer, naming the endpoint, with a hint;
    // not a client that cannot be built, not a panic, not retried.
    let tokens = s.fake.count(Route::Token);
    let out = job.status(image, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        out.status.code(),
        Some(8),
        "a cloud call failed: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("unknownissuer") || lower.contains("unknown issuer"),
        "{err}"
    );
    assert!(err.contains(&format!("`{https_token}`")), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("hint: ") && l.contains("`ca_file:`")),
        "{err}"
    );
    for bad in [
        "panicked",
        "no ca certificates were loaded",
        "builder error",
        "did not finish within",
    ] {
        assert!(!lower.contains(bad), "{bad}: {err}");
    }
    assert_eq!(s.fake.count(Route::Token), tokens, "no token was sent");
}

#[test]
fn the_static_binary_in_an_empty_image_reaches_http_endpoints() {
    crate::require!("openssl", "dockerd");
    let Some(binary) = static_binary() else {
        return;
    };
    let s = setup();
    let image = empty_image(&binary);
    let job = Job::new(&s);

    // (c) `http://` API and token endpoints need no trust roots.
    job.configure(&s, &s.fake.api_endpoint(), &s.fake.token_uri(), "");
    let tokens = s.fake.count(Route::Token);
    let out = job.status(image, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TERMINATED"),
        "{}",
        text(&out)
    );
    assert_eq!(s.fake.count(Route::Token), tokens + 1);

    // The metadata server (plain HTTP) as the credential source.
    let metadata = s.fake.count(Route::Metadata);
    let host = s.fake.metadata_host();
    let out = job.status(
        image,
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", ""),
            ("GCE_METADATA_HOST", &host),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.fake.count(Route::Metadata) > metadata);
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
