//! EC2 builders through the EC2 Query API, with no AWS SDK or CLI.
//!
//! A builder names its instance by id or by its `Name` tag. absconda reads
//! its state with `DescribeInstances` and changes it with `StartInstances` /
//! `StopInstances` (API version 2016-11-15): form-encoded POSTs signed with
//! SigV4 ([`super::aws_auth`]), XML answers parsed with quick-xml.
//!
//! Start and stop are idempotent, and they look before they act: starting a
//! running or pending instance and stopping a stopped or stopping one make no
//! state-changing call at all; an instance caught half-way the other way
//! (starting one that is still stopping) is waited for, then changed.
//!
//! Before the first SSH connection to a fresh instance,
//! [`Ec2::console_host_key_fingerprints`] reads the host key fingerprints
//! the instance printed on its serial console (`GetConsoleOutput`), so
//! absconda can trust it without trust-on-first-use.
//!
//! Every request goes through [`with_retry`]: connection failures, 429, 5xx and
//! `RequestLimitExceeded` are retried with backoff under the deadline, while
//! credential errors (`AuthFailure`, `SignatureDoesNotMatch`, …) fail at once
//! with the credential source named.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use super::aws_auth::{self, CredentialChain, Credentials, Env, SigningRequest};
use super::retry::{Backoff, with_retry};
use super::{CloudError, InstanceInfo, Provider, Status};

/// The Query API version every request names.
pub const API_VERSION: &str = "2016-11-15";

const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// More pages than this for one id or Name tag means something is wrong.
const MAX_PAGES: usize = 20;
/// Pages of a listing of every instance, and `MaxResults` of each.
const MAX_LIST_PAGES: usize = 100;
const LIST_PAGE_SIZE: u32 = 200;

/// Error codes that mean the credentials, not the request, are the problem.
const AUTH_CODES: &[&str] = &[
    "AuthFailure",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "RequestExpired",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "UnauthorizedOperation",
    "AccessDenied",
];

/// How a builder names its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Instance {
    /// `instance_id: i-0123456789abcdef0`
    Id(String),
    /// `instance: NAME`, the value of the instance's `Name` tag.
    Name(String),
}

impl fmt::Display for Ec2Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ec2Instance::Id(id) => f.write_str(id),
            Ec2Instance::Name(name) => write!(f, "tag:Name={name}"),
        }
    }
}

/// What an EC2 builder's config says, before the environment fills the gaps.
#[derive(Debug, Clone)]
pub struct Ec2Settings {
    /// `region:`; else `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`.
    pub region: Option<String>,
    pub instance: Ec2Instance,
    /// `api_endpoint:`; else `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`,
    /// `https://ec2.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// `profile:`; else `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    pub backoff: Backoff,
}

/// One EC2 instance, reached through the Query API.
#[derive(Debug)]
pub struct Ec2 {
    instance: Ec2Instance,
    region: String,
    endpoint: Url,
    http: reqwest::Client,
    credentials: CredentialChain,
    backoff: Backoff,
}

impl Ec2 {
    /// Settings completed from the process environment and `~/.aws`.
    pub fn new(settings: Ec2Settings) -> Result<Ec2, CloudError> {
        Ec2::with_env(settings, Env::from_process())
    }

    /// Settings completed from `env` instead of the process environment.
    pub fn with_env(settings: Ec2Settings, env: Env) -> Result<Ec2, CloudError> {
        let credentials = CredentialChain::new(env, settings.profile.as_deref());
        Ec2::with_credentials(settings, credentials)
    }

    /// With a credential chain of the caller's (for example
    /// [`CredentialChain::fixed`]); region and endpoint come from its environment.
    pub fn with_credentials(
        settings: Ec2Settings,
        credentials: CredentialChain,
    ) -> Result<Ec2, CloudError> {
        let env = credentials.env();
        let non_empty =
            |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let region = non_empty(settings.region)
            .or_else(|| env.get("AWS_REGION").map(|s| s.trim().to_string()))
            .or_else(|| env.get("AWS_DEFAULT_REGION").map(|s| s.trim().to_string()))
            .or_else(|| aws_auth::profile_region(env, credentials.profile()))
            .ok_or_else(|| CloudError::Config {
                message: format!(
                    "no AWS region for instance `{}`: set `region:` on the builder, AWS_REGION, \
                     or `region` in profile `{}` of `~/.aws/config`",
                    settings.instance,
                    credentials.profile()
                ),
            })?;
        let endpoint = non_empty(settings.endpoint)
            .or_else(|| {
                env.get("AWS_ENDPOINT_URL_EC2")
                    .map(|s| s.trim().to_string())
            })
            .or_else(|| env.get("AWS_ENDPOINT_URL").map(|s| s.trim().to_string()))
            .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com"));
        let endpoint = Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| CloudError::Config {
                message: format!(
                    "the EC2 endpoint `{}` is not an http(s) URL",
                    redact_url_text(&endpoint)
                ),
            })?;
        let http = super::http::builder()?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudError::Config {
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        tracing::debug!(%region, endpoint = %redact_url(&endpoint), instance = %settings.instance, "ec2 provider");
        Ok(Ec2 {
            instance: settings.instance,
            region,
            endpoint,
            http,
            credentials,
            backoff: settings.backoff,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The credentials this provider signs with, for other AWS APIs.
    pub fn credentials(&self) -> &CredentialChain {
        &self.credentials
    }

    /// The Query API endpoint requests go to.
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub fn instance(&self) -> &Ec2Instance {
        &self.instance
    }

    /// Sends one signed Query API request (`Action` and `Version` are added)
    /// with retries, and returns the XML answer.
    ///
    /// The building block of the provider, public for tools and tests that
    /// need other actions (`RunInstances`, `CreateTags`, …).
    pub async fn query(&self, action: &str, params: &[(&str, &str)]) -> Result<String, CloudError> {
        with_retry(&format!("EC2 {action}"), self.backoff, || {
            self.send(action, params)
        })
        .await
    }

    /// One attempt: sign, send, classify the answer.
    async fn send(&self, action: &str, params: &[(&str, &str)]) -> Result<String, CloudError> {
        let creds = self.credentials.credentials().await?;
        let body = aws_auth::query_body(
            [("Action", action), ("Version", API_VERSION)]
                .into_iter()
                .chain(params.iter().copied()),
        );
        let signed = aws_auth::sign(
            &SigningRequest {
                method: "POST",
                url: &self.endpoint,
                headers: &[("content-type", CONTENT_TYPE)],
                body: body.as_bytes(),
            },
            &creds,
            &self.region,
            "ec2",
            Utc::now(),
        );
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body);
        request = signed.apply(request, &creds)?;
        tracing::debug!(action, endpoint = %redact_url(&self.endpoint), "ec2 request");
        let (status, headers, body) =
            super::exchange(request, &redact_url(&self.endpoint), super::BODY_LIMIT).await?;
        let retry_after = parse_retry_after(&headers);
        let text = String::from_utf8_lossy(&body).into_owned();
        tracing::debug!(action, status = status.as_u16(), "ec2 answer");
        if status.is_success() {
            return Ok(text);
        }
        Err(self.classify_error(action, status, retry_after, &text, &creds))
    }

    fn classify_error(
        &self,
        action: &str,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        body: &str,
        creds: &Credentials,
    ) -> CloudError {
        let (code, message) = parse_error(body).unwrap_or_else(|| {
            (
                status
                    .canonical_reason()
                    .unwrap_or("HTTP error")
                    .to_string(),
                snippet(body),
            )
        });
        if AUTH_CODES.contains(&code.as_str()) {
            let hint = match code.as_str() {
                "RequestExpired" => {
                    "the request's time is too far from AWS's: check this machine's clock"
                        .to_string()
                }
                "UnauthorizedOperation" | "AccessDenied" => format!(
                    "the credentials are valid but may not call `ec2:{action}`: check the IAM policy \
                     of the user or role behind them"
                ),
                "ExpiredToken" => {
                    format!("the session token has expired; {}", creds.source.hint())
                }
                _ => creds.source.hint(),
            };
            return CloudError::Auth {
                source_name: creds.source.to_string(),
                message: format!("{action} was refused with {code}: {message}; {hint}"),
            };
        }
        if code == "InvalidInstanceID.NotFound" {
            return CloudError::NotFound {
                instance: self.instance.to_string(),
            };
        }
        CloudError::Api {
            service: "ec2",
            operation: action.to_string(),
            status: status.as_u16(),
            code,
            message,
            retry_after,
        }
    }

    /// Every instance the builder's id or Name tag matches, all pages.
    async fn matching_instances(&self) -> Result<Vec<Instance>, CloudError> {
        let (key, value, filter_value) = match &self.instance {
            Ec2Instance::Id(id) => ("InstanceId.1", id.as_str(), None),
            Ec2Instance::Name(name) => ("Filter.1.Name", "tag:Name", Some(name.as_str())),
        };
        let mut params = vec![(key.to_string(), value.to_string())];
        if let Some(name) = filter_value {
            params.push(("Filter.1.Value.1".into(), name.to_string()));
        }
        let (found, _complete) = self.describe_pages(&params, MAX_PAGES).await?;
        Ok(found)
    }

    /// DescribeInstances with `fixed` parameters, following `NextToken` for
    /// at most `max_pages` pages; `false` when more pages were left.
    async fn describe_pages(
        &self,
        fixed: &[(String, String)],
        max_pages: usize,
    ) -> Result<(Vec<Instance>, bool), CloudError> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..max_pages {
            let mut params: Vec<(&str, &str)> = fixed
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(t) = token.as_deref() {
                params.push(("NextToken", t));
            }
            let xml = self.query("DescribeInstances", &params).await?;
            let page = parse_describe(&xml).map_err(|message| CloudError::Protocol {
                url: redact_url(&self.endpoint),
                message,
            })?;
            found.extend(page.instances);
            token = page.next_token;
            if token.is_none() {
                return Ok((found, true));
            }
        }
        Ok((found, false))
    }

    /// Every instance the credentials see in the region that is not
    /// terminated (DescribeInstances, all pages through `NextToken`),
    /// narrowed by tags: `(KEY, Some(VALUE))` is the filter `tag:KEY` =
    /// VALUE, `(KEY, None)` the filter `tag-key` = KEY. Sorted by Name tag
    /// and id. The provider's own instance plays no part.
    pub async fn list_instances(
        &self,
        tags: &[(String, Option<String>)],
    ) -> Result<Vec<Instance>, CloudError> {
        self.list_instances_paged(tags, LIST_PAGE_SIZE).await
    }

    /// [`Ec2::list_instances`] asking for at most `page_size` (5 to 1000)
    /// reservations per page.
    pub async fn list_instances_paged(
        &self,
        tags: &[(String, Option<String>)],
        page_size: u32,
    ) -> Result<Vec<Instance>, CloudError> {
        let mut fixed: Vec<(String, String)> = vec![
            ("Filter.1.Name".into(), "instance-state-name".into()),
            ("MaxResults".into(), page_size.clamp(5, 1000).to_string()),
        ];
        for (i, state) in ["pending", "running", "stopping", "stopped"]
            .iter()
            .enumerate()
        {
            fixed.push((format!("Filter.1.Value.{}", i + 1), state.to_string()));
        }
        for (n, (key, value)) in tags.iter().enumerate() {
            let f = n + 2;
            match value {
                Some(v) => {
                    fixed.push((format!("Filter.{f}.Name"), format!("tag:{key}")));
                    fixed.push((format!("Filter.{f}.Value.1"), v.clone()));
                }
                None => {
                    fixed.push((format!("Filter.{f}.Name"), "tag-key".into()));
                    fixed.push((format!("Filter.{f}.Value.1"), key.clone()));
                }
            }
        }
        let (mut found, complete) = self.describe_pages(&fixed, MAX_LIST_PAGES).await?;
        if !complete {
            return Err(CloudError::Protocol {
                url: redact_url(&self.endpoint),
                message: format!("more than {MAX_LIST_PAGES} pages of instances"),
            });
        }
        found.sort_by(|a: &Instance, b: &Instance| {
            (&a.name, &a.instance_id).cmp(&(&b.name, &b.instance_id))
        });
        Ok(found)
    }

    /// The one instance this builder means.
    pub async fn find(&self) -> Result<Instance, CloudError> {
        let found = self.matching_instances().await?;
        let (mut alive, terminated): (Vec<Instance>, Vec<Instance>) =
            found.into_iter().partition(|i| i.state != "terminated");
        if alive.len() > 1 {
            let ids = alive
                .iter()
                .map(|i| format!("`{}`", i.instance_id))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(match &self.instance {
                Ec2Instance::Name(name) => CloudError::Config {
                    message: format!(
                        "the Name tag `{name}` matches {} instances in `{}` that are not terminated \
                         ({ids}); name the builder's instance with `instance_id:` instead",
                        alive.len(),
                        self.region,
                    ),
                },
                Ec2Instance::Id(id) => CloudError::Protocol {
                    url: redact_url(&self.endpoint),
                    message: format!(
                        "DescribeInstances returned several instances for `{id}`: {ids}"
                    ),
                },
            });
        }
        // Only terminated ones left: the builder's instance is gone.
        alive
            .pop()
            .or_else(|| terminated.into_iter().next())
            .ok_or_else(|| CloudError::NotFound {
                instance: self.instance.to_string(),
            })
    }

    /// The SSH host key fingerprints (`SHA256:…`) the instance printed on its
    /// serial console, read with `GetConsoleOutput`.
    ///
    /// The bundled startup script prints them at every boot between
    /// `-----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----` and
    /// `-----END ABSCONDA HOST KEY FINGERPRINTS-----`; without that block,
    /// cloud-init's own `-----BEGIN SSH HOST KEY FINGERPRINTS-----` block is
    /// used. Empty when neither is there (yet): console output reaches the
    /// API a while after the guest wrote it.
    ///
    /// `Latest=true` asks for the newest output, not the buffer of the last
    /// boot; instance types that do not support it (older than Nitro) refuse
    /// the parameter, and the call is repeated without it.
    pub async fn console_host_key_fingerprints(&self) -> Result<Vec<String>, CloudError> {
        let id = match &self.instance {
            Ec2Instance::Id(id) => id.clone(),
            Ec2Instance::Name(_) => self.find().await?.instance_id,
        };
        let xml = match self
            .query(
                "GetConsoleOutput",
                &[("InstanceId", id.as_str()), ("Latest", "true")],
            )
            .await
        {
            Ok(xml) => xml,
            Err(e @ CloudError::Api { status, .. })
                if (400..500).contains(&status) && !e.is_transient() =>
            {
                tracing::debug!(error = %e, "GetConsoleOutput with Latest=true refused; asking without it");
                self.query("GetConsoleOutput", &[("InstanceId", id.as_str())])
                    .await?
            }
            Err(e) => return Err(e),
        };
        let text = parse_console_output(&xml).map_err(|message| CloudError::Protocol {
            url: redact_url(&self.endpoint),
            message,
        })?;
        Ok(host_key_fingerprints_in_console(&text))
    }

    /// Sends StartInstances or StopInstances for `id`.
    async fn change_state(&self, action: &str, id: &str) -> Result<(), CloudError> {
        let xml = self.query(action, &[("InstanceId.1", id)]).await?;
        match parse_state_change(&xml) {
            Ok(changes) => {
                for c in changes {
                    tracing::info!(
                        instance = %c.instance_id,
                        from = %c.previous_state.name,
                        to = %c.current_state.name,
                        "{action}"
                    );
                }
                Ok(())
            }
            // The request was accepted; an answer we cannot read changes nothing.
            Err(message) => {
                tracing::warn!(action, %message, "unreadable answer to an accepted request");
                Ok(())
            }
        }
    }

    /// Sleeps before looking at the instance again, or gives up at the deadline.
    async fn pause(
        &self,
        deadline: Instant,
        attempt: &mut u32,
        what: &str,
        last: CloudError,
    ) -> Result<(), CloudError> {
        let wait = self.backoff.delay(*attempt).max(Duration::from_millis(100));
        if Instant::now() + wait >= deadline {
            return Err(CloudError::Timeout {
                what: what.to_string(),
                after: self.backoff.deadline,
                last: Some(Box::new(last)),
            });
        }
        tokio::time::sleep(wait).await;
        *attempt += 1;
        Ok(())
    }

    /// Starts (`starting`) or stops the instance unless it is already on its
    /// way there, waiting out a transition the other way first.
    async fn drive(&self, starting: bool) -> Result<(), CloudError> {
        let (action, verb) = if starting {
            ("StartInstances", "start")
        } else {
            ("StopInstances", "stop")
        };
        let deadline = Instant::now() + self.backoff.deadline;
        let mut attempt = 0;
        loop {
            let inst = self.find().await?;
            let status = status_from_ec2(&inst.state);
            let id = inst.instance_id.as_str();
            let waiting_for = match (starting, status) {
                (true, Status::Running | Status::Starting)
                | (false, Status::Stopped | Status::Stopping) => {
                    tracing::debug!(instance = id, state = %inst.state, "nothing to {verb}");
                    return Ok(());
                }
                (false, Status::Gone) => {
                    tracing::warn!(instance = id, "the instance is terminated; nothing to stop");
                    return Ok(());
                }
                (true, Status::Gone) => {
                    return Err(CloudError::OperationFailed {
                        operation: format!("{action} {id}"),
                        message: "the instance is terminated and cannot be started".into(),
                    });
                }
                (_, Status::Unknown) => {
                    return Err(CloudError::OperationFailed {
                        operation: format!("{action} {id}"),
                        message: format!(
                            "the instance is in state `{}`, unknown to absconda",
                            inst.state
                        ),
                    });
                }
                (true, Status::Stopped) | (false, Status::Running) => {
                    match self.change_state(action, id).await {
                        Ok(()) => return Ok(()),
                        // Someone else changed it meanwhile: look again.
                        Err(e @ CloudError::Api { .. }) if is_incorrect_state(&e) => e,
                        Err(e) => return Err(e),
                    }
                }
                // Half-way the other way (stopping when we start, pending
                // when we stop): wait for it to settle, then act.
                (true, _) | (false, _) => CloudError::OperationFailed {
                    operation: format!("{action} {id}"),
                    message: format!("the instance is still `{}`", inst.state),
                },
            };
            let what = format!(
                "{verb} instance `{id}` (waiting for it to leave `{}`)",
                inst.state
            );
            self.pause(deadline, &mut attempt, &what, waiting_for)
                .await?;
        }
    }
}

fn is_incorrect_state(e: &CloudError) -> bool {
    matches!(e, CloudError::Api { code, .. } if code == "IncorrectInstanceState")
}

impl Provider for Ec2 {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    async fn describe(&self) -> Result<InstanceInfo, CloudError> {
        let inst = self.find().await?;
        Ok(InstanceInfo {
            status: status_from_ec2(&inst.state),
            address: inst.address(),
            raw_status: inst.state,
            id: inst.instance_id,
        })
    }

    async fn start(&self) -> Result<(), CloudError> {
        self.drive(true).await
    }

    async fn stop(&self) -> Result<(), CloudError> {
        self.drive(false).await
    }
}

/// EC2's instance state names, normalised.
pub fn status_from_ec2(state: &str) -> Status {
    match state {
        "pending" => Status::Starting,
        "running" => Status::Running,
        "stopping" | "shutting-down" => Status::Stopping,
        "stopped" => Status::Stopped,
        "terminated" => Status::Gone,
        _ => Status::Unknown,
    }
}

/// The `Retry-After` header: delay-seconds or an HTTP date.
fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// The URL without user name or password.
fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() || !shown.username().is_empty() {
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    shown.to_string()
}

fn redact_url_text(text: &str) -> String {
    match Url::parse(text) {
        Ok(url) => redact_url(&url),
        Err(_) => match text.rsplit_once('@') {
            Some((_, rest)) => format!("…@{rest}"),
            None => text.to_string(),
        },
    }
}

/// The start of a non-XML error body, on one line.
fn snippet(body: &str) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty answer)".into();
    }
    let mut s: String = one_line.chars().take(200).collect();
    if s.len() < one_line.len() {
        s.push('…');
    }
    s
}

// ---------------------------------------------------------------------------
// XML

/// One instance as absconda needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    /// EC2's state name: `pending`, `running`, …
    pub state: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    /// The VPC it runs in (for its EC2 Instance Connect Endpoint).
    pub vpc_id: Option<String>,
    /// The `Name` tag.
    pub name: Option<String>,
}

impl Instance {
    /// The public address, else the private one.
    pub fn address(&self) -> Option<String> {
        self.public_ip.clone().or_else(|| self.private_ip.clone())
    }
}

/// One page of DescribeInstances.
#[derive(Debug, Default)]
pub struct DescribePage {
    /// The instances of every reservation, in order.
    pub instances: Vec<Instance>,
    pub next_token: Option<String>,
}

/// EC2's list wrapper: `<fooSet><item>…</item><item>…</item></fooSet>`.
#[derive(Deserialize)]
struct ItemSet<T> {
    #[serde(default = "Vec::new")]
    item: Vec<T>,
}

impl<T> Default for ItemSet<T> {
    fn default() -> Self {
        ItemSet { item: Vec::new() }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeInstancesXml {
    #[serde(default)]
    reservation_set: ItemSet<ReservationXml>,
    #[serde(default)]
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReservationXml {
    #[serde(default)]
    instances_set: ItemSet<InstanceXml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceXml {
    instance_id: String,
    instance_state: StateXml,
    #[serde(default)]
    private_ip_address: Option<String>,
    #[serde(default)]
    ip_address: Option<String>,
    #[serde(default)]
    vpc_id: Option<String>,
    #[serde(default)]
    tag_set: ItemSet<TagXml>,
}

#[derive(Deserialize)]
struct StateXml {
    name: String,
}

#[derive(Deserialize)]
struct TagXml {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateChangeResponseXml {
    #[serde(default)]
    instances_set: ItemSet<StateChangeXml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateChangeXml {
    instance_id: String,
    current_state: StateXml,
    previous_state: StateXml,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Parses a DescribeInstances answer.
pub fn parse_describe(xml: &str) -> Result<DescribePage, String> {
    expect_root(xml, "DescribeInstancesResponse")?;
    let doc: DescribeInstancesXml = quick_xml::de::from_str(xml)
        .map_err(|e| format!("cannot read the DescribeInstances answer: {e}"))?;
    let instances = doc
        .reservation_set
        .item
        .into_iter()
        .flat_map(|r| r.instances_set.item)
        .map(|i| Instance {
            name: i
                .tag_set
                .item
                .into_iter()
                .find(|t| t.key == "Name")
                .and_then(|t| non_empty(t.value)),
            instance_id: i.instance_id.trim().to_string(),
            state: i.instance_state.name.trim().to_string(),
            public_ip: non_empty(i.ip_address),
            private_ip: non_empty(i.private_ip_address),
            vpc_id: non_empty(i.vpc_id),
        })
        .collect();
    Ok(DescribePage {
        instances,
        next_token: non_empty(doc.next_token),
    })
}

/// What StartInstances/StopInstances says changed.
struct StateChange {
    instance_id: String,
    current_state: StateXml,
    previous_state: StateXml,
}

fn parse_state_change(xml: &str) -> Result<Vec<StateChange>, String> {
    if root_name(xml).is_none_or(|n| !n.ends_with("InstancesResponse")) {
        return Err(format!("unexpected answer `{}`", snippet(xml)));
    }
    let doc: StateChangeResponseXml =
        quick_xml::de::from_str(xml).map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(doc
        .instances_set
        .item
        .into_iter()
        .map(|c| StateChange {
            instance_id: c.instance_id,
            current_state: c.current_state,
            previous_state: c.previous_state,
        })
        .collect())
}

#[derive(Deserialize)]
struct ConsoleOutputXml {
    #[serde(default)]
    output: Option<String>,
}

/// The decoded console text of a GetConsoleOutput answer; empty when the
/// instance has none yet (the answer then has no `<output>`).
pub fn parse_console_output(xml: &str) -> Result<String, String> {
    expect_root(xml, "GetConsoleOutputResponse")?;
    let doc: ConsoleOutputXml = quick_xml::de::from_str(xml)
        .map_err(|e| format!("cannot read the GetConsoleOutput answer: {e}"))?;
    let encoded: String = doc
        .output
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .map_err(|e| format!("the console output is not base64: {e}"))?;
    // Serial consoles carry whatever the guest wrote, escape codes and
    // broken UTF-8 included.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

const ABSCONDA_BEGIN: &str = "-----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----";
const ABSCONDA_END: &str = "-----END ABSCONDA HOST KEY FINGERPRINTS-----";
const CLOUD_INIT_BEGIN: &str = "-----BEGIN SSH HOST KEY FINGERPRINTS-----";
const CLOUD_INIT_END: &str = "-----END SSH HOST KEY FINGERPRINTS-----";

/// The `SHA256:…` fingerprints of the last complete ABSCONDA block of a
/// console text, else of cloud-init's last complete block.
///
/// The last block is the newest boot's. A block cut short (the boot is still
/// printing it, or the console buffer starts in its middle) is ignored
/// rather than trusted half: a missing key would look like a mismatch.
/// Marker lines may carry a prefix (cloud-init writes `ec2: -----BEGIN…`,
/// a console may add timestamps) but must end with the marker; inside a
/// block every well-formed `SHA256:` token counts, whatever the line's
/// layout (`ssh-ed25519 SHA256:…` or `256 SHA256:… root@host (ED25519)`),
/// since kernel messages may be interleaved.
pub fn host_key_fingerprints_in_console(text: &str) -> Vec<String> {
    last_block(text, ABSCONDA_BEGIN, ABSCONDA_END)
        .or_else(|| last_block(text, CLOUD_INIT_BEGIN, CLOUD_INIT_END))
        .unwrap_or_default()
}

fn last_block(text: &str, begin: &str, end: &str) -> Option<Vec<String>> {
    let mut current: Option<Vec<String>> = None;
    let mut last = None;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(begin) {
            current = Some(Vec::new());
            continue;
        }
        if line.ends_with(end) {
            if let Some(block) = current.take()
                && !block.is_empty()
            {
                last = Some(block);
            }
            continue;
        }
        if let Some(block) = current.as_mut() {
            for fp in line.split_whitespace().filter_map(sha256_token) {
                if !block.contains(&fp) {
                    block.push(fp);
                }
            }
        }
    }
    last
}

/// `SHA256:` and 43 base64 characters (`ssh-keygen -l` leaves out the
/// padding; a padded one is accepted and normalised).
fn sha256_token(token: &str) -> Option<String> {
    let rest = token.strip_prefix("SHA256:")?.trim_end_matches('=');
    let ok = rest.len() == 43
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    ok.then(|| format!("SHA256:{rest}"))
}

/// The first `<Code>` and `<Message>` of an error answer, whatever wraps them
/// (`<Response><Errors><Error>` for EC2, `<ErrorResponse><Error>` elsewhere).
pub fn parse_error(xml: &str) -> Option<(String, String)> {
    use quick_xml::events::Event;
    #[derive(Clone, Copy)]
    enum Field {
        Code,
        Message,
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut code = String::new();
    let mut message = String::new();
    let mut in_error = false;
    let mut field: Option<Field> = None;
    loop {
        let piece: Option<String> = match reader.read_event() {
            Ok(Event::Start(e)) => {
                field = match e.local_name().as_ref() {
                    b"Error" => {
                        in_error = true;
                        None
                    }
                    b"Code" if in_error => Some(Field::Code),
                    b"Message" if in_error => Some(Field::Message),
                    _ => None,
                };
                None
            }
            Ok(Event::End(e)) => {
                field = None;
                if e.local_name().as_ref() == b"Error" && !code.is_empty() {
                    break;
                }
                None
            }
            Ok(Event::Text(t)) => t.decode().ok().map(|c| c.into_owned()),
            Ok(Event::CData(t)) => t.decode().ok().map(|c| c.into_owned()),
            // Since quick-xml 0.38 entity references arrive as events of their own.
            Ok(Event::GeneralRef(r)) => match r.resolve_char_ref() {
                Ok(Some(c)) => Some(c.to_string()),
                _ => r.decode().ok().map(|name| {
                    match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    }
                    .to_string()
                }),
            },
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => None,
        };
        match (field, piece) {
            (Some(Field::Code), Some(p)) => code.push_str(&p),
            (Some(Field::Message), Some(p)) => message.push_str(&p),
            _ => {}
        }
    }
    let code = code.trim();
    if code.is_empty() {
        return None;
    }
    Some((code.to_string(), message.trim().to_string()))
}

/// The local name of the document's root element.
fn root_name(xml: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                return Some(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Fails unless the answer is the `<{expected}>` document.
fn expect_root(xml: &str, expected: &str) -> Result<(), String> {
    match root_name(xml) {
        Some(name) if name == expected => Ok(()),
        Some(name) => Err(format!("expected a `{expected}` document, got `{name}`")),
        None => Err(format!(
            "expected a `{expected}` document, got `{}`",
            snippet(xml)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP_ED: &str = "SHA256:Yq8wE3rT6uI9oP2aS5dF7gH0jK4lZ1xC3vB6nM8qW2e";
    const FP_EC: &str = "SHA256:0mTz3n7Qv5yPbXW1kJc8sUu2aHdLr9eFgN4oViYtZqE";
    const FP_RSA: &str = "SHA256:R7tY1uI4oP9aS2dF5gH8jK0lZ3xC6vB9nM1qW4eE7rT";

    /// A first boot on Ubuntu: kernel lines, cloud-init's block, then the
    /// startup script's, with a kernel message in the middle of it.
    fn first_boot() -> String {
        format!(
            "[    0.000000] Linux version 6.8.0-1021-aws (buildd@lcy02-amd64-034) (x86_64-linux-gnu-gcc-13)\r\n\
             [    4.112233] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode\r\n\
             [   12.004512] cloud-init[812]: Cloud-init v. 24.4 running 'modules:config' at Mon, 03 Mar 2025 10:00:01 +0000.\r\n\
             <14>Mar  3 10:00:02 ec2: \r\n\
             <14>Mar  3 10:00:02 ec2: #############################################################\r\n\
             <14>Mar  3 10:00:02 ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
             <14>Mar  3 10:00:02 ec2: 256 {FP_EC} root@ip-172-31-5-10 (ECDSA)\r\n\
             <14>Mar  3 10:00:02 ec2: 256 {FP_ED} root@ip-172-31-5-10 (ED25519)\r\n\
             <14>Mar  3 10:00:02 ec2: 3072 {FP_RSA} root@ip-172-31-5-10 (RSA)\r\n\
             <14>Mar  3 10:00:02 ec2: -----END SSH HOST KEY FINGERPRINTS-----\r\n\
             <14>Mar  3 10:00:02 ec2: #############################################################\r\n\
             -----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----\r\n\
             ecdsa-sha2-nistp256 {FP_EC}\r\n\
             [   14.551002] audit: type=1400 audit(1741000003.120:95): apparmor=\"STATUS\"\r\n\
             ssh-ed25519 {FP_ED}\r\n\
             -----END ABSCONDA HOST KEY FINGERPRINTS-----\r\n\
             Ubuntu 24.04.1 LTS ip-172-31-5-10 ttyS0\r\n"
        )
    }

    #[test]
    fn console_fingerprints_come_from_the_absconda_block() {
        assert_eq!(
            host_key_fingerprints_in_console(&first_boot()),
            vec![FP_EC.to_string(), FP_ED.to_string()]
        );
    }

    #[test]
    fn console_fingerprints_fall_back_to_cloud_init() {
        let text = first_boot();
        let without_ours = &text[..text.find("-----BEGIN ABSCONDA").unwrap()];
        assert_eq!(
            host_key_fingerprints_in_console(without_ours),
            vec![FP_EC.to_string(), FP_ED.to_string(), FP_RSA.to_string()]
        );
    }

    #[test]
    fn console_fingerprint_edge_cases() {
        let other = "SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let cases: Vec<(String, Vec<&str>)> = vec![
            // Nothing printed yet.
            (String::new(), vec![]),
            ("login: ".into(), vec![]),
            // A block still being printed is not trusted half.
            (format!("{ABSCONDA_BEGIN}\nssh-ed25519 {FP_ED}\n"), vec![]),
            // A second boot printed the block again: the newest counts.
            (
                format!(
                    "{ABSCONDA_BEGIN}\nssh-ed25519 {other}\n{ABSCONDA_END}\nreboot\n\
                     {ABSCONDA_BEGIN}\nssh-ed25519 {FP_ED}\n{ABSCONDA_END}\n"
                ),
                vec![FP_ED],
            ),
            // The buffer starts inside a block: its END alone is ignored.
            (
                format!(
                    "ssh-ed25519 {other}\n{ABSCONDA_END}\n{ABSCONDA_BEGIN}\nssh-rsa {FP_RSA}\n{ABSCONDA_END}\n"
                ),
                vec![FP_RSA],
            ),
            // Padded, truncated and garbage tokens.
            (
                format!(
                    "{ABSCONDA_BEGIN}\nssh-ed25519 {FP_ED}=\nssh-rsa SHA256:short\nSHA256:{}\n{ABSCONDA_END}\n",
                    "!".repeat(43)
                ),
                vec![FP_ED],
            ),
            // An empty block of ours does not hide cloud-init's.
            (
                format!(
                    "{CLOUD_INIT_BEGIN}\n256 {FP_ED} root@h (ED25519)\n{CLOUD_INIT_END}\n{ABSCONDA_BEGIN}\n{ABSCONDA_END}\n"
                ),
                vec![FP_ED],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(host_key_fingerprints_in_console(&text), want, "{text:?}");
        }
    }

    #[test]
    fn console_output_answers() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(first_boot());
        // AWS wraps nothing, but whitespace around the text must not matter.
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\n\
             <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>\n\
             <instanceId>i-1234567890abcdef0</instanceId>\n\
             <timestamp>2025-03-03T10:00:05.000Z</timestamp>\n\
             <output>\n{}\n</output>\n</GetConsoleOutputResponse>",
            &encoded
        );
        assert_eq!(parse_console_output(&xml).unwrap(), first_boot());
        let none = "<GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><instanceId>i-1</instanceId><timestamp>2025-03-03T10:00:05.000Z</timestamp></GetConsoleOutputResponse>";
        assert_eq!(parse_console_output(none).unwrap(), "");
        assert!(parse_console_output("<DescribeInstancesResponse/>").is_err());
        let bad = none.replace("</timestamp>", "</timestamp><output>%%%</output>");
        assert!(parse_console_output(&bad).is_err());
    }

    #[test]
    fn status_mapping() {
        let cases = [
            ("pending", Status::Starting),
            ("running", Status::Running),
            ("stopping", Status::Stopping),
            ("shutting-down", Status::Stopping),
            ("stopped", Status::Stopped),
            ("terminated", Status::Gone),
            ("rebooting", Status::Unknown),
            ("", Status::Unknown),
        ];
        for (state, status) in cases {
            assert_eq!(status_from_ec2(state), status, "{state}");
        }
    }

    const DESCRIBE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
    <reservationSet>
        <item>
            <reservationId>r-1234567890abcdef0</reservationId>
            <ownerId>123456789012</ownerId>
            <groupSet/>
            <instancesSet>
                <item>
                    <instanceId>i-1234567890abcdef0</instanceId>
                    <imageId>ami-bff32ccc</imageId>
                    <instanceState>
                        <code>16</code>
                        <name>running</name>
                    </instanceState>
                    <privateDnsName>ip-192-168-1-88.eu-west-1.compute.internal</privateDnsName>
                    <dnsName>ec2-54-194-252-215.eu-west-1.compute.amazonaws.com</dnsName>
                    <reason/>
                    <privateIpAddress>192.168.1.88</privateIpAddress>
                    <ipAddress>54.194.252.215</ipAddress>
                    <groupSet>
                        <item><groupId>sg-e4076980</groupId><groupName>SecurityGroup1</groupName></item>
                    </groupSet>
                    <networkInterfaceSet>
                        <item>
                            <networkInterfaceId>eni-0598c7d356eba48d7</networkInterfaceId>
                            <privateIpAddress>192.168.1.99</privateIpAddress>
                            <association><publicIp>54.1.1.1</publicIp></association>
                            <privateIpAddressesSet>
                                <item><privateIpAddress>192.168.1.99</privateIpAddress><primary>true</primary></item>
                            </privateIpAddressesSet>
                        </item>
                    </networkInterfaceSet>
                    <tagSet>
                        <item><key>env</key><value>ci</value></item>
                        <item><key>Name</key><value>builder &amp; co</value></item>
                    </tagSet>
                </item>
                <item>
                    <instanceId>i-0000000000000000b</instanceId>
                    <instanceState><code>80</code><name>stopped</name></instanceState>
                    <privateIpAddress>10.0.0.7</privateIpAddress>
                    <tagSet/>
                </item>
            </instancesSet>
        </item>
        <item>
            <reservationId>r-2</reservationId>
            <instancesSet>
                <item>
                    <instanceId>i-0000000000000000c</instanceId>
                    <instanceState><code>48</code><name>terminated</name></instanceState>
                    <tagSet><item><key>Name</key><value/></item></tagSet>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
    <nextToken>page-2</nextToken>
</DescribeInstancesResponse>"#;

    #[test]
    fn describe_with_several_reservations() {
        let page = parse_describe(DESCRIBE).unwrap();
        assert_eq!(page.next_token.as_deref(), Some("page-2"));
        assert_eq!(
            page.instances,
            vec![
                Instance {
                    instance_id: "i-1234567890abcdef0".into(),
                    state: "running".into(),
                    public_ip: Some("54.194.252.215".into()),
                    private_ip: Some("192.168.1.88".into()),
                    vpc_id: None,
                    name: Some("builder & co".into()),
                },
                Instance {
                    instance_id: "i-0000000000000000b".into(),
                    state: "stopped".into(),
                    public_ip: None,
                    private_ip: Some("10.0.0.7".into()),
                    vpc_id: None,
                    name: None,
                },
                Instance {
                    instance_id: "i-0000000000000000c".into(),
                    state: "terminated".into(),
                    public_ip: None,
                    private_ip: None,
                    vpc_id: None,
                    name: None,
                },
            ]
        );
        assert_eq!(
            page.instances[0].address().as_deref(),
            Some("54.194.252.215")
        );
        assert_eq!(page.instances[1].address().as_deref(), Some("10.0.0.7"));
        assert_eq!(page.instances[2].address(), None);
    }

    #[test]
    fn describe_empty_answers() {
        let cases = [
            r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><reservationSet/><requestId>x</requestId></DescribeInstancesResponse>"#,
            r#"<DescribeInstancesResponse><requestId>x</requestId><reservationSet></reservationSet></DescribeInstancesResponse>"#,
            r#"<DescribeInstancesResponse><requestId>x</requestId></DescribeInstancesResponse>"#,
        ];
        for xml in cases {
            let page = parse_describe(xml).unwrap();
            assert!(page.instances.is_empty(), "{xml}");
            assert_eq!(page.next_token, None);
        }
        let err = parse_describe("<html>oops</html>").unwrap_err();
        assert!(err.contains("`html`"), "{err}");
        assert!(parse_describe("").is_err());
    }

    #[test]
    fn state_change_answers() {
        let xml = r#"<StartInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <instancesSet>
    <item>
      <instanceId>i-1234567890abcdef0</instanceId>
      <currentState><code>0</code><name>pending</name></currentState>
      <previousState><code>80</code><name>stopped</name></previousState>
    </item>
  </instancesSet>
</StartInstancesResponse>"#;
        let changes = parse_state_change(xml).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].instance_id, "i-1234567890abcdef0");
        assert_eq!(changes[0].current_state.name, "pending");
        assert_eq!(changes[0].previous_state.name, "stopped");
    }

    #[test]
    fn error_answers() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1a2b3c4d' does not exist</Message></Error></Errors><RequestID>ea966190-f9aa-478e-9ede-example</RequestID></Response>"#,
                Some((
                    "InvalidInstanceID.NotFound",
                    "The instance ID 'i-1a2b3c4d' does not exist",
                )),
            ),
            (
                r#"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>x</RequestID></Response>"#,
                Some(("RequestLimitExceeded", "Request limit exceeded.")),
            ),
            (
                r#"<ErrorResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/"><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>a &amp; b &lt;c&gt;</Message></Error><RequestId>x</RequestId></ErrorResponse>"#,
                Some(("SignatureDoesNotMatch", "a & b <c>")),
            ),
            (
                r#"<Response><Errors><Error><Code>AuthFailure</Code></Error></Errors></Response>"#,
                Some(("AuthFailure", "")),
            ),
            ("<html><body>502 Bad Gateway</body></html>", None),
            ("", None),
            ("not xml at all", None),
        ];
        for (xml, expected) in cases {
            let got = parse_error(xml);
            let got = got.as_ref().map(|(c, m)| (c.as_str(), m.as_str()));
            assert_eq!(got, *expected, "{xml}");
        }
    }

    #[test]
    fn retry_after_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(parse_retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(3)));
        let soon = (Utc::now() + chrono::TimeDelta::seconds(30)).to_rfc2822();
        headers.insert(reqwest::header::RETRY_AFTER, soon.parse().unwrap());
        let d = parse_retry_after(&headers).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }

    fn settings(instance: Ec2Instance) -> Ec2Settings {
        Ec2Settings {
            region: None,
            instance,
            endpoint: None,
            profile: None,
            backoff: Backoff::default(),
        }
    }

    #[test]
    fn region_and_endpoint_resolution() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = ap-south-1\n[profile dev]\nregion = eu-west-2\n",
        )
        .unwrap();
        let home = dir.path().to_str().unwrap();
        let env =
            |pairs: &[(&str, &str)]| Env::from_pairs(pairs.iter().copied().chain([("HOME", home)]));
        let id = || Ec2Instance::Id("i-1".into());
        struct Case {
            name: &'static str,
            settings: Ec2Settings,
            env: Env,
            region: &'static str,
            endpoint: &'static str,
        }
        let cases = [
            Case {
                name: "profile region and the default endpoint",
                settings: settings(id()),
                env: env(&[]),
                region: "ap-south-1",
                endpoint: "https://ec2.ap-south-1.amazonaws.com/",
            },
            Case {
                name: "AWS_PROFILE's region",
                settings: settings(id()),
                env: env(&[("AWS_PROFILE", "dev")]),
                region: "eu-west-2",
                endpoint: "https://ec2.eu-west-2.amazonaws.com/",
            },
            Case {
                name: "AWS_DEFAULT_REGION over the profile",
                settings: settings(id()),
                env: env(&[("AWS_DEFAULT_REGION", "us-west-1")]),
                region: "us-west-1",
                endpoint: "https://ec2.us-west-1.amazonaws.com/",
            },
            Case {
                name: "AWS_REGION over AWS_DEFAULT_REGION, AWS_ENDPOINT_URL",
                settings: settings(id()),
                env: env(&[
                    ("AWS_DEFAULT_REGION", "us-west-1"),
                    ("AWS_REGION", "us-east-2"),
                    ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
                ]),
                region: "us-east-2",
                endpoint: "http://127.0.0.1:4566/",
            },
            Case {
                name: "AWS_ENDPOINT_URL_EC2 over AWS_ENDPOINT_URL",
                settings: settings(id()),
                env: env(&[
                    ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
                    ("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:5000/"),
                ]),
                region: "ap-south-1",
                endpoint: "http://127.0.0.1:5000/",
            },
            Case {
                name: "settings over everything",
                settings: Ec2Settings {
                    region: Some("sa-east-1".into()),
                    endpoint: Some("https://vpce-1.ec2.sa-east-1.vpce.amazonaws.com".into()),
                    ..settings(id())
                },
                env: env(&[
                    ("AWS_REGION", "us-east-2"),
                    ("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:5000/"),
                ]),
                region: "sa-east-1",
                endpoint: "https://vpce-1.ec2.sa-east-1.vpce.amazonaws.com/",
            },
        ];
        for case in cases {
            let ec2 = Ec2::with_env(case.settings, case.env).unwrap();
            assert_eq!(ec2.region(), case.region, "{}", case.name);
            assert_eq!(ec2.endpoint().as_str(), case.endpoint, "{}", case.name);
        }

        let empty = tempfile::tempdir().unwrap();
        let err = Ec2::with_env(
            settings(id()),
            Env::from_pairs([("HOME", empty.path().to_str().unwrap())]),
        )
        .unwrap_err();
        assert!(matches!(err, CloudError::Config { .. }));
        assert!(err.to_string().contains("no AWS region"), "{err}");

        let err = Ec2::with_env(
            Ec2Settings {
                region: Some("us-east-1".into()),
                endpoint: Some("ftp://user:pw@example.com".into()),
                ..settings(id())
            },
            env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not an http(s) URL"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn instance_display() {
        assert_eq!(Ec2Instance::Id("i-1".into()).to_string(), "i-1");
        assert_eq!(Ec2Instance::Name("b".into()).to_string(), "tag:Name=b");
    }
}
