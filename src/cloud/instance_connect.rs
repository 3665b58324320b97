//! EC2 Instance Connect: pushing the user's public key to an instance for
//! 60 seconds (`SendSSHPublicKey`), so no long-lived key has to live on it.
//!
//! The service speaks the AWS JSON 1.1 protocol: a signed (SigV4, service
//! `ec2-instance-connect`) `POST /` with `X-Amz-Target:
//! AWSEC2InstanceConnectService.SendSSHPublicKey` and a JSON body. The
//! instance's sshd asks its metadata service for keys pushed in the last 60
//! seconds, so the key is pushed right before each connection, and the SSH
//! handshake must finish inside that window.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use url::Url;

use super::CloudError;
use super::aws_auth::{self, CredentialChain, SigningRequest};
use super::retry::{Backoff, with_retry};

/// How long a pushed key is accepted.
pub const KEY_WINDOW: Duration = Duration::from_secs(60);

const SERVICE: &str = "ec2-instance-connect";
const TARGET: &str = "AWSEC2InstanceConnectService.SendSSHPublicKey";
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// Error types that mean the credentials or their permissions are the problem.
const AUTH_TYPES: [&str; 6] = [
    "AuthException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
];

/// An Instance Connect client for one region.
pub struct InstanceConnect<'a> {
    endpoint: Url,
    region: String,
    http: reqwest::Client,
    credentials: &'a CredentialChain,
    backoff: Backoff,
}

impl<'a> InstanceConnect<'a> {
    /// `endpoint`: `instance_connect_endpoint:`, else
    /// `AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT`, else `AWS_ENDPOINT_URL`,
    /// else the regional public endpoint.
    pub fn new(
        endpoint: Option<&str>,
        region: &str,
        credentials: &'a CredentialChain,
        backoff: Backoff,
    ) -> Result<InstanceConnect<'a>, CloudError> {
        let env = credentials.env();
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| {
                env.get("AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT")
                    .map(str::to_string)
            })
            .or_else(|| env.get("AWS_ENDPOINT_URL").map(str::to_string))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("https://ec2-instance-connect.{region}.amazonaws.com"));
        let endpoint = Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| CloudError::Config {
                message: format!(
                    "the EC2 Instance Connect endpoint `{endpoint}` is not an http(s) URL"
                ),
            })?;
        let http = super::http::builder()?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudError::Config {
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(InstanceConnect {
            endpoint,
            region: region.to_string(),
            http,
            credentials,
            backoff,
        })
    }

    /// Lets `os_user` log in to `instance_id` with `public_key` for the next
    /// 60 seconds.
    pub async fn send_ssh_public_key(
        &self,
        instance_id: &str,
        os_user: &str,
        public_key: &str,
    ) -> Result<(), CloudError> {
        let body = json!({
            "InstanceId": instance_id,
            "InstanceOSUser": os_user,
            "SSHPublicKey": public_key,
        })
        .to_string();
        with_retry(
            "EC2 Instance Connect SendSSHPublicKey",
            self.backoff,
            || self.send_once(&body),
        )
        .await
    }

    async fn send_once(&self, body: &str) -> Result<(), CloudError> {
        let creds = self.credentials.credentials().await?;
        let signed = aws_auth::sign(
            &SigningRequest {
                method: "POST",
                url: &self.endpoint,
                headers: &[("content-type", CONTENT_TYPE), ("x-amz-target", TARGET)],
                body: body.as_bytes(),
            },
            &creds,
            &self.region,
            SERVICE,
            Utc::now(),
        );
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header("x-amz-target", TARGET)
            .body(body.to_string());
        request = signed.apply(request, &creds)?;
        let url = format!(
            "{}://{}/",
            self.endpoint.scheme(),
            self.endpoint.host_str().unwrap_or_default()
        );
        let transport = |e: reqwest::Error| CloudError::Transport {
            url: url.clone(),
            source: Box::new(e.without_url()),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        tracing::debug!(status = status.as_u16(), "ec2-instance-connect answer");
        if status.is_success() {
            let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if answer.get("Success").and_then(Value::as_bool) == Some(false) {
                return Err(CloudError::Api {
                    service: "ec2-instance-connect",
                    operation: "SendSSHPublicKey".into(),
                    status: status.as_u16(),
                    code: "Unsuccessful".into(),
                    message: "the service did not accept the key".into(),
                    retry_after: None,
                });
            }
            return Ok(());
        }
        let (code, message) = parse_error(&text);
        if status.as_u16() == 401 || status.as_u16() == 403 || AUTH_TYPES.contains(&code.as_str()) {
            return Err(CloudError::Auth {
                source_name: creds.source.to_string(),
                message: format!(
                    "SendSSHPublicKey was refused with {code}: {message}; the credentials need \
                     `ec2-instance-connect:SendSSHPublicKey` on the instance; {}",
                    creds.source.hint()
                ),
            });
        }
        Err(CloudError::Api {
            service: "ec2-instance-connect",
            operation: "SendSSHPublicKey".into(),
            status: status.as_u16(),
            code,
            message,
            retry_after: None,
        })
    }
}

/// `(type, message)` of a JSON (`__type`, `message`) or XML (`<Code>`,
/// `<Message>`) error body.
fn parse_error(body: &str) -> (String, String) {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let kind = v
            .get("__type")
            .and_then(Value::as_str)
            .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
            .unwrap_or_else(|| "Error".into());
        let message = v
            .get("message")
            .or_else(|| v.get("Message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        return (kind, message);
    }
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&close)? + start;
        Some(body[start..end].to_string())
    };
    (
        tag("Code").unwrap_or_else(|| "Error".into()),
        tag("Message").unwrap_or_else(|| body.chars().take(200).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_both_shapes() {
        assert_eq!(
            parse_error(
                r#"{"__type":"com.amazonaws.ec2instanceconnect#EC2InstanceNotFoundException","message":"no such instance"}"#
            ),
            (
                "EC2InstanceNotFoundException".into(),
                "no such instance".into()
            )
        );
        assert_eq!(
            parse_error(
                "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>bad</Message></Error></ErrorResponse>"
            ),
            ("SignatureDoesNotMatch".into(), "bad".into())
        );
    }
}
