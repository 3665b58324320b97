//! Cloud providers: the machines a builder runs on.
//!
//! A builder is either an always-on SSH host or a VM in Google Compute Engine
//! or EC2 that absconda starts and stops through the cloud's REST API. Each
//! cloud lives in its own file and implements [`Provider`]; the build pipeline
//! only sees [`InstanceInfo`] and the normalised [`Status`].
//!
//! Every API call goes through [`retry::with_retry`], which retries transient
//! failures (connection errors, 429, 5xx, throttling) with exponential backoff
//! and jitter under one deadline, and never retries an authentication error.

pub mod aws_auth;
pub mod azure;
pub mod azure_auth;
pub mod ec2;
pub mod eice;
pub mod gce;
pub mod gcp_auth;
pub mod gcp_token;
pub mod http;
pub mod iap;
pub mod instance_connect;
pub mod jwt;
pub mod oslogin;
pub mod retry;
pub mod websocket;

use std::fmt;
use std::time::Duration;

/// The most of one HTTP answer absconda reads from a cloud API or a
/// metadata server: their answers are a few KiB, and a broken or hostile
/// endpoint must not grow the client's memory.
pub const BODY_LIMIT: usize = 4 << 20;

/// Why an answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http(reqwest::Error),
    #[error("the answer is longer than {}, the most absconda reads", crate::util::human_bytes(*limit as u64))]
    TooLong { limit: usize },
}

/// Reads a response's body, at most `limit` bytes: a longer one is an
/// error as soon as it shows (by its `Content-Length` or while reading).
pub async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLong { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLong { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Sends a request and reads its answer's status, headers and body (at most
/// `limit` bytes). A failure to connect or read, or an overlong body, is an
/// error naming `shown`: the URL as it may appear in logs and messages.
pub async fn exchange(
    request: reqwest::RequestBuilder,
    shown: &str,
    limit: usize,
) -> Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Vec<u8>), CloudError> {
    let transport = |e: reqwest::Error| CloudError::Transport {
        url: shown.to_string(),
        source: Box::new(e.without_url()),
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = read_body(response, limit).await.map_err(|e| match e {
        BodyError::Http(e) => transport(e),
        e => CloudError::Protocol {
            url: shown.to_string(),
            message: e.to_string(),
        },
    })?;
    Ok((status, headers, body))
}

/// The normalised life-cycle state of a VM, whatever the cloud calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Booting: GCE PROVISIONING/STAGING/REPAIRING, EC2 pending.
    Starting,
    /// GCE RUNNING, EC2 running; an SSH host is always `Running`.
    Running,
    /// GCE STOPPING/SUSPENDING, EC2 stopping/shutting-down.
    Stopping,
    /// GCE TERMINATED/SUSPENDED, EC2 stopped.
    Stopped,
    /// The instance no longer exists (EC2 terminated, GCE 404).
    Gone,
    /// A state this version does not know; the raw name is kept in `InstanceInfo`.
    Unknown,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Gone => "gone",
            Status::Unknown => "unknown",
        })
    }
}

/// What a cloud says about one instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceInfo {
    /// The cloud's own identifier (GCE instance name, EC2 instance id).
    pub id: String,
    pub status: Status,
    /// The status exactly as the cloud spelled it (`TERMINATED`, `stopped`, …).
    pub raw_status: String,
    /// The address to reach SSH on, when the instance has one.
    pub address: Option<String>,
}

/// Errors from a cloud API, each naming the request it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Credentials were missing, rejected or could not be loaded.
    /// `source_name` says which credential source was used
    /// (for example "service account key file `/path/key.json`").
    #[error("authentication failed using {source_name}: {message}")]
    Auth {
        source_name: String,
        message: String,
    },
    /// The API answered with an error.
    #[error("{service} API error {status} for {operation}: {code}: {message}")]
    Api {
        service: &'static str,
        operation: String,
        status: u16,
        code: String,
        message: String,
        /// Seconds from a `Retry-After` header, when present.
        retry_after: Option<Duration>,
    },
    /// The request never got an HTTP answer (DNS, connect, reset, TLS).
    #[error("could not reach {url}")]
    Transport {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer could not be understood.
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
    /// The instance named in the config does not exist.
    #[error("instance `{instance}` not found")]
    NotFound { instance: String },
    /// A long-running operation finished with an error.
    #[error("operation `{operation}` failed: {message}")]
    OperationFailed { operation: String, message: String },
    /// The builder's settings cannot be used as they are: no region, an
    /// `api_endpoint` that is not an http(s) URL, a name that matches
    /// several instances.
    #[error("invalid settings: {message}")]
    Config { message: String },
    /// A deadline passed; `last` is the last transient error seen, if any.
    #[error("{what} did not finish within {}s", after.as_secs())]
    Timeout {
        what: String,
        after: Duration,
        #[source]
        last: Option<Box<CloudError>>,
    },
}

impl CloudError {
    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            // A certificate that is not trusted now will not be on retry.
            CloudError::Transport { source, .. } => !http::is_certificate_error(source.as_ref()),
            // No capacity or quota: that lasts minutes, not seconds; a pool
            // moves on to its next builder, a lone builder says so at once.
            CloudError::Api { .. } if self.is_capacity() => false,
            CloudError::Api { status, code, .. } => {
                *status == 429
                    || *status >= 500
                    || code == "RequestLimitExceeded"
                    || code == "Throttling"
                    || code == "rateLimitExceeded"
                    || code == "userRateLimitExceeded"
            }
            _ => false,
        }
    }

    /// Whether the cloud has no room for the VM: no capacity in the zone
    /// for its type, or a quota reached.
    pub fn is_capacity(&self) -> bool {
        let CloudError::Api { code, .. } = self else {
            return false;
        };
        const CODES: &[&str] = &[
            // EC2
            "InsufficientInstanceCapacity",
            "InsufficientHostCapacity",
            "InsufficientCapacity",
            "InstanceLimitExceeded",
            "VcpuLimitExceeded",
            "MaxSpotInstanceCountExceeded",
            // Compute Engine
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
            "QUOTA_EXCEEDED",
            // Azure
            "AllocationFailed",
            "ZonalAllocationFailed",
            "OverconstrainedAllocationRequest",
            "SkuNotAvailable",
        ];
        CODES.contains(&code.as_str())
    }

    /// The server's requested delay before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CloudError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// One cloud's view of one builder VM.
///
/// `start` and `stop` are idempotent: starting a running VM or stopping a
/// stopped one succeeds without doing anything, so two clients racing to start
/// the same builder are safe. Both return once the cloud has accepted the
/// request; callers poll [`Provider::describe`] for the state they want.
pub trait Provider: Send + Sync {
    /// A short name for messages, for example `gce` or `ec2`.
    fn kind(&self) -> &'static str;
    /// The current state and address.
    fn describe(&self) -> impl Future<Output = Result<InstanceInfo, CloudError>> + Send;
    fn start(&self) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn stop(&self) -> impl Future<Output = Result<(), CloudError>> + Send;
}

#[cfg(test)]
mod tests {
    /// An HTTP server on loopback answering every request with `head` and
    /// then `len` bytes of `x`.
    async fn server(head: &'static str, len: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = sock.read(&mut req).await;
                    let _ = sock.write_all(head.as_bytes()).await;
                    let chunk = vec![b'x'; 64 << 10];
                    let mut sent = 0;
                    while sent < len {
                        let n = chunk.len().min(len - sent);
                        if sock.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                });
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_only() {
        let client = reqwest::Client::new();
        // No Content-Length: the limit shows while reading 1 GiB.
        let url = server("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 1 << 30).await;
        let start = std::time::Instant::now();
        let response = client.get(&url).send().await.unwrap();
        let err = read_body(response, BODY_LIMIT).await.unwrap_err();
        assert!(matches!(err, BodyError::TooLong { .. }), "{err}");
        assert!(err.to_string().contains("longer than 4.0 MiB"), "{err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
        // A Content-Length over the limit is refused before reading.
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n",
            0,
        )
        .await;
        let response = client.get(&url).send().await.unwrap();
        assert!(matches!(
            read_body(response, BODY_LIMIT).await,
            Err(BodyError::TooLong { .. })
        ));
        // Within the limit: the whole body.
        let url = server("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 1000).await;
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(read_body(response, BODY_LIMIT).await.unwrap().len(), 1000);
    }

    use super::*;
}
