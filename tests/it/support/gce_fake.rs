//! A fake Google Compute Engine for tests, because no emulator exists.
//!
//! It follows the public compute v1 REST reference and Google's token flows
//! field by field, as far as absconda can observe them:
//! - `instances.get/start/stop/resume`, `instances.getGuestAttributes` and
//!   `zoneOperations.get/wait` under
//!   `/compute/v1/projects/{p}/zones/{z}/...`, with Instance and Operation
//!   resources shaped like Google's (`kind`, string ids, `selfLink`s on
//!   `www.googleapis.com`, RFC 3339 times, `clientOperationId` = `requestId`);
//! - statuses that change with time (start: TERMINATED → PROVISIONING →
//!   STAGING → RUNNING, stop: RUNNING → STOPPING → TERMINATED), a new
//!   ephemeral `natIP` at every start, operations that finish later and a
//!   `wait` that returns before `DONE`;
//! - guest attributes as the guest agent writes them: the SSH host keys
//!   under `hostkeys/` (entry key = key type, value = the base64 key),
//!   published when a test says so, possibly some time after boot; a 404
//!   `notFound` while nothing is published;
//! - instance metadata (`metadata.items`, `metadata.fingerprint`) and the
//!   project's `commonInstanceMetadata` (`projects.get`); `instances.setMetadata`
//!   with the fingerprint check (412 `conditionNotMet` when stale), a fresh
//!   fingerprint after every change, and the guest agent's side: unexpired
//!   `ssh-keys` entries (or, with `enable-oslogin=TRUE`, the OS Login keys
//!   of `support::oslogin_fake`) written to `<dir>/<user>` for sshd's
//!   `AuthorizedKeysFile <dir>/%u`;
//! - `instances.aggregatedList` (`projects/{p}/aggregated/instances`):
//!   `items` keyed by `zones/{zone}` (a zone with nothing on the page gets
//!   the `NO_RESULTS_ON_PAGE` warning), `labels`, `maxResults` up to 500, an
//!   opaque `nextPageToken` honoured only with the same `filter` and
//!   `maxResults`, list filters (`FIELD = VALUE`, `!=`, `:`, `:*`, several
//!   in parentheses) and a 400 for unknown query parameters or filters;
//! - Google's JSON errors, and an HTML 404 page for unknown paths;
//! - Bearer tokens checked on every API call: tokens it minted at its
//!   `/token` endpoint (refresh-token grant for `authorized_user`, JWT-bearer
//!   grant for service accounts) or its metadata server, and self-signed JWTs
//!   verified against the test service account's public key (RS256, `kid` =
//!   `private_key_id`, `iss` = `sub` = `client_email`, `aud` or `scope`, `exp`);
//! - a metadata server on its own listener that answers only with
//!   `Metadata-Flavor: Google`.
//!
//! Faults are scripted per test (bursts of 503, 429 with `Retry-After`,
//! connection resets, a permanent 500) and every request is logged so tests
//! can count them. The fake runs on its own thread and runtime, so it keeps
//! answering while a test blocks on a child process (the `absconda` binary).
//!
//! How a test uses it (the fake runs on its own thread: use it from sync or
//! async tests alike):
//!
//! ```ignore
//! let fake = GceFake::start();                   // API + /token + metadata server
//! fake.add_instance("builder", "TERMINATED");     // in fake.project(), fake.zone()
//! let dir = tempfile::tempdir()?;
//! // A child `absconda`: credentials through one of the three flows ...
//! for (name, value) in fake.credential_env(Flow::ServiceAccountKey, dir.path()) {
//!     match value { Some(v) => cmd.env(name, v), None => cmd.env_remove(name) };
//! }
//! // ... and a builder with `provider: gcp`, `project: absconda-test`,
//! // `zone: us-central1-a`, `instance: builder`,
//! // `api_endpoint: <fake.api_endpoint()>`, and `host: 127.0.0.1` (plus the
//! // loopback sshd's port) because the fake's natIP (34.x.y.z) is not routable.
//! fake.wait_for_status("builder", "TERMINATED", Duration::from_secs(5));
//! assert_eq!(fake.transitions("builder"), 2);     // started once, stopped once
//! ```
//!
//! Faults: `fake.inject(Scope::Api, Fault::Unavailable, 3)`,
//! `Fault::TooManyRequests { retry_after_secs }`, `Fault::Reset`,
//! `fake.inject_always(Scope::Api, Fault::Internal)`; the log:
//! `fake.requests()`, `fake.count(Route::Start)`.
#![allow(dead_code)] // a harness: each test uses part of it

use std::collections::{HashMap, VecDeque};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const PROJECT: &str = "absconda-test";
pub const ZONE: &str = "us-central1-a";
/// The audience of a self-signed JWT for the compute API (AIP-4111).
pub const COMPUTE_AUDIENCE: &str = "https://compute.googleapis.com/";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const COMPUTE_SCOPE: &str = "https://www.googleapis.com/auth/compute";
const LINK_BASE: &str = "https://www.googleapis.com/compute/v1";

/// How long each transition takes.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// An operation stays PENDING this long before RUNNING.
    pub pending: Duration,
    pub provisioning: Duration,
    pub staging: Duration,
    pub stopping: Duration,
    pub suspending: Duration,
    /// The longest a `wait` call blocks (Google: about two minutes).
    pub wait_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            pending: Duration::from_millis(20),
            provisioning: Duration::from_millis(150),
            staging: Duration::from_millis(150),
            stopping: Duration::from_millis(200),
            suspending: Duration::from_millis(200),
            wait_max: Duration::from_millis(120),
        }
    }
}

/// Which listener or endpoint a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every `/compute/v1/...` request.
    Api,
    /// Only `instances.start/stop/resume`.
    Mutations,
    /// Only `zoneOperations.get/wait`.
    Operations,
    /// Only `instances.getGuestAttributes`.
    GuestAttributes,
    /// The OAuth `/token` endpoint.
    Token,
    /// The metadata server.
    Metadata,
    All,
}

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 503 `backendError`, status UNAVAILABLE.
    Unavailable,
    /// 500 `backendError`, status INTERNAL.
    Internal,
    /// 429 `rateLimitExceeded` with `Retry-After: secs`.
    TooManyRequests { retry_after_secs: u64 },
    /// 403 `rateLimitExceeded` (how older Google APIs throttle).
    RateLimitForbidden,
    /// Close the connection without answering; the request has no effect.
    Reset,
    /// Handle the request, then close the connection without answering.
    ResetAfterHandling,
    /// An HTML page with this status (a proxy or load balancer answering).
    Html(u16),
    /// 400 `resourceNotReady`, as when another client's operation on the
    /// same VM is still running.
    NotReady,
}

/// What a request was, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    GetInstance,
    Start,
    Stop,
    Resume,
    GetOperation,
    WaitOperation,
    GuestAttributes,
    SetMetadata,
    GetProject,
    AggregatedList,
    OsLogin,
    Token,
    /// IAM Credentials `serviceAccounts.generateAccessToken`.
    GenerateAccessToken,
    /// Security Token Service `v1/token` (workload identity federation).
    Sts,
    Metadata,
    Unknown,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub route: Route,
    pub method: String,
    pub path: String,
    pub query: String,
    /// Who the Bearer token belonged to (`serviceAccount:…`, `user:…`), if valid.
    pub principal: Option<String>,
    /// The kind of credential presented: `self-signed-jwt`, `minted`, or none.
    pub credential: Option<&'static str>,
    /// The HTTP status answered; 0 for a dropped connection.
    pub status: u16,
    pub at: Instant,
}

/// The test service account, with its private key.
#[derive(Clone)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub client_id: String,
    /// PKCS#8 PEM, as in a key file downloaded from the console.
    pub private_key_pem: String,
    /// PKCS#1 RSAPublicKey DER, to verify signatures.
    public_key: Vec<u8>,
}

impl ServiceAccount {
    /// A fresh RSA-2048 key for `email`.
    pub fn generate(email: &str) -> ServiceAccount {
        let pair = KeyPair::generate(KeySize::Rsa2048).expect("generate an RSA key");
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).expect("PKCS#8");
        let b64 = STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        let id: [u8; 20] = rand::random();
        ServiceAccount {
            client_email: email.to_string(),
            private_key_id: hex::encode(id),
            client_id: format!("1{:020}", rand::random::<u64>()),
            private_key_pem: pem,
            public_key: pair.public_key().as_ref().to_vec(),
        }
    }

    /// The key file JSON, as `gcloud iam service-accounts keys create` writes it.
    pub fn key_json(&self, project: &str, token_uri: &str) -> Value {
        json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": token_uri.replace("/token", "/o/oauth2/auth"),
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": token_uri.replace("/token", "/oauth2/v1/certs"),
            "client_x509_cert_url": token_uri.replace("/token", "/robot/v1/metadata/x509/sa"),
            "universe_domain": "googleapis.com"
        })
    }
}

/// The three ways absconda finds Google credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// `GOOGLE_APPLICATION_CREDENTIALS` = a service account key file.
    ServiceAccountKey,
    /// gcloud's `application_default_credentials.json` (`authorized_user`).
    GcloudUser,
    /// The metadata server, through `GCE_METADATA_HOST`.
    MetadataServer,
}

/// An `authorized_user` as written by `gcloud auth application-default login`.
#[derive(Debug, Clone)]
pub struct AuthorizedUser {
    pub account: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
}

struct InstanceState {
    project: String,
    zone: String,
    name: String,
    id: u64,
    status: String,
    network_ip: String,
    nat_ip: Option<String>,
    /// Whether the VM has an external access config at all.
    external: bool,
    schedule: VecDeque<(Instant, String)>,
    created: String,
    last_start: Option<String>,
    last_stop: Option<String>,
    last_suspended: Option<String>,
    /// `labels`, as `instances.setLabels` would leave them.
    labels: Vec<(String, String)>,
    /// Guest attributes `hostkeys/<type>` = base64 key, visible from
    /// `host_keys_at` on (the guest agent writes them a little after boot).
    host_keys: Vec<(String, String)>,
    host_keys_at: Option<Instant>,
    /// `metadata.items`, in order, and `metadata.fingerprint`.
    metadata: Vec<(String, String)>,
    metadata_fingerprint: String,
    /// A write by someone else, applied just before the next `setMetadata`.
    concurrent_write: Option<(String, String)>,
}

fn new_fingerprint() -> String {
    STANDARD.encode(rand::random::<[u8; 8]>())
}

struct OperationState {
    id: u64,
    name: String,
    project: String,
    zone: String,
    op_type: String,
    target: String,
    target_id: u64,
    user: String,
    request_id: Option<String>,
    insert_time: String,
    created: Instant,
    running_at: Instant,
    done_at: Instant,
    start_time: Option<String>,
    end_time: Option<String>,
    error: Option<(String, String, u16)>,
}

struct FaultRule {
    scope: Scope,
    fault: Fault,
    remaining: Option<usize>,
}

struct MintedToken {
    principal: String,
    expires: Instant,
}

struct State {
    timings: Timings,
    instances: Vec<InstanceState>,
    operations: Vec<OperationState>,
    request_ids: HashMap<String, String>,
    faults: Vec<FaultRule>,
    log: Vec<Logged>,
    service_accounts: Vec<ServiceAccount>,
    users: Vec<AuthorizedUser>,
    tokens: HashMap<String, MintedToken>,
    /// Subject tokens the STS accepts (an identity provider's OIDC tokens).
    federated: Vec<String>,
    /// AWS keys (access key id, secret, session token) whose signed
    /// `GetCallerIdentity` requests the STS accepts as subject tokens.
    aws_keys: Vec<(String, String, Option<String>)>,
    /// Why the STS or the token endpoint refused something, for tests.
    refusals: Vec<String>,
    /// Service accounts allowed to impersonate others
    /// (`roles/iam.serviceAccountTokenCreator`).
    token_creators: Vec<String>,
    /// More URIs a JWT-bearer assertion may name as `aud` (the token
    /// endpoint as a TLS front in a test shows it).
    token_uris: Vec<String>,
    token_lifetime: Duration,
    deny_iam: bool,
    fail_next: Option<(String, String, u16)>,
    next_ip: u32,
    next_id: u64,
    metadata_identity: String,
    metadata_instance: String,
    /// The project the metadata server reports (`project/project-id`).
    metadata_project: String,
    /// Effective start/stop/resume transitions per instance name.
    transitions: HashMap<String, usize>,
    project_metadata: Vec<(String, String)>,
    project_metadata_fingerprint: String,
    pub(crate) oslogin: super::oslogin_fake::Profiles,
    /// The guest agent's `authorized_keys` folder and the instance it
    /// stands in for.
    guest_keys: Option<(String, PathBuf)>,
    set_metadata_bodies: Vec<Value>,
    /// Largest page `instances.aggregatedList` returns (Google may return
    /// fewer than `maxResults`), and the page tokens it issued: token →
    /// (offset, filter, maxResults) of the listing it continues.
    list_page_size: usize,
    page_tokens: HashMap<String, (usize, Option<String>, Option<String>)>,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        // Google ids are large unsigned numbers, sent as strings.
        4_000_000_000_000_000_000 + self.next_id * 7919
    }

    fn advance(&mut self) {
        let now = Instant::now();
        for inst in &mut self.instances {
            while let Some((at, _)) = inst.schedule.front() {
                if *at > now {
                    break;
                }
                let (_, status) = inst.schedule.pop_front().expect("front exists");
                set_status(inst, &status, &mut self.next_ip);
            }
        }
    }

    fn instance(&mut self, project: &str, zone: &str, name: &str) -> Option<&mut InstanceState> {
        self.instances
            .iter_mut()
            .find(|i| i.project == project && i.zone == zone && i.name == name)
    }
}

fn now_rfc3339() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

fn set_status(inst: &mut InstanceState, status: &str, next_ip: &mut u32) {
    match status {
        // The ephemeral external IP is assigned while the VM is staged and
        // released when it stops, so every start gets a new one.
        "STAGING" | "RUNNING" if inst.external && inst.nat_ip.is_none() => {
            *next_ip += 1;
            inst.nat_ip = Some(format!(
                "34.{}.{}.{}",
                120 + (*next_ip >> 16) % 100,
                (*next_ip >> 8) & 0xff,
                *next_ip & 0xff
            ));
        }
        "TERMINATED" | "STOPPED" => {
            inst.nat_ip = None;
            inst.last_stop = Some(now_rfc3339());
        }
        "SUSPENDED" => {
            inst.nat_ip = None;
            inst.last_suspended = Some(now_rfc3339());
        }
        _ => {}
    }
    if status == "RUNNING" && inst.status != "RUNNING" {
        inst.last_start = Some(now_rfc3339());
    }
    inst.status = status.to_string();
}

struct Shared {
    state: Mutex<State>,
    api_addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn api_base(&self) -> String {
        format!("http://{}", self.api_addr)
    }
}

/// A running fake; stops when dropped.
pub struct GceFake {
    shared: Arc<Shared>,
    metadata_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GceFake {
    /// Starts the fake on two loopback ports, with one registered service
    /// account (`absconda-builder@absconda-test.iam.gserviceaccount.com`).
    pub fn start() -> GceFake {
        crate::support::watch();
        let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the API port");
        let md = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the metadata port");
        api.set_nonblocking(true).expect("nonblocking");
        md.set_nonblocking(true).expect("nonblocking");
        let api_addr = api.local_addr().expect("API address");
        let metadata_addr = md.local_addr().expect("metadata address");
        let sa = ServiceAccount::generate(&format!(
            "absconda-builder@{PROJECT}.iam.gserviceaccount.com"
        ));
        let shared = Arc::new(Shared {
            api_addr,
            state: Mutex::new(State {
                timings: Timings::default(),
                instances: Vec::new(),
                operations: Vec::new(),
                request_ids: HashMap::new(),
                faults: Vec::new(),
                log: Vec::new(),
                service_accounts: vec![sa],
                users: Vec::new(),
                tokens: HashMap::new(),
                federated: Vec::new(),
                aws_keys: Vec::new(),
                refusals: Vec::new(),
                token_creators: Vec::new(),
                token_uris: Vec::new(),
                token_lifetime: Duration::from_secs(3599),
                deny_iam: false,
                fail_next: None,
                next_ip: 0,
                next_id: 0,
                metadata_identity: format!(
                    "{}-compute@developer.gserviceaccount.com",
                    123456789012u64
                ),
                metadata_instance: "absconda-builder".into(),
                metadata_project: PROJECT.into(),
                transitions: HashMap::new(),
                project_metadata: Vec::new(),
                project_metadata_fingerprint: new_fingerprint(),
                oslogin: Default::default(),
                guest_keys: None,
                set_metadata_bodies: Vec::new(),
                list_page_size: 500,
                page_tokens: HashMap::new(),
            }),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("gce-fake".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake runtime");
                rt.block_on(async move {
                    let api = TcpListener::from_std(api).expect("tokio listener");
                    let md = TcpListener::from_std(md).expect("tokio listener");
                    tokio::select! {
                        _ = accept_loop(api, sh.clone(), Listener::Api) => {}
                        _ = accept_loop(md, sh, Listener::Metadata) => {}
                        _ = rx => {}
                    }
                });
            })
            .expect("spawn the fake's thread");
        GceFake {
            shared,
            metadata_addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    // ---- where things are -------------------------------------------------

    /// The base URL for a builder's `api_endpoint:` (before `/compute/v1`).
    pub fn api_endpoint(&self) -> String {
        self.shared.api_base()
    }

    /// The OAuth token endpoint, written into key files as `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.shared.api_base())
    }

    /// `host:port` for `GCE_METADATA_HOST`.
    pub fn metadata_host(&self) -> String {
        self.metadata_addr.to_string()
    }

    pub fn project(&self) -> &'static str {
        PROJECT
    }

    pub fn zone(&self) -> &'static str {
        ZONE
    }

    // ---- instances ----------------------------------------------------------

    /// Adds a VM with an external access config in the default project and zone.
    pub fn add_instance(&self, name: &str, status: &str) {
        self.add_instance_in(PROJECT, ZONE, name, status, true);
    }

    pub fn add_instance_in(
        &self,
        project: &str,
        zone: &str,
        name: &str,
        status: &str,
        external: bool,
    ) {
        let mut st = self.shared.lock();
        let id = st.id();
        let n = st.instances.len() as u32 + 2;
        let mut inst = InstanceState {
            project: project.into(),
            zone: zone.into(),
            name: name.into(),
            id,
            status: "TERMINATED".into(),
            network_ip: format!("10.128.{}.{}", n >> 8, n & 0xff),
            nat_ip: None,
            external,
            schedule: VecDeque::new(),
            created: now_rfc3339(),
            last_start: None,
            last_stop: None,
            last_suspended: None,
            labels: Vec::new(),
            host_keys: Vec::new(),
            host_keys_at: None,
            metadata: Vec::new(),
            metadata_fingerprint: new_fingerprint(),
            concurrent_write: None,
        };
        let mut next_ip = st.next_ip;
        set_status(&mut inst, status, &mut next_ip);
        st.next_ip = next_ip;
        st.instances.push(inst);
    }

    /// Sets the VM's labels (as `instances.setLabels` would).
    pub fn set_labels(&self, name: &str, labels: &[(&str, &str)]) {
        let mut st = self.shared.lock();
        let inst = st
            .instances
            .iter_mut()
            .find(|i| i.name == name)
            .expect("no such instance");
        inst.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// The most instances one page of `instances.aggregatedList` holds.
    pub fn set_list_page_size(&self, n: usize) {
        self.shared.lock().list_page_size = n.max(1);
    }

    /// The status `instances.get` would report now.
    pub fn status(&self, name: &str) -> Option<String> {
        let mut st = self.shared.lock();
        st.advance();
        st.instance(PROJECT, ZONE, name).map(|i| i.status.clone())
    }

    /// Sets the status at once, cancelling any transition in progress (for
    /// example to make the builder stopped before a build).
    pub fn set_status(&self, name: &str, status: &str) {
        let mut st = self.shared.lock();
        st.advance();
        let mut next_ip = st.next_ip;
        if let Some(inst) = st.instance(PROJECT, ZONE, name) {
            inst.schedule.clear();
            set_status(inst, status, &mut next_ip);
        }
        st.next_ip = next_ip;
    }

    /// Schedules a status change `after` from now (after what is scheduled).
    pub fn schedule_status(&self, name: &str, after: Duration, status: &str) {
        let mut st = self.shared.lock();
        if let Some(inst) = st.instance(PROJECT, ZONE, name) {
            inst.schedule
                .push_back((Instant::now() + after, status.to_string()));
        }
    }

    pub fn nat_ip(&self, name: &str) -> Option<String> {
        let mut st = self.shared.lock();
        st.advance();
        st.instance(PROJECT, ZONE, name)
            .and_then(|i| i.nat_ip.clone())
    }

    pub fn network_ip(&self, name: &str) -> Option<String> {
        let mut st = self.shared.lock();
        st.instance(PROJECT, ZONE, name)
            .map(|i| i.network_ip.clone())
    }

    /// Publishes SSH host keys for `name` as its guest agent would: one
    /// guest attribute `hostkeys/<type>` per OpenSSH public key line
    /// (`ssh-ed25519 AAAA… comment`), whose value is the base64 key alone.
    /// An empty list unpublishes them. They stay across stops and starts,
    /// like the VM's host keys.
    pub fn set_guest_host_keys(&self, name: &str, lines: &[&str]) {
        self.set_guest_host_keys_after(name, lines, Duration::ZERO);
    }

    /// Like [`GceFake::set_guest_host_keys`], visible only `after` from now
    /// (the guest agent writes them a while after the VM is RUNNING).
    pub fn set_guest_host_keys_after(&self, name: &str, lines: &[&str], after: Duration) {
        let keys: Vec<(String, String)> = lines
            .iter()
            .map(|l| {
                let mut f = l.split_whitespace();
                let kind = f.next().expect("a key type").to_string();
                let data = f.next().expect("a base64 key").to_string();
                (kind, data)
            })
            .collect();
        let mut st = self.shared.lock();
        if let Some(inst) = st.instance(PROJECT, ZONE, name) {
            inst.host_keys_at = (!keys.is_empty()).then(|| Instant::now() + after);
            inst.host_keys = keys;
        }
    }

    /// How many start/stop/resume requests actually changed `name`'s state.
    pub fn transitions(&self, name: &str) -> usize {
        self.shared
            .lock()
            .transitions
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Waits (blocking) until `name` reports `status`, or panics after `within`.
    pub fn wait_for_status(&self, name: &str, status: &str, within: Duration) {
        let until = Instant::now() + within;
        while self.status(name).as_deref() != Some(status) {
            assert!(
                Instant::now() < until,
                "`{name}` did not reach {status} within {within:?}, it is {:?}",
                self.status(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn set_timings(&self, timings: Timings) {
        self.shared.lock().timings = timings;
    }

    pub fn timings(&self) -> Timings {
        self.shared.lock().timings
    }

    /// The next start/stop/resume operation ends DONE with this error (the
    /// VM goes back to where it was), as when a zone runs out of capacity.
    pub fn fail_next_operation(&self, code: &str, message: &str) {
        self.shared.lock().fail_next = Some((code.into(), message.into(), 503));
    }

    /// Which VM the metadata server describes (`instance/name`), and which
    /// one [`GceFake::guest_poweroff_url`] powers off.
    pub fn set_metadata_instance(&self, name: &str) {
        self.shared.lock().metadata_instance = name.into();
    }

    /// Which project the metadata server says its VM is in.
    pub fn set_metadata_project(&self, project: &str) {
        self.shared.lock().metadata_project = project.into();
    }

    /// A URL that powers the metadata server's VM off from inside, as
    /// `sudo poweroff` on a real one would (RUNNING → STOPPING → TERMINATED,
    /// seen through the API). For a test `poweroff_command` such as
    /// `curl -s -X POST <url>`; not part of Google's metadata server.
    pub fn guest_poweroff_url(&self) -> String {
        format!("http://{}{GUEST_POWEROFF_PATH}", self.metadata_addr)
    }

    /// The guest shuts `name` down, as if `poweroff` ran inside it.
    pub fn guest_poweroff(&self, name: &str) {
        guest_poweroff(&self.shared, name);
    }

    // ---- credentials --------------------------------------------------------

    /// The registered service account.
    pub fn service_account(&self) -> ServiceAccount {
        self.shared.lock().service_accounts[0].clone()
    }

    /// Writes the service account's key file (`token_uri` = this fake) and
    /// returns its path, for `GOOGLE_APPLICATION_CREDENTIALS`.
    pub fn write_service_account_key(&self, dir: &Path) -> PathBuf {
        let sa = self.service_account();
        let path = dir.join("service-account.json");
        write_json(&path, &sa.key_json(PROJECT, &self.token_uri()));
        path
    }

    /// Writes a key file for a service account the fake does not know (a
    /// deleted key): the fake answers 401 to its tokens.
    pub fn write_unknown_service_account_key(&self, dir: &Path) -> PathBuf {
        let mut sa = ServiceAccount::generate(&format!(
            "absconda-builder@{PROJECT}.iam.gserviceaccount.com"
        ));
        // Same identity, but a key id and key the fake never registered.
        sa.client_email = self.service_account().client_email;
        let path = dir.join("deleted-key.json");
        write_json(&path, &sa.key_json(PROJECT, &self.token_uri()));
        path
    }

    /// Registers a user and writes gcloud's
    /// `application_default_credentials.json` for them at `path`
    /// (`token_uri` = this fake).
    pub fn write_authorized_user(&self, path: &Path) -> AuthorizedUser {
        let user = AuthorizedUser {
            account: "dev@example.com".into(),
            client_id: format!("{}-fake.apps.googleusercontent.com", rand::random::<u32>()),
            client_secret: format!("GOCSPX-{}", hex::encode(rand::random::<[u8; 12]>())),
            refresh_token: format!("1//0{}", hex::encode(rand::random::<[u8; 24]>())),
        };
        self.shared.lock().users.push(user.clone());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the gcloud directory");
        }
        write_json(
            path,
            &json!({
                "account": "",
                "client_id": user.client_id,
                "client_secret": user.client_secret,
                "quota_project_id": PROJECT,
                "refresh_token": user.refresh_token,
                "token_uri": self.token_uri(),
                "type": "authorized_user",
                "universe_domain": "googleapis.com"
            }),
        );
        user
    }

    /// Makes the STS accept `subject_token` (as an identity provider would
    /// have issued it).
    pub fn federate(&self, subject_token: &str) {
        self.shared.lock().federated.push(subject_token.to_string());
    }

    /// Makes the STS accept AWS subject tokens signed with these keys (as
    /// a pool's AWS provider would, after AWS confirmed the caller).
    pub fn federate_aws(&self, access_key_id: &str, secret: &str, session_token: Option<&str>) {
        self.shared.lock().aws_keys.push((
            access_key_id.to_string(),
            secret.to_string(),
            session_token.map(str::to_string),
        ));
    }

    /// Why the STS or the token endpoint refused what it was sent.
    pub fn refusals(&self) -> Vec<String> {
        self.shared.lock().refusals.clone()
    }

    /// Accepts JWT-bearer assertions addressed to `uri` as well as to
    /// [`GceFake::token_uri`] (the token endpoint behind a TLS front).
    pub fn accept_token_uri(&self, uri: &str) {
        self.shared.lock().token_uris.push(uri.to_string());
    }

    /// An `impersonated_service_account` file at `path` whose source is the
    /// key of a second service account, `ci-deployer`, allowed to
    /// impersonate the test service account (the target). Returns the
    /// source's account.
    pub fn write_impersonated_from_key(&self, path: &Path) -> ServiceAccount {
        let source =
            ServiceAccount::generate(&format!("ci-deployer@{PROJECT}.iam.gserviceaccount.com"));
        {
            let mut st = self.shared.lock();
            st.service_accounts.push(source.clone());
            st.token_creators
                .push(format!("serviceAccount:{}", source.client_email));
        }
        let target = self.service_account().client_email;
        write_json(
            path,
            &json!({
                "delegates": [],
                "service_account_impersonation_url": format!(
                    "{}/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
                    self.api_endpoint()
                ),
                "source_credentials": source.key_json(PROJECT, &self.token_uri()),
                "type": "impersonated_service_account"
            }),
        );
        source
    }

    /// An `impersonated_service_account` file at `path`, as `gcloud auth
    /// application-default login --impersonate-service-account` writes it:
    /// a user's login as the source, the test service account as the target.
    pub fn write_impersonated(&self, path: &Path) -> AuthorizedUser {
        let user = self.write_authorized_user(path);
        let sa = self.service_account().client_email;
        let source: Value =
            serde_json::from_slice(&std::fs::read(path).expect("the source file")).unwrap();
        write_json(
            path,
            &json!({
                "delegates": [],
                "service_account_impersonation_url": format!(
                    "{}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken",
                    self.api_endpoint()
                ),
                "source_credentials": source,
                "type": "impersonated_service_account"
            }),
        );
        user
    }

    /// The environment that makes a child `absconda` use this fake's
    /// credentials through `flow`: `Some` to set, `None` to remove. Files go
    /// in `dir`. gcloud's file is placed with `CLOUDSDK_CONFIG`, so `HOME`
    /// (and the `~/.ssh` under it) is left alone, and the other flows point
    /// `CLOUDSDK_CONFIG` at an empty directory so that no real gcloud
    /// credentials are picked up.
    pub fn credential_env(&self, flow: Flow, dir: &Path) -> Vec<(&'static str, Option<String>)> {
        let empty = dir.join("no-gcloud");
        std::fs::create_dir_all(&empty).expect("create an empty gcloud directory");
        let show = |p: &Path| Some(p.display().to_string());
        match flow {
            Flow::ServiceAccountKey => vec![
                (
                    "GOOGLE_APPLICATION_CREDENTIALS",
                    show(&self.write_service_account_key(dir)),
                ),
                ("CLOUDSDK_CONFIG", show(&empty)),
                ("GCE_METADATA_HOST", None),
            ],
            Flow::GcloudUser => {
                let gcloud = dir.join("gcloud");
                self.write_authorized_user(&gcloud.join("application_default_credentials.json"));
                vec![
                    ("GOOGLE_APPLICATION_CREDENTIALS", None),
                    ("CLOUDSDK_CONFIG", show(&gcloud)),
                    ("GCE_METADATA_HOST", None),
                ]
            }
            Flow::MetadataServer => vec![
                ("GOOGLE_APPLICATION_CREDENTIALS", None),
                ("CLOUDSDK_CONFIG", show(&empty)),
                ("GCE_METADATA_HOST", Some(self.metadata_host())),
            ],
        }
    }

    /// Revokes every refresh token and minted access token (a password
    /// change, `gcloud auth application-default revoke`).
    pub fn revoke_all(&self) {
        let mut st = self.shared.lock();
        for user in &mut st.users {
            user.refresh_token = format!("revoked-{}", hex::encode(rand::random::<[u8; 8]>()));
        }
        st.tokens.clear();
    }

    /// The principal of a `Bearer` token this fake minted (unexpired) or a
    /// self-signed JWT of one of its service accounts, as the API checks it.
    pub fn principal_of(&self, authorization: &str) -> Option<String> {
        let token = authorization.strip_prefix("Bearer ")?.trim();
        let st = self.shared.lock();
        if let Some(minted) = st.tokens.get(token) {
            return (minted.expires > Instant::now()).then(|| minted.principal.clone());
        }
        verify_jwt(&st.service_accounts, token, JwtUse::SelfSigned)
            .ok()
            .map(|e| format!("serviceAccount:{e}"))
    }

    /// Makes every API call fail with 403 PERMISSION_DENIED (a missing IAM role).
    pub fn deny_iam(&self, deny: bool) {
        self.shared.lock().deny_iam = deny;
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = lifetime;
    }

    // ---- faults and the request log -----------------------------------------

    /// The next `times` requests in `scope` get `fault`.
    pub fn inject(&self, scope: Scope, fault: Fault, times: usize) {
        self.shared.lock().faults.push(FaultRule {
            scope,
            fault,
            remaining: Some(times),
        });
    }

    /// Every request in `scope` gets `fault` until [`GceFake::clear_faults`].
    pub fn inject_always(&self, scope: Scope, fault: Fault) {
        self.shared.lock().faults.push(FaultRule {
            scope,
            fault,
            remaining: None,
        });
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    pub fn count(&self, route: Route) -> usize {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|l| l.route == route)
            .count()
    }

    /// Requests to `/compute/v1/...`, whatever happened to them.
    pub fn api_requests(&self) -> usize {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|l| {
                matches!(
                    l.route,
                    Route::GetInstance
                        | Route::Start
                        | Route::Stop
                        | Route::Resume
                        | Route::GetOperation
                        | Route::WaitOperation
                        | Route::GuestAttributes
                )
            })
            .count()
    }

    pub fn clear_log(&self) {
        self.shared.lock().log.clear();
    }
}

impl Drop for GceFake {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const GUEST_POWEROFF_PATH: &str = "/_fake/guest-poweroff";

fn guest_poweroff(shared: &Shared, name: &str) {
    let mut st = shared.lock();
    st.advance();
    let stopping = st.timings.stopping;
    let mut ip = 0;
    if let Some(inst) = st.instance(PROJECT, ZONE, name)
        && matches!(inst.status.as_str(), "RUNNING" | "STAGING" | "PROVISIONING")
    {
        inst.schedule.clear();
        set_status(inst, "STOPPING", &mut ip);
        inst.schedule
            .push_back((Instant::now() + stopping, "TERMINATED".into()));
    }
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("serialise"))
        .expect("write a credentials file");
}

// ---- HTTP/1.1 -----------------------------------------------------------------
//
// Hand-written rather than on a server framework so that a fault can drop a
// connection exactly where a real network would.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Api,
    Metadata,
}

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
}

struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

enum Outcome {
    Reply(Response),
    /// Drop the connection without a word.
    Reset,
    /// Send the response, then close.
    ReplyAndReset(Response),
}

fn json_response(status: u16, body: Value) -> Response {
    Response {
        status,
        content_type: "application/json; charset=UTF-8",
        headers: vec![("Vary".into(), "Origin, X-Origin, Referer".into())],
        body: serde_json::to_vec_pretty(&body).expect("serialise"),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Google's error envelope.
fn google_error(status: u16, message: &str, reason: &str, grpc_status: Option<&str>) -> Response {
    let mut error = json!({
        "code": status,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
    });
    if let Some(s) = grpc_status {
        error["status"] = json!(s);
    }
    json_response(status, json!({ "error": error }))
}

/// The page Google's front end serves for a path it does not route.
fn html_page(status: u16, path: &str) -> Response {
    let body = format!(
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error {status} ({})!!1</title>\n  <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  <p><b>{status}.</b> <ins>That’s an error.</ins>\n  <p>The requested URL <code>{path}</code> was not found on this server.  <ins>That’s all we know.</ins>\n",
        reason_phrase(status)
    );
    Response {
        status,
        content_type: "text/html; charset=UTF-8",
        headers: vec![("Referrer-Policy".into(), "no-referrer".into())],
        body: body.into_bytes(),
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, which: Listener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_connection(sock, shared.clone(), which));
    }
}

async fn serve_connection(mut sock: TcpStream, shared: Arc<Shared>, which: Listener) {
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut sock, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let outcome = handle(&shared, which, &req).await;
        let (resp, then_reset) = match outcome {
            Outcome::Reset => {
                let _ = sock.set_zero_linger();
                return;
            }
            Outcome::Reply(r) => (r, false),
            Outcome::ReplyAndReset(r) => (r, true),
        };
        if then_reset {
            // The server acted but the answer is lost on the way.
            let _ = sock.set_zero_linger();
            drop(resp);
            return;
        }
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nDate: {}\r\n",
            resp.status,
            reason_phrase(resp.status),
            resp.content_type,
            resp.body.len(),
            chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT")
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
        if close {
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
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    buf.drain(..head_end + 4);
    let body = if chunked {
        read_chunked(sock, buf).await?
    } else {
        let length = length.unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..length).collect()
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    let mut headers = headers;
    if length.is_none() && !chunked {
        headers.push(("x-fake-no-length".into(), "1".into()));
    }
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

async fn read_chunked(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

// ---- routing -----------------------------------------------------------------

enum ApiPath {
    Project {
        project: String,
    },
    /// `projects/{p}/aggregated/instances`: `instances.aggregatedList`.
    Aggregated {
        project: String,
    },
    /// `oslogin.googleapis.com/v1/users/...`, served by `oslogin_fake`.
    OsLogin,
    Instance {
        project: String,
        zone: String,
        name: String,
        action: Option<String>,
    },
    Operation {
        project: String,
        zone: String,
        name: String,
        wait: bool,
    },
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_api_path(path: &str) -> Option<ApiPath> {
    if path.starts_with("/v1/users/") {
        return Some(ApiPath::OsLogin);
    }
    let rest = path.strip_prefix("/compute/v1/")?;
    let seg: Vec<String> = rest.split('/').map(percent_decode).collect();
    let s: Vec<&str> = seg.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["projects", p, "aggregated", "instances"] => Some(ApiPath::Aggregated {
            project: p.to_string(),
        }),
        ["projects", p] => Some(ApiPath::Project {
            project: p.to_string(),
        }),
        ["projects", p, "zones", z, "instances", name] => Some(ApiPath::Instance {
            project: p.to_string(),
            zone: z.to_string(),
            name: name.to_string(),
            action: None,
        }),
        ["projects", p, "zones", z, "instances", name, action] => Some(ApiPath::Instance {
            project: p.to_string(),
            zone: z.to_string(),
            name: name.to_string(),
            action: Some(action.to_string()),
        }),
        ["projects", p, "zones", z, "operations", name] => Some(ApiPath::Operation {
            project: p.to_string(),
            zone: z.to_string(),
            name: name.to_string(),
            wait: false,
        }),
        ["projects", p, "zones", z, "operations", name, "wait"] => Some(ApiPath::Operation {
            project: p.to_string(),
            zone: z.to_string(),
            name: name.to_string(),
            wait: true,
        }),
        _ => None,
    }
}

fn route_of(which: Listener, req: &Request) -> Route {
    if which == Listener::Metadata {
        return Route::Metadata;
    }
    if req.path == "/token" || req.path == "/tokeninfo" {
        return Route::Token;
    }
    if req.path == "/v1/token" {
        return Route::Sts;
    }
    if req.path.starts_with("/v1/projects/-/serviceAccounts/")
        && req.path.ends_with(":generateAccessToken")
    {
        return Route::GenerateAccessToken;
    }
    match (req.method.as_str(), parse_api_path(&req.path)) {
        ("GET", Some(ApiPath::Instance { action: None, .. })) => Route::GetInstance,
        (
            "GET",
            Some(ApiPath::Instance {
                action: Some(a), ..
            }),
        ) if a == "getGuestAttributes" => Route::GuestAttributes,
        ("GET", Some(ApiPath::Project { .. })) => Route::GetProject,
        ("GET", Some(ApiPath::Aggregated { .. })) => Route::AggregatedList,
        (_, Some(ApiPath::OsLogin)) => Route::OsLogin,
        (
            "POST",
            Some(ApiPath::Instance {
                action: Some(a), ..
            }),
        ) => match a.as_str() {
            "start" => Route::Start,
            "stop" => Route::Stop,
            "resume" => Route::Resume,
            "setMetadata" => Route::SetMetadata,
            _ => Route::Unknown,
        },
        ("GET", Some(ApiPath::Operation { wait: false, .. })) => Route::GetOperation,
        ("POST", Some(ApiPath::Operation { wait: true, .. })) => Route::WaitOperation,
        _ => Route::Unknown,
    }
}

fn scope_matches(scope: Scope, route: Route) -> bool {
    match scope {
        Scope::All => true,
        Scope::Api => matches!(
            route,
            Route::GetInstance
                | Route::Start
                | Route::Stop
                | Route::Resume
                | Route::GetOperation
                | Route::WaitOperation
                | Route::GuestAttributes
                | Route::SetMetadata
                | Route::GetProject
                | Route::AggregatedList
        ),
        Scope::Mutations => matches!(route, Route::Start | Route::Stop | Route::Resume),
        Scope::Operations => matches!(route, Route::GetOperation | Route::WaitOperation),
        Scope::GuestAttributes => route == Route::GuestAttributes,
        Scope::Token => route == Route::Token,
        Scope::Metadata => route == Route::Metadata,
    }
}

fn take_fault(st: &mut State, route: Route) -> Option<Fault> {
    let idx = st
        .faults
        .iter()
        .position(|f| scope_matches(f.scope, route) && f.remaining != Some(0))?;
    let rule = &mut st.faults[idx];
    if let Some(n) = rule.remaining.as_mut() {
        *n -= 1;
    }
    Some(rule.fault.clone())
}

fn fault_response(fault: &Fault, path: &str) -> Option<Response> {
    Some(match fault {
        Fault::Unavailable => google_error(
            503,
            "The service is currently unavailable.",
            "backendError",
            Some("UNAVAILABLE"),
        ),
        Fault::Internal => google_error(
            500,
            "Internal error. Please try again or contact Google Support.",
            "backendError",
            Some("INTERNAL"),
        ),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut r = google_error(
                429,
                "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com'.",
                "rateLimitExceeded",
                Some("RESOURCE_EXHAUSTED"),
            );
            r.headers
                .push(("Retry-After".into(), retry_after_secs.to_string()));
            r
        }
        Fault::RateLimitForbidden => google_error(
            403,
            "Rate Limit Exceeded",
            "rateLimitExceeded",
            Some("PERMISSION_DENIED"),
        ),
        Fault::Html(status) => html_page(*status, path),
        Fault::NotReady => google_error(
            400,
            &format!(
                "The resource '{}' is not ready",
                path.trim_start_matches("/compute/v1/")
                    .rsplit_once('/')
                    .map(|(r, _)| r)
                    .unwrap_or(path)
            ),
            "resourceNotReady",
            None,
        ),
        Fault::Reset | Fault::ResetAfterHandling => return None,
    })
}

async fn handle(shared: &Arc<Shared>, which: Listener, req: &Request) -> Outcome {
    let route = route_of(which, req);
    let fault = take_fault(&mut shared.lock(), route);
    let mut principal = None;
    let mut credential = None;
    let outcome = match &fault {
        Some(Fault::Reset) => Outcome::Reset,
        Some(Fault::ResetAfterHandling) => {
            let resp = dispatch(shared, which, route, req, &mut principal, &mut credential).await;
            Outcome::ReplyAndReset(resp)
        }
        Some(f) => match fault_response(f, &req.path) {
            Some(r) => Outcome::Reply(r),
            None => Outcome::Reset,
        },
        None => Outcome::Reply(
            dispatch(shared, which, route, req, &mut principal, &mut credential).await,
        ),
    };
    let status = match &outcome {
        Outcome::Reply(r) => r.status,
        Outcome::Reset | Outcome::ReplyAndReset(_) => 0,
    };
    shared.lock().log.push(Logged {
        route,
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        principal,
        credential,
        status,
        at: Instant::now(),
    });
    outcome
}

async fn dispatch(
    shared: &Arc<Shared>,
    which: Listener,
    route: Route,
    req: &Request,
    principal: &mut Option<String>,
    credential: &mut Option<&'static str>,
) -> Response {
    match which {
        Listener::Metadata => metadata(shared, req),
        Listener::Api if req.path == "/tokeninfo" => tokeninfo(shared, req),
        Listener::Api if route == Route::Token => token_endpoint(shared, req),
        Listener::Api if route == Route::Sts => sts_exchange(shared, req),
        Listener::Api if route == Route::GenerateAccessToken => {
            generate_access_token(shared, req, principal)
        }
        Listener::Api => {
            let Some(path) = parse_api_path(&req.path) else {
                return html_page(404, &req.path);
            };
            if route == Route::Unknown {
                // A known resource with a method it does not have: Google's
                // front end answers with the same HTML page.
                return html_page(404, &req.path);
            }
            match authenticate(shared, req) {
                Ok((who, kind)) => {
                    *principal = Some(who);
                    *credential = Some(kind);
                }
                Err(resp) => return resp,
            }
            if req.method == "POST" && req.header("x-fake-no-length").is_some() {
                return html_page(411, &req.path);
            }
            if shared.lock().deny_iam {
                let permission = match route {
                    Route::Start => "compute.instances.start",
                    Route::Stop => "compute.instances.stop",
                    Route::Resume => "compute.instances.resume",
                    Route::GetOperation | Route::WaitOperation => "compute.zoneOperations.get",
                    Route::GuestAttributes => "compute.instances.getGuestAttributes",
                    Route::SetMetadata => "compute.instances.setMetadata",
                    Route::GetProject => "compute.projects.get",
                    Route::AggregatedList => "compute.instances.list",
                    Route::OsLogin => "compute.oslogin.updateExternalUser",
                    _ => "compute.instances.get",
                };
                let resource = match &path {
                    ApiPath::Project { project } | ApiPath::Aggregated { project } => {
                        format!("projects/{project}")
                    }
                    ApiPath::OsLogin => req.path.clone(),
                    ApiPath::Instance {
                        project,
                        zone,
                        name,
                        ..
                    } => format!("projects/{project}/zones/{zone}/instances/{name}"),
                    ApiPath::Operation {
                        project,
                        zone,
                        name,
                        ..
                    } => format!("projects/{project}/zones/{zone}/operations/{name}"),
                };
                return google_error(
                    403,
                    &format!("Required '{permission}' permission for '{resource}'"),
                    "forbidden",
                    None,
                );
            }
            let user = principal.clone().unwrap_or_default();
            match path {
                ApiPath::Project { project } => project_call(shared, &project),
                ApiPath::Aggregated { project } => aggregated_list(shared, &project, req),
                ApiPath::OsLogin => {
                    let mut st = shared.lock();
                    let (status, body) =
                        st.oslogin
                            .handle(&user, &req.method, &req.path, &req.query, &req.body);
                    if req.method != "GET" && status == 200 {
                        st.sync_guest_keys();
                    }
                    json_response(status, body)
                }
                ApiPath::Instance {
                    project,
                    zone,
                    name,
                    action,
                } => instance_call(
                    shared,
                    &project,
                    &zone,
                    &name,
                    action.as_deref(),
                    &user,
                    req,
                ),
                ApiPath::Operation {
                    project,
                    zone,
                    name,
                    wait,
                } => operation_call(shared, &project, &zone, &name, wait).await,
            }
        }
    }
}

// ---- compute resources -------------------------------------------------------

fn not_found(resource: &str) -> Response {
    google_error(
        404,
        &format!("The resource '{resource}' was not found"),
        "notFound",
        None,
    )
}

fn instance_json(inst: &InstanceState) -> Value {
    let zone_link = format!("{LINK_BASE}/projects/{}/zones/{}", inst.project, inst.zone);
    let region = inst
        .zone
        .rsplit_once('-')
        .map(|(r, _)| r)
        .unwrap_or(&inst.zone)
        .to_string();
    let mut nic = json!({
        "kind": "compute#networkInterface",
        "network": format!("{LINK_BASE}/projects/{}/global/networks/default", inst.project),
        "subnetwork": format!("{LINK_BASE}/projects/{}/regions/{region}/subnetworks/default", inst.project),
        "networkIP": inst.network_ip,
        "name": "nic0",
        "fingerprint": "jXTY5e5Q0jM=",
        "stackType": "IPV4_ONLY",
        "accessConfigs": []
    });
    if inst.external {
        let mut ac = json!({
            "kind": "compute#accessConfig",
            "type": "ONE_TO_ONE_NAT",
            "name": "External NAT",
            "networkTier": "PREMIUM"
        });
        if let Some(ip) = &inst.nat_ip {
            ac["natIP"] = json!(ip);
        }
        nic["accessConfigs"] = json!([ac]);
    }
    let running = inst.status == "RUNNING";
    let mut v = json!({
        "kind": "compute#instance",
        "id": inst.id.to_string(),
        "creationTimestamp": inst.created,
        "name": inst.name,
        "description": "",
        "tags": {"fingerprint": "42WmSpB8rSM="},
        "machineType": format!("{zone_link}/machineTypes/e2-standard-4"),
        "status": inst.status,
        "zone": zone_link,
        "canIpForward": false,
        "networkInterfaces": [nic],
        "disks": [{
            "kind": "compute#attachedDisk",
            "type": "PERSISTENT",
            "mode": "READ_WRITE",
            "source": format!("{zone_link}/disks/{}", inst.name),
            "deviceName": inst.name,
            "index": 0,
            "boot": true,
            "autoDelete": true,
            "interface": "SCSI",
            "diskSizeGb": "50"
        }],
        "metadata": metadata_json(&inst.metadata, &inst.metadata_fingerprint),
        "serviceAccounts": [{
            "email": format!("123456789012-compute@developer.gserviceaccount.com"),
            "scopes": [CLOUD_PLATFORM]
        }],
        "selfLink": format!("{zone_link}/instances/{}", inst.name),
        "scheduling": {
            "onHostMaintenance": "MIGRATE",
            "automaticRestart": true,
            "preemptible": false,
            "provisioningModel": "STANDARD"
        },
        "cpuPlatform": if running { "AMD Rome" } else { "Unknown CPU Platform" },
        "labelFingerprint": "42WmSpB8rSM=",
        "labels": if inst.labels.is_empty() {
            Value::Null
        } else {
            Value::Object(
                inst.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            )
        },
        "startRestricted": false,
        "deletionProtection": false,
        "fingerprint": "Dh7VQ3zCzDc=",
        "lastStartTimestamp": inst.last_start,
        "lastStopTimestamp": inst.last_stop,
        "lastSuspendedTimestamp": inst.last_suspended,
        "satisfiesPzi": true
    });
    // Google omits fields it has no value for.
    if let Some(obj) = v.as_object_mut() {
        obj.retain(|_, val| !val.is_null());
    }
    v
}

fn operation_json(op: &OperationState) -> Value {
    let now = Instant::now();
    let zone_link = format!("{LINK_BASE}/projects/{}/zones/{}", op.project, op.zone);
    let (status, progress) = if now >= op.done_at {
        ("DONE", 100)
    } else if now >= op.running_at {
        ("RUNNING", 0)
    } else {
        ("PENDING", 0)
    };
    let mut v = json!({
        "kind": "compute#operation",
        "id": op.id.to_string(),
        "name": op.name,
        "zone": zone_link,
        "operationType": op.op_type,
        "targetLink": format!("{zone_link}/instances/{}", op.target),
        "targetId": op.target_id.to_string(),
        "status": status,
        "user": op.user,
        "progress": progress,
        "insertTime": op.insert_time,
        "selfLink": format!("{zone_link}/operations/{}", op.name),
    });
    if status != "PENDING" {
        v["startTime"] = json!(
            op.start_time
                .clone()
                .unwrap_or_else(|| op.insert_time.clone())
        );
    }
    if status == "DONE" {
        v["endTime"] = json!(op.end_time.clone().unwrap_or_else(now_rfc3339));
        if let Some((code, message, http)) = &op.error {
            v["error"] = json!({"errors": [{"code": code, "message": message}]});
            v["httpErrorStatusCode"] = json!(http);
            v["httpErrorMessage"] = json!(reason_phrase(*http).to_ascii_uppercase());
        }
    }
    if let Some(id) = &op.request_id {
        v["clientOperationId"] = json!(id);
    }
    v
}

fn operation_name() -> String {
    let millis = chrono::Utc::now().timestamp_millis();
    let r: [u8; 14] = rand::random();
    let h = hex::encode(r);
    format!(
        "operation-{millis}-{}-{}-{}",
        &h[..13],
        &h[13..21],
        &h[21..28]
    )
}

fn instance_call(
    shared: &Arc<Shared>,
    project: &str,
    zone: &str,
    name: &str,
    action: Option<&str>,
    user: &str,
    req: &Request,
) -> Response {
    let mut st = shared.lock();
    st.advance();
    let resource = format!("projects/{project}/zones/{zone}/instances/{name}");
    if st.instance(project, zone, name).is_none() {
        return not_found(&resource);
    }
    let Some(action) = action else {
        let inst = st.instance(project, zone, name).expect("checked above");
        return json_response(200, instance_json(inst));
    };
    if action == "getGuestAttributes" {
        let inst = st.instance(project, zone, name).expect("checked above");
        return guest_attributes(inst, req);
    }
    let request_id = req.query_param("requestId");
    // A retried request: the same operation, nothing done twice.
    if let Some(op_name) = request_id.as_ref().and_then(|id| st.request_ids.get(id))
        && let Some(op) = st.operations.iter().find(|o| &o.name == op_name)
    {
        return json_response(200, operation_json(op));
    }
    if action == "setMetadata" {
        return set_metadata(&mut st, project, zone, name, user, request_id, req);
    }
    let t = st.timings;
    let now = Instant::now();
    let current = st
        .instance(project, zone, name)
        .map(|i| i.status.clone())
        .unwrap_or_default();
    // (effective, done_at, failed)
    let fail = st.fail_next.clone();
    let mut effective = false;
    let mut done_at = now + t.pending;
    let mut error = None;
    match (action, current.as_str()) {
        ("start", "TERMINATED" | "STOPPED") | ("resume", "SUSPENDED") => {
            effective = true;
            let first = if action == "start" {
                "PROVISIONING"
            } else {
                "STAGING"
            };
            let staging_at = now
                + if action == "start" {
                    t.provisioning
                } else {
                    Duration::ZERO
                };
            let running_at = staging_at + t.staging;
            let mut next_ip = st.next_ip;
            let inst = st.instance(project, zone, name).expect("checked above");
            inst.schedule.clear();
            set_status(inst, first, &mut next_ip);
            if let Some(f) = fail {
                // Capacity ran out: the VM falls back to where it was.
                inst.schedule.push_back((running_at, current.clone()));
                error = Some(f);
            } else {
                if action == "start" {
                    inst.schedule.push_back((staging_at, "STAGING".into()));
                }
                inst.schedule.push_back((running_at, "RUNNING".into()));
            }
            st.next_ip = next_ip;
            done_at = running_at;
        }
        ("start", "STOPPING" | "SUSPENDING") | ("resume", "STOPPING" | "SUSPENDING") => {
            return google_error(
                400,
                &format!("The resource '{resource}' is not ready"),
                "resourceNotReady",
                None,
            );
        }
        ("start", "SUSPENDED") => {
            return google_error(
                400,
                &format!("Instance '{name}' is suspended. Use the resume method to start it."),
                "badRequest",
                None,
            );
        }
        ("resume", "RUNNING" | "PROVISIONING" | "STAGING") => {}
        ("resume", _) => {
            return google_error(
                400,
                &format!("Instance '{name}' is not in SUSPENDED state."),
                "badRequest",
                None,
            );
        }
        // Starting a VM that is already up: a no-op operation.
        ("start", _) => {}
        ("stop", "RUNNING" | "PROVISIONING" | "STAGING" | "REPAIRING" | "SUSPENDED") => {
            effective = true;
            let stopped_at = now + t.stopping;
            let inst = st.instance(project, zone, name).expect("checked above");
            inst.schedule.clear();
            let mut ip = 0;
            if let Some(f) = fail {
                set_status(inst, "STOPPING", &mut ip);
                inst.schedule.push_back((stopped_at, current.clone()));
                error = Some(f);
            } else {
                set_status(inst, "STOPPING", &mut ip);
                inst.schedule.push_back((stopped_at, "TERMINATED".into()));
            }
            done_at = stopped_at;
        }
        ("stop", "STOPPING") => {
            // Completes when the stop in progress does.
            let inst = st.instance(project, zone, name).expect("checked above");
            done_at = inst.schedule.back().map(|(at, _)| *at).unwrap_or(now);
        }
        ("stop", _) => {}
        _ => return html_page(404, &req.path),
    }
    if effective {
        *st.transitions.entry(name.to_string()).or_default() += 1;
        if error.is_some() {
            st.fail_next = None;
        }
    }
    let id = st.id();
    let target_id = st
        .instance(project, zone, name)
        .map(|i| i.id)
        .unwrap_or_default();
    let insert_time = now_rfc3339();
    let op = OperationState {
        id,
        name: operation_name(),
        project: project.into(),
        zone: zone.into(),
        op_type: action.to_string(),
        target: name.to_string(),
        target_id,
        user: user.to_string(),
        request_id: request_id.clone(),
        insert_time: insert_time.clone(),
        created: now,
        running_at: (now + t.pending).min(done_at),
        done_at: done_at.max(now),
        start_time: Some(insert_time),
        end_time: None,
        error,
    };
    let body = operation_json(&op);
    if let Some(id) = request_id {
        st.request_ids.insert(id, op.name.clone());
    }
    st.operations.push(op);
    json_response(200, body)
}

/// `instances.getGuestAttributes`: `queryPath` names a namespace
/// (`hostkeys/`) or one key (`hostkeys/ssh-ed25519`), `variableKey` one
/// key whose value is returned alone. Nothing published under the path is
/// a 404 `notFound` naming it.
fn guest_attributes(inst: &InstanceState, req: &Request) -> Response {
    let visible = inst.host_keys_at.is_some_and(|at| Instant::now() >= at);
    let entries: Vec<(String, String, String)> = if visible {
        inst.host_keys
            .iter()
            .map(|(k, v)| ("hostkeys".to_string(), k.clone(), v.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let self_link = format!(
        "{LINK_BASE}/projects/{}/zones/{}/instances/{}/guestAttributes/",
        inst.project, inst.zone, inst.name
    );
    let missing = |path: &str| {
        not_found(&format!(
            "projects/{}/zones/{}/instances/{}/guestAttributes/{path}",
            inst.project, inst.zone, inst.name
        ))
    };
    if let Some(variable) = req.query_param("variableKey") {
        let (ns, key) = variable.split_once('/').unwrap_or(("", variable.as_str()));
        return match entries.iter().find(|(n, k, _)| n == ns && k == key) {
            Some((_, _, value)) => json_response(
                200,
                json!({
                    "kind": "compute#guestAttributes",
                    "variableKey": variable,
                    "variableValue": value,
                    "selfLink": format!("{self_link}{variable}"),
                }),
            ),
            None => missing(&variable),
        };
    }
    let query_path = req.query_param("queryPath").unwrap_or_default();
    let (ns, key) = query_path
        .split_once('/')
        .unwrap_or((query_path.as_str(), ""));
    let items: Vec<Value> = entries
        .iter()
        .filter(|(n, k, _)| (ns.is_empty() || n == ns) && (key.is_empty() || k == key))
        .map(|(n, k, v)| json!({"namespace": n, "key": k, "value": v}))
        .collect();
    if items.is_empty() {
        return missing(&query_path);
    }
    json_response(
        200,
        json!({
            "kind": "compute#guestAttributes",
            "queryPath": query_path,
            "queryValue": {"items": items},
            "selfLink": format!("{self_link}{query_path}"),
        }),
    )
}

async fn operation_call(
    shared: &Arc<Shared>,
    project: &str,
    zone: &str,
    name: &str,
    wait: bool,
) -> Response {
    let resource = format!("projects/{project}/zones/{zone}/operations/{name}");
    let until = {
        let st = shared.lock();
        let Some(op) = st.operations.iter().find(|o| {
            (o.name == name || o.id.to_string() == name) && o.project == project && o.zone == zone
        }) else {
            return not_found(&resource);
        };
        if wait {
            Some(op.done_at.min(Instant::now() + st.timings.wait_max))
        } else {
            None
        }
    };
    if let Some(until) = until {
        tokio::time::sleep_until(until.into()).await;
    }
    let mut st = shared.lock();
    st.advance();
    match st.operations.iter().find(|o| {
        (o.name == name || o.id.to_string() == name) && o.project == project && o.zone == zone
    }) {
        Some(op) => json_response(200, operation_json(op)),
        None => not_found(&resource),
    }
}

// ---- authentication ----------------------------------------------------------

fn unauthenticated(message: &str, reason: &str) -> Response {
    let mut r = json_response(
        401,
        json!({"error": {
            "code": 401,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason, "location": "Authorization", "locationType": "header"}],
            "status": "UNAUTHENTICATED"
        }}),
    );
    r.headers.push((
        "WWW-Authenticate".into(),
        "Bearer realm=\"https://accounts.google.com/\"".into(),
    ));
    r
}

const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

/// Checks the Bearer token of an API call; returns the principal.
fn authenticate(shared: &Arc<Shared>, req: &Request) -> Result<(String, &'static str), Response> {
    let Some(auth) = req.header("authorization") else {
        return Err(unauthenticated(
            "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
            "required",
        ));
    };
    let Some(token) = auth.strip_prefix("Bearer ").map(str::trim) else {
        return Err(unauthenticated(INVALID_CREDENTIALS, "authError"));
    };
    let st = shared.lock();
    if let Some(minted) = st.tokens.get(token) {
        if minted.expires > Instant::now() {
            return Ok((minted.principal.clone(), "minted"));
        }
        return Err(unauthenticated(INVALID_CREDENTIALS, "authError"));
    }
    if token.split('.').count() == 3 {
        return match verify_jwt(&st.service_accounts, token, JwtUse::SelfSigned) {
            Ok(email) => Ok((format!("serviceAccount:{email}"), "self-signed-jwt")),
            Err(_why) => Err(unauthenticated(INVALID_CREDENTIALS, "authError")),
        };
    }
    Err(unauthenticated(INVALID_CREDENTIALS, "authError"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum JwtUse<'a> {
    /// Sent straight to the API (AIP-4111).
    SelfSigned,
    /// An assertion for the JWT-bearer grant at one of these token URIs.
    Assertion(&'a [String]),
}

/// Verifies an RS256 JWT signed by one of `accounts`; returns its email.
fn verify_jwt(accounts: &[ServiceAccount], jwt: &str, usage: JwtUse<'_>) -> Result<String, String> {
    let mut parts = jwt.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s)) => (h, p, s),
        _ => return Err("not a JWT".into()),
    };
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {} is not RS256", header["alg"]));
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let account = accounts
        .iter()
        .find(|a| a.private_key_id == kid)
        .ok_or_else(|| format!("unknown key id {kid}"))?;
    let key = signature::UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        &account.public_key,
    );
    key.verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "bad signature".to_string())?;
    if claims["iss"] != account.client_email.as_str() {
        return Err("iss is not the key's client_email".into());
    }
    if !claims["sub"].is_null() && claims["sub"] != account.client_email.as_str() {
        return Err("sub differs from iss".into());
    }
    let now = chrono::Utc::now().timestamp();
    let iat = claims["iat"].as_i64().ok_or("no iat")?;
    let exp = claims["exp"].as_i64().ok_or("no exp")?;
    if exp <= now {
        return Err("expired".into());
    }
    if iat > now + 300 {
        return Err("issued in the future".into());
    }
    // One hour, with room for the clock-skew margin the client libraries add.
    if exp - iat > 3600 + 300 {
        return Err("lifetime longer than one hour".into());
    }
    let scopes = claims["scope"].as_str().unwrap_or_default();
    let has_scope = scopes
        .split(' ')
        .any(|s| s == CLOUD_PLATFORM || s == COMPUTE_SCOPE);
    match usage {
        JwtUse::SelfSigned => {
            let aud = claims["aud"].as_str();
            let aud_ok = aud
                .is_some_and(|a| a.trim_end_matches('/') == COMPUTE_AUDIENCE.trim_end_matches('/'));
            if aud.is_some() && !aud_ok {
                return Err(format!("audience {aud:?} is not the compute API"));
            }
            if !aud_ok && !has_scope {
                return Err("neither the compute audience nor a compute scope".into());
            }
        }
        JwtUse::Assertion(token_uris) => {
            if !token_uris.iter().any(|u| claims["aud"] == u.as_str()) {
                return Err(format!(
                    "assertion audience {} is not the token URI",
                    claims["aud"]
                ));
            }
            // RFC 7523 and Google: an assertion lives at most an hour.
            if exp - iat > 3600 {
                return Err("assertion lifetime longer than one hour".into());
            }
            if !has_scope {
                return Err("assertion without a compute scope".into());
            }
        }
    }
    Ok(account.client_email.clone())
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({"error": error, "error_description": description}),
    )
}

/// `POST /token`: the refresh-token and JWT-bearer grants, form or JSON.
fn token_endpoint(shared: &Arc<Shared>, req: &Request) -> Response {
    if req.method != "POST" {
        return html_page(405, &req.path);
    }
    let ct = req
        .header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let params: HashMap<String, String> = if ct.starts_with("application/json") {
        match serde_json::from_slice::<Value>(&req.body) {
            Ok(Value::Object(m)) => m
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
                .collect(),
            _ => return oauth_error(400, "invalid_request", "Invalid JSON payload received."),
        }
    } else {
        url::form_urlencoded::parse(&req.body)
            .into_owned()
            .collect()
    };
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    let mut st = shared.lock();
    let principal = match get("grant_type") {
        "refresh_token" => {
            let Some(user) = st.users.iter().find(|u| u.client_id == get("client_id")) else {
                return oauth_error(401, "invalid_client", "The OAuth client was not found.");
            };
            if user.client_secret != get("client_secret") {
                return oauth_error(401, "invalid_client", "Unauthorized");
            }
            if user.refresh_token != get("refresh_token") {
                return oauth_error(400, "invalid_grant", "Token has been expired or revoked.");
            }
            format!("user:{}", user.account)
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let mut token_uris = st.token_uris.clone();
            token_uris.push(format!("{}/token", shared.api_base()));
            match verify_jwt(
                &st.service_accounts,
                get("assertion"),
                JwtUse::Assertion(&token_uris),
            ) {
                Ok(email) => format!("serviceAccount:{email}"),
                Err(why) => {
                    st.refusals.push(format!("jwt-bearer: {why}"));
                    return oauth_error(400, "invalid_grant", "Invalid JWT Signature.");
                }
            }
        }
        "" => return oauth_error(400, "unsupported_grant_type", "Invalid grant_type: "),
        other => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
    };
    let lifetime = st.token_lifetime;
    let token = mint(&mut st, principal, lifetime);
    json_response(
        200,
        json!({
            "access_token": token,
            "expires_in": lifetime.as_secs(),
            "scope": CLOUD_PLATFORM,
            "token_type": "Bearer"
        }),
    )
}

/// `POST /v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`, as IAM
/// Credentials documents it: the caller's Bearer token, a JSON body with a
/// non-empty `scope` list, optional `delegates` and `lifetime` (`"Ns"`, at
/// most 3600s); the answer holds `accessToken` and `expireTime` (RFC 3339).
fn generate_access_token(
    shared: &Arc<Shared>,
    req: &Request,
    principal: &mut Option<String>,
) -> Response {
    if req.method != "POST" {
        return html_page(405, &req.path);
    }
    let who = match authenticate(shared, req) {
        Ok((who, _)) => who,
        Err(r) => return r,
    };
    *principal = Some(who.clone());
    let email = req
        .path
        .trim_start_matches("/v1/projects/-/serviceAccounts/")
        .trim_end_matches(":generateAccessToken")
        .to_string();
    let invalid = |m: &str| google_error(400, m, "badRequest", Some("INVALID_ARGUMENT"));
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return invalid("Invalid JSON payload received.");
    };
    let scopes: Vec<&str> = body["scope"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if scopes.is_empty() {
        return invalid("Scope required.");
    }
    if !scopes.contains(&CLOUD_PLATFORM) {
        return invalid("the test wants the cloud-platform scope");
    }
    if let Some(l) = body.get("lifetime") {
        let secs = l
            .as_str()
            .and_then(|l| l.strip_suffix('s'))
            .and_then(|n| n.parse::<u64>().ok());
        if !secs.is_some_and(|n| (1..=3600).contains(&n)) {
            return invalid("The lifetime must be between 1s and 3600s.");
        }
    }
    if let Some(d) = body.get("delegates")
        && !d.as_array().is_some_and(|a| {
            a.iter().all(|x| {
                x.as_str()
                    .is_some_and(|x| x.starts_with("projects/-/serviceAccounts/"))
            })
        })
    {
        return invalid("delegates must be projects/-/serviceAccounts/EMAIL names.");
    }
    let mut st = shared.lock();
    let allowed = who.starts_with("user:")
        || who.starts_with("principal:")
        || st.token_creators.contains(&who);
    if !allowed || st.deny_iam {
        return google_error(
            403,
            "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
            "forbidden",
            Some("PERMISSION_DENIED"),
        );
    }
    if !st
        .service_accounts
        .iter()
        .any(|sa| sa.client_email == email)
    {
        return google_error(
            404,
            &format!("Not found; Gaia id not found for email {email}"),
            "notFound",
            Some("NOT_FOUND"),
        );
    }
    let lifetime = st.token_lifetime;
    let token = mint(&mut st, format!("serviceAccount:{email}"), lifetime);
    let expires = chrono::Utc::now() + chrono::Duration::from_std(lifetime).unwrap();
    json_response(
        200,
        json!({
            "accessToken": token,
            "expireTime": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
    )
}

/// `POST /v1/token` of Google's Security Token Service: the RFC 8693 token
/// exchange, form-encoded, as sts.googleapis.com documents it.
fn sts_exchange(shared: &Arc<Shared>, req: &Request) -> Response {
    if req.method != "POST" {
        return html_page(405, &req.path);
    }
    let params: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    if get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" {
        return oauth_error(400, "invalid_grant", "Invalid grant_type.");
    }
    if get("requested_token_type") != "urn:ietf:params:oauth:token-type:access_token" {
        return oauth_error(400, "invalid_request", "Invalid requested_token_type.");
    }
    if !get("audience").starts_with("//iam.googleapis.com/") {
        return oauth_error(
            400,
            "invalid_target",
            "The target service indicated by the \"audience\" parameters is invalid.",
        );
    }
    if !get("scope").split(' ').any(|s| s == CLOUD_PLATFORM) {
        return oauth_error(
            400,
            "invalid_scope",
            "the test wants the cloud-platform scope",
        );
    }
    let mut st = shared.lock();
    let principal = match get("subject_token_type") {
        "urn:ietf:params:oauth:token-type:jwt" | "urn:ietf:params:oauth:token-type:id_token" => {
            if !st.federated.iter().any(|t| t == get("subject_token")) {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "The given subject token is not valid.",
                );
            }
            format!("principal:{}", get("audience"))
        }
        "urn:ietf:params:aws:token-type:aws4_request" => {
            match verify_aws_subject(&st.aws_keys, get("subject_token"), get("audience")) {
                Ok(key) => format!("principal:{}/aws/{key}", get("audience")),
                Err(why) => {
                    st.refusals.push(format!("aws subject token: {why}"));
                    return oauth_error(
                        400,
                        "invalid_grant",
                        "The AWS subject token is not valid.",
                    );
                }
            }
        }
        _ => return oauth_error(400, "invalid_request", "Invalid subject_token_type."),
    };
    let lifetime = st.token_lifetime;
    let token = mint(&mut st, principal, lifetime);
    json_response(
        200,
        json!({
            "access_token": token,
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
        }),
    )
}

/// Checks an AWS subject token as Google's STS does before replaying it to
/// AWS (AIP-4117): the URL-encoded JSON of a POST to
/// `sts.{region}.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15`
/// whose `headers` (`key`/`value` pairs) carry a SigV4 `Authorization` for
/// service `sts` that covers `host`, `x-amz-date` and
/// `x-goog-cloud-target-resource` (= the audience), with a signature that
/// AWS would accept from one of `keys`. Returns the access key id.
fn verify_aws_subject(
    keys: &[(String, String, Option<String>)],
    token: &str,
    audience: &str,
) -> Result<String, String> {
    use super::sigv4;
    let decoded: String = url::form_urlencoded::parse(format!("t={token}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let request: Value =
        serde_json::from_str(&decoded).map_err(|e| format!("not URL-encoded JSON: {e}"))?;
    if request["method"] != "POST" {
        return Err(format!("method {}", request["method"]));
    }
    let url_text = request["url"].as_str().ok_or("no url")?;
    let url = url::Url::parse(url_text).map_err(|e| format!("url: {e}"))?;
    let host = url.host_str().unwrap_or_default().to_string();
    let region = host
        .strip_prefix("sts.")
        .and_then(|h| h.strip_suffix(".amazonaws.com"))
        .ok_or_else(|| format!("host {host} is not a regional AWS STS"))?
        .to_string();
    if url.scheme() != "https" || url.port().is_some() {
        return Err(format!("url {url_text}"));
    }
    let mut query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    query.sort();
    if query
        != [
            ("Action".to_string(), "GetCallerIdentity".to_string()),
            ("Version".to_string(), "2011-06-15".to_string()),
        ]
    {
        return Err(format!("query {:?}", url.query()));
    }
    let mut headers: HashMap<String, String> = HashMap::new();
    for h in request["headers"].as_array().ok_or("no headers list")? {
        let (Some(k), Some(v)) = (h["key"].as_str(), h["value"].as_str()) else {
            return Err("a header without key or value".into());
        };
        headers.insert(k.to_ascii_lowercase(), v.to_string());
    }
    let header = |name: &str| {
        headers
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no {name} header"))
    };
    if header("x-goog-cloud-target-resource")? != audience {
        return Err("x-goog-cloud-target-resource is not the audience".into());
    }
    if header("host")? != host {
        return Err("host header differs from the URL".into());
    }
    let authorization = header("authorization")?;
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for part in rest.split(", ") {
        let (k, v) = part.split_once('=').ok_or("malformed Authorization")?;
        fields.insert(k, v);
    }
    let credential = fields.get("Credential").ok_or("no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let date = header("x-amz-date")?;
    if scope.len() != 5
        || !date.starts_with(scope[1])
        || scope[2] != region
        || scope[3] != "sts"
        || scope[4] != "aws4_request"
    {
        return Err(format!("credential scope {credential}"));
    }
    let signed_at = chrono::NaiveDateTime::parse_from_str(&date, "%Y%m%dT%H%M%SZ")
        .map_err(|e| e.to_string())?
        .and_utc();
    let age = (chrono::Utc::now() - signed_at).num_seconds();
    if !(-300..=900).contains(&age) {
        return Err(format!("signed {age}s ago"));
    }
    let (access_key, secret, session) = keys
        .iter()
        .find(|(k, _, _)| k == scope[0])
        .ok_or_else(|| format!("unknown access key {}", scope[0]))?;
    let signed: Vec<&str> = fields
        .get("SignedHeaders")
        .ok_or("no SignedHeaders")?
        .split(';')
        .collect();
    let mut must = vec!["host", "x-amz-date", "x-goog-cloud-target-resource"];
    if let Some(session) = session {
        if header("x-amz-security-token")? != *session {
            return Err("x-amz-security-token is not the session's".into());
        }
        must.push("x-amz-security-token");
    }
    for name in must {
        if !signed.contains(&name) {
            return Err(format!("{name} is not signed"));
        }
    }
    let mut sorted = signed.clone();
    sorted.sort_unstable();
    if sorted != signed {
        return Err("SignedHeaders are not sorted".into());
    }
    let mut canonical_headers = String::new();
    for name in &signed {
        canonical_headers.push_str(&format!("{name}:{}\n", header(name)?.trim()));
    }
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{}={}", sigv4::uri_encode(k), sigv4::uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let canonical = format!(
        "POST\n{}\n{canonical_query}\n{canonical_headers}\n{}\n{}",
        url.path(),
        signed.join(";"),
        sigv4::sha256_hex(b"")
    );
    let want = sigv4::signature(secret, &date, &region, "sts", &canonical);
    if fields.get("Signature") != Some(&want.as_str()) {
        return Err("signature does not match".into());
    }
    Ok(access_key.clone())
}

fn mint(st: &mut State, principal: String, lifetime: Duration) -> String {
    let token = format!(
        "ya29.fake-{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    );
    st.tokens.insert(
        token.clone(),
        MintedToken {
            principal,
            expires: Instant::now() + lifetime,
        },
    );
    token
}

// ---- metadata server ----------------------------------------------------------

fn metadata_text(status: u16, body: String) -> Response {
    Response {
        status,
        content_type: "application/text",
        headers: vec![
            ("Metadata-Flavor".into(), "Google".into()),
            ("Server".into(), "Metadata Server for VM".into()),
        ],
        body: body.into_bytes(),
    }
}

fn metadata(shared: &Arc<Shared>, req: &Request) -> Response {
    if req.path == GUEST_POWEROFF_PATH {
        // Not Google's: a test hook standing in for `poweroff` inside the VM.
        let name = shared.lock().metadata_instance.clone();
        guest_poweroff(shared, &name);
        return metadata_text(200, "powering off\n".into());
    }
    if req.header("metadata-flavor") != Some("Google") || req.header("x-forwarded-for").is_some() {
        let mut r = html_page(403, &req.path);
        r.body = format!(
            "<!DOCTYPE html>\n<html lang=en>\n<title>Error 403 (Forbidden)!!1</title>\n<p>Your client does not have permission to get URL <code>{}</code> from this server. Missing Metadata-Flavor:Google header.",
            req.path
        )
        .into_bytes();
        r.headers.push(("Metadata-Flavor".into(), "Google".into()));
        return r;
    }
    if req.method != "GET" {
        return html_page(405, &req.path);
    }
    let mut st = shared.lock();
    let sa = st.metadata_identity.clone();
    let text = |s: &str| metadata_text(200, s.to_string());
    match req.path.as_str() {
        "/" => text("computeMetadata/\n"),
        "/computeMetadata/v1" | "/computeMetadata/v1/" => {
            text("instance/\noauth2/\nproject/\nuniverse/\n")
        }
        "/computeMetadata/v1/instance/name" => text(&st.metadata_instance.clone()),
        "/computeMetadata/v1/instance/hostname" => text(&format!(
            "{}.{ZONE}.c.{PROJECT}.internal",
            st.metadata_instance
        )),
        "/computeMetadata/v1/instance/zone" => text(&format!("projects/123456789012/zones/{ZONE}")),
        "/computeMetadata/v1/instance/id" => {
            let name = st.metadata_instance.clone();
            let id = st.instance(PROJECT, ZONE, &name).map(|i| i.id).unwrap_or(1);
            text(&id.to_string())
        }
        "/computeMetadata/v1/project/project-id" => text(&st.metadata_project.clone()),
        "/computeMetadata/v1/project/numeric-project-id" => text("123456789012"),
        "/computeMetadata/v1/universe/universe-domain" => text("googleapis.com"),
        "/computeMetadata/v1/instance/service-accounts/default/email" => text(&sa),
        "/computeMetadata/v1/instance/service-accounts/default/scopes" => {
            text(&format!("{CLOUD_PLATFORM}\n"))
        }
        "/computeMetadata/v1/instance/service-accounts/default/token" => {
            let lifetime = st.token_lifetime;
            let token = mint(&mut st, format!("serviceAccount:{sa}"), lifetime);
            let mut r = json_response(
                200,
                json!({"access_token": token, "expires_in": lifetime.as_secs(), "token_type": "Bearer"}),
            );
            r.content_type = "application/json";
            r.headers = vec![
                ("Metadata-Flavor".into(), "Google".into()),
                ("Server".into(), "Metadata Server for VM".into()),
            ];
            r
        }
        _ => {
            let mut r = html_page(404, &req.path);
            r.headers.push(("Metadata-Flavor".into(), "Google".into()));
            r
        }
    }
}

// ---- metadata, projects.get, setMetadata, the guest agent's keys ---------------

fn metadata_json(items: &[(String, String)], fingerprint: &str) -> Value {
    let mut v = json!({"kind": "compute#metadata", "fingerprint": fingerprint});
    if !items.is_empty() {
        v["items"] = json!(
            items
                .iter()
                .map(|(k, val)| json!({"key": k, "value": val}))
                .collect::<Vec<_>>()
        );
    }
    v
}

/// `projects.get`: a Project resource with its common instance metadata.
/// Query parameters `instances.aggregatedList` takes (its own and the
/// system parameters every Google API takes); Google refuses any other.
const AGGREGATED_LIST_PARAMS: &[&str] = &[
    "filter",
    "maxResults",
    "orderBy",
    "pageToken",
    "includeAllScopes",
    "returnPartialSuccess",
    "serviceProjectNumber",
    "alt",
    "fields",
    "key",
    "prettyPrint",
    "quotaUser",
    "userIp",
    "$.xgafv",
];

/// One comparison of a list filter: `FIELD OP VALUE`.
#[derive(Debug, Clone, PartialEq)]
struct FilterExpr {
    field: String,
    op: String,
    value: String,
}

/// Parses a list filter as the compute reference describes it: one
/// expression `FIELD OP VALUE` (OP one of `=`, `!=`, `:`; `:*` tests that a
/// field is set), or several, each in parentheses, all of which must hold
/// (an explicit `AND` between them is allowed). Values may be double-quoted.
/// `OR` and other operators are beyond this fake and refused.
fn parse_filter(filter: &str) -> Result<Vec<FilterExpr>, String> {
    let f = filter.trim();
    let parts: Vec<String> = if f.starts_with('(') {
        let mut parts = Vec::new();
        let mut rest = f;
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            if let Some(r) = rest.strip_prefix("AND ") {
                rest = r;
                continue;
            }
            let r = rest.strip_prefix('(').ok_or("expected `(`")?;
            let close = r.find(')').ok_or("unbalanced parentheses")?;
            parts.push(r[..close].to_string());
            rest = &r[close + 1..];
        }
        parts
    } else {
        vec![f.to_string()]
    };
    let mut out = Vec::new();
    for p in parts {
        let p = p.trim();
        let (field, op, value) = if let Some(i) = p.find("!=") {
            (&p[..i], "!=", &p[i + 2..])
        } else if let Some(i) = p.find(['=', ':']) {
            (&p[..i], &p[i..i + 1], &p[i + 1..])
        } else {
            return Err(format!("no operator in `{p}`"));
        };
        let field = field.trim();
        let value = value.trim();
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(v) => v.to_string(),
            None if value.contains(char::is_whitespace) || value.is_empty() => {
                return Err(format!("bad value in `{p}`"));
            }
            None => value.to_string(),
        };
        let known = field == "name"
            || field == "status"
            || field
                .strip_prefix("labels.")
                .is_some_and(|k| !k.is_empty() && !k.contains(char::is_whitespace));
        if !known {
            return Err(format!("field `{field}` is not supported by this fake"));
        }
        if value.contains(" OR ") || field.contains(" OR ") {
            return Err("OR is not supported by this fake".into());
        }
        out.push(FilterExpr {
            field: field.to_string(),
            op: op.to_string(),
            value,
        });
    }
    Ok(out)
}

fn filter_matches(inst: &InstanceState, exprs: &[FilterExpr]) -> bool {
    exprs.iter().all(|e| {
        let actual: Option<&str> = match e.field.as_str() {
            "name" => Some(&inst.name),
            "status" => Some(&inst.status),
            f => f.strip_prefix("labels.").and_then(|k| {
                inst.labels
                    .iter()
                    .find(|(lk, _)| lk == k)
                    .map(|(_, v)| v.as_str())
            }),
        };
        match (e.op.as_str(), actual) {
            (":", a) if e.value == "*" => a.is_some(),
            ("=", Some(a)) => a == e.value,
            (":", Some(a)) => a.contains(&e.value),
            ("!=", a) => a != Some(e.value.as_str()),
            _ => false,
        }
    })
}

/// `instances.aggregatedList`: the project's VMs in every zone, keyed by
/// `zones/{zone}` (a zone with none on the page carries the
/// `NO_RESULTS_ON_PAGE` warning instead), `maxResults` at most 500, and a
/// `nextPageToken` while more remain. A `pageToken` is honoured only with
/// the `filter` and `maxResults` of the request that issued it.
fn aggregated_list(shared: &Arc<Shared>, project: &str, req: &Request) -> Response {
    let invalid = |field: &str, value: &str, why: &str| {
        google_error(
            400,
            &format!("Invalid value for field '{field}': '{value}'. {why}"),
            "invalid",
            Some("INVALID_ARGUMENT"),
        )
    };
    for (k, _) in url::form_urlencoded::parse(req.query.as_bytes()) {
        if !AGGREGATED_LIST_PARAMS.contains(&k.as_ref()) {
            return google_error(
                400,
                &format!(
                    "Invalid JSON payload received. Unknown name \"{k}\": Cannot bind query parameter. Field '{k}' could not be found in request message."
                ),
                "invalid",
                Some("INVALID_ARGUMENT"),
            );
        }
    }
    let filter = req.query_param("filter");
    let max_results = req.query_param("maxResults");
    let max = match max_results.as_deref().map(str::parse::<usize>) {
        None => 500,
        Some(Ok(n)) if n <= 500 => n,
        Some(_) => {
            return invalid(
                "maxResults",
                max_results.as_deref().unwrap_or_default(),
                "Must be less than or equal to 500",
            );
        }
    };
    if let Some(v) = req.query_param("returnPartialSuccess")
        && v != "true"
        && v != "false"
    {
        return invalid("returnPartialSuccess", &v, "Must be a boolean");
    }
    let exprs = match filter.as_deref().map(parse_filter) {
        None => Vec::new(),
        Some(Ok(e)) => e,
        Some(Err(why)) => {
            return invalid(
                "filter",
                filter.as_deref().unwrap_or_default(),
                &format!("Invalid list filter expression ({why})."),
            );
        }
    };
    let mut st = shared.lock();
    if project != PROJECT {
        return not_found(&format!("projects/{project}"));
    }
    st.advance();
    let offset = match req.query_param("pageToken") {
        None => 0,
        Some(t) => match st.page_tokens.get(&t) {
            Some((off, f, m)) if *f == filter && *m == max_results => *off,
            Some(_) => {
                return invalid(
                    "pageToken",
                    &t,
                    "The page token was issued for a request with other parameters.",
                );
            }
            None => return invalid("pageToken", &t, "Invalid page token."),
        },
    };
    let mut matching: Vec<&InstanceState> = st
        .instances
        .iter()
        .filter(|i| i.project == project && filter_matches(i, &exprs))
        .collect();
    matching.sort_by(|a, b| (&a.zone, a.id).cmp(&(&b.zone, b.id)));
    let page_len = if max == 0 { 500 } else { max }.min(st.list_page_size);
    let page: Vec<&InstanceState> = matching
        .iter()
        .skip(offset)
        .take(page_len)
        .copied()
        .collect();
    let mut zones: Vec<String> = st
        .instances
        .iter()
        .filter(|i| i.project == project)
        .map(|i| i.zone.clone())
        .chain([ZONE.to_string(), "europe-west1-b".to_string()])
        .collect();
    zones.sort();
    zones.dedup();
    let mut items = serde_json::Map::new();
    for zone in &zones {
        let scope = format!("zones/{zone}");
        let here: Vec<Value> = page
            .iter()
            .filter(|i| &i.zone == zone)
            .map(|i| instance_json(i))
            .collect();
        let value = if here.is_empty() {
            json!({"warning": {
                "code": "NO_RESULTS_ON_PAGE",
                "message": format!("There are no results for scope '{scope}' on this page."),
                "data": [{"key": "scope", "value": scope}]
            }})
        } else {
            json!({ "instances": here })
        };
        items.insert(scope, value);
    }
    let next = offset + page.len();
    let mut body = json!({
        "kind": "compute#instanceAggregatedList",
        "id": format!("projects/{project}/aggregated/instances"),
        "items": items,
        "selfLink": format!("{LINK_BASE}/projects/{project}/aggregated/instances"),
    });
    if next < matching.len() {
        let token = STANDARD.encode(rand::random::<[u8; 18]>());
        body["nextPageToken"] = json!(token);
        st.page_tokens
            .insert(token, (next, filter.clone(), max_results.clone()));
    }
    json_response(200, body)
}

fn project_call(shared: &Arc<Shared>, project: &str) -> Response {
    let st = shared.lock();
    if project != PROJECT {
        return not_found(&format!("projects/{project}"));
    }
    json_response(
        200,
        json!({
            "kind": "compute#project",
            "id": "123456789012",
            "creationTimestamp": "2024-01-15T08:00:00.000-08:00",
            "name": project,
            "commonInstanceMetadata": metadata_json(&st.project_metadata, &st.project_metadata_fingerprint),
            "defaultServiceAccount": "123456789012-compute@developer.gserviceaccount.com",
            "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS",
            "defaultNetworkTier": "PREMIUM",
            "vmDnsSetting": "ZONAL_ONLY",
            "selfLink": format!("{LINK_BASE}/projects/{project}"),
        }),
    )
}

/// `instances.setMetadata`: the body is a Metadata resource whose
/// `fingerprint` must be the current one; `items` replace all items.
fn set_metadata(
    st: &mut State,
    project: &str,
    zone: &str,
    name: &str,
    user: &str,
    request_id: Option<String>,
    req: &Request,
) -> Response {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return google_error(
                400,
                &format!("Invalid JSON payload received. {e}"),
                "parseError",
                None,
            );
        }
    };
    st.set_metadata_bodies.push(body.clone());
    let inst = st
        .instance(project, zone, name)
        .expect("checked by the caller");
    if let Some((k, v)) = inst.concurrent_write.take() {
        // Another client wrote first: the fingerprint moves on.
        match inst.metadata.iter_mut().find(|(key, _)| *key == k) {
            Some(item) => item.1 = v,
            None => inst.metadata.push((k, v)),
        }
        inst.metadata_fingerprint = new_fingerprint();
    }
    let Some(fingerprint) = body.get("fingerprint").and_then(Value::as_str) else {
        return google_error(
            400,
            "Invalid value for field 'metadata.fingerprint': ''. Supplied fingerprint is invalid.",
            "invalid",
            None,
        );
    };
    if fingerprint != inst.metadata_fingerprint {
        return google_error(
            412,
            "Supplied fingerprint does not match current metadata fingerprint.",
            "conditionNotMet",
            None,
        );
    }
    let mut items = Vec::new();
    for item in body
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let Some(key) = item.get("key").and_then(Value::as_str) else {
            return google_error(400, "Required field 'key' not specified", "required", None);
        };
        let valid = !key.is_empty()
            && key.len() <= 128
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return google_error(
                400,
                &format!("Invalid value for field 'resource.items[].key': '{key}'."),
                "invalid",
                None,
            );
        }
        if items.iter().any(|(k, _): &(String, String)| k == key) {
            return google_error(
                400,
                &format!("Duplicate metadata key '{key}'."),
                "invalid",
                None,
            );
        }
        let value = item
            .get("value")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if value.len() > 256 * 1024 {
            return google_error(400, "Metadata value too large.", "invalid", None);
        }
        items.push((key.to_string(), value.to_string()));
    }
    inst.metadata = items;
    inst.metadata_fingerprint = new_fingerprint();
    let target_id = inst.id;
    st.sync_guest_keys();
    let id = st.id();
    let now = Instant::now();
    let insert_time = now_rfc3339();
    let op = OperationState {
        id,
        name: operation_name(),
        project: project.into(),
        zone: zone.into(),
        op_type: "setMetadata".into(),
        target: name.to_string(),
        target_id,
        user: user.to_string(),
        request_id: request_id.clone(),
        insert_time: insert_time.clone(),
        created: now,
        running_at: now + st.timings.pending,
        done_at: now + st.timings.pending * 2,
        start_time: Some(insert_time),
        end_time: None,
        error: None,
    };
    let answer = operation_json(&op);
    if let Some(id) = request_id {
        st.request_ids.insert(id, op.name.clone());
    }
    st.operations.push(op);
    json_response(200, answer)
}

/// The `expireOn` of a `google-ssh` entry, when it has one.
fn ssh_keys_entry_expired(rest: &str) -> bool {
    let Some((_, json_part)) = rest.split_once(" google-ssh ") else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(json_part) else {
        return true;
    };
    match v.get("expireOn").and_then(Value::as_str) {
        Some(at) => chrono::DateTime::parse_from_str(at, "%Y-%m-%dT%H:%M:%S%z")
            .map(|t| t < chrono::Utc::now())
            .unwrap_or(true),
        None => false,
    }
}

impl State {
    fn metadata_value(&mut self, instance: &str, key: &str) -> Option<String> {
        let from_instance = self.instance(PROJECT, ZONE, instance).and_then(|i| {
            i.metadata
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        });
        from_instance.or_else(|| {
            self.project_metadata
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    }

    /// What the guest agent (or, with OS Login, the `AuthorizedKeysCommand`)
    /// would let in: one file per user in the keys folder.
    fn sync_guest_keys(&mut self) {
        let Some((instance, dir)) = self.guest_keys.clone() else {
            return;
        };
        let oslogin = self
            .metadata_value(&instance, "enable-oslogin")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut by_user: BTreeMapOf = std::collections::BTreeMap::new();
        if oslogin {
            for (user, keys) in self.oslogin.authorized_keys() {
                by_user.entry(user).or_default().extend(keys);
            }
        } else {
            let mut lines = Vec::new();
            let mut block = false;
            if let Some(inst) = self.instance(PROJECT, ZONE, &instance) {
                for (k, v) in &inst.metadata {
                    match k.as_str() {
                        "ssh-keys" => lines.extend(v.lines().map(str::to_string)),
                        "block-project-ssh-keys" => block = v.eq_ignore_ascii_case("true"),
                        _ => {}
                    }
                }
            }
            if !block
                && let Some((_, v)) = self.project_metadata.iter().find(|(k, _)| k == "ssh-keys")
            {
                lines.extend(v.lines().map(str::to_string));
            }
            for line in lines {
                let Some((user, rest)) = line.split_once(':') else {
                    continue;
                };
                if user.is_empty() || rest.trim().is_empty() || ssh_keys_entry_expired(rest) {
                    continue;
                }
                by_user
                    .entry(user.to_string())
                    .or_default()
                    .push(rest.to_string());
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for (user, keys) in by_user {
            let mut text = keys.join("\n");
            text.push('\n');
            std::fs::write(dir.join(&user), text).expect("write the guest's authorized keys");
        }
    }
}

type BTreeMapOf = std::collections::BTreeMap<String, Vec<String>>;

impl GceFake {
    /// Sets (or adds) an instance metadata item, as another client would;
    /// the fingerprint changes.
    pub fn set_instance_metadata(&self, name: &str, key: &str, value: &str) {
        let mut st = self.shared.lock();
        if let Some(inst) = st.instance(PROJECT, ZONE, name) {
            match inst.metadata.iter_mut().find(|(k, _)| k == key) {
                Some(item) => item.1 = value.into(),
                None => inst.metadata.push((key.into(), value.into())),
            }
            inst.metadata_fingerprint = new_fingerprint();
        }
        st.sync_guest_keys();
    }

    /// The instance's metadata items now.
    pub fn instance_metadata(&self, name: &str) -> Vec<(String, String)> {
        let mut st = self.shared.lock();
        st.instance(PROJECT, ZONE, name)
            .map(|i| i.metadata.clone())
            .unwrap_or_default()
    }

    /// Sets a project-wide metadata item (`commonInstanceMetadata`).
    pub fn set_project_metadata(&self, key: &str, value: &str) {
        let mut st = self.shared.lock();
        match st.project_metadata.iter_mut().find(|(k, _)| k == key) {
            Some(item) => item.1 = value.into(),
            None => st.project_metadata.push((key.into(), value.into())),
        }
        st.project_metadata_fingerprint = new_fingerprint();
        st.sync_guest_keys();
    }

    /// Makes another client write `key = value` just before the next
    /// `setMetadata` on `name` is checked, so its fingerprint is stale.
    pub fn write_concurrently_before_next_set(&self, name: &str, key: &str, value: &str) {
        let mut st = self.shared.lock();
        if let Some(inst) = st.instance(PROJECT, ZONE, name) {
            inst.concurrent_write = Some((key.into(), value.into()));
        }
    }

    /// Plays the guest agent of instance `name`: keeps one file per user in
    /// `dir` with the keys that user may log in with (for sshd's
    /// `AuthorizedKeysFile <dir>/%u`).
    pub fn serve_guest_keys(&self, name: &str, dir: &Path) {
        let mut st = self.shared.lock();
        st.guest_keys = Some((name.into(), dir.to_path_buf()));
        st.sync_guest_keys();
    }

    /// The bodies of every `setMetadata` call, in order.
    pub fn set_metadata_bodies(&self) -> Vec<Value> {
        self.shared.lock().set_metadata_bodies.clone()
    }

    /// The OS Login service's state.
    pub fn oslogin<T>(&self, f: impl FnOnce(&mut super::oslogin_fake::Profiles) -> T) -> T {
        let mut st = self.shared.lock();
        let out = f(&mut st.oslogin);
        st.sync_guest_keys();
        out
    }
}

/// Google's `tokeninfo` endpoint: `GET /tokeninfo?access_token=…` describes
/// a token this fake minted, with the account's `email` (tokens carry the
/// `userinfo.email` scope, as gcloud's application-default login asks for).
fn tokeninfo(shared: &Arc<Shared>, req: &Request) -> Response {
    let st = shared.lock();
    let Some(token) = req.query_param("access_token") else {
        return json_response(
            400,
            json!({"error": "invalid_request", "error_description": "Invalid Value"}),
        );
    };
    match st.tokens.get(&token) {
        Some(minted) if minted.expires > Instant::now() => {
            let email = minted
                .principal
                .split_once(':')
                .map(|(_, e)| e)
                .unwrap_or(&minted.principal);
            let left = minted
                .expires
                .saturating_duration_since(Instant::now())
                .as_secs();
            json_response(
                200,
                json!({
                    "azp": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
                    "aud": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
                    "sub": "109876543210987654321",
                    "scope": format!("openid https://www.googleapis.com/auth/userinfo.email {CLOUD_PLATFORM}"),
                    "exp": (chrono::Utc::now().timestamp() + left as i64).to_string(),
                    "expires_in": left.to_string(),
                    "email": email,
                    "email_verified": "true",
                    "access_type": "offline"
                }),
            )
        }
        _ => json_response(
            400,
            json!({"error": "invalid_token", "error_description": "Invalid Value"}),
        ),
    }
}

/// The fake's own behaviour where absconda's flows do not reach it.
#[cfg(test)]
mod tests {
    use super::*;

    /// The fake itself: the JWT-bearer grant at `token_uri`, Google's 401 and the
    /// HTML 404, which absconda's own flows do not all reach.
    #[tokio::test]
    async fn follows_googles_token_flows() {
        use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;

        let fake = GceFake::start();
        fake.add_instance("vm", "RUNNING");
        let sa = fake.service_account();
        let pem = sa
            .private_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>();
        let der = base64::engine::general_purpose::STANDARD
            .decode(pem)
            .unwrap();
        let key = RsaKeyPair::from_pkcs8(&der).unwrap();
        let now = chrono::Utc::now().timestamp();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": sa.private_key_id});
        let claims = serde_json::json!({
            "iss": sa.client_email, "scope": "https://www.googleapis.com/auth/cloud-platform",
            "aud": fake.token_uri(), "iat": now, "exp": now + 3600
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; key.public_modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        let assertion = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));

        let http = reqwest::Client::new();
        let grant = http
            .post(fake.token_uri())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", &assertion),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(grant.status(), 200);
        let body: serde_json::Value = grant.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        let token = body["access_token"].as_str().unwrap();

        let url = format!(
            "{}/compute/v1/projects/{}/zones/{}/instances/vm",
            fake.api_endpoint(),
            fake.project(),
            fake.zone()
        );
        let ok = http.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        let instance: serde_json::Value = ok.json().await.unwrap();
        assert_eq!(instance["kind"], "compute#instance");
        assert_eq!(instance["status"], "RUNNING");

        // The assertion itself is not an access token for the API: its audience
        // is the token endpoint.
        let wrong = http.get(&url).bearer_auth(&assertion).send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let none = http.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401);
        assert!(none.headers().contains_key("www-authenticate"));
        let err: serde_json::Value = none.json().await.unwrap();
        assert_eq!(err["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(err["error"]["errors"][0]["reason"], "required");

        let html = http
            .get(format!("{}/compute/v1/nope", fake.api_endpoint()))
            .send()
            .await
            .unwrap();
        assert_eq!(html.status(), 404);
        assert!(
            html.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
    }

    /// The metadata server refuses a request without the flavor header, as
    /// the real one does.
    #[tokio::test]
    async fn the_metadata_server_wants_the_flavor_header() {
        let fake = GceFake::start();
        let url = format!(
            "http://{}/computeMetadata/v1/instance/service-accounts/default/token",
            fake.metadata_host()
        );
        let plain = reqwest::get(&url).await.unwrap();
        assert_eq!(plain.status(), 403);
        let flavored = reqwest::Client::new()
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap();
        assert_eq!(flavored.status(), 200);
        assert_eq!(flavored.headers()["metadata-flavor"], "Google");
    }
}
