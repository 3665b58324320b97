//! A fake of Azure Resource Manager (compute and network), Microsoft Entra
//! ID's token endpoint and the instance metadata service, because no
//! emulator of them exists.
//!
//! Written from Microsoft's REST reference:
//! - `virtualMachines` Get (with `$expand=instanceView`), Instance View,
//!   Start, Deallocate, Power Off and Retrieve Boot Diagnostics Data under
//!   `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/…`,
//!   every request with an `api-version` (400 `MissingApiVersionParameter`
//!   without one) and a Bearer token this fake minted (401
//!   `InvalidAuthenticationToken` otherwise); ARM's error envelope
//!   `{"error":{"code","message"}}`;
//! - Start and Deallocate answer 202 with `Azure-AsyncOperation`, `Location`
//!   and `Retry-After`; the operation status resource says `InProgress` until
//!   the VM reaches its target power state, then `Succeeded`;
//! - power states that walk on a timer (`deallocated → starting → running`,
//!   `running → deallocating → deallocated`), a 409 `OperationNotAllowed`
//!   when an action comes while another is in progress, a new dynamic public
//!   IP at every start;
//! - `networkInterfaces` and `publicIPAddresses` Get;
//! - the Entra v2.0 token endpoint (`client_credentials` with a client
//!   secret, or a client assertion whose RS256 signature is verified against
//!   the test certificate's key, with `x5t` = the certificate's thumbprint and
//!   `aud` = the token endpoint; or a federated token) answering
//!   `AADSTS…` errors like Entra;
//! - IMDS on its own listener: `/metadata/identity/oauth2/token` and
//!   `/metadata/instance/compute/resourceId`, only with `Metadata: true`.
//!
//! Faults (429 with `Retry-After`, 500, 409) are injected per test on ARM
//! calls, and every request is logged.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha1::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SUBSCRIPTION: &str = "00000000-1111-2222-3333-444444444444";
pub const RESOURCE_GROUP: &str = "absconda-rg";
pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_ID: &str = "22222222-3333-4444-5555-666666666666";
pub const CLIENT_SECRET: &str = "Xy8Q~fake-secret-value-0123456789";
pub const MANAGED_IDENTITY_CLIENT_ID: &str = "33333333-4444-5555-6666-777777777777";
const ARM_SCOPE: &str = "https://management.azure.com/.default";
const LOCATION: &str = "westeurope";

/// How long each transition takes.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub starting: Duration,
    pub deallocating: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            starting: Duration::from_millis(600),
            deallocating: Duration::from_millis(600),
        }
    }
}

/// A scripted ARM answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    TooManyRequests { retry_after_secs: u64 },
    Internal,
    Conflict,
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
}

struct Vm {
    power: String,
    schedule: VecDeque<(Instant, String)>,
    transitions: usize,
    public_ip: Option<String>,
    private_ip: String,
    serial_log: String,
}

struct Operation {
    /// When the VM reaches the operation's target power state.
    done_at: Instant,
}

struct State {
    timings: Timings,
    vms: HashMap<String, Vm>,
    operations: HashMap<String, Operation>,
    faults: VecDeque<Fault>,
    always: Option<Fault>,
    log: Vec<Logged>,
    tokens: HashSet<String>,
    next: u32,
    /// The VM the metadata service says it runs on.
    imds_vm: String,
}

impl State {
    fn advance(&mut self) {
        let now = Instant::now();
        for vm in self.vms.values_mut() {
            while let Some((at, _)) = vm.schedule.front() {
                if *at > now {
                    break;
                }
                let (_, p) = vm.schedule.pop_front().unwrap();
                vm.power = p;
            }
        }
    }

    fn mint(&mut self) -> String {
        let t = format!("eyJ0eXAi.fake-arm-token-{}", rand::random::<u64>());
        self.tokens.insert(t.clone());
        t
    }
}

/// The test app registration's certificate and key.
pub struct Certificate {
    /// PEM with the certificate and the PKCS#8 private key.
    pub pem: String,
    /// base64url SHA-1 of the certificate's DER.
    pub x5t: String,
    public_key: Vec<u8>,
}

struct Shared {
    state: Mutex<State>,
    api_addr: SocketAddr,
    cert: Mutex<Option<Certificate>>,
    federated_token: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake; stops when dropped.
pub struct AzureFake {
    shared: Arc<Shared>,
    imds_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Api,
    Imds,
}

impl AzureFake {
    pub fn start() -> AzureFake {
        let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let imds = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        api.set_nonblocking(true).unwrap();
        imds.set_nonblocking(true).unwrap();
        let api_addr = api.local_addr().unwrap();
        let imds_addr = imds.local_addr().unwrap();
        let shared = Arc::new(Shared {
            api_addr,
            cert: Mutex::new(None),
            federated_token: format!("eyJhbGciOi.federated.{}", rand::random::<u64>()),
            state: Mutex::new(State {
                timings: Timings::default(),
                vms: HashMap::new(),
                operations: HashMap::new(),
                faults: VecDeque::new(),
                always: None,
                log: Vec::new(),
                tokens: HashSet::new(),
                next: 0,
                imds_vm: "builder".into(),
            }),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("azure-fake".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let api = TcpListener::from_std(api).unwrap();
                    let imds = TcpListener::from_std(imds).unwrap();
                    tokio::select! {
                        _ = accept_loop(api, sh.clone(), Listener::Api) => {}
                        _ = accept_loop(imds, sh, Listener::Imds) => {}
                        _ = rx => {}
                    }
                });
            })
            .unwrap();
        AzureFake {
            shared,
            imds_addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `api_endpoint:` and `authority_host:` of a builder (one listener serves both).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.shared.api_addr)
    }

    /// What `AZURE_POD_IDENTITY_AUTHORITY_HOST` or `metadata_endpoint` names.
    pub fn imds_endpoint(&self) -> String {
        format!("http://{}", self.imds_addr)
    }

    pub fn resource_id(name: &str) -> String {
        format!(
            "/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines/{name}"
        )
    }

    pub fn add_vm(&self, name: &str, power: &str) {
        let mut st = self.shared.lock();
        st.next += 1;
        let n = st.next;
        st.vms.insert(
            name.into(),
            Vm {
                power: power.into(),
                schedule: VecDeque::new(),
                transitions: 0,
                public_ip: (power == "running").then(|| format!("20.0.0.{n}")),
                private_ip: format!("10.0.0.{}", n + 3),
                serial_log: String::new(),
            },
        );
    }

    pub fn power(&self, name: &str) -> Option<String> {
        let mut st = self.shared.lock();
        st.advance();
        st.vms.get(name).map(|v| v.power.clone())
    }

    pub fn public_ip(&self, name: &str) -> Option<String> {
        self.shared
            .lock()
            .vms
            .get(name)
            .and_then(|v| v.public_ip.clone())
    }

    pub fn private_ip(&self, name: &str) -> Option<String> {
        self.shared
            .lock()
            .vms
            .get(name)
            .map(|v| v.private_ip.clone())
    }

    pub fn transitions(&self, name: &str) -> usize {
        self.shared
            .lock()
            .vms
            .get(name)
            .map_or(0, |v| v.transitions)
    }

    pub fn set_serial_log(&self, name: &str, text: &str) {
        if let Some(v) = self.shared.lock().vms.get_mut(name) {
            v.serial_log = text.into();
        }
    }

    pub fn set_imds_vm(&self, name: &str) {
        self.shared.lock().imds_vm = name.into();
    }

    /// Waits for a power state with a deadline.
    pub fn wait_for_power(&self, name: &str, power: &str, within: Duration) {
        let end = Instant::now() + within;
        loop {
            if self.power(name).as_deref() == Some(power) {
                return;
            }
            assert!(
                Instant::now() < end,
                "`{name}` did not reach `{power}` within {within:?} (is {:?})",
                self.power(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Forgets every token it minted, as a revocation would.
    pub fn revoke_all(&self) {
        self.shared.lock().tokens.clear();
    }

    pub fn inject(&self, fault: Fault, times: usize) {
        let mut st = self.shared.lock();
        for _ in 0..times {
            st.faults.push_back(fault);
        }
    }

    pub fn inject_always(&self, fault: Fault) {
        self.shared.lock().always = Some(fault);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Requests whose path ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|l| l.method == method && l.path.ends_with(suffix))
            .count()
    }

    /// The environment of a service principal with a client secret.
    pub fn secret_env(&self, secret: &str) -> Vec<(String, String)> {
        vec![
            ("AZURE_TENANT_ID".into(), TENANT.into()),
            ("AZURE_CLIENT_ID".into(), CLIENT_ID.into()),
            ("AZURE_CLIENT_SECRET".into(), secret.into()),
            ("AZURE_AUTHORITY_HOST".into(), self.endpoint()),
        ]
    }

    /// A certificate for the app registration (made with `openssl`), written
    /// to `dir`; returns the environment that uses it.
    pub fn certificate_env(&self, dir: &Path) -> Vec<(String, String)> {
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let key_pem = pem("PRIVATE KEY", der.as_ref());
        let key_path = dir.join("key.pem");
        std::fs::write(&key_path, &key_pem).unwrap();
        let cert_path = dir.join("cert.crt");
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .arg(&key_path)
            .args(["-subj", "/CN=absconda-test", "-days", "2", "-out"])
            .arg(&cert_path)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cert_pem = std::fs::read_to_string(&cert_path).unwrap();
        let cert_der = STANDARD
            .decode(
                cert_pem
                    .lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .unwrap();
        let x5t = URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&cert_der));
        let both = dir.join("app.pem");
        std::fs::write(&both, format!("{cert_pem}{key_pem}")).unwrap();
        *self.shared.cert.lock().unwrap() = Some(Certificate {
            pem: format!("{cert_pem}{key_pem}"),
            x5t,
            public_key: pair.public_key().as_ref().to_vec(),
        });
        vec![
            ("AZURE_TENANT_ID".into(), TENANT.into()),
            ("AZURE_CLIENT_ID".into(), CLIENT_ID.into()),
            (
                "AZURE_CLIENT_CERTIFICATE_PATH".into(),
                both.to_string_lossy().into_owned(),
            ),
            ("AZURE_AUTHORITY_HOST".into(), self.endpoint()),
        ]
    }

    pub fn federated_env(&self, dir: &Path) -> Vec<(String, String)> {
        let path: PathBuf = dir.join("federated-token");
        std::fs::write(&path, &self.shared.federated_token).unwrap();
        vec![
            ("AZURE_TENANT_ID".into(), TENANT.into()),
            ("AZURE_CLIENT_ID".into(), CLIENT_ID.into()),
            (
                "AZURE_FEDERATED_TOKEN_FILE".into(),
                path.to_string_lossy().into_owned(),
            ),
            ("AZURE_AUTHORITY_HOST".into(), self.endpoint()),
        ]
    }

    pub fn managed_identity_env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_CLIENT_ID".into(), MANAGED_IDENTITY_CLIENT_ID.into()),
            (
                "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
                self.imds_endpoint(),
            ),
        ]
    }
}

impl Drop for AzureFake {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for c in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(c).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

// ---- HTTP/1.1 -----------------------------------------------------------------

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn query_param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
    fn form(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(&self.body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    content_type: &'static str,
}

fn json_response(status: u16, body: Value) -> Response {
    Response {
        status,
        headers: vec![(
            "x-ms-request-id".into(),
            format!("{:032x}", rand::random::<u128>()),
        )],
        body: if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        },
        content_type: "application/json; charset=utf-8",
    }
}

fn arm_error(status: u16, code: &str, message: &str) -> Response {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, which: Listener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve(sock, shared.clone(), which));
    }
}

async fn serve(mut sock: TcpStream, shared: Arc<Shared>, which: Listener) {
    let mut buf = Vec::new();
    loop {
        let Ok(Some(req)) = read_request(&mut sock, &mut buf).await else {
            return;
        };
        let resp = handle(&shared, which, &req);
        shared.lock().log.push(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            status: resp.status,
        });
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            resp.status,
            resp.content_type,
            resp.body.len()
        );
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if sock.write_all(head.as_bytes()).await.is_err()
            || sock.write_all(&resp.body).await.is_err()
        {
            return;
        }
    }
}

async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    buf.drain(..head_end + 4);
    while buf.len() < length {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..length).collect();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

// ---- routes -------------------------------------------------------------------

fn handle(shared: &Arc<Shared>, which: Listener, req: &Request) -> Response {
    if which == Listener::Imds {
        return imds(shared, req);
    }
    if req.path == format!("/{TENANT}/oauth2/v2.0/token") {
        return token(shared, req);
    }
    if let Some(name) = req.path.strip_prefix("/_fake/serial/") {
        let st = shared.lock();
        return match st.vms.get(name) {
            Some(vm) if req.query_param("sig").is_some() => Response {
                status: 200,
                headers: vec![],
                body: vm.serial_log.clone().into_bytes(),
                content_type: "text/plain",
            },
            _ => arm_error(403, "AuthenticationFailed", "no SAS"),
        };
    }
    // ARM: api-version, then the token.
    if req.query_param("api-version").is_none() {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "));
    let mut st = shared.lock();
    if !token.is_some_and(|t| st.tokens.contains(t)) {
        return arm_error(
            401,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        );
    }
    if let Some(f) = st.always.or_else(|| st.faults.pop_front()) {
        let mutating = req.method == "POST";
        match f {
            Fault::TooManyRequests { retry_after_secs } => {
                let mut r = arm_error(
                    429,
                    "TooManyRequests",
                    "The request is being throttled as the limit has been reached for operation type - Read_30Min.",
                );
                r.headers
                    .push(("Retry-After".into(), retry_after_secs.to_string()));
                return r;
            }
            Fault::Internal => {
                return arm_error(
                    500,
                    "InternalServerError",
                    "Encountered internal server error.",
                );
            }
            Fault::Conflict if mutating => {
                return arm_error(
                    409,
                    "OperationNotAllowed",
                    "Operation 'start' is not allowed since the VM is marked for deallocation.",
                );
            }
            Fault::Conflict => st.faults.push_front(Fault::Conflict),
        }
    }
    st.advance();
    let prefix =
        format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/");
    let ops = format!(
        "/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/{LOCATION}/operations/"
    );
    if let Some(id) = req.path.strip_prefix(&ops) {
        let Some(op) = st.operations.get(id) else {
            return arm_error(404, "NotFound", "operation not found");
        };
        let status = if Instant::now() >= op.done_at {
            "Succeeded"
        } else {
            "InProgress"
        };
        let mut r = json_response(
            200,
            json!({"name": id, "status": status, "startTime": chrono::Utc::now().to_rfc3339()}),
        );
        if status == "InProgress" {
            r.headers.push(("Retry-After".into(), "1".into()));
        }
        return r;
    }
    let Some(rest) = req.path.strip_prefix(&prefix) else {
        return arm_error(404, "InvalidResourceType", "unknown path");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["Microsoft.Compute", "virtualMachines", name, tail @ ..] => {
            let name = name.to_string();
            if !st.vms.contains_key(&name) {
                return arm_error(
                    404,
                    "ResourceNotFound",
                    &format!(
                        "The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{RESOURCE_GROUP}' was not found."
                    ),
                );
            }
            match (req.method.as_str(), tail) {
                ("GET", []) => {
                    let expand = req.query_param("$expand").as_deref() == Some("instanceView");
                    json_response(200, vm_json(&name, &st.vms[&name], expand))
                }
                ("GET", ["instanceView"]) => json_response(200, instance_view(&st.vms[&name])),
                ("POST", [action @ ("start" | "deallocate" | "powerOff")]) => {
                    vm_action(&mut st, &name, action, shared.api_addr)
                }
                ("POST", ["retrieveBootDiagnosticsData"]) => json_response(
                    200,
                    json!({
                        "consoleScreenshotBlobUri": format!("http://{}/_fake/screenshot/{name}?sig=x", shared.api_addr),
                        "serialConsoleLogBlobUri": format!("http://{}/_fake/serial/{name}?sv=2021&sig=abc", shared.api_addr),
                    }),
                ),
                _ => arm_error(405, "MethodNotAllowed", "method not allowed"),
            }
        }
        ["Microsoft.Network", "networkInterfaces", nic] => {
            let name = nic.trim_end_matches("-nic");
            let Some(vm) = st.vms.get(name) else {
                return arm_error(404, "NotFound", "nic not found");
            };
            json_response(200, nic_json(name, vm))
        }
        ["Microsoft.Network", "publicIPAddresses", pip] => {
            let name = pip.trim_end_matches("-ip");
            let Some(vm) = st.vms.get(name) else {
                return arm_error(404, "NotFound", "public IP not found");
            };
            let mut props = json!({"provisioningState": "Succeeded", "publicIPAllocationMethod": "Dynamic", "publicIPAddressVersion": "IPv4", "idleTimeoutInMinutes": 4});
            if let Some(ip) = &vm.public_ip {
                props["ipAddress"] = json!(ip);
            }
            json_response(
                200,
                json!({"name": pip, "id": format!("{prefix}Microsoft.Network/publicIPAddresses/{pip}").trim_start_matches('/').to_string(), "location": LOCATION, "sku": {"name": "Basic"}, "properties": props}),
            )
        }
        _ => arm_error(404, "InvalidResourceType", "unknown resource type"),
    }
}

fn vm_action(st: &mut State, name: &str, action: &str, origin: SocketAddr) -> Response {
    let (starting, deallocating) = (st.timings.starting, st.timings.deallocating);
    let vm = st.vms.get_mut(name).unwrap();
    if !vm.schedule.is_empty() {
        return arm_error(
            409,
            "OperationNotAllowed",
            &format!(
                "Operation '{action}' is not allowed on VM '{name}' since the VM is in a transition."
            ),
        );
    }
    let now = Instant::now();
    let mut done_at = now;
    let (to, next, timing) = match action {
        "start" => ("starting", "running", starting),
        "deallocate" => ("deallocating", "deallocated", deallocating),
        _ => ("stopping", "stopped", deallocating),
    };
    let acts = match action {
        "start" => vm.power != "running",
        "deallocate" => vm.power != "deallocated",
        _ => vm.power == "running",
    };
    if acts {
        vm.transitions += 1;
        vm.power = to.into();
        vm.public_ip = if action == "start" {
            st.next += 1;
            Some(format!("20.0.1.{}", st.next))
        } else {
            None
        };
        done_at = now + timing;
        vm.schedule.push_back((done_at, next.into()));
    }
    let id = format!(
        "{:08x}-aaaa-bbbb-cccc-{:012x}",
        rand::random::<u32>(),
        rand::random::<u64>() & 0xffff_ffff_ffff
    );
    st.operations.insert(id.clone(), Operation { done_at });
    let url = format!(
        "http://{origin}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/{LOCATION}/operations/{id}?p=abc&api-version=2024-07-01"
    );
    let mut r = json_response(202, Value::Null);
    r.headers.push(("Azure-AsyncOperation".into(), url.clone()));
    r.headers
        .push(("Location".into(), format!("{url}&monitor=true")));
    r.headers.push(("Retry-After".into(), "1".into()));
    r
}

fn instance_view(vm: &Vm) -> Value {
    let prov = if vm.schedule.is_empty() {
        "succeeded"
    } else {
        "updating"
    };
    json!({
        "computerName": "builder",
        "osName": "ubuntu",
        "osVersion": "24.04",
        "statuses": [
            {"code": format!("ProvisioningState/{prov}"), "level": "Info", "displayStatus": "Provisioning succeeded"},
            {"code": format!("PowerState/{}", vm.power), "level": "Info", "displayStatus": format!("VM {}", vm.power)}
        ]
    })
}

fn vm_json(name: &str, vm: &Vm, expand: bool) -> Value {
    let rg = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers");
    let mut props = json!({
        "vmId": "0f47b100-583c-48e3-a4c0-aefc2c9bbcc1",
        "hardwareProfile": {"vmSize": "Standard_D4s_v5"},
        "provisioningState": "Succeeded",
        "networkProfile": {"networkInterfaces": [
            {"id": format!("{rg}/Microsoft.Network/networkInterfaces/{name}-nic"), "properties": {"primary": true}}
        ]},
    });
    if expand {
        props["instanceView"] = instance_view(vm);
    }
    json!({
        "name": name,
        "id": AzureFake::resource_id(name),
        "type": "Microsoft.Compute/virtualMachines",
        "location": LOCATION,
        "properties": props,
    })
}

fn nic_json(name: &str, vm: &Vm) -> Value {
    let rg = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers");
    json!({
        "name": format!("{name}-nic"),
        "id": format!("{rg}/Microsoft.Network/networkInterfaces/{name}-nic"),
        "location": LOCATION,
        "properties": {
            "provisioningState": "Succeeded",
            "ipConfigurations": [{
                "name": "ipconfig1",
                "id": format!("{rg}/Microsoft.Network/networkInterfaces/{name}-nic/ipConfigurations/ipconfig1"),
                "properties": {
                    "privateIPAddress": vm.private_ip,
                    "privateIPAllocationMethod": "Dynamic",
                    "publicIPAddress": {"id": format!("{rg}/Microsoft.Network/publicIPAddresses/{name}-ip")},
                    "primary": true
                }
            }],
            "primary": true
        }
    })
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({
            "error": error,
            "error_description": format!("{description}\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [7000215],
            "trace_id": "0000",
            "correlation_id": "1111",
        }),
    )
}

fn token(shared: &Arc<Shared>, req: &Request) -> Response {
    if req.method != "POST" {
        return oauth_error(
            405,
            "invalid_request",
            "AADSTS900561: The endpoint only accepts POST requests.",
        );
    }
    if req.form("grant_type").as_deref() != Some("client_credentials") {
        return oauth_error(
            400,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        );
    }
    if req.form("scope").as_deref() != Some(ARM_SCOPE) {
        return oauth_error(
            400,
            "invalid_scope",
            "AADSTS70011: The provided value for the input parameter 'scope' is not valid.",
        );
    }
    if req.form("client_id").as_deref() != Some(CLIENT_ID) {
        return oauth_error(
            400,
            "unauthorized_client",
            &format!(
                "AADSTS700016: Application with identifier '{}' was not found in the directory.",
                req.form("client_id").unwrap_or_default()
            ),
        );
    }
    if let Some(secret) = req.form("client_secret") {
        if secret != CLIENT_SECRET {
            return oauth_error(
                401,
                "invalid_client",
                &format!(
                    "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'."
                ),
            );
        }
    } else if let Some(assertion) = req.form("client_assertion") {
        if req.form("client_assertion_type").as_deref()
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return oauth_error(
                400,
                "invalid_request",
                "AADSTS90014: client_assertion_type is missing.",
            );
        }
        if assertion != shared.federated_token {
            let aud = format!("http://{}/{TENANT}/oauth2/v2.0/token", shared.api_addr);
            if let Err(why) = verify_assertion(shared, &assertion, &aud) {
                return oauth_error(
                    401,
                    "invalid_client",
                    &format!("AADSTS700027: Client assertion failed signature validation. ({why})"),
                );
            }
        }
    } else {
        return oauth_error(
            401,
            "invalid_client",
            "AADSTS7000216: 'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
        );
    }
    let t = shared.lock().mint();
    json_response(
        200,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": t}),
    )
}

fn verify_assertion(shared: &Shared, jwt: &str, aud: &str) -> Result<(), String> {
    let cert = shared.cert.lock().unwrap();
    let cert = cert.as_ref().ok_or("no certificate registered")?;
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT".into());
    };
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err("alg is not RS256".into());
    }
    if header["x5t"].as_str() != Some(cert.x5t.as_str()) {
        return Err("x5t is not the registered certificate's thumbprint".into());
    }
    signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &cert.public_key)
        .verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "bad signature".to_string())?;
    if claims["aud"] != aud {
        return Err(format!("aud {} is not the token endpoint", claims["aud"]));
    }
    if claims["iss"] != CLIENT_ID || claims["sub"] != CLIENT_ID {
        return Err("iss and sub must be the client id".into());
    }
    let now = chrono::Utc::now().timestamp();
    if claims["exp"].as_i64().is_none_or(|e| e <= now) {
        return Err("expired".into());
    }
    if claims["jti"].as_str().is_none_or(str::is_empty) {
        return Err("no jti".into());
    }
    Ok(())
}

fn imds(shared: &Arc<Shared>, req: &Request) -> Response {
    if req.header("metadata") != Some("true") {
        return json_response(
            400,
            json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
        );
    }
    if req.query_param("api-version").is_none() {
        return json_response(
            400,
            json!({"error": "Bad request. api-version was not specified in the request"}),
        );
    }
    match req.path.as_str() {
        "/metadata/identity/oauth2/token" => {
            if req.query_param("resource").as_deref() != Some("https://management.azure.com/") {
                return json_response(
                    400,
                    json!({"error": "invalid_resource", "error_description": "AADSTS500011: The resource principal was not found"}),
                );
            }
            if let Some(id) = req.query_param("client_id")
                && id != MANAGED_IDENTITY_CLIENT_ID
            {
                return json_response(
                    400,
                    json!({"error": "invalid_request", "error_description": "Identity not found"}),
                );
            }
            let mut st = shared.lock();
            let t = st.mint();
            let now = chrono::Utc::now().timestamp();
            json_response(
                200,
                json!({"access_token": t, "client_id": MANAGED_IDENTITY_CLIENT_ID, "expires_in": "86399", "expires_on": (now + 86399).to_string(), "ext_expires_in": "86399", "not_before": now.to_string(), "resource": "https://management.azure.com/", "token_type": "Bearer"}),
            )
        }
        "/metadata/instance/compute/resourceId" => {
            let vm = shared.lock().imds_vm.clone();
            Response {
                status: 200,
                headers: vec![],
                body: AzureFake::resource_id(&vm).into_bytes(),
                content_type: "text/plain; charset=utf-8",
            }
        }
        _ => json_response(404, json!({"error": "Not found"})),
    }
}
