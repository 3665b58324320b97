//! AWS CodeBuild as a builder: the context in S3, `StartBuild` with the
//! source, buildspec and privileged mode overridden for this build, the log
//! followed in CloudWatch Logs, `StopBuild` on Ctrl-C.
//!
//! Three AWS APIs, all signed with SigV4 ([`crate::cloud::aws_auth`]):
//! S3 (REST; `PutObject`, multipart upload above [`MULTIPART_THRESHOLD`],
//! `DeleteObject`), CodeBuild and CloudWatch Logs (JSON 1.1: a POST to `/`
//! with `X-Amz-Target`). The CodeBuild project (`codebuild_project:`) gives
//! the environment image, compute type and service role; its role needs
//! `s3:GetObject` on the bucket, and `ecr:GetAuthorizationToken` (and push
//! rights) for ECR or `secretsmanager:GetSecretValue` on `registry_secret:`.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::{Package, ServiceError};
use crate::build::{BuildReport, BuildRequest};
use crate::cloud::aws_auth::{self, CredentialChain, Env, SigningRequest};
use crate::cloud::retry::{Backoff, with_retry};
use crate::cloud::{BODY_LIMIT, CloudError};
use crate::config::Builder;
use crate::report::{Phase, Reporter};

/// Contexts larger than this go up in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// The size of each part but the last (S3's minimum is 5 MiB).
pub const PART_SIZE: u64 = 8 << 20;
const JSON: &str = "application/x-amz-json-1.1";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Events asked for per `GetLogEvents` call, and calls per poll at most.
const LOG_PAGES_PER_POLL: usize = 20;

/// The AWS endpoints of one region, with the credentials.
pub struct Aws {
    http: reqwest::Client,
    credentials: CredentialChain,
    region: String,
    codebuild: Url,
    logs: Url,
    s3: Url,
    /// Virtual-hosted S3 (`bucket.s3.region.amazonaws.com`) unless an
    /// endpoint was given.
    virtual_hosted: bool,
    backoff: Backoff,
}

impl Aws {
    pub fn for_builder(b: &Builder, env: Env) -> Result<Aws, CloudError> {
        let credentials = CredentialChain::new(env, b.profile.as_deref());
        let env = credentials.env();
        let region = b
            .region
            .clone()
            .or_else(|| env.get("AWS_REGION").map(str::to_string))
            .or_else(|| env.get("AWS_DEFAULT_REGION").map(str::to_string))
            .or_else(|| aws_auth::profile_region(env, credentials.profile()))
            .ok_or_else(|| CloudError::Config {
                message: format!(
                    "no AWS region for build service `{}`: set `region:` on it or AWS_REGION",
                    b.name
                ),
            })?;
        let endpoint = |var: &str, default: String| -> Result<(Url, bool), CloudError> {
            let given = b
                .api_endpoint
                .clone()
                .or_else(|| env.get(var).map(str::to_string))
                .or_else(|| env.get("AWS_ENDPOINT_URL").map(str::to_string));
            let custom = given.is_some();
            let text = given.unwrap_or(default);
            let url = Url::parse(&text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| CloudError::Config {
                    message: format!("the AWS endpoint `{text}` is not an http(s) URL"),
                })?;
            Ok((url, custom))
        };
        let (codebuild, _) = endpoint(
            "AWS_ENDPOINT_URL_CODEBUILD",
            format!("https://codebuild.{region}.amazonaws.com"),
        )?;
        let (logs, _) = endpoint(
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
            format!("https://logs.{region}.amazonaws.com"),
        )?;
        let (s3, custom) = endpoint(
            "AWS_ENDPOINT_URL_S3",
            format!("https://s3.{region}.amazonaws.com"),
        )?;
        let http = crate::cloud::http::builder()?
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudError::Config {
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(Aws {
            http,
            credentials,
            region,
            codebuild,
            logs,
            s3,
            virtual_hosted: !custom,
            backoff: Backoff::default(),
        })
    }

    /// One signed request, retried while the error is transient.
    pub async fn call(
        &self,
        service: &'static str,
        operation: &str,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), CloudError> {
        with_retry(&format!("{service} {operation}"), self.backoff, || {
            self.send(service, operation, method, url, headers, body)
        })
        .await
    }

    async fn send(
        &self,
        service: &'static str,
        operation: &str,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), CloudError> {
        let creds = self.credentials.credentials().await?;
        // S3 wants the payload's hash in a header (and signed); the other
        // services take it from the signature alone.
        let hash = hex::encode(Sha256::digest(body));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if service == "s3" {
            all.push(("x-amz-content-sha256", &hash));
        }
        let signed = aws_auth::sign(
            &SigningRequest {
                method,
                url,
                headers: &all,
                body,
            },
            &creds,
            &self.region,
            service,
            Utc::now(),
        );
        let method_v =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| CloudError::Config {
                message: format!("bad HTTP method `{method}`"),
            })?;
        let mut request = self.http.request(method_v, url.clone()).body(body.to_vec());
        for (name, value) in &all {
            request = request.header(*name, *value);
        }
        request = signed.apply(request, &creds)?;
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            aws_auth::host_header(url),
            url.path()
        );
        tracing::debug!(service, operation, url = %shown, "aws request");
        let (status, headers, body) = crate::cloud::exchange(request, &shown, BODY_LIMIT).await?;
        if status.is_success() {
            return Ok((headers, body));
        }
        let text = String::from_utf8_lossy(&body);
        let (code, message) = parse_json_error(&text)
            .or_else(|| crate::cloud::ec2::parse_error(&text))
            .unwrap_or_else(|| {
                (
                    status
                        .canonical_reason()
                        .unwrap_or("HTTP error")
                        .to_string(),
                    text.chars().take(200).collect(),
                )
            });
        const AUTH: &[&str] = &[
            "SignatureDoesNotMatch",
            "InvalidClientTokenId",
            "UnrecognizedClientException",
            "ExpiredToken",
            "ExpiredTokenException",
            "InvalidAccessKeyId",
            "AccessDenied",
            "AccessDeniedException",
            "MissingAuthenticationToken",
        ];
        if AUTH.contains(&code.as_str()) {
            return Err(CloudError::Auth {
                source_name: creds.source.to_string(),
                message: format!(
                    "{service} {operation} was refused with {code}: {message}; {}",
                    creds.source.hint()
                ),
            });
        }
        Err(CloudError::Api {
            service,
            operation: operation.to_string(),
            status: status.as_u16(),
            code,
            message,
            retry_after: None,
        })
    }

    /// A JSON 1.1 call (`CodeBuild_20161006.StartBuild`, …).
    pub async fn json(
        &self,
        service: &'static str,
        operation: &str,
        body: &Value,
    ) -> Result<Value, CloudError> {
        let (url, target) = match service {
            "codebuild" => (&self.codebuild, format!("CodeBuild_20161006.{operation}")),
            _ => (&self.logs, format!("Logs_20140328.{operation}")),
        };
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let (_, answer) = self
            .call(
                service,
                operation,
                "POST",
                url,
                &[("content-type", JSON), ("x-amz-target", &target)],
                &bytes,
            )
            .await?;
        if answer.iter().all(u8::is_ascii_whitespace) {
            return Ok(json!({}));
        }
        serde_json::from_slice(&answer).map_err(|e| CloudError::Protocol {
            url: url.to_string(),
            message: format!("{operation}: {e}"),
        })
    }

    /// The URL of an object (query added by the caller).
    pub fn object_url(&self, bucket: &str, key: &str) -> Url {
        let mut url = self.s3.clone();
        if self.virtual_hosted && !bucket.contains('.') {
            let host = format!("{bucket}.{}", self.s3.host_str().unwrap_or_default());
            let _ = url.set_host(Some(&host));
            url.set_path(&format!("/{}", super::encode_path(key)));
        } else {
            url.set_path(&format!(
                "/{}/{}",
                super::encode_path(bucket),
                super::encode_path(key)
            ));
        }
        url
    }

    /// Uploads the package: one `PutObject`, or a multipart upload.
    pub async fn upload(
        &self,
        bucket: &str,
        key: &str,
        package: &Package,
        reporter: &dyn Reporter,
    ) -> Result<(), ServiceError> {
        let url = self.object_url(bucket, key);
        let read = |offset, len| async move {
            package
                .read_range(offset, len)
                .await
                .map_err(|source| ServiceError::Pack {
                    path: package.path.clone(),
                    source,
                })
        };
        if package.size <= MULTIPART_THRESHOLD {
            let body = read(0, package.size as usize).await?;
            self.call(
                "s3",
                "PutObject",
                "PUT",
                &url,
                &[("content-type", "application/gzip")],
                &body,
            )
            .await?;
            reporter.upload_progress(package.size);
            return Ok(());
        }
        let mut create = url.clone();
        create.set_query(Some("uploads"));
        let (_, answer) = self
            .call("s3", "CreateMultipartUpload", "POST", &create, &[], b"")
            .await?;
        let answer = String::from_utf8_lossy(&answer);
        let upload_id = xml_text(&answer, "UploadId").ok_or_else(|| CloudError::Protocol {
            url: url.to_string(),
            message: "CreateMultipartUpload answered without an UploadId".into(),
        })?;
        let result = async {
            let mut etags = Vec::new();
            let mut offset = 0;
            let mut number = 1;
            while offset < package.size {
                let len = PART_SIZE.min(package.size - offset);
                let body = read(offset, len as usize).await?;
                let mut part = url.clone();
                part.query_pairs_mut()
                    .append_pair("partNumber", &number.to_string())
                    .append_pair("uploadId", &upload_id);
                let (headers, _) = self
                    .call("s3", "UploadPart", "PUT", &part, &[], &body)
                    .await?;
                let etag = headers
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                etags.push((number, etag));
                offset += len;
                number += 1;
                reporter.upload_progress(offset);
            }
            let mut xml = String::from("<CompleteMultipartUpload>");
            for (n, etag) in &etags {
                xml.push_str(&format!(
                    "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                    xml_escape(etag)
                ));
            }
            xml.push_str("</CompleteMultipartUpload>");
            let mut complete = url.clone();
            complete
                .query_pairs_mut()
                .append_pair("uploadId", &upload_id);
            let (_, answer) = self
                .call(
                    "s3",
                    "CompleteMultipartUpload",
                    "POST",
                    &complete,
                    &[("content-type", "application/xml")],
                    xml.as_bytes(),
                )
                .await?;
            // S3 may answer 200 with an error in the body.
            let answer = String::from_utf8_lossy(&answer);
            if let Some((code, message)) = crate::cloud::ec2::parse_error(&answer) {
                return Err(ServiceError::Cloud(CloudError::Api {
                    service: "s3",
                    operation: "CompleteMultipartUpload".into(),
                    status: 200,
                    code,
                    message,
                    retry_after: None,
                }));
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            let mut abort = url.clone();
            abort.query_pairs_mut().append_pair("uploadId", &upload_id);
            let _ = self
                .send("s3", "AbortMultipartUpload", "DELETE", &abort, &[], b"")
                .await;
        }
        result
    }

    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), CloudError> {
        let url = self.object_url(bucket, key);
        self.call("s3", "DeleteObject", "DELETE", &url, &[], b"")
            .await
            .map(|_| ())
    }
}

/// `{"__type": "…#Code", "message": "…"}`, as the JSON protocols answer.
fn parse_json_error(text: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(text).ok()?;
    let code = v.get("__type")?.as_str()?;
    let code = code.rsplit('#').next().unwrap_or(code).to_string();
    let message = v
        .get("message")
        .or_else(|| v.get("Message"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Some((code, message))
}

fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].to_string())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The registry host of an image reference (`docker.io` when it has none).
pub fn registry_host(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".into(),
    }
}

/// ECR's `ACCOUNT.dkr.ecr.REGION.amazonaws.com`: its region.
fn ecr_region(host: &str) -> Option<&str> {
    let rest = host.split_once(".dkr.ecr.")?.1;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    (!region.is_empty() && !region.contains('.')).then_some(region)
}

/// The buildspec for the request: log in (pre_build), `docker build`
/// (build), `docker push` (post_build, only after a successful build).
pub fn buildspec(builder: &Builder, req: &BuildRequest, dockerfile: &str) -> String {
    use crate::shell::quote;
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let needs_login = req.push || !req.cache_from.is_empty() || !req.cache_to.is_empty();
    let mut hosts: Vec<String> = req.images.iter().map(|i| registry_host(i)).collect();
    hosts.dedup();
    let mut login = Vec::new();
    let mut secret_used = false;
    if needs_login {
        for host in &hosts {
            if let Some(region) = ecr_region(host) {
                login.push(format!(
                    "aws ecr get-login-password --region {} | docker login --username AWS --password-stdin {}",
                    quote(region),
                    quote(host)
                ));
            } else if builder.registry_secret.is_some() {
                secret_used = true;
                login.push(format!(
                    "printf '%s' \"$ABSCONDA_REGISTRY_PASSWORD\" | docker login --username \"$ABSCONDA_REGISTRY_USERNAME\" --password-stdin {}",
                    quote(host)
                ));
            }
        }
    }
    let mut y = String::from("version: 0.2\n");
    if let (true, Some(secret)) = (secret_used, &builder.registry_secret) {
        y.push_str("env:\n  secrets-manager:\n");
        y.push_str(&format!(
            "    ABSCONDA_REGISTRY_USERNAME: {}\n    ABSCONDA_REGISTRY_PASSWORD: {}\n",
            q(&format!("{secret}:username")),
            q(&format!("{secret}:password"))
        ));
    }
    y.push_str("phases:\n");
    if !login.is_empty() {
        y.push_str("  pre_build:\n    on-failure: ABORT\n    commands:\n");
        for l in &login {
            y.push_str(&format!("      - {}\n", q(l)));
        }
    }
    let mut build = String::from("docker");
    for a in super::docker_build_args(req, dockerfile) {
        build.push(' ');
        build.push_str(&quote(&a));
    }
    y.push_str("  build:\n    on-failure: ABORT\n    commands:\n");
    if super::pushes_in_build(req) {
        y.push_str(&format!(
            "      - {}\n",
            q("docker buildx create --use --driver docker-container")
        ));
    }
    y.push_str(&format!("      - {}\n", q(&build)));
    if req.push && !super::pushes_in_build(req) {
        y.push_str("  post_build:\n    commands:\n");
        for image in &req.images {
            y.push_str(&format!(
                "      - {}\n",
                q(&format!("docker push {}", quote(image)))
            ));
        }
    }
    y
}

/// The build id's part after the project name: CodeBuild's default log stream.
fn stream_of(id: &str) -> &str {
    id.rsplit_once(':').map(|(_, s)| s).unwrap_or(id)
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
    let aws = Aws::for_builder(builder, Env::from_process())?;
    if req.push && builder.registry_secret.is_none() {
        for host in req.images.iter().map(|i| registry_host(i)) {
            if ecr_region(&host).is_none() {
                reporter.info(&format!(
                    "codebuild: no `registry_secret` for `{host}`: the push relies on the build image's own login"
                ));
            }
        }
    }
    let bucket = builder.bucket.clone().unwrap_or_default();
    let project = builder.codebuild_project.clone().unwrap_or_default();
    let key = package.object_name();

    let since = Instant::now();
    reporter.phase(Phase::Upload);
    let uploaded = tokio::select! {
        r = aws.upload(&bucket, &key, package, reporter) => r,
        _ = cancel.cancelled() => {
            let _ = aws.delete(&bucket, &key).await;
            return Err(super::interrupted());
        }
    };
    if let Err(e) = uploaded {
        let _ = aws.delete(&bucket, &key).await;
        return Err(e.into());
    }
    super::phase_done(report, reporter, Phase::Upload, since);

    let result = start_and_follow(
        &aws, builder, req, package, &bucket, &key, &project, reporter, cancel, report,
    )
    .await;
    super::report_delete(
        reporter,
        &format!("s3://{bucket}/{key}"),
        aws.delete(&bucket, &key).await,
    );
    result
}

#[allow(clippy::too_many_arguments)]
async fn start_and_follow(
    aws: &Aws,
    builder: &Builder,
    req: &BuildRequest,
    package: &Package,
    bucket: &str,
    key: &str,
    project: &str,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> anyhow::Result<()> {
    let minutes = builder.timeout.as_secs().div_ceil(60).clamp(5, 2160);
    let mut body = json!({
        "projectName": project,
        "sourceTypeOverride": "S3",
        "sourceLocationOverride": format!("{bucket}/{key}"),
        "buildspecOverride": buildspec(builder, req, &package.dockerfile),
        "privilegedModeOverride": true,
        "timeoutInMinutesOverride": minutes,
        // A retried StartBuild (an answer lost on the way) starts no second build.
        "idempotencyToken": format!("absconda-{:032x}", rand::random::<u128>()),
    });
    if let Some(group) = &builder.log_group {
        body["logsConfigOverride"] =
            json!({"cloudWatchLogs": {"status": "ENABLED", "groupName": group}});
    }
    let since = Instant::now();
    reporter.phase(Phase::Build);
    let started = aws.json("codebuild", "StartBuild", &body).await?;
    let id = started["build"]["id"]
        .as_str()
        .ok_or_else(|| CloudError::Protocol {
            url: aws.codebuild.to_string(),
            message: "StartBuild answered without a build id".into(),
        })?
        .to_string();
    reporter.info(&format!("codebuild: build `{id}` started"));
    let group = started["build"]["logs"]["groupName"]
        .as_str()
        .map(str::to_string)
        .or(builder.log_group.clone())
        .unwrap_or_else(|| format!("/aws/codebuild/{project}"));
    let stream = started["build"]["logs"]["streamName"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| stream_of(&id).to_string());
    let mut logs = LogFollower {
        group,
        stream,
        token: None,
    };
    let deadline = Instant::now() + builder.timeout;
    let build = loop {
        let b = aws
            .json("codebuild", "BatchGetBuilds", &json!({"ids": [id]}))
            .await?;
        let b = b["builds"][0].clone();
        logs.follow(aws, reporter).await;
        let status = b["buildStatus"].as_str().unwrap_or("IN_PROGRESS");
        if status != "IN_PROGRESS" || b["buildComplete"].as_bool() == Some(true) {
            // The last lines can reach the log after the status.
            logs.follow(aws, reporter).await;
            break b;
        }
        if Instant::now() >= deadline {
            let _ = aws.json("codebuild", "StopBuild", &json!({"id": id})).await;
            return Err(ServiceError::Timeout {
                service: "codebuild",
                id,
                after: builder.timeout,
            }
            .into());
        }
        tokio::select! {
            _ = tokio::time::sleep(super::POLL) => {}
            _ = cancel.cancelled() => {
                reporter.info(&format!("codebuild: stopping build `{id}`"));
                if let Err(e) = aws.json("codebuild", "StopBuild", &json!({"id": id})).await {
                    reporter.info(&format!(
                        "could not stop build `{id}`: {}",
                        crate::exit::one_line(&anyhow::Error::new(e))
                    ));
                }
                return Err(super::interrupted());
            }
        }
    };
    super::phase_done(report, reporter, Phase::Build, since);
    let seconds = build_seconds(&build).unwrap_or_else(|| since.elapsed().as_secs_f64());
    report.billed_seconds = Some(super::billed_minutes(seconds) * 60.0);
    let status = build["buildStatus"]
        .as_str()
        .unwrap_or("UNKNOWN")
        .to_string();
    let failed_phase = build["phases"]
        .as_array()
        .and_then(|ps| {
            ps.iter().find(|p| {
                matches!(
                    p["phaseStatus"].as_str(),
                    Some("FAILED" | "FAULT" | "TIMED_OUT")
                )
            })
        })
        .and_then(|p| p["phaseType"].as_str())
        .map(str::to_string);
    match status.as_str() {
        "SUCCEEDED" => Ok(()),
        "FAILED" | "TIMED_OUT"
            if matches!(failed_phase.as_deref(), Some("POST_BUILD" | "PRE_BUILD")) && req.push =>
        {
            Err(ServiceError::PushFailed {
                service: "codebuild",
                id,
                status,
            }
            .into())
        }
        "FAILED" | "TIMED_OUT" => Err(ServiceError::BuildFailed {
            service: "codebuild",
            id,
            status,
            phase: failed_phase,
        }
        .into()),
        _ => Err(ServiceError::Ended {
            service: "codebuild",
            id,
            status,
        }
        .into()),
    }
}

/// Seconds between the build's start and end, as CodeBuild reports them
/// (epoch seconds in the JSON protocol).
fn build_seconds(build: &Value) -> Option<f64> {
    let start = build["startTime"].as_f64()?;
    let end = build["endTime"].as_f64()?;
    (end >= start).then_some(end - start)
}

/// Reads the build's log stream from where it left off.
struct LogFollower {
    group: String,
    stream: String,
    token: Option<String>,
}

impl LogFollower {
    /// Prints new events; a stream that does not exist yet is not an error.
    async fn follow(&mut self, aws: &Aws, reporter: &dyn Reporter) {
        for _ in 0..LOG_PAGES_PER_POLL {
            let mut body = json!({
                "logGroupName": self.group,
                "logStreamName": self.stream,
                "startFromHead": true,
            });
            if let Some(t) = &self.token {
                body["nextToken"] = json!(t);
            }
            let page = match aws.json("logs", "GetLogEvents", &body).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "no log events yet");
                    return;
                }
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                let mut line = e["message"].as_str().unwrap_or_default().to_string();
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                reporter.output(true, line.as_bytes());
            }
            let next = page["nextForwardToken"].as_str().map(str::to_string);
            let same = next == self.token;
            if next.is_some() {
                self.token = next;
            }
            if events.is_empty() || same {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts() {
        for (image, host) in [
            ("alpine:3", "docker.io"),
            ("me/app:1", "docker.io"),
            ("localhost:5000/app:1", "localhost:5000"),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1",
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            ),
            ("ghcr.io/me/app:1", "ghcr.io"),
        ] {
            assert_eq!(registry_host(image), host, "{image}");
        }
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            Some("eu-west-1")
        );
        assert_eq!(ecr_region("ghcr.io"), None);
    }

    #[test]
    fn the_buildspec_logs_in_builds_and_pushes() {
        let cfg = crate::config::ConfigFile::parse(
            std::path::Path::new("/x/absconda-remote.yaml"),
            "builders:\n  cb:\n    provider: codebuild\n    bucket: b\n    codebuild_project: p\n    registry_secret: ci/registry\n",
        )
        .unwrap();
        let b = cfg.builder("cb").unwrap();
        let req = BuildRequest {
            images: vec![
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1".into(),
                "ghcr.io/me/app:1".into(),
            ],
            push: true,
            build_args: vec!["A=$(rm -rf /)".into()],
            ..Default::default()
        };
        let spec = buildspec(&b, &req, "sub dir/Dockerfile");
        for want in [
            r#""aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com""#,
            r#"ABSCONDA_REGISTRY_PASSWORD: "ci/registry:password""#,
            r#"--password-stdin ghcr.io""#,
            r#"docker build -f 'sub dir/Dockerfile'"#,
            r#"--build-arg 'A=$(rm -rf /)'"#,
            "  post_build:\n    commands:\n      - \"docker push 123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1\"",
            "  build:\n    on-failure: ABORT",
        ] {
            assert!(spec.contains(want), "`{want}` missing from:\n{spec}");
        }
        // Valid YAML whose commands are the shell lines, unchanged.
        let v: serde_norway::Value = serde_norway::from_str(&spec).unwrap();
        let build = v["phases"]["build"]["commands"][0].as_str().unwrap();
        assert!(
            build.starts_with("docker build -f 'sub dir/Dockerfile' -t 123456789012"),
            "{build}"
        );
        assert!(build.ends_with(" --build-arg 'A=$(rm -rf /)' ."), "{build}");
        // Without --push nothing logs in or pushes.
        let spec = buildspec(&b, &BuildRequest { push: false, ..req }, "Dockerfile");
        assert!(
            !spec.contains("login") && !spec.contains("push") && !spec.contains("secrets-manager"),
            "{spec}"
        );
    }

    #[test]
    fn json_errors() {
        assert_eq!(
            parse_json_error(
                r#"{"__type":"com.amazonaws#ResourceNotFoundException","message":"no"}"#
            ),
            Some(("ResourceNotFoundException".into(), "no".into()))
        );
        assert_eq!(parse_json_error("<Error/>"), None);
    }
}
