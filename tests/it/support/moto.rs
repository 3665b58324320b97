//! moto's server as a real EC2 endpoint on loopback, with signatures checked.
//!
//! [`Moto::start`] installs moto into a Python venv (made with `python3`, or
//! `$ABSCONDA_TEST_PYTHON`) cached under `$ABSCONDA_TEST_CACHE` (default
//! `target/tmp/test-cache`), reused by every later run, then starts `moto_server` on a free loopback port as a child
//! process that is killed when the [`Moto`] is dropped.
//!
//! Signature checking is switched on through moto's
//! `INITIAL_NO_AUTH_ACTION_COUNT`: the first three actions are let through
//! unchecked, and the harness spends exactly them on creating an IAM user,
//! its access key and an admin inline policy. From then on moto verifies the
//! SigV4 signature of every request against that key (EC2 answers
//! `AuthFailure` otherwise) and evaluates the user's policy.
//!
//! moto routes a request to a service by the service name in its SigV4
//! credential scope, so even the unchecked bootstrap requests are signed
//! (with a throwaway key) for `iam`.
//!
//! For other tests (an end-to-end build through a loopback sshd, say):
//! `Moto::start().await` (None means "skipped outside CI"), then
//! [`Moto::run_instance`] to make a builder VM, [`Moto::env`] for an
//! environment with the admin key, and [`Moto::settings`] for an
//! [`Ec2Settings`] pointing at this server. moto's instances get made-up IP
//! addresses, so such a test must override the address (a config `host:`).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use absconda::cloud::aws_auth::{self, CredentialSource, Credentials, Env, SigningRequest};
use absconda::cloud::ec2::{Ec2, Ec2Instance, Ec2Settings};
use absconda::cloud::retry::Backoff;
use url::Url;

use super::skip_or_fail;

/// What gets installed; a cached venv made for another spec is rebuilt.
pub const MOTO_SPEC: &str = "moto[server,ec2]>=5,<6";
pub const REGION: &str = "us-east-1";
/// moto's default account.
pub const ACCOUNT_ID: &str = "123456789012";
const USER: &str = "absconda-test";
const ROLE: &str = "absconda-test-role";
/// CreateUser, CreateAccessKey, PutUserPolicy.
const UNCHECKED_ACTIONS: usize = 3;
const ADMIN_POLICY: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
/// Any AMI id will do: moto does not validate them unless asked to.
pub const IMAGE_ID: &str = "ami-0123456789abcdef0";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// Where the venv is cached.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("ABSCONDA_TEST_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-cache"),
    }
}

/// The `moto_server` program, installed on first use.
///
/// Test threads share one answer; test processes share the venv under a
/// file lock, so two `cargo test` runs do not install over each other.
pub fn moto_server_program() -> Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM.get_or_init(install).clone()
}

fn install() -> Result<PathBuf, String> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .map_err(|e| format!("cannot create `{}`: {e}", cache.display()))?;
    let lock_path = cache.join("moto-venv.lock");
    let lock = File::create(&lock_path)
        .map_err(|e| format!("cannot create `{}`: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock `{}`: {e}", lock_path.display()))?;

    let venv = cache.join("moto-venv");
    let program = venv.join("bin").join("moto_server");
    let marker = venv.join(".absconda-installed");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == MOTO_SPEC) && program.exists() {
        return Ok(program);
    }
    let _ = std::fs::remove_dir_all(&venv);
    eprintln!("installing {MOTO_SPEC} into `{}` (once)", venv.display());
    let python = std::env::var_os("ABSCONDA_TEST_PYTHON").unwrap_or_else(|| "python3".into());
    run(Command::new(python).arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        MOTO_SPEC,
    ]))?;
    if !program.exists() {
        return Err(format!(
            "pip installed moto but `{}` is missing",
            program.display()
        ));
    }
    std::fs::write(&marker, MOTO_SPEC)
        .map_err(|e| format!("cannot write `{}`: {e}", marker.display()))?;
    Ok(program)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Temporary credentials from STS `AssumeRole`, as a `credential_process` would print them.
#[derive(Debug, Clone)]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: String,
}

/// A running moto server with IAM checks on and an admin user's key.
pub struct Moto {
    child: Child,
    addr: SocketAddr,
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    /// An empty home directory for environments, and the server's log.
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Moto {
    /// Starts a server, or returns `None` when moto cannot be installed and
    /// this is not CI (the test then returns early, having said why).
    pub async fn start() -> Option<Moto> {
        crate::support::watch();
        let program = match moto_server_program() {
            Ok(p) => p,
            Err(e) => {
                skip_or_fail(&format!("moto is not available: {e}"));
                return None;
            }
        };
        let mut last = String::new();
        // A free port can be taken between our probe and moto's bind: try again.
        for _ in 0..3 {
            match Moto::spawn(&program).await {
                Ok(moto) => return Some(moto),
                Err(e) => last = e,
            }
        }
        panic!("moto_server did not start: {last}");
    }

    async fn spawn(program: &Path) -> Result<Moto, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port()?;
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path).map_err(|e| e.to_string())?;
        let err_log = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env(
                "INITIAL_NO_AUTH_ACTION_COUNT",
                UNCHECKED_ACTIONS.to_string(),
            )
            // No need for the default AMI catalogue: any ImageId is accepted.
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| format!("cannot run `{}`: {e}", program.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut moto = Moto {
            child,
            addr,
            endpoint: format!("http://{addr}"),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            dir,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())?,
        };
        moto.wait_ready(&log_path).await?;
        moto.bootstrap_iam().await?;
        Ok(moto)
    }

    async fn wait_ready(&mut self, log: &Path) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "moto_server exited ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                // The dashboard API is not an AWS action: it does not use up
                // the unchecked requests.
                let probe = self
                    .http
                    .get(format!("{}/moto-api/", self.endpoint))
                    .send()
                    .await;
                if probe.is_ok_and(|r| r.status().is_success()) {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "moto_server did not answer on {} within 60s: {}",
                    self.addr,
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Spends the unchecked requests on an admin user with an access key.
    async fn bootstrap_iam(&mut self) -> Result<(), String> {
        // Unchecked, but routed to IAM by the scope of a signature.
        let anyone = Credentials::new(
            "AKIDBOOTSTRAP",
            "bootstrap",
            None,
            CredentialSource::Explicit,
        );
        let iam = |params: Vec<(&'static str, String)>| {
            let mut all = vec![("Version", "2010-05-08".to_string())];
            all.extend(params);
            all
        };
        self.signed_query(
            "iam",
            &anyone,
            &iam(vec![
                ("Action", "CreateUser".into()),
                ("UserName", USER.into()),
            ]),
        )
        .await?;
        let key = self
            .signed_query(
                "iam",
                &anyone,
                &iam(vec![
                    ("Action", "CreateAccessKey".into()),
                    ("UserName", USER.into()),
                ]),
            )
            .await?;
        self.access_key_id =
            xml_text(&key, "AccessKeyId").ok_or("no AccessKeyId in CreateAccessKey")?;
        self.secret_access_key =
            xml_text(&key, "SecretAccessKey").ok_or("no SecretAccessKey in CreateAccessKey")?;
        self.signed_query(
            "iam",
            &anyone,
            &iam(vec![
                ("Action", "PutUserPolicy".into()),
                ("UserName", USER.into()),
                ("PolicyName", "admin".into()),
                ("PolicyDocument", ADMIN_POLICY.into()),
            ]),
        )
        .await?;
        Ok(())
    }

    /// A SigV4-signed Query API POST for `service`; the XML answer, or the
    /// status and body of an error.
    pub async fn signed_query(
        &self,
        service: &str,
        creds: &Credentials,
        params: &[(&str, String)],
    ) -> Result<String, String> {
        let url = Url::parse(&self.endpoint).map_err(|e| e.to_string())?;
        let body = aws_auth::query_body(params.iter().map(|(k, v)| (*k, v.as_str())));
        let signed = aws_auth::sign(
            &SigningRequest {
                method: "POST",
                url: &url,
                headers: &[("content-type", FORM)],
                body: body.as_bytes(),
            },
            creds,
            REGION,
            service,
            chrono::Utc::now(),
        );
        let mut req = self.http.post(url).header("content-type", FORM).body(body);
        for (name, value) in signed.iter() {
            req = req.header(name, value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{service} request failed: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{service} answered {status}: {text}"));
        }
        Ok(text)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin user's access key id and secret.
    pub fn access_key(&self) -> (&str, &str) {
        (&self.access_key_id, &self.secret_access_key)
    }

    pub fn admin_credentials(&self) -> Credentials {
        Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.clone(),
            None,
            CredentialSource::Explicit,
        )
    }

    /// An empty directory used as `HOME` by [`Moto::env`]; tests may put
    /// `.aws/` files in it.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// An environment with no credentials: this server as EC2 endpoint, the
    /// test region, an empty home, IMDS off (it must never be probed).
    pub fn env_without_credentials(&self) -> Env {
        Env::from_pairs([
            ("HOME", self.home().display().to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL_EC2", self.endpoint.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ])
    }

    /// [`Moto::env_without_credentials`] plus the admin key in
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub fn env(&self) -> Env {
        self.env_without_credentials()
            .with("AWS_ACCESS_KEY_ID", self.access_key_id.clone())
            .with("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone())
    }

    /// Settings for `instance` on this server, with a test-sized backoff.
    pub fn settings(&self, instance: Ec2Instance) -> Ec2Settings {
        Ec2Settings {
            region: Some(REGION.to_string()),
            instance,
            endpoint: Some(self.endpoint.clone()),
            profile: None,
            backoff: fast_backoff(Duration::from_secs(20)),
        }
    }

    /// A provider for `instance` with the admin key.
    pub fn ec2(&self, instance: Ec2Instance) -> Ec2 {
        Ec2::with_env(self.settings(instance), self.env()).expect("EC2 provider for moto")
    }

    /// Runs a new instance (tagged `Name=name` when given) and returns its id.
    pub async fn run_instance(&self, name: Option<&str>) -> String {
        let mut params = vec![
            ("ImageId", IMAGE_ID),
            ("InstanceType", "t3.micro"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
        ];
        if let Some(name) = name {
            params.extend([
                ("TagSpecification.1.ResourceType", "instance"),
                ("TagSpecification.1.Tag.1.Key", "Name"),
                ("TagSpecification.1.Tag.1.Value", name),
            ]);
        }
        let xml = self
            .ec2(Ec2Instance::Id("i-harness".into()))
            .query("RunInstances", &params)
            .await
            .expect("RunInstances");
        xml_text(&xml, "instanceId").expect("instanceId in RunInstances")
    }

    pub async fn terminate(&self, id: &str) {
        self.ec2(Ec2Instance::Id(id.into()))
            .query("TerminateInstances", &[("InstanceId.1", id)])
            .await
            .expect("TerminateInstances");
    }

    /// The state name moto holds for `id`, read with a raw DescribeInstances.
    pub async fn state(&self, id: &str) -> String {
        let xml = self
            .ec2(Ec2Instance::Id(id.into()))
            .query("DescribeInstances", &[("InstanceId.1", id)])
            .await
            .expect("DescribeInstances");
        let after_state = xml.split("<instanceState>").nth(1).expect("instanceState");
        xml_text(after_state, "name").expect("state name")
    }

    /// Temporary credentials with a session token: an admin role assumed
    /// through STS with the admin user's key.
    pub async fn session_credentials(&self) -> SessionCredentials {
        let admin = self.admin_credentials();
        let trust = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{ACCOUNT_ID}:user/{USER}"}},"Action":"sts:AssumeRole"}}]}}"#
        );
        let iam = |action: &str, extra: Vec<(&'static str, String)>| {
            let mut p = vec![
                ("Version", "2010-05-08".to_string()),
                ("Action", action.to_string()),
            ];
            p.extend(extra);
            p
        };
        // The role may exist from an earlier call on this server.
        let _ = self
            .signed_query(
                "iam",
                &admin,
                &iam(
                    "CreateRole",
                    vec![
                        ("RoleName", ROLE.into()),
                        ("AssumeRolePolicyDocument", trust),
                    ],
                ),
            )
            .await;
        self.signed_query(
            "iam",
            &admin,
            &iam(
                "PutRolePolicy",
                vec![
                    ("RoleName", ROLE.into()),
                    ("PolicyName", "admin".into()),
                    ("PolicyDocument", ADMIN_POLICY.into()),
                ],
            ),
        )
        .await
        .expect("PutRolePolicy");
        let xml = self
            .signed_query(
                "sts",
                &admin,
                &[
                    ("Version", "2011-06-15".to_string()),
                    ("Action", "AssumeRole".to_string()),
                    ("RoleArn", format!("arn:aws:iam::{ACCOUNT_ID}:role/{ROLE}")),
                    ("RoleSessionName", "absconda-test".to_string()),
                ],
            )
            .await
            .expect("AssumeRole");
        SessionCredentials {
            access_key_id: xml_text(&xml, "AccessKeyId").expect("AccessKeyId"),
            secret_access_key: xml_text(&xml, "SecretAccessKey").expect("SecretAccessKey"),
            session_token: xml_text(&xml, "SessionToken").expect("SessionToken"),
            expiration: xml_text(&xml, "Expiration").expect("Expiration"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backoff for tests: quick retries under `deadline`.
pub fn fast_backoff(deadline: Duration) -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        deadline,
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// The text of the first `<tag>` element: enough for the answers the harness reads.
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(
        xml[start..end]
            .trim()
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">"),
    )
}
