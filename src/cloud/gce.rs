//! Google Compute Engine builders through the compute v1 REST API, without
//! gcloud.
//!
//! Three calls do the work: `instances.get` for the state and address,
//! `instances.start`/`instances.stop` (or `instances.resume` for a suspended
//! VM) to change it, and `zoneOperations.wait` to follow the long-running
//! operation they return. `wait` may answer before the operation is `DONE`, so
//! it is called again until it is, and an operation that ends with
//! `error.errors[]` becomes [`CloudError::OperationFailed`].
//!
//! Start and stop look at the current status first: starting a VM that is
//! already booting or running, or stopping one that is stopped or stopping,
//! sends nothing. Every mutating request carries a `requestId`, reused when a
//! request is retried, so the API ignores a duplicate of a request it already
//! accepted (a connection reset after the server acted, for example). A start
//! or stop that the API refuses because another client got there first is
//! accepted when a fresh `instances.get` shows the VM heading the right way.
//!
//! Before the first SSH connection to a fresh VM, [`Gce::guest_host_keys`]
//! reads the SSH host keys the guest agent publishes as guest attributes
//! (`instances.getGuestAttributes?queryPath=hostkeys/`), so absconda can
//! trust the VM without trust-on-first-use.
//!
//! Each public call runs under the one deadline of `GceSettings::backoff`:
//! transient failures (connection errors, 429, 5xx, `rateLimitExceeded`) are
//! retried with backoff and `Retry-After`; authentication failures are not,
//! and say which credentials were used and what to check.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::gcp_auth::{CredentialSource, GcpAuth};
use super::retry::{Backoff, settle_pause, with_retry_until};
use super::{CloudError, InstanceInfo, Provider, Status};

/// The compute API's base URL when `api_endpoint` is not set.
pub const DEFAULT_API_ENDPOINT: &str = "https://compute.googleapis.com";

/// Longest a single request may take; `wait` itself returns within about two
/// minutes, so its requests get more.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT_REQUEST_TIMEOUT: Duration = Duration::from_secs(150);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls of a VM that must settle before we can act on it.
const SETTLE_POLL_MAX: Duration = Duration::from_secs(2);

/// Which address of the VM SSH should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressKind {
    /// `networkInterfaces[0].accessConfigs[0].natIP`, the ephemeral or
    /// static external IP.
    #[default]
    External,
    /// `networkInterfaces[0].networkIP`, for builders reached over a VPN,
    /// an interconnect or from inside the VPC.
    Internal,
}

/// Everything needed to reach one builder VM.
#[derive(Debug, Clone)]
pub struct GceSettings {
    pub project: String,
    pub zone: String,
    pub instance: String,
    /// The base URL before `/compute/v1` (a URL that already ends in
    /// `/compute/v1` is taken as is); [`DEFAULT_API_ENDPOINT`] when unset.
    pub api_endpoint: Option<String>,
    pub address: AddressKind,
    /// Retries and the deadline of each `describe`, `start` and `stop`.
    pub backoff: Backoff,
}

/// A GCE VM driven through the compute v1 API.
#[derive(Debug)]
pub struct Gce {
    settings: GceSettings,
    /// `.../compute/v1/projects/{p}/zones/{z}/instances/{name}`
    instance_url: Url,
    /// `.../compute/v1/projects/{p}/zones/{z}/operations/`
    operations_url: Url,
    http: reqwest::Client,
    auth: GcpAuth,
}

/// What a request is about, to tell a missing VM from a missing operation
/// or guest attributes that were never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Instance,
    Operation,
    GuestAttributes,
    Project,
}

/// The guest attribute namespace the guest agent writes the SSH host keys
/// to: one entry per key type, `hostkeys/ssh-ed25519` = the base64 key.
pub const HOST_KEYS_QUERY_PATH: &str = "hostkeys/";

/// A start or stop, and the API method that performs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Resume,
    Stop,
}

impl Action {
    fn method(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Resume => "resume",
            Action::Stop => "stop",
        }
    }
}

impl Gce {
    /// A provider using Application Default Credentials from the environment.
    pub fn new(settings: GceSettings) -> Result<Gce, CloudError> {
        Gce::with_auth(settings, GcpAuth::from_env()?)
    }

    /// A provider with credentials found elsewhere (tests pass a
    /// [`GcpAuth::from_lookup`] so they need not change the process
    /// environment).
    pub fn with_auth(settings: GceSettings, auth: GcpAuth) -> Result<Gce, CloudError> {
        let endpoint = settings
            .api_endpoint
            .as_deref()
            .unwrap_or(DEFAULT_API_ENDPOINT);
        let base = api_base(endpoint)?;
        for (what, value) in [
            ("project", &settings.project),
            ("zone", &settings.zone),
            ("instance", &settings.instance),
        ] {
            if value.is_empty() || value.contains('/') {
                return Err(CloudError::Config {
                    message: format!("GCE {what} `{value}` is empty or contains `/`"),
                });
            }
        }
        let zone_url = join_segments(
            &base,
            &["projects", &settings.project, "zones", &settings.zone],
        )?;
        let instance_url = join_segments(&zone_url, &["instances", &settings.instance])?;
        let mut operations_url = join_segments(&zone_url, &["operations"])?;
        operations_url.set_path(&format!("{}/", operations_url.path()));
        let mut builder = super::http::builder()?
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&base) {
            // A proxy from the environment must not capture a local endpoint.
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CloudError::Transport {
            url: endpoint.to_string(),
            source: Box::new(e),
        })?;
        Ok(Gce {
            settings,
            instance_url,
            operations_url,
            http,
            auth,
        })
    }

    pub fn settings(&self) -> &GceSettings {
        &self.settings
    }

    /// The credentials this provider uses, for other Google APIs.
    pub fn auth(&self) -> &GcpAuth {
        &self.auth
    }

    /// Which credentials this provider uses.
    pub fn credential_source(&self) -> &CredentialSource {
        self.auth.source()
    }

    /// The SSH host public keys the VM's guest agent published under the
    /// guest attribute path `hostkeys/`, as OpenSSH lines
    /// (`ssh-ed25519 AAAA…`).
    ///
    /// Empty when nothing is published (yet): the agent writes the keys a
    /// little after boot, and only when the instance's metadata sets
    /// `enable-guest-attributes = TRUE`. The API answers 404 then, which is
    /// not an error here. Anything the guest can write is only as
    /// trustworthy as the guest: these keys say which key the *VM* holds,
    /// which is what a man in the middle on the network cannot fake.
    pub async fn guest_host_keys(&self) -> Result<Vec<String>, CloudError> {
        let mut url = join_segments(&self.instance_url, &["getGuestAttributes"])?;
        url.query_pairs_mut()
            .append_pair("queryPath", HOST_KEYS_QUERY_PATH);
        let what = format!(
            "instances.getGuestAttributes `{}` (queryPath `{HOST_KEYS_QUERY_PATH}`)",
            self.resource_name()
        );
        let body = match self
            .call(
                &what,
                Method::GET,
                &url,
                Target::GuestAttributes,
                self.deadline(),
            )
            .await
        {
            Ok(body) => body,
            Err(CloudError::Api { status: 404, .. }) => {
                tracing::debug!(instance = %self.settings.instance, "no guest attributes under {HOST_KEYS_QUERY_PATH}");
                return Ok(Vec::new());
            }
            Err(e) => return Err(self.name_timeout(e, "reading the host keys of")),
        };
        parse_guest_host_keys(&body).map_err(|message| CloudError::Protocol {
            url: url.to_string(),
            message,
        })
    }

    /// `projects/{p}/zones/{z}/instances/{name}`, for messages.
    fn resource_name(&self) -> String {
        format!(
            "projects/{}/zones/{}/instances/{}",
            self.settings.project, self.settings.zone, self.settings.instance
        )
    }

    /// A timeout after failed attempts names the whole start or stop; its
    /// cause still names the request that kept failing. (A timeout without a
    /// cause already says what it waited for.)
    fn name_timeout(&self, e: CloudError, verb: &str) -> CloudError {
        match e {
            CloudError::Timeout {
                after,
                last: Some(last),
                ..
            } => CloudError::Timeout {
                what: format!("{verb} `{}`", self.resource_name()),
                after,
                last: Some(last),
            },
            e => e,
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.settings.backoff.deadline
    }

    async fn get_instance(&self, deadline: Instant) -> Result<InstanceInfo, CloudError> {
        let what = format!("instances.get `{}`", self.resource_name());
        let body = self
            .call(
                &what,
                Method::GET,
                &self.instance_url,
                Target::Instance,
                deadline,
            )
            .await?;
        parse_instance(&body, self.settings.address).map_err(|message| CloudError::Protocol {
            url: self.instance_url.to_string(),
            message,
        })
    }

    /// Brings the VM to the state `action` aims at, unless it is there or on
    /// its way; returns once the operation is `DONE`.
    async fn change(&self, want_running: bool) -> Result<(), CloudError> {
        let deadline = self.deadline();
        let mut polls = 0u32;
        loop {
            let info = self.get_instance(deadline).await?;
            let action = match plan(want_running, &info.raw_status) {
                Plan::Nothing => {
                    tracing::debug!(
                        instance = %self.settings.instance,
                        status = %info.raw_status,
                        "nothing to do"
                    );
                    return Ok(());
                }
                Plan::Act(action) => action,
                Plan::Settle => {
                    // STOPPING before a start, SUSPENDING before a resume:
                    // the API refuses to act until the VM has settled.
                    self.pause(&mut polls, deadline, &info.raw_status).await?;
                    continue;
                }
                Plan::Unsupported => {
                    return Err(CloudError::Protocol {
                        url: self.instance_url.to_string(),
                        message: format!(
                            "instance `{}` is in status `{}`, which absconda does not know how to {}",
                            self.settings.instance,
                            info.raw_status,
                            if want_running { "start" } else { "stop" }
                        ),
                    });
                }
            };
            // One id per decision, reused by the retries of this request.
            let mut url = join_segments(&self.instance_url, &[action.method()])?;
            url.query_pairs_mut()
                .append_pair("requestId", &new_request_id());
            let what = format!("instances.{} `{}`", action.method(), self.resource_name());
            let op = match self
                .call(&what, Method::POST, &url, Target::Instance, deadline)
                .await
            {
                Ok(op) => op,
                Err(err @ CloudError::Api { status, .. }) if (400..500).contains(&status) => {
                    // Another client may have acted between our get and our
                    // request (a conflict, resourceNotReady): accept that if
                    // the VM is on its way, and try again if it is between
                    // states.
                    let now = self.get_instance(deadline).await?;
                    let on_its_way = if want_running {
                        matches!(now.status, Status::Starting | Status::Running)
                    } else {
                        matches!(now.status, Status::Stopping | Status::Stopped)
                    };
                    if on_its_way {
                        tracing::debug!(error = %err, status = %now.raw_status, "{what} refused, but the VM is already on its way");
                        return Ok(());
                    }
                    if matches!(&err, CloudError::Api { code, .. } if code == "resourceNotReady") {
                        self.pause(&mut polls, deadline, &now.raw_status).await?;
                        continue;
                    }
                    return Err(err);
                }
                Err(e) => return Err(e),
            };
            let op = parse_operation(&op).map_err(|message| CloudError::Protocol {
                url: url.to_string(),
                message,
            })?;
            return self.wait_operation(op, deadline).await;
        }
    }

    /// Waits a little before looking at a VM that is between states again.
    async fn pause(
        &self,
        polls: &mut u32,
        deadline: Instant,
        status: &str,
    ) -> Result<(), CloudError> {
        settle_pause(
            self.settings.backoff,
            SETTLE_POLL_MAX,
            polls,
            deadline,
            || {
                format!(
                    "waiting for `{}` to leave status {status}",
                    self.settings.instance
                )
            },
        )
        .await
    }

    /// Calls `zoneOperations.wait` until the operation is `DONE`.
    async fn wait_operation(&self, mut op: Operation, deadline: Instant) -> Result<(), CloudError> {
        let mut early = 0u32;
        loop {
            if op.is_done() {
                return op.result();
            }
            let url = join_segments(&self.operations_url, &[&op.name, "wait"])?;
            let what = format!(
                "zoneOperations.wait `{}` ({})",
                op.name,
                op.operation_type.as_deref().unwrap_or("operation")
            );
            let asked = Instant::now();
            let body = self
                .call(&what, Method::POST, &url, Target::Operation, deadline)
                .await?;
            op = parse_operation(&body).map_err(|message| CloudError::Protocol {
                url: url.to_string(),
                message,
            })?;
            if op.is_done() {
                continue;
            }
            // `wait` may return at once when the server is busy; do not spin.
            if asked.elapsed() < Duration::from_secs(1) {
                let pause = self.settings.backoff.delay(early).min(SETTLE_POLL_MAX);
                if Instant::now() + pause >= deadline {
                    return Err(CloudError::Timeout {
                        what: format!("operation `{}` on `{}`", op.name, self.settings.instance),
                        after: self.settings.backoff.deadline,
                        last: None,
                    });
                }
                tokio::time::sleep(pause).await;
                early += 1;
            }
        }
    }

    /// One API call with retries, under `deadline`.
    async fn call(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        target: Target,
        deadline: Instant,
    ) -> Result<Value, CloudError> {
        self.call_with(what, method, url, target, deadline, None)
            .await
    }

    /// [`Gce::call`] with a JSON request body.
    async fn call_with(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        target: Target,
        deadline: Instant,
        body: Option<&Value>,
    ) -> Result<Value, CloudError> {
        with_retry_until(what, self.settings.backoff, deadline, || {
            self.send_once(what, method.clone(), url, target, body)
        })
        .await
    }

    async fn send_once(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        target: Target,
        body: Option<&Value>,
    ) -> Result<Value, CloudError> {
        let headers = self.auth.headers().await?;
        let timeout = if url.path().ends_with("/wait") {
            WAIT_REQUEST_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers)
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        } else if method == Method::POST {
            // Google answers 411 to a POST without a length.
            request = request.header(reqwest::header::CONTENT_LENGTH, "0");
        }
        let (status, headers, body) =
            super::exchange(request, url.as_str(), super::BODY_LIMIT).await?;
        let status = status.as_u16();
        let retry_after = parse_retry_after(&headers);
        let content_type = content_type(&headers);
        tracing::debug!(%method, %url, status, "compute API answered");
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| CloudError::Protocol {
                url: url.to_string(),
                message: format!(
                    "expected a JSON resource, got `{}` ({e}): {}",
                    content_type.as_deref().unwrap_or("no content type"),
                    snippet(&body)
                ),
            });
        }
        let operation = what.to_string();
        Err(
            match classify_error(status, &body, content_type.as_deref()) {
                Classified::Auth(message) => {
                    self.auth.auth_error(format!("HTTP {status}: {message}"))
                }
                Classified::NotFound if target == Target::Instance => CloudError::NotFound {
                    instance: self.resource_name(),
                },
                Classified::NotFound if target == Target::GuestAttributes => CloudError::Api {
                    service: "compute",
                    operation,
                    status,
                    code: "notFound".into(),
                    message: "no guest attributes are published under this path".into(),
                    retry_after,
                },
                Classified::NotFound if target == Target::Project => CloudError::Api {
                    service: "compute",
                    operation,
                    status,
                    code: "notFound".into(),
                    message: "no such project, or the credentials may not see it".into(),
                    retry_after,
                },
                Classified::NotFound => CloudError::Api {
                    service: "compute",
                    operation,
                    status,
                    code: "notFound".into(),
                    message: "the operation no longer exists".into(),
                    retry_after,
                },
                Classified::NotAnApi(message) => CloudError::Protocol {
                    url: url.to_string(),
                    message,
                },
                Classified::Api { code, message } => CloudError::Api {
                    service: "compute",
                    operation,
                    status,
                    code,
                    message,
                    retry_after,
                },
            },
        )
    }
}

impl Provider for Gce {
    fn kind(&self) -> &'static str {
        "gce"
    }

    async fn describe(&self) -> Result<InstanceInfo, CloudError> {
        self.get_instance(self.deadline()).await
    }

    async fn start(&self) -> Result<(), CloudError> {
        self.change(true)
            .await
            .map_err(|e| self.name_timeout(e, "starting"))
    }

    async fn stop(&self) -> Result<(), CloudError> {
        self.change(false)
            .await
            .map_err(|e| self.name_timeout(e, "stopping"))
    }
}

/// The metadata that decides how SSH keys reach a VM: the instance's own
/// items (with the fingerprint `setMetadata` needs) and the project's
/// common instance metadata, which instance items override.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshMetadata {
    pub instance: Vec<(String, String)>,
    pub fingerprint: Option<String>,
    /// `None` when the project could not be read (no `compute.projects.get`
    /// permission): then only the instance's items are known.
    pub project: Option<Vec<(String, String)>>,
}

impl SshMetadata {
    /// A metadata value as the guest sees it: the instance's item, else the
    /// project's.
    pub fn value(&self, key: &str) -> Option<&str> {
        fn find<'a>(items: &'a [(String, String)], key: &str) -> Option<&'a str> {
            items
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
        find(&self.instance, key).or_else(|| self.project.as_deref().and_then(|p| find(p, key)))
    }

    /// Whether a boolean metadata key is set to true (`TRUE`, `true`, `1`,
    /// `yes`, as the guest environment reads them).
    pub fn is_true(&self, key: &str) -> bool {
        self.value(key).is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "true" | "1" | "yes" | "y"
            )
        })
    }
}

/// How many times a `setMetadata` that lost a race with another writer is
/// tried again with a fresh fingerprint.
const METADATA_RACE_RETRIES: u32 = 8;

impl Gce {
    /// The instance's metadata items and fingerprint, and the project's
    /// common instance metadata (`projects.get`).
    pub async fn ssh_metadata(&self) -> Result<SshMetadata, CloudError> {
        let deadline = self.deadline();
        let (instance, fingerprint) = self.instance_metadata(deadline).await?;
        let project_url = join_segments(
            &api_base_of(&self.instance_url),
            &["projects", &self.settings.project],
        )?;
        let what = format!("projects.get `{}`", self.settings.project);
        let project = match self
            .call(&what, Method::GET, &project_url, Target::Project, deadline)
            .await
        {
            Ok(body) => Some(metadata_items(body.get("commonInstanceMetadata"))),
            Err(e @ (CloudError::Auth { .. } | CloudError::Api { .. })) => {
                tracing::debug!(
                    "cannot read the project's metadata, using the instance's only: {e}"
                );
                None
            }
            Err(e) => return Err(e),
        };
        Ok(SshMetadata {
            instance,
            fingerprint,
            project,
        })
    }

    async fn instance_metadata(
        &self,
        deadline: Instant,
    ) -> Result<(Vec<(String, String)>, Option<String>), CloudError> {
        let what = format!("instances.get `{}`", self.resource_name());
        let body = self
            .call(
                &what,
                Method::GET,
                &self.instance_url,
                Target::Instance,
                deadline,
            )
            .await?;
        let metadata = body.get("metadata");
        let fingerprint = metadata
            .and_then(|m| m.get("fingerprint"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((metadata_items(metadata), fingerprint))
    }

    /// Changes the instance's `ssh-keys` item with `update` (given the
    /// current value, it returns the new one, or `None` when nothing needs
    /// to change) through `instances.setMetadata`, sending the fingerprint
    /// read with it. When another writer changed the metadata in between
    /// (412 `conditionNotMet`), reads it again and reapplies `update`, so
    /// no other item or key is ever lost. Returns whether anything changed.
    pub async fn update_ssh_keys(
        &self,
        update: impl Fn(&str) -> Option<String>,
    ) -> Result<bool, CloudError> {
        let deadline = self.deadline();
        let mut races = 0u32;
        loop {
            let (mut items, fingerprint) = self.instance_metadata(deadline).await?;
            let current = items
                .iter()
                .find(|(k, _)| k == SSH_KEYS)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let Some(new) = update(&current) else {
                return Ok(false);
            };
            match items.iter_mut().find(|(k, _)| k == SSH_KEYS) {
                Some(item) => item.1 = new,
                None => items.push((SSH_KEYS.to_string(), new)),
            }
            let mut body = serde_json::json!({
                "kind": "compute#metadata",
                "items": items
                    .iter()
                    .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
                    .collect::<Vec<_>>(),
            });
            if let Some(f) = &fingerprint {
                body["fingerprint"] = Value::String(f.clone());
            }
            let mut url = join_segments(&self.instance_url, &["setMetadata"])?;
            url.query_pairs_mut()
                .append_pair("requestId", &new_request_id());
            let what = format!("instances.setMetadata `{}`", self.resource_name());
            let op = match self
                .call_with(
                    &what,
                    Method::POST,
                    &url,
                    Target::Instance,
                    deadline,
                    Some(&body),
                )
                .await
            {
                Ok(op) => op,
                Err(CloudError::Api { status: 412, .. }) if races < METADATA_RACE_RETRIES => {
                    // Someone else wrote the metadata since we read it.
                    races += 1;
                    tracing::debug!("metadata fingerprint was stale; reading it again");
                    continue;
                }
                Err(e) => return Err(self.name_timeout(e, "adding an SSH key to")),
            };
            let op = parse_operation(&op).map_err(|message| CloudError::Protocol {
                url: url.to_string(),
                message,
            })?;
            self.wait_operation(op, deadline).await?;
            return Ok(true);
        }
    }
}

/// One VM as `instances.aggregatedList` shows it, for picking a builder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListedInstance {
    pub zone: String,
    pub name: String,
    pub status: String,
    pub external_ip: Option<String>,
    pub internal_ip: Option<String>,
    /// `labels`, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// More pages than this for one project means something is wrong.
const MAX_LIST_PAGES: usize = 100;
/// `maxResults` of each page (the API's maximum).
const LIST_PAGE_SIZE: &str = "500";

impl Gce {
    /// A client for the project-wide calls of `project` only
    /// ([`Gce::aggregated_list`]): it names no zone or instance, so
    /// instance calls on it fail.
    pub fn for_project(
        project: &str,
        api_endpoint: Option<String>,
        backoff: Backoff,
    ) -> Result<Gce, CloudError> {
        Gce::new(GceSettings {
            project: project.to_string(),
            // `-` is the API's "every zone"; no instance has that name.
            zone: "-".into(),
            instance: "-".into(),
            api_endpoint,
            address: AddressKind::External,
            backoff,
        })
    }

    /// Every VM of the project in every zone (`instances.aggregatedList`,
    /// all pages), narrowed by `filter` (the API's filter expression, e.g.
    /// `labels.role = "builder"`), sorted by zone and name. Zones the API
    /// could not reach are named in the log and left out.
    pub async fn aggregated_list(
        &self,
        filter: Option<&str>,
    ) -> Result<Vec<ListedInstance>, CloudError> {
        let deadline = self.deadline();
        let base = join_segments(
            &api_base_of(&self.instance_url),
            &[
                "projects",
                &self.settings.project,
                "aggregated",
                "instances",
            ],
        )?;
        let what = format!(
            "instances.aggregatedList `projects/{}`",
            self.settings.project
        );
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut url = base.clone();
            {
                let mut q = url.query_pairs_mut();
                if let Some(f) = filter {
                    q.append_pair("filter", f);
                }
                q.append_pair("maxResults", LIST_PAGE_SIZE);
                q.append_pair("returnPartialSuccess", "true");
                if let Some(t) = &token {
                    q.append_pair("pageToken", t);
                }
            }
            let body = self
                .call(&what, Method::GET, &url, Target::Project, deadline)
                .await?;
            let page = parse_aggregated(&body).map_err(|message| CloudError::Protocol {
                url: url.to_string(),
                message,
            })?;
            for zone in &page.unreachables {
                tracing::warn!("instances.aggregatedList could not reach `{zone}`");
            }
            found.extend(page.instances);
            token = page.next_page_token;
            if token.is_none() {
                found.sort_by(|a, b| (&a.zone, &a.name).cmp(&(&b.zone, &b.name)));
                return Ok(found);
            }
        }
        Err(CloudError::Protocol {
            url: base.to_string(),
            message: format!("more than {MAX_LIST_PAGES} pages of instances"),
        })
    }
}

/// One page of `instances.aggregatedList`.
#[derive(Debug, Default)]
struct AggregatedPage {
    instances: Vec<ListedInstance>,
    next_page_token: Option<String>,
    unreachables: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AggregatedList {
    /// `zones/{zone}` → `{"instances": [...]}` or `{"warning": ...}`.
    #[serde(default)]
    items: serde_json::Map<String, Value>,
    next_page_token: Option<String>,
    #[serde(default)]
    unreachables: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ListedResource {
    name: String,
    status: Option<String>,
    #[serde(default, rename = "networkInterfaces")]
    network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

/// Reads an InstanceAggregatedList: instances keyed by their zone's scope.
fn parse_aggregated(body: &Value) -> Result<AggregatedPage, String> {
    let list = AggregatedList::deserialize(body)
        .map_err(|e| format!("not an InstanceAggregatedList: {e}"))?;
    let mut page = AggregatedPage {
        next_page_token: list.next_page_token.filter(|t| !t.is_empty()),
        unreachables: list.unreachables,
        ..Default::default()
    };
    for (scope, scoped) in list.items {
        let Some(zone) = scope.strip_prefix("zones/") else {
            continue;
        };
        let Some(instances) = scoped.get("instances") else {
            // A scope with nothing on this page carries only a `warning`.
            continue;
        };
        let instances = Vec::<ListedResource>::deserialize(instances)
            .map_err(|e| format!("`items.{scope}.instances`: {e}"))?;
        for i in instances {
            let nic = i.network_interfaces.first();
            page.instances.push(ListedInstance {
                zone: zone.to_string(),
                name: i.name,
                status: i.status.unwrap_or_default(),
                external_ip: nic
                    .and_then(|n| n.access_configs.first())
                    .and_then(|a| a.nat_ip.clone())
                    .filter(|a| !a.is_empty()),
                internal_ip: nic.and_then(|n| n.network_ip.clone()),
                labels: i.labels.into_iter().collect(),
            });
        }
    }
    Ok(page)
}

/// The metadata key the guest agent reads SSH keys from.
pub const SSH_KEYS: &str = "ssh-keys";

/// `items[]` of a Metadata resource as pairs; an item without a value is
/// an empty string.
fn metadata_items(metadata: Option<&Value>) -> Vec<(String, String)> {
    metadata
        .and_then(|m| m.get("items"))
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    let key = i.get("key")?.as_str()?.to_string();
                    let value = i
                        .get("value")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    Some((key, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `.../compute/v1` from an instance URL.
fn api_base_of(instance_url: &Url) -> Url {
    let mut url = instance_url.clone();
    let path = url.path().to_string();
    let base = match path.find("/projects/") {
        Some(i) => &path[..i],
        None => path.as_str(),
    };
    url.set_path(base);
    url
}

/// `{endpoint}/compute/v1`, checked.
fn api_base(endpoint: &str) -> Result<Url, CloudError> {
    let bad = |why: String| CloudError::Config {
        message: format!("GCE `api_endpoint` `{endpoint}` {why}"),
    };
    let url = Url::parse(endpoint).map_err(|e| bad(format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must be an http or https URL".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("must not have a query, fragment or user".into()));
    }
    // Accept the full API root too: it is an easy mistake to make.
    if url.path().trim_end_matches('/').ends_with("/compute/v1") {
        let mut url = url;
        let path = url.path().trim_end_matches('/').to_string();
        url.set_path(&path);
        return Ok(url);
    }
    join_segments(&url, &["compute", "v1"])
}

/// Appends path segments, percent-encoding each one.
fn join_segments(base: &Url, segments: &[&str]) -> Result<Url, CloudError> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| CloudError::Config {
            message: format!("`{base}` cannot be a base URL"),
        })?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// A random UUID (version 4) for `requestId`.
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Maps every status of the compute v1 reference (and the newer ones the
/// client libraries list) to the normalised [`Status`].
pub fn map_status(raw: &str) -> Status {
    match raw {
        // PENDING: a flex-start VM waiting for capacity.
        "PROVISIONING" | "STAGING" | "REPAIRING" | "PENDING" => Status::Starting,
        "RUNNING" => Status::Running,
        "STOPPING" | "SUSPENDING" | "PENDING_STOP" | "DEPROVISIONING" => Status::Stopping,
        // A stopped VM reports TERMINATED.
        "TERMINATED" | "STOPPED" | "SUSPENDED" => Status::Stopped,
        _ => Status::Unknown,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Already there or on the way.
    Nothing,
    Act(Action),
    /// In a transition the API will not interrupt; poll again.
    Settle,
    Unsupported,
}

fn plan(want_running: bool, raw: &str) -> Plan {
    if want_running {
        match raw {
            "PROVISIONING" | "STAGING" | "RUNNING" | "REPAIRING" | "PENDING" => Plan::Nothing,
            "TERMINATED" | "STOPPED" => Plan::Act(Action::Start),
            "SUSPENDED" => Plan::Act(Action::Resume),
            "STOPPING" | "SUSPENDING" | "PENDING_STOP" | "DEPROVISIONING" => Plan::Settle,
            _ => Plan::Unsupported,
        }
    } else {
        match raw {
            // A suspended VM costs no compute; stopping it would throw its
            // memory away, so leave it.
            "TERMINATED" | "STOPPED" | "STOPPING" | "SUSPENDED" | "SUSPENDING" | "PENDING_STOP"
            | "DEPROVISIONING" => Plan::Nothing,
            "PROVISIONING" | "STAGING" | "RUNNING" | "REPAIRING" | "PENDING" => {
                Plan::Act(Action::Stop)
            }
            _ => Plan::Unsupported,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceResource {
    name: String,
    status: Option<String>,
    #[serde(default)]
    network_interfaces: Vec<NetworkInterface>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkInterface {
    #[serde(rename = "networkIP")]
    network_ip: Option<String>,
    #[serde(default)]
    access_configs: Vec<AccessConfig>,
}

#[derive(Debug, Deserialize)]
struct AccessConfig {
    #[serde(rename = "natIP")]
    nat_ip: Option<String>,
}

/// Reads an Instance resource.
fn parse_instance(body: &Value, address: AddressKind) -> Result<InstanceInfo, String> {
    let instance = InstanceResource::deserialize(body)
        .map_err(|e| format!("not an Instance resource: {e}"))?;
    let raw_status = instance.status.unwrap_or_default();
    let nic = instance.network_interfaces.first();
    let address = match address {
        AddressKind::External => nic
            .and_then(|n| n.access_configs.first())
            .and_then(|a| a.nat_ip.clone()),
        AddressKind::Internal => nic.and_then(|n| n.network_ip.clone()),
    }
    .filter(|a| !a.is_empty());
    Ok(InstanceInfo {
        id: instance.name,
        status: map_status(&raw_status),
        raw_status,
        address,
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Operation {
    name: String,
    status: Option<String>,
    operation_type: Option<String>,
    error: Option<OperationError>,
    http_error_status_code: Option<u16>,
    http_error_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OperationError {
    #[serde(default)]
    errors: Vec<OperationErrorItem>,
}

#[derive(Debug, Deserialize)]
struct OperationErrorItem {
    code: Option<String>,
    message: Option<String>,
}

impl Operation {
    fn is_done(&self) -> bool {
        self.status.as_deref() == Some("DONE")
    }

    /// The outcome of a `DONE` operation.
    fn result(&self) -> Result<(), CloudError> {
        let Some(error) = &self.error else {
            return Ok(());
        };
        let mut parts: Vec<String> = error
            .errors
            .iter()
            .map(|e| match (&e.code, &e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => "unknown error".into(),
            })
            .collect();
        if parts.is_empty() {
            parts.push(
                match (self.http_error_status_code, &self.http_error_message) {
                    (Some(c), Some(m)) => format!("HTTP {c} {m}"),
                    _ => "the operation reported an error without details".into(),
                },
            );
        }
        Err(CloudError::OperationFailed {
            operation: format!(
                "{} ({})",
                self.name,
                self.operation_type.as_deref().unwrap_or("operation")
            ),
            message: parts.join("; "),
        })
    }
}

fn parse_operation(body: &Value) -> Result<Operation, String> {
    let op = Operation::deserialize(body).map_err(|e| format!("not an Operation resource: {e}"))?;
    if op.name.is_empty() || op.name.contains('/') {
        return Err(format!("operation name `{}` is not usable", op.name));
    }
    Ok(op)
}

/// A GuestAttributes resource: `{"kind": "compute#guestAttributes",
/// "queryPath": "hostkeys/", "queryValue": {"items": [{"namespace",
/// "key", "value"}]}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GuestAttributes {
    query_value: Option<GuestAttributesValue>,
}

#[derive(Debug, Deserialize)]
struct GuestAttributesValue {
    #[serde(default)]
    items: Vec<GuestAttributesEntry>,
}

#[derive(Debug, Deserialize)]
struct GuestAttributesEntry {
    namespace: Option<String>,
    key: Option<String>,
    value: Option<String>,
}

/// The OpenSSH lines of the `hostkeys/` entries. The guest agent writes the
/// key type as the entry's key and the base64 key alone as its value; a
/// value that is a whole `type base64 [comment]` line (as some hand-written
/// startup scripts publish) is accepted too. Entries of other namespaces
/// and empty ones are skipped; whether a line is a valid key is for the SSH
/// layer to decide.
fn parse_guest_host_keys(body: &Value) -> Result<Vec<String>, String> {
    let attrs = GuestAttributes::deserialize(body)
        .map_err(|e| format!("not a GuestAttributes resource: {e}"))?;
    let namespace = HOST_KEYS_QUERY_PATH.trim_end_matches('/');
    let mut lines = Vec::new();
    for item in attrs.query_value.map(|v| v.items).unwrap_or_default() {
        if item.namespace.as_deref().is_some_and(|n| n != namespace) {
            continue;
        }
        let key = item.key.unwrap_or_default();
        let value = item.value.unwrap_or_default();
        let mut fields = value.split_whitespace();
        let line = match (fields.next(), fields.next()) {
            (Some(algorithm), Some(data)) => format!("{algorithm} {data}"),
            (Some(data), None) if !key.trim().is_empty() => format!("{} {data}", key.trim()),
            _ => continue,
        };
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Google's error body: `{"error": {"code", "message", "status", "errors": [{"reason"}]}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: GoogleError,
}

#[derive(Debug, Deserialize)]
struct GoogleError {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    errors: Vec<GoogleErrorItem>,
}

#[derive(Debug, Deserialize)]
struct GoogleErrorItem {
    reason: Option<String>,
}

/// An error answer, sorted by what the caller should do about it.
#[derive(Debug, PartialEq, Eq)]
enum Classified {
    Auth(String),
    NotFound,
    /// The answer did not come from the compute API (an HTML page).
    NotAnApi(String),
    Api {
        code: String,
        message: String,
    },
}

const RATE_LIMIT_REASONS: [&str; 2] = ["rateLimitExceeded", "userRateLimitExceeded"];

fn classify_error(status: u16, body: &[u8], content_type: Option<&str>) -> Classified {
    let parsed = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let Some(error) = parsed else {
        let described = format!(
            "HTTP {status} with a non-JSON body ({}): {}",
            content_type.unwrap_or("no content type"),
            snippet(body)
        );
        return match status {
            401 | 403 => Classified::Auth(described),
            // An HTML 404 is a wrong URL (`api_endpoint`, a proxy), not a
            // missing VM.
            404 => Classified::NotAnApi(format!(
                "{described}; hint: check the GCE `api_endpoint` (it is the URL before `/compute/v1`)"
            )),
            _ => Classified::Api {
                code: format!("HTTP {status}"),
                message: described,
            },
        };
    };
    let reasons: Vec<&str> = error
        .errors
        .iter()
        .filter_map(|e| e.reason.as_deref())
        .collect();
    let rate_limited = reasons.iter().find(|r| RATE_LIMIT_REASONS.contains(r));
    let message = error.message.clone().unwrap_or_else(|| snippet(body));
    if let Some(reason) = rate_limited {
        return Classified::Api {
            code: (*reason).to_string(),
            message,
        };
    }
    match status {
        401 | 403 => return Classified::Auth(message),
        404 => return Classified::NotFound,
        _ => {}
    }
    let code = error
        .status
        .clone()
        .or_else(|| reasons.first().map(|r| r.to_string()))
        .unwrap_or_else(|| format!("HTTP {status}"));
    Classified::Api { code, message }
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
}

/// The start of a body, on one line, for messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(160).collect();
    if flat.chars().count() > 160 {
        out.push('…');
    }
    if out.is_empty() {
        out.push_str("(empty body)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aggregated_list_pages_are_read_by_zone_scope() {
        let page = parse_aggregated(&json!({
            "kind": "compute#instanceAggregatedList",
            "items": {
                "zones/us-central1-a": {"instances": [{
                    "name": "b", "status": "RUNNING",
                    "labels": {"role": "builder", "env": "ci"},
                    "networkInterfaces": [{"networkIP": "10.0.0.2",
                        "accessConfigs": [{"natIP": "34.1.2.3"}]}]
                }]},
                "zones/europe-west1-b": {"warning": {"code": "NO_RESULTS_ON_PAGE"}},
                "regions/us-central1": {"instances": [{"name": "not-a-zone"}]}
            },
            "nextPageToken": "tok",
            "unreachables": ["zones/asia-east1-a"]
        }))
        .unwrap();
        assert_eq!(page.next_page_token.as_deref(), Some("tok"));
        assert_eq!(page.unreachables, ["zones/asia-east1-a"]);
        assert_eq!(
            page.instances,
            [ListedInstance {
                zone: "us-central1-a".into(),
                name: "b".into(),
                status: "RUNNING".into(),
                external_ip: Some("34.1.2.3".into()),
                internal_ip: Some("10.0.0.2".into()),
                labels: vec![
                    ("env".into(), "ci".into()),
                    ("role".into(), "builder".into())
                ],
            }]
        );
        let last = parse_aggregated(&json!({"items": {}, "nextPageToken": ""})).unwrap();
        assert!(last.next_page_token.is_none() && last.instances.is_empty());
        assert!(parse_aggregated(&json!({"items": {"zones/a": {"instances": [{}]}}})).is_err());
    }

    #[test]
    fn every_reference_status_is_mapped() {
        let table = [
            ("PROVISIONING", Status::Starting),
            ("STAGING", Status::Starting),
            ("RUNNING", Status::Running),
            ("STOPPING", Status::Stopping),
            ("STOPPED", Status::Stopped),
            ("SUSPENDING", Status::Stopping),
            ("SUSPENDED", Status::Stopped),
            ("REPAIRING", Status::Starting),
            ("TERMINATED", Status::Stopped),
            ("PENDING", Status::Starting),
            ("PENDING_STOP", Status::Stopping),
            ("DEPROVISIONING", Status::Stopping),
            ("", Status::Unknown),
            ("EXPLODED", Status::Unknown),
        ];
        for (raw, want) in table {
            assert_eq!(map_status(raw), want, "{raw}");
        }
    }

    #[test]
    fn start_and_stop_plans() {
        use Action::*;
        let table = [
            ("TERMINATED", Plan::Act(Start), Plan::Nothing),
            ("STOPPED", Plan::Act(Start), Plan::Nothing),
            ("SUSPENDED", Plan::Act(Resume), Plan::Nothing),
            ("RUNNING", Plan::Nothing, Plan::Act(Stop)),
            ("STAGING", Plan::Nothing, Plan::Act(Stop)),
            ("PROVISIONING", Plan::Nothing, Plan::Act(Stop)),
            ("REPAIRING", Plan::Nothing, Plan::Act(Stop)),
            ("STOPPING", Plan::Settle, Plan::Nothing),
            ("SUSPENDING", Plan::Settle, Plan::Nothing),
            ("WEIRD", Plan::Unsupported, Plan::Unsupported),
        ];
        for (raw, start, stop) in table {
            assert_eq!(plan(true, raw), start, "start from {raw}");
            assert_eq!(plan(false, raw), stop, "stop from {raw}");
        }
    }

    fn instance(status: &str, nat: Option<&str>) -> Value {
        let mut access = json!({"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT", "name": "External NAT", "networkTier": "PREMIUM"});
        if let Some(ip) = nat {
            access["natIP"] = json!(ip);
        }
        json!({
            "kind": "compute#instance",
            "id": "1234567890123456789",
            "name": "builder",
            "status": status,
            "zone": "https://www.googleapis.com/compute/v1/projects/p/zones/us-central1-a",
            "networkInterfaces": [{
                "kind": "compute#networkInterface",
                "name": "nic0",
                "networkIP": "10.128.0.7",
                "accessConfigs": [access]
            }]
        })
    }

    #[test]
    fn instance_addresses() {
        let running = instance("RUNNING", Some("34.1.2.3"));
        let info = parse_instance(&running, AddressKind::External).unwrap();
        assert_eq!(info.id, "builder");
        assert_eq!(info.status, Status::Running);
        assert_eq!(info.raw_status, "RUNNING");
        assert_eq!(info.address.as_deref(), Some("34.1.2.3"));
        let info = parse_instance(&running, AddressKind::Internal).unwrap();
        assert_eq!(info.address.as_deref(), Some("10.128.0.7"));

        let stopped = instance("TERMINATED", None);
        let info = parse_instance(&stopped, AddressKind::External).unwrap();
        assert_eq!(info.status, Status::Stopped);
        assert_eq!(info.address, None);

        let bare = json!({"name": "x", "status": "RUNNING"});
        assert_eq!(
            parse_instance(&bare, AddressKind::External)
                .unwrap()
                .address,
            None
        );
        assert!(parse_instance(&json!({"status": "RUNNING"}), AddressKind::External).is_err());
        assert!(parse_instance(&json!([1, 2]), AddressKind::External).is_err());
    }

    #[test]
    fn operation_errors_are_surfaced() {
        let done = parse_operation(&json!({
            "kind": "compute#operation", "id": "1", "name": "operation-1-abc",
            "operationType": "start", "status": "DONE", "progress": 100
        }))
        .unwrap();
        assert!(done.is_done());
        assert!(done.result().is_ok());

        let failed = parse_operation(&json!({
            "name": "operation-2", "operationType": "start", "status": "DONE",
            "httpErrorStatusCode": 503, "httpErrorMessage": "SERVICE UNAVAILABLE",
            "error": {"errors": [
                {"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "The zone does not have enough resources"},
                {"code": "QUOTA_EXCEEDED"}
            ]}
        }))
        .unwrap();
        let err = failed.result().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CloudError::OperationFailed { .. }));
        assert!(
            text.contains("ZONE_RESOURCE_POOL_EXHAUSTED: The zone does not have enough resources"),
            "{text}"
        );
        assert!(text.contains("QUOTA_EXCEEDED"), "{text}");
        assert!(text.contains("operation-2 (start)"), "{text}");

        let running = parse_operation(&json!({"name": "op", "status": "RUNNING"})).unwrap();
        assert!(!running.is_done());
        assert!(parse_operation(&json!({"name": "../x"})).is_err());
        assert!(parse_operation(&json!({"status": "DONE"})).is_err());
    }

    #[test]
    fn guest_host_keys_are_read() {
        let ed = "AAAAC3NzaC1lZDI1NTE5AAAAIDH4N0673+8lz5tj14CZrNA9OPGl37HV458CH8t1jVuG";
        let body = json!({
            "kind": "compute#guestAttributes",
            "queryPath": "hostkeys/",
            "queryValue": {"items": [
                {"namespace": "hostkeys", "key": "ssh-ed25519", "value": ed},
                {"namespace": "hostkeys", "key": "ecdsa-sha2-nistp256", "value": "ecdsa-sha2-nistp256 AAAAE2Vj root@host"},
                {"namespace": "hostkeys", "key": "ssh-rsa", "value": ""},
                {"namespace": "other", "key": "ssh-dss", "value": "AAAAB3"},
                {"namespace": "hostkeys", "key": "ssh-ed25519", "value": ed}
            ]},
            "selfLink": "https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/i/guestAttributes/hostkeys/"
        });
        assert_eq!(
            parse_guest_host_keys(&body).unwrap(),
            vec![
                format!("ssh-ed25519 {ed}"),
                "ecdsa-sha2-nistp256 AAAAE2Vj".to_string()
            ]
        );
        // No items at all (an empty namespace) is no keys, not an error.
        let empty =
            json!({"kind": "compute#guestAttributes", "queryPath": "hostkeys/", "queryValue": {}});
        assert!(parse_guest_host_keys(&empty).unwrap().is_empty());
        let bare = json!({"kind": "compute#guestAttributes", "queryPath": "hostkeys/"});
        assert!(parse_guest_host_keys(&bare).unwrap().is_empty());
        assert!(parse_guest_host_keys(&json!([1])).is_err());
    }

    #[test]
    fn google_errors_are_classified() {
        let not_found = br#"{"error":{"code":404,"message":"The resource 'projects/p/zones/z/instances/x' was not found","errors":[{"message":"The resource 'projects/p/zones/z/instances/x' was not found","domain":"global","reason":"notFound"}]}}"#;
        assert_eq!(
            classify_error(404, not_found, Some("application/json")),
            Classified::NotFound
        );

        let denied = br#"{"error":{"code":403,"message":"Required 'compute.instances.start' permission","errors":[{"reason":"forbidden"}],"status":"PERMISSION_DENIED"}}"#;
        assert!(
            matches!(classify_error(403, denied, None), Classified::Auth(m) if m.contains("compute.instances.start"))
        );

        let unauth = br#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
        assert!(matches!(
            classify_error(401, unauth, None),
            Classified::Auth(_)
        ));

        let rate = br#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"reason":"rateLimitExceeded"}],"status":"PERMISSION_DENIED"}}"#;
        let c = classify_error(403, rate, None);
        assert_eq!(
            c,
            Classified::Api {
                code: "rateLimitExceeded".into(),
                message: "Rate Limit Exceeded".into()
            }
        );

        let unavailable = br#"{"error":{"code":503,"message":"The service is currently unavailable.","errors":[{"reason":"backendError"}],"status":"UNAVAILABLE"}}"#;
        assert_eq!(
            classify_error(503, unavailable, None),
            Classified::Api {
                code: "UNAVAILABLE".into(),
                message: "The service is currently unavailable.".into()
            }
        );
        let reason_only =
            br#"{"error":{"code":400,"message":"bad","errors":[{"reason":"resourceNotReady"}]}}"#;
        assert!(
            matches!(classify_error(400, reason_only, None), Classified::Api { code, .. } if code == "resourceNotReady")
        );
    }

    #[test]
    fn non_json_answers_are_clear() {
        let html = b"<!DOCTYPE html>\n<html lang=en>\n  <title>Error 404 (Not Found)!!1</title>";
        match classify_error(404, html, Some("text/html")) {
            Classified::NotAnApi(m) => {
                assert!(m.contains("non-JSON"), "{m}");
                assert!(m.contains("text/html"), "{m}");
                assert!(m.contains("api_endpoint"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(classify_error(502, b"<html>bad gateway</html>", Some("text/html")), Classified::Api { code, .. } if code == "HTTP 502")
        );
        assert!(matches!(
            classify_error(401, b"", None),
            Classified::Auth(_)
        ));
        assert!(matches!(
            classify_error(500, b"{\"error\": 5}", None),
            Classified::Api { .. }
        ));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert(RETRY_AFTER, later.parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn urls_are_built_and_checked() {
        let base = api_base("http://127.0.0.1:8080").unwrap();
        assert_eq!(base.as_str(), "http://127.0.0.1:8080/compute/v1");
        let base = api_base("https://private.example.com/gce/").unwrap();
        assert_eq!(base.as_str(), "https://private.example.com/gce/compute/v1");
        let url = join_segments(&base, &["projects", "my proj", "zones", "z"]).unwrap();
        assert_eq!(url.path(), "/gce/compute/v1/projects/my%20proj/zones/z");
        assert!(matches!(
            api_base("ftp://x"),
            Err(CloudError::Config { .. })
        ));
        assert!(matches!(
            api_base("not a url"),
            Err(CloudError::Config { .. })
        ));
        assert!(matches!(
            api_base("https://u:p@x"),
            Err(CloudError::Config { .. })
        ));
    }

    #[test]
    fn request_ids_are_uuids() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn settings_are_validated() {
        let auth =
            GcpAuth::from_lookup(|k| (k == "GCE_METADATA_HOST").then(|| "127.0.0.1:9".into()))
                .unwrap();
        let settings = GceSettings {
            project: "p".into(),
            zone: "z".into(),
            instance: "a/b".into(),
            api_endpoint: None,
            address: AddressKind::External,
            backoff: Backoff::default(),
        };
        assert!(matches!(
            Gce::with_auth(settings, auth),
            Err(CloudError::Config { .. })
        ));
    }

    #[test]
    fn address_kind_reads_from_config() {
        #[derive(Deserialize)]
        struct C {
            address: AddressKind,
        }
        let c: C = serde_json::from_str(r#"{"address":"internal"}"#).unwrap();
        assert_eq!(c.address, AddressKind::Internal);
        let c: C = serde_json::from_str(r#"{"address":"external"}"#).unwrap();
        assert_eq!(c.address, AddressKind::External);
    }
}
