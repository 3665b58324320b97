//! Google Cloud Build as a builder: the context in Cloud Storage, a build
//! with one `docker build` step and `images` for the push, its log followed
//! live, `builds.cancel` on Ctrl-C.
//!
//! Two Google APIs with Application Default Credentials
//! ([`crate::cloud::gcp_auth`], as for GCE):
//! - Cloud Storage JSON API: a media upload (`uploadType=media`) for small
//!   contexts, a resumable upload (`uploadType=resumable`, chunks of
//!   [`CHUNK`] with `Content-Range`, resumed from the server's `Range` after
//!   an error) above [`RESUMABLE_THRESHOLD`]; `objects.delete` after.
//! - Cloud Build v1: `projects.locations.builds.create`, `.get`, `.cancel`.
//!
//! The log is read as `gcloud builds submit` reads it: the object
//! `log-{id}.txt` in the build's `logsBucket`, with ranged reads from where
//! the last read ended.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::{Package, ServiceError};
use crate::build::{BuildReport, BuildRequest};
use crate::cloud::gcp_auth::GcpAuth;
use crate::cloud::retry::{Backoff, with_retry};
use crate::cloud::{BODY_LIMIT, CloudError};
use crate::config::Builder;
use crate::report::{Phase, Reporter};

pub const DEFAULT_API_ENDPOINT: &str = "https://cloudbuild.googleapis.com";
pub const DEFAULT_STORAGE_ENDPOINT: &str = "https://storage.googleapis.com";
/// Contexts larger than this use a resumable upload.
pub const RESUMABLE_THRESHOLD: u64 = 8 << 20;
/// Bytes per resumable chunk: a multiple of 256 KiB, as the API requires.
pub const CHUNK: u64 = 4 << 20;
const DOCKER_STEP: &str = "gcr.io/cloud-builders/docker";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of log read per request at most.
const LOG_READ: u64 = 1 << 20;

pub struct Gcp {
    http: reqwest::Client,
    auth: GcpAuth,
    api: Url,
    storage: Url,
    backoff: Backoff,
}

/// What one request came back with.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Gcp {
    pub fn for_builder(b: &Builder, auth: GcpAuth) -> Result<Gcp, CloudError> {
        let parse = |text: &str, key: &str| {
            Url::parse(text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| CloudError::Config {
                    message: format!("`{key}` `{text}` is not an http(s) URL"),
                })
        };
        let api = parse(
            b.api_endpoint.as_deref().unwrap_or(DEFAULT_API_ENDPOINT),
            "api_endpoint",
        )?;
        let storage = parse(
            b.storage_endpoint
                .as_deref()
                .unwrap_or(DEFAULT_STORAGE_ENDPOINT),
            "storage_endpoint",
        )?;
        let mut builder = crate::cloud::http::builder()?
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")));
        if [&api, &storage]
            .iter()
            .all(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
        {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CloudError::Config {
            message: format!("cannot set up the HTTP client: {e}"),
        })?;
        Ok(Gcp {
            http,
            auth,
            api,
            storage,
            backoff: Backoff::default(),
        })
    }

    fn url(&self, base: &Url, path: &str) -> Url {
        let mut url = base.clone();
        let prefix = base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        url
    }

    /// One authenticated request; non-2xx answers other than those in
    /// `accept` become errors.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
        accept: &[StatusCode],
    ) -> Result<Answer, CloudError> {
        let auth = self.auth.headers().await?;
        let mut request = self.http.request(method.clone(), url.clone()).headers(auth);
        for (k, v) in headers {
            request = request.header(*k, v.as_str());
        }
        match body {
            Some(b) => request = request.body(b),
            None if method == Method::POST || method == Method::PUT => {
                request = request.header(reqwest::header::CONTENT_LENGTH, "0")
            }
            None => {}
        }
        let shown = format!("{}{}", url.origin().ascii_serialization(), url.path());
        tracing::debug!(what, url = %shown, "google request");
        let (status, headers, body) = crate::cloud::exchange(request, &shown, BODY_LIMIT).await?;
        if status.is_success() || accept.contains(&status) {
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let code = v["error"]["status"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("HTTP error").into());
        let message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        if status == StatusCode::UNAUTHORIZED {
            return Err(self.auth.auth_error(format!("{what}: {message}")));
        }
        Err(CloudError::Api {
            service: "cloudbuild",
            operation: what.to_string(),
            status: status.as_u16(),
            code,
            message,
            retry_after: None,
        })
    }

    async fn call_json(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<Value, CloudError> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let headers = if body.is_some() {
            vec![("content-type", "application/json".to_string())]
        } else {
            Vec::new()
        };
        let answer = with_retry(what, self.backoff, || {
            self.send(what, method.clone(), url, &headers, bytes.clone(), &[])
        })
        .await?;
        if answer.body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&answer.body).map_err(|e| CloudError::Protocol {
            url: url.to_string(),
            message: format!("{what}: {e}"),
        })
    }

    /// `builds.create`, which has no request id: an answer lost on the way
    /// may mean the build runs, so only a refusal before any work (429) is
    /// tried again.
    async fn create(&self, url: &Url, build: &Value) -> Result<Value, CloudError> {
        let bytes = serde_json::to_vec(build).unwrap_or_default();
        let headers = [("content-type", "application/json".to_string())];
        let mut attempt = 0;
        let answer = loop {
            match self
                .send(
                    "builds.create",
                    Method::POST,
                    url,
                    &headers,
                    Some(bytes.clone()),
                    &[],
                )
                .await
            {
                Err(CloudError::Api { status: 429, .. }) if attempt < 4 => {
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                    attempt += 1;
                }
                other => break other?,
            }
        };
        serde_json::from_slice(&answer.body).map_err(|e| CloudError::Protocol {
            url: url.origin().ascii_serialization(),
            message: format!("builds.create: {e}"),
        })
    }

    fn upload_url(&self, bucket: &str, object: &str, kind: &str) -> Url {
        let mut url = self.url(
            &self.storage,
            &format!("/upload/storage/v1/b/{}/o", super::encode_path(bucket)),
        );
        url.query_pairs_mut()
            .append_pair("uploadType", kind)
            .append_pair("name", object);
        url
    }

    fn object_url(&self, bucket: &str, object: &str) -> Url {
        // The object name is one path segment: `/` encoded too.
        let name: String = url::form_urlencoded::byte_serialize(object.as_bytes())
            .collect::<String>()
            .replace('+', "%20");
        self.url(
            &self.storage,
            &format!("/storage/v1/b/{}/o/{name}", super::encode_path(bucket)),
        )
    }

    /// Uploads the package (see the module docs).
    pub async fn upload(
        &self,
        bucket: &str,
        object: &str,
        package: &Package,
        reporter: &dyn Reporter,
    ) -> Result<(), ServiceError> {
        let read = |offset: u64, len: u64| async move {
            package
                .read_range(offset, len as usize)
                .await
                .map_err(|source| ServiceError::Pack {
                    path: package.path.clone(),
                    source,
                })
        };
        if package.size <= RESUMABLE_THRESHOLD {
            let body = read(0, package.size).await?;
            let url = self.upload_url(bucket, object, "media");
            let headers = [("content-type", "application/gzip".to_string())];
            with_retry("storage objects.insert", self.backoff, || {
                self.send(
                    "storage objects.insert",
                    Method::POST,
                    &url,
                    &headers,
                    Some(body.clone()),
                    &[],
                )
            })
            .await?;
            reporter.upload_progress(package.size);
            return Ok(());
        }
        // A resumable session: its URI comes back in `Location`.
        let start = self.upload_url(bucket, object, "resumable");
        let headers = [
            (
                "content-type",
                "application/json; charset=UTF-8".to_string(),
            ),
            ("x-upload-content-type", "application/gzip".to_string()),
            ("x-upload-content-length", package.size.to_string()),
        ];
        let answer = with_retry("storage resumable upload", self.backoff, || {
            self.send(
                "storage resumable upload",
                Method::POST,
                &start,
                &headers,
                Some(b"{}".to_vec()),
                &[],
            )
        })
        .await?;
        let session = answer
            .headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Url::parse(v).ok())
            .ok_or_else(|| CloudError::Protocol {
                url: start.origin().ascii_serialization(),
                message: "the resumable upload answered without a `Location`".into(),
            })?;
        let permanent = StatusCode::PERMANENT_REDIRECT;
        let deadline = Instant::now() + self.backoff.deadline;
        let mut offset = 0u64;
        let mut attempt = 0u32;
        while offset < package.size {
            let len = CHUNK.min(package.size - offset);
            let body = read(offset, len).await?;
            let range = format!("bytes {offset}-{}/{}", offset + len - 1, package.size);
            let sent = self
                .send(
                    "storage upload chunk",
                    Method::PUT,
                    &session,
                    &[("content-range", range)],
                    Some(body),
                    &[permanent],
                )
                .await;
            match sent {
                Ok(a) if a.status == permanent => {
                    offset = persisted(&a.headers);
                    attempt = 0;
                }
                Ok(_) => offset = package.size,
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "upload chunk failed; asking where to resume");
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                    attempt += 1;
                    // Where the server got to: `bytes */total` asks.
                    let status = self
                        .send(
                            "storage upload status",
                            Method::PUT,
                            &session,
                            &[("content-range", format!("bytes */{}", package.size))],
                            None,
                            &[permanent],
                        )
                        .await;
                    match status {
                        Ok(a) if a.status == permanent => offset = persisted(&a.headers),
                        Ok(_) => offset = package.size,
                        Err(e) if e.is_transient() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
            reporter.upload_progress(offset);
        }
        Ok(())
    }

    pub async fn delete(&self, bucket: &str, object: &str) -> Result<(), CloudError> {
        let url = self.object_url(bucket, object);
        with_retry("storage objects.delete", self.backoff, || {
            self.send(
                "storage objects.delete",
                Method::DELETE,
                &url,
                &[],
                None,
                &[StatusCode::NOT_FOUND],
            )
        })
        .await
        .map(|_| ())
    }

    fn builds_url(&self, project: &str, location: &str) -> Url {
        self.url(
            &self.api,
            &format!(
                "/v1/projects/{}/locations/{}/builds",
                super::encode_path(project),
                super::encode_path(location)
            ),
        )
    }
}

/// The next byte to send after a 308: one past the end of its `Range`
/// (`bytes=0-N`), or 0 without one.
fn persisted(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get(reqwest::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('-').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|last| last + 1)
        .unwrap_or(0)
}

/// The Build resource for `builds.create`.
pub fn build_body(
    builder: &Builder,
    req: &BuildRequest,
    bucket: &str,
    object: &str,
    dockerfile: &str,
) -> Value {
    let mut steps = Vec::new();
    if super::pushes_in_build(req) {
        steps.push(json!({
            "name": DOCKER_STEP,
            "args": ["buildx", "create", "--use", "--driver", "docker-container"],
        }));
    }
    let args = super::docker_build_args(req, dockerfile);
    steps.push(json!({"name": DOCKER_STEP, "args": args}));
    let mut body = json!({
        "source": {"storageSource": {"bucket": bucket, "object": object}},
        "steps": steps,
        "timeout": format!("{}s", builder.timeout.as_secs()),
        "tags": ["absconda"],
    });
    if req.push && !super::pushes_in_build(req) {
        body["images"] = json!(req.images);
    }
    if let Some(m) = &builder.machine_type {
        body["options"] = json!({"machineType": m});
    }
    body
}

/// Runs one build (see the module docs).
pub async fn run(
    builder: &Builder,
    req: &BuildRequest,
    package: &Package,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> anyhow::Result<()> {
    let gcp = Gcp::for_builder(builder, GcpAuth::from_env()?)?;
    let bucket = builder.bucket.clone().unwrap_or_default();
    let object = package.object_name();

    let since = Instant::now();
    reporter.phase(Phase::Upload);
    let uploaded = tokio::select! {
        r = gcp.upload(&bucket, &object, package, reporter) => Some(r),
        _ = cancel.cancelled() => None,
    };
    match uploaded {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            let _ = gcp.delete(&bucket, &object).await;
            return Err(e.into());
        }
        None => {
            let _ = gcp.delete(&bucket, &object).await;
            return Err(super::interrupted());
        }
    }
    super::phase_done(report, reporter, Phase::Upload, since);

    let result = follow(
        &gcp, builder, req, package, &bucket, &object, reporter, cancel, report,
    )
    .await;
    super::report_delete(
        reporter,
        &format!("gs://{bucket}/{object}"),
        gcp.delete(&bucket, &object).await,
    );
    result
}

#[allow(clippy::too_many_arguments)]
async fn follow(
    gcp: &Gcp,
    builder: &Builder,
    req: &BuildRequest,
    package: &Package,
    bucket: &str,
    object: &str,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> anyhow::Result<()> {
    let project = builder.project.clone().unwrap_or_default();
    let location = builder.region.clone().unwrap_or_else(|| "global".into());
    let builds = gcp.builds_url(&project, &location);
    let body = build_body(builder, req, bucket, object, &package.dockerfile);
    let since = Instant::now();
    reporter.phase(Phase::Build);
    let op = gcp.create(&builds, &body).await?;
    let id = op["metadata"]["build"]["id"]
        .as_str()
        .ok_or_else(|| CloudError::Protocol {
            url: builds.to_string(),
            message: "builds.create answered without `metadata.build.id`".into(),
        })?
        .to_string();
    reporter.info(&format!("cloudbuild: build `{id}` started"));
    let build_url = gcp.url(&builds, &format!("/{}", super::encode_path(&id)));
    let cancel_url = gcp.url(&builds, &format!("/{}:cancel", super::encode_path(&id)));
    let mut log = LogFollower {
        offset: 0,
        bucket: None,
        object: format!("log-{id}.txt"),
    };
    let deadline = Instant::now() + builder.timeout;
    let build = loop {
        let b = gcp
            .call_json("builds.get", Method::GET, &build_url, None)
            .await?;
        if log.bucket.is_none() {
            log.bucket = b["logsBucket"].as_str().map(|s| {
                s.trim_start_matches("gs://")
                    .trim_end_matches('/')
                    .to_string()
            });
        }
        log.follow(gcp, reporter).await;
        let status = b["status"].as_str().unwrap_or("STATUS_UNKNOWN");
        if !matches!(status, "QUEUED" | "WORKING" | "PENDING" | "STATUS_UNKNOWN") {
            log.follow(gcp, reporter).await;
            break b;
        }
        if Instant::now() >= deadline {
            let _ = gcp
                .call_json("builds.cancel", Method::POST, &cancel_url, Some(&json!({})))
                .await;
            return Err(ServiceError::Timeout {
                service: "cloudbuild",
                id,
                after: builder.timeout,
            }
            .into());
        }
        tokio::select! {
            _ = tokio::time::sleep(super::POLL) => {}
            _ = cancel.cancelled() => {
                reporter.info(&format!("cloudbuild: cancelling build `{id}`"));
                let body = json!({"projectId": project, "id": id});
                if let Err(e) = gcp.call_json("builds.cancel", Method::POST, &cancel_url, Some(&body)).await {
                    reporter.info(&format!(
                        "could not cancel build `{id}`: {}",
                        crate::exit::one_line(&anyhow::Error::new(e))
                    ));
                }
                return Err(super::interrupted());
            }
        }
    };
    super::phase_done(report, reporter, Phase::Build, since);
    let seconds = match (
        build["startTime"].as_str().and_then(rfc3339),
        build["finishTime"].as_str().and_then(rfc3339),
    ) {
        (Some(a), Some(b)) if b >= a => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => since.elapsed().as_secs_f64(),
    };
    report.billed_seconds = Some(super::billed_minutes(seconds) * 60.0);
    let status = build["status"].as_str().unwrap_or_default().to_string();
    let failure = build["failureInfo"]["type"].as_str().unwrap_or_default();
    match status.as_str() {
        "SUCCESS" => Ok(()),
        "FAILURE" if failure.starts_with("PUSH_") => Err(ServiceError::PushFailed {
            service: "cloudbuild",
            id,
            status,
        }
        .into()),
        "FAILURE" | "TIMEOUT" => Err(ServiceError::BuildFailed {
            service: "cloudbuild",
            id,
            status,
            phase: None,
        }
        .into()),
        _ => Err(ServiceError::Ended {
            service: "cloudbuild",
            id,
            status,
        }
        .into()),
    }
}

fn rfc3339(s: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(s).ok()
}

/// Reads `log-{id}.txt` from where the last read ended.
struct LogFollower {
    offset: u64,
    bucket: Option<String>,
    object: String,
}

impl LogFollower {
    async fn follow(&mut self, gcp: &Gcp, reporter: &dyn Reporter) {
        let Some(bucket) = &self.bucket else { return };
        let mut url = gcp.object_url(bucket, &self.object);
        url.query_pairs_mut().append_pair("alt", "media");
        for _ in 0..16 {
            let range = format!("bytes={}-{}", self.offset, self.offset + LOG_READ - 1);
            let answer = gcp
                .send(
                    "storage log read",
                    Method::GET,
                    &url,
                    &[("range", range)],
                    None,
                    // Not there yet, or nothing past the offset.
                    &[StatusCode::NOT_FOUND, StatusCode::RANGE_NOT_SATISFIABLE],
                )
                .await;
            let a = match answer {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "log read failed");
                    return;
                }
            };
            if !matches!(a.status, StatusCode::OK | StatusCode::PARTIAL_CONTENT)
                || a.body.is_empty()
            {
                return;
            }
            let whole = a.status == StatusCode::OK;
            // A server that ignores `Range` sends it all: skip what we have.
            let new = if whole {
                a.body.get(self.offset as usize..).unwrap_or_default()
            } else {
                &a.body[..]
            };
            reporter.output(true, new);
            self.offset += new.len() as u64;
            if whole || (a.body.len() as u64) < LOG_READ {
                return;
            }
        }
    }
}
