//! Azure builders through the Azure Resource Manager REST API, without the
//! `az` CLI.
//!
//! `virtualMachines.get` with `$expand=instanceView` gives the power state
//! (`PowerState/running`, `…/deallocated`, …) and the network interfaces;
//! `virtualMachines.start` and `virtualMachines.deallocate` change it. A stop
//! is always a deallocation: a VM that is only powered off (`stopped`) keeps
//! its compute allocated and billed, so stopping it deallocates it too.
//!
//! Start and deallocate are long-running operations: ARM answers 202 with an
//! `Azure-AsyncOperation` URL (polled until its `status` is `Succeeded`,
//! `Failed` or `Canceled`) or else a `Location` URL (polled until it stops
//! answering 202), each poll after the `Retry-After` the server asked for.
//! Poll URLs are only followed on the API's own origin, so the token never
//! goes anywhere else.
//!
//! A 409 Conflict (another operation is running on the VM) is handled by
//! looking at the VM again: accepted when it is already heading the right way,
//! otherwise tried again once it has settled. 429 and 5xx are retried with
//! backoff and `Retry-After` under the deadline of `AzureSettings::backoff`.
//!
//! The address comes from the primary network interface: the `ipAddress` of
//! the public IP resource its primary IP configuration points to, or its
//! `privateIPAddress` with `address: internal`.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER};
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::azure_auth::{AzureAuth, AzureCredentialSource};
use super::gce::AddressKind;
use super::retry::{Backoff, settle_pause, with_retry, with_retry_until};
use super::{CloudError, InstanceInfo, Provider, Status};

/// Azure Resource Manager's public endpoint.
pub const DEFAULT_API_ENDPOINT: &str = "https://management.azure.com";
/// `Microsoft.Compute` API version (virtualMachines get/start/deallocate/instanceView).
pub const COMPUTE_API_VERSION: &str = "2024-07-01";
/// `Microsoft.Network` API version (networkInterfaces, publicIPAddresses).
pub const NETWORK_API_VERSION: &str = "2024-05-01";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls when the server gives no `Retry-After`.
const POLL_DEFAULT: Duration = Duration::from_secs(2);
/// Longest pause between polls, whatever `Retry-After` says.
const POLL_MAX: Duration = Duration::from_secs(30);
const SETTLE_POLL_MAX: Duration = Duration::from_secs(2);
/// How long an accepted start or deallocate may take to finish: Azure
/// often needs a minute or two, more than the deadline of a single call.
const OPERATION_DEADLINE: Duration = Duration::from_secs(900);
/// How much of the end of the serial log is searched for host keys.
const MAX_SERIAL_LOG: usize = 1 << 20;

/// Everything needed to reach one builder VM.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    pub subscription_id: String,
    pub resource_group: String,
    pub vm_name: String,
    /// The ARM base URL; [`DEFAULT_API_ENDPOINT`] when unset.
    pub api_endpoint: Option<String>,
    pub address: AddressKind,
    /// Retries and the deadline of each `describe`, `start` and `stop`.
    pub backoff: Backoff,
}

/// An Azure VM driven through ARM.
#[derive(Debug)]
pub struct Azure {
    settings: AzureSettings,
    /// The endpoint, without a trailing slash.
    base: Url,
    /// `{base}/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm}`
    vm_url: Url,
    http: reqwest::Client,
    auth: AzureAuth,
    /// ARM refused a token with 401: a cached token revoked or expired early
    /// gets one more try with a fresh one.
    refused: std::sync::atomic::AtomicBool,
}

/// One answer of ARM.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Deallocate,
}

impl Action {
    fn method(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Deallocate => "deallocate",
        }
    }
}

enum Plan {
    Nothing,
    Act(Action),
    Settle,
}

/// What to do to bring a VM in power state `raw` where we want it.
fn plan(want_running: bool, raw: &str) -> Plan {
    match (want_running, raw) {
        (true, "running" | "starting") => Plan::Nothing,
        (true, "stopped" | "deallocated") => Plan::Act(Action::Start),
        (false, "deallocated" | "deallocating") => Plan::Nothing,
        // A powered-off VM is still allocated and billed: deallocate it.
        (false, "running" | "starting" | "stopped") => Plan::Act(Action::Deallocate),
        _ => Plan::Settle,
    }
}

/// Maps the `PowerState/…` codes of the instance view to [`Status`].
pub fn map_power_state(raw: &str) -> Status {
    match raw {
        "starting" => Status::Starting,
        "running" => Status::Running,
        "stopping" | "deallocating" => Status::Stopping,
        "stopped" | "deallocated" => Status::Stopped,
        _ => Status::Unknown,
    }
}

impl Azure {
    /// A provider with credentials from the environment.
    pub fn new(settings: AzureSettings, authority_host: Option<&str>) -> Result<Azure, CloudError> {
        Azure::with_auth(settings, AzureAuth::from_env(authority_host)?)
    }

    pub fn with_auth(settings: AzureSettings, auth: AzureAuth) -> Result<Azure, CloudError> {
        let endpoint = settings
            .api_endpoint
            .as_deref()
            .unwrap_or(DEFAULT_API_ENDPOINT);
        let bad = |why: String| CloudError::Config {
            message: format!("Azure `api_endpoint` `{endpoint}` {why}"),
        };
        let mut base = Url::parse(endpoint).map_err(|e| bad(format!("is not a URL ({e})")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("must be an http or https URL".into()));
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(bad("must not have a query, fragment or user".into()));
        }
        let path = base.path().trim_end_matches('/').to_string();
        base.set_path(&path);
        for (what, value) in [
            ("subscription_id", &settings.subscription_id),
            ("resource_group", &settings.resource_group),
            ("vm_name", &settings.vm_name),
        ] {
            if value.is_empty() || value.contains(['/', '?', '#']) {
                return Err(CloudError::Config {
                    message: format!(
                        "Azure `{what}` `{value}` is empty or contains `/`, `?` or `#`"
                    ),
                });
            }
        }
        let mut vm_url = base.clone();
        vm_url
            .path_segments_mut()
            .map_err(|_| bad("cannot be a base URL".into()))?
            .pop_if_empty()
            .extend([
                "subscriptions",
                &settings.subscription_id,
                "resourceGroups",
                &settings.resource_group,
                "providers",
                "Microsoft.Compute",
                "virtualMachines",
                &settings.vm_name,
            ]);
        let mut builder = super::http::builder()?
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            // Poll URLs are followed by hand, after an origin check.
            .redirect(reqwest::redirect::Policy::none());
        if is_loopback(&base) {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CloudError::Transport {
            url: endpoint.to_string(),
            source: Box::new(e),
        })?;
        Ok(Azure {
            settings,
            base,
            vm_url,
            http,
            auth,
            refused: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn settings(&self) -> &AzureSettings {
        &self.settings
    }

    pub fn credential_source(&self) -> &AzureCredentialSource {
        self.auth.source()
    }

    /// The VM's ARM resource id, as the instance metadata service reports it
    /// in `compute/resourceId`.
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.settings.subscription_id, self.settings.resource_group, self.settings.vm_name
        )
    }

    /// The `SHA256:` host key fingerprints the VM printed on its serial
    /// console (cloud-init's, or absconda's own block), read from the boot
    /// diagnostics serial log through `retrieveBootDiagnosticsData`. Empty
    /// when boot diagnostics are off or nothing is printed yet.
    pub async fn serial_log_host_key_fingerprints(&self) -> Result<Vec<String>, CloudError> {
        let deadline = self.deadline();
        let mut url = self.vm_url.clone();
        url.path_segments_mut()
            .map_err(|_| CloudError::Config {
                message: "the API endpoint cannot be a base URL".into(),
            })?
            .push("retrieveBootDiagnosticsData");
        let mut url = Azure::with_version(&url, COMPUTE_API_VERSION);
        url.query_pairs_mut()
            .append_pair("sasUriExpirationTimeInMinutes", "5");
        let what = format!(
            "virtualMachines.retrieveBootDiagnosticsData `{}`",
            self.resource_id()
        );
        let answer = match self.call(&what, Method::POST, &url, false, deadline).await {
            Ok(a) => a,
            Err(e @ CloudError::Api { status, .. }) if (400..500).contains(&status) => {
                tracing::debug!(error = %e, "no boot diagnostics");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let Some(blob) = answer.body["serialConsoleLogBlobUri"].as_str() else {
            return Ok(Vec::new());
        };
        let blob = Url::parse(blob).map_err(|e| CloudError::Protocol {
            url: url.to_string(),
            message: format!("`serialConsoleLogBlobUri` is not a URL: {e}"),
        })?;
        // A SAS URL: it carries its own authorization, so no token is sent.
        let mut shown = blob.clone();
        shown.set_query(None);
        let text = with_retry(
            &format!("reading the serial log `{shown}`"),
            self.settings.backoff,
            || async {
                let r = self
                    .http
                    .get(blob.clone())
                    .timeout(REQUEST_TIMEOUT)
                    .send()
                    .await
                    .map_err(|e| CloudError::Transport {
                        url: shown.to_string(),
                        source: Box::new(e.without_url()),
                    })?;
                let status = r.status().as_u16();
                let retry = retry_after(r.headers());
                let bytes = r.bytes().await.map_err(|e| CloudError::Transport {
                    url: shown.to_string(),
                    source: Box::new(e.without_url()),
                })?;
                if status == 404 {
                    return Ok(String::new());
                }
                if !(200..300).contains(&status) {
                    return Err(CloudError::Api {
                        service: "Azure Storage",
                        operation: format!("reading the serial log `{shown}`"),
                        status,
                        code: format!("HTTP {status}"),
                        message: snippet(&bytes),
                        retry_after: retry,
                    });
                }
                // Only the tail matters, and it must fit in memory.
                let tail = &bytes[bytes.len().saturating_sub(MAX_SERIAL_LOG)..];
                Ok(String::from_utf8_lossy(tail).into_owned())
            },
        )
        .await?;
        Ok(super::ec2::host_key_fingerprints_in_console(&text))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.settings.backoff.deadline
    }

    fn with_version(url: &Url, version: &str) -> Url {
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("api-version", version);
        url
    }

    /// `{base}{id}?api-version=…` for a resource id ARM returned.
    fn resource_url(&self, id: &str, version: &str) -> Result<Url, CloudError> {
        if !id.starts_with("/subscriptions/") || id.contains("..") || id.contains(['?', '#']) {
            return Err(CloudError::Protocol {
                url: self.vm_url.to_string(),
                message: format!("`{id}` is not an ARM resource id"),
            });
        }
        let url = Url::parse(&format!("{}{id}", self.base.as_str().trim_end_matches('/')))
            .map_err(|e| CloudError::Protocol {
                url: self.vm_url.to_string(),
                message: format!("resource id `{id}`: {e}"),
            })?;
        Ok(Azure::with_version(&url, version))
    }

    /// The VM with its instance view.
    async fn get_vm(&self, deadline: Instant) -> Result<(Value, String), CloudError> {
        let mut url = Azure::with_version(&self.vm_url, COMPUTE_API_VERSION);
        url.query_pairs_mut().append_pair("$expand", "instanceView");
        let what = format!("virtualMachines.get `{}`", self.resource_id());
        let vm = self
            .call(&what, Method::GET, &url, true, deadline)
            .await?
            .body;
        let statuses = match vm["properties"]["instanceView"]["statuses"].as_array() {
            Some(s) => s.clone(),
            None => {
                // Not expanded: ask for the instance view itself.
                let mut iv = self.vm_url.clone();
                iv.path_segments_mut()
                    .map_err(|_| CloudError::Config {
                        message: "the API endpoint cannot be a base URL".into(),
                    })?
                    .push("instanceView");
                let iv = Azure::with_version(&iv, COMPUTE_API_VERSION);
                let what = format!("virtualMachines.instanceView `{}`", self.resource_id());
                let body = self
                    .call(&what, Method::GET, &iv, true, deadline)
                    .await?
                    .body;
                body["statuses"].as_array().cloned().unwrap_or_default()
            }
        };
        let power = statuses
            .iter()
            .filter_map(|s| s["code"].as_str())
            .find_map(|c| c.strip_prefix("PowerState/"))
            .unwrap_or("unknown")
            .to_string();
        Ok((vm, power))
    }

    async fn describe_at(&self, deadline: Instant) -> Result<InstanceInfo, CloudError> {
        let (vm, power) = self.get_vm(deadline).await?;
        let status = map_power_state(&power);
        let address = if matches!(status, Status::Running | Status::Starting) {
            self.address_of(&vm, deadline).await?
        } else {
            None
        };
        Ok(InstanceInfo {
            id: vm["id"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| self.resource_id()),
            status,
            raw_status: power,
            address,
        })
    }

    /// The address of the primary NIC's primary IP configuration.
    async fn address_of(
        &self,
        vm: &Value,
        deadline: Instant,
    ) -> Result<Option<String>, CloudError> {
        let nics = vm["properties"]["networkProfile"]["networkInterfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(nic_id) = primary(&nics).and_then(|n| n["id"].as_str()) else {
            return Ok(None);
        };
        let url = self.resource_url(nic_id, NETWORK_API_VERSION)?;
        let what = format!("networkInterfaces.get `{nic_id}`");
        let nic = self
            .call(&what, Method::GET, &url, false, deadline)
            .await?
            .body;
        let configs = nic["properties"]["ipConfigurations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(config) = primary(&configs) else {
            return Ok(None);
        };
        let props = &config["properties"];
        if self.settings.address == AddressKind::Internal {
            return Ok(props["privateIPAddress"].as_str().map(str::to_string));
        }
        let Some(pip_id) = props["publicIPAddress"]["id"].as_str() else {
            return Ok(None);
        };
        let url = self.resource_url(pip_id, NETWORK_API_VERSION)?;
        let what = format!("publicIPAddresses.get `{pip_id}`");
        let pip = self
            .call(&what, Method::GET, &url, false, deadline)
            .await?
            .body;
        Ok(pip["properties"]["ipAddress"]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(str::to_string))
    }

    async fn change(&self, want_running: bool) -> Result<(), CloudError> {
        let deadline = self.deadline();
        let mut polls = 0u32;
        loop {
            let (_, power) = self.get_vm(deadline).await?;
            let action = match plan(want_running, &power) {
                Plan::Nothing => {
                    tracing::debug!(vm = %self.settings.vm_name, %power, "nothing to do");
                    return Ok(());
                }
                Plan::Settle => {
                    self.pause(&mut polls, deadline, &power).await?;
                    continue;
                }
                Plan::Act(a) => a,
            };
            let mut url = self.vm_url.clone();
            url.path_segments_mut()
                .map_err(|_| CloudError::Config {
                    message: "the API endpoint cannot be a base URL".into(),
                })?
                .push(action.method());
            let url = Azure::with_version(&url, COMPUTE_API_VERSION);
            let what = format!(
                "virtualMachines.{} `{}`",
                action.method(),
                self.resource_id()
            );
            match self.call(&what, Method::POST, &url, true, deadline).await {
                Ok(answer) => return self.follow(&what, answer, deadline).await,
                Err(CloudError::Api { status: 409, .. }) => {
                    // Another operation holds the VM: look again once it settles.
                    tracing::debug!("{what}: conflict, waiting for the VM to settle");
                    self.pause(&mut polls, deadline, &power).await?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn pause(
        &self,
        polls: &mut u32,
        deadline: Instant,
        power: &str,
    ) -> Result<(), CloudError> {
        settle_pause(
            self.settings.backoff,
            SETTLE_POLL_MAX,
            polls,
            deadline,
            || {
                format!(
                    "waiting for `{}` to leave power state `{power}`",
                    self.settings.vm_name
                )
            },
        )
        .await
    }

    /// Follows a long-running operation until it ends.
    async fn follow(
        &self,
        what: &str,
        answer: Answer,
        deadline: Instant,
    ) -> Result<(), CloudError> {
        if answer.status != 202 && answer.status != 201 {
            return Ok(());
        }
        let header = |h: &HeaderMap, name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (url, async_op) = match (
            header(&answer.headers, "azure-asyncoperation"),
            header(&answer.headers, "location"),
        ) {
            (Some(u), _) => (u, true),
            (None, Some(u)) => (u, false),
            (None, None) => return Ok(()),
        };
        let url = self.poll_url(&url)?;
        let deadline = deadline.max(Instant::now() + OPERATION_DEADLINE);
        let mut wait = retry_after(&answer.headers);
        loop {
            let pause = wait.unwrap_or(POLL_DEFAULT).min(POLL_MAX);
            if Instant::now() + pause >= deadline {
                return Err(CloudError::Timeout {
                    what: format!("{what} (following its operation)"),
                    after: OPERATION_DEADLINE,
                    last: None,
                });
            }
            tokio::time::sleep(pause).await;
            let poll_what = format!("{what}: operation status");
            let a = self
                .call(&poll_what, Method::GET, &url, false, deadline)
                .await?;
            wait = retry_after(&a.headers);
            if async_op {
                match a.body["status"].as_str() {
                    Some("Succeeded") => return Ok(()),
                    Some(s @ ("Failed" | "Canceled")) => {
                        let e = &a.body["error"];
                        return Err(CloudError::OperationFailed {
                            operation: what.to_string(),
                            message: format!(
                                "{s}: {}: {}",
                                e["code"].as_str().unwrap_or("no code"),
                                e["message"].as_str().unwrap_or("no message")
                            ),
                        });
                    }
                    Some(_) => continue,
                    None => {
                        return Err(CloudError::Protocol {
                            url: url.to_string(),
                            message: "the operation status has no `status`".into(),
                        });
                    }
                }
            } else if a.status != 202 {
                return Ok(());
            }
        }
    }

    /// A poll URL from ARM. The token only ever goes to the API endpoint:
    /// a URL on another origin (a front end's own host name, say) is
    /// followed with its path and query on the endpoint's origin.
    fn poll_url(&self, raw: &str) -> Result<Url, CloudError> {
        let mut url = self.base.join(raw).map_err(|e| CloudError::Protocol {
            url: self.vm_url.to_string(),
            message: format!("operation URL `{raw}`: {e}"),
        })?;
        let same = url.scheme() == self.base.scheme()
            && url.port_or_known_default() == self.base.port_or_known_default()
            && (url.host_str() == self.base.host_str()
                || (is_loopback(&url) && is_loopback(&self.base)));
        if !same {
            tracing::debug!(
                "operation URL on `{}`: following it on `{}`",
                url.origin().ascii_serialization(),
                self.base.origin().ascii_serialization()
            );
            let mut on_base = self.base.clone();
            on_base.set_path(url.path());
            on_base.set_query(url.query());
            url = on_base;
        }
        Ok(url)
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        is_vm: bool,
        deadline: Instant,
    ) -> Result<Answer, CloudError> {
        let first = with_retry_until(what, self.settings.backoff, deadline, || {
            self.send_once(what, method.clone(), url, is_vm)
        })
        .await;
        match first {
            Err(CloudError::Auth { .. })
                if self
                    .refused
                    .swap(false, std::sync::atomic::Ordering::SeqCst) =>
            {
                tracing::debug!("{what}: token refused, trying once more with a fresh one");
                let again = self.send_once(what, method.clone(), url, is_vm).await;
                self.refused
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                again
            }
            r => r,
        }
    }

    async fn send_once(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        is_vm: bool,
    ) -> Result<Answer, CloudError> {
        let auth = self.auth.header().await?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, auth)
            .timeout(REQUEST_TIMEOUT);
        if method == Method::POST {
            request = request.header(reqwest::header::CONTENT_LENGTH, "0");
        }
        let response = request.send().await.map_err(|e| CloudError::Transport {
            url: url.to_string(),
            source: Box::new(e.without_url()),
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| CloudError::Transport {
            url: url.to_string(),
            source: Box::new(e.without_url()),
        })?;
        tracing::debug!(%method, %url, status, "ARM answered");
        let body: Option<Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
            Some(Value::Null)
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        if (200..300).contains(&status) {
            let Some(body) = body else {
                return Err(CloudError::Protocol {
                    url: url.to_string(),
                    message: format!("expected JSON, got: {}", snippet(&bytes)),
                });
            };
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
        let body = body.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| snippet(&bytes));
        match status {
            401 => {
                self.auth.invalidate().await;
                self.refused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                Err(self
                    .auth
                    .auth_error(format!("ARM refused the token (HTTP 401 `{code}`: {message})")))
            }
            403 => Err(self.auth.auth_error(format!(
                "ARM denied {what} (HTTP 403 `{code}`: {message}); the identity needs `Microsoft.Compute/virtualMachines/read`, `start/action` and `deallocate/action` on the VM and `Microsoft.Network/*/read` on its network interface and public IP"
            ))),
            404 if is_vm => Err(CloudError::NotFound {
                instance: self.resource_id(),
            }),
            _ => Err(CloudError::Api {
                service: "Azure Resource Manager",
                operation: what.to_string(),
                status,
                code: if code.is_empty() {
                    format!("HTTP {status}")
                } else {
                    code
                },
                message,
                retry_after: retry_after(&headers),
            }),
        }
    }
}

impl Provider for Azure {
    fn kind(&self) -> &'static str {
        "azure"
    }

    async fn describe(&self) -> Result<InstanceInfo, CloudError> {
        self.describe_at(self.deadline()).await
    }

    async fn start(&self) -> Result<(), CloudError> {
        self.change(true).await
    }

    async fn stop(&self) -> Result<(), CloudError> {
        self.change(false).await
    }
}

/// The entry marked `properties.primary` (or `primary`), else the first.
fn primary(items: &[Value]) -> Option<&Value> {
    items
        .iter()
        .find(|i| {
            i["properties"]["primary"].as_bool() == Some(true)
                || i["primary"].as_bool() == Some(true)
        })
        .or_else(|| items.first())
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn snippet(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(200).collect()
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_urls_never_take_the_token_elsewhere() {
        let auth = AzureAuth::from_lookup(
            |k| match k {
                "AZURE_TENANT_ID" | "AZURE_CLIENT_ID" | "AZURE_CLIENT_SECRET" => Some("x".into()),
                _ => None,
            },
            None,
        )
        .unwrap();
        let a = Azure::with_auth(
            AzureSettings {
                subscription_id: "s".into(),
                resource_group: "rg".into(),
                vm_name: "vm".into(),
                api_endpoint: Some("https://arm.example.net".into()),
                address: AddressKind::External,
                backoff: Backoff::default(),
            },
            auth,
        )
        .unwrap();
        let u = a
            .poll_url("https://evil.example.com/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1?api-version=2024-07-01")
            .unwrap();
        assert_eq!(
            u.as_str(),
            "https://arm.example.net/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1?api-version=2024-07-01"
        );
        let u = a.poll_url("https://arm.example.net/op/2?x=1").unwrap();
        assert_eq!(u.as_str(), "https://arm.example.net/op/2?x=1");
    }

    #[test]
    fn stopping_always_deallocates() {
        assert!(matches!(
            plan(false, "stopped"),
            Plan::Act(Action::Deallocate)
        ));
        assert!(matches!(
            plan(false, "running"),
            Plan::Act(Action::Deallocate)
        ));
        assert!(matches!(plan(false, "deallocated"), Plan::Nothing));
        assert!(matches!(plan(false, "stopping"), Plan::Settle));
        assert!(matches!(plan(true, "deallocating"), Plan::Settle));
        assert!(matches!(plan(true, "stopped"), Plan::Act(Action::Start)));
        assert_eq!(map_power_state("deallocating"), Status::Stopping);
        assert_eq!(map_power_state("hibernated"), Status::Unknown);
    }
}
