//! EC2 Instance Connect Endpoint (`tunnel: eice`): SSH to an instance that
//! has only a private address, through the endpoint in its VPC.
//!
//! The endpoint is found with EC2's `DescribeInstanceConnectEndpoints`
//! (one in the state `create-complete`, in the instance's VPC). The tunnel
//! is a websocket to `wss://{DnsName}/openTunnel?instanceConnectEndpointId=..&remotePort=22&privateIpAddress=..&maxTunnelDuration=..`,
//! presigned with SigV4 for the service `ec2-instance-connect`; once open,
//! its binary messages carry the TCP stream as it is, in both directions.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, DuplexStream};
use url::Url;

use super::CloudError;
use super::ec2::Ec2;
use super::websocket::{Incoming, WebSocket, WsError};

pub const SERVICE: &str = "ec2-instance-connect";
pub const ENDPOINT_ENV: &str = "ABSCONDA_EICE_ENDPOINT";
/// The longest tunnel EICE allows, in seconds: a build may take that long.
pub const MAX_TUNNEL_DURATION: u32 = 3600;

/// Why an EICE tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EiceError {
    #[error(
        "no EC2 Instance Connect Endpoint is ready (`create-complete`) in VPC `{vpc}` of region `{region}`"
    )]
    NoEndpoint { vpc: String, region: String },
    #[error("instance `{instance}` has no private IP address for EC2 Instance Connect Endpoint")]
    NoPrivateIp { instance: String },
    #[error("could not look up the EC2 Instance Connect Endpoints")]
    Describe(#[source] CloudError),
    #[error("could not open the EC2 Instance Connect Endpoint tunnel through `{endpoint}`")]
    Open {
        endpoint: String,
        #[source]
        source: WsError,
    },
    #[error("`{endpoint}` is not a ws:// or wss:// URL (`eice_endpoint:` or {ENDPOINT_ENV})")]
    Endpoint { endpoint: String },
    #[error("no AWS credentials to sign the EC2 Instance Connect Endpoint tunnel")]
    Credentials(#[source] CloudError),
}

impl EiceError {
    /// A refused signature or permission: waiting does not change it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            EiceError::Open {
                source: WsError::Refused {
                    status: 401 | 403,
                    ..
                },
                ..
            }
        )
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            EiceError::NoEndpoint { vpc, .. } => Some(format!(
                "create one with `aws ec2 create-instance-connect-endpoint --subnet-id SUBNET` in a subnet of `{vpc}`, and allow TCP 22 from its security group to the instance"
            )),
            EiceError::Open {
                source: WsError::Refused { status: 403, .. },
                ..
            } => Some(
                "allow `ec2-instance-connect:OpenTunnel` on the endpoint to the credentials absconda uses".into(),
            ),
            _ => None,
        }
    }
}

/// One endpoint as DescribeInstanceConnectEndpoints lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub instance_connect_endpoint_id: String,
    #[serde(default)]
    pub dns_name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub vpc_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeXml {
    #[serde(default)]
    instance_connect_endpoint_set: Items,
}

#[derive(Deserialize, Default)]
struct Items {
    #[serde(default)]
    item: Vec<Endpoint>,
}

/// Parses a DescribeInstanceConnectEndpoints answer.
pub fn parse_endpoints(xml: &str) -> Result<Vec<Endpoint>, String> {
    let doc: DescribeXml = quick_xml::de::from_str(xml)
        .map_err(|e| format!("cannot read the DescribeInstanceConnectEndpoints answer: {e}"))?;
    Ok(doc.instance_connect_endpoint_set.item)
}

/// Opens a tunnel to port `port` of the builder's instance and returns
/// the local end of it. `configured`: `eice_endpoint:`, which replaces
/// `wss://{DnsName}` (for private endpoints and tests).
pub async fn open(
    ec2: &Ec2,
    configured: Option<&str>,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<DuplexStream> {
    let instance = ec2.find().await?;
    let ip = instance
        .private_ip
        .clone()
        .ok_or_else(|| EiceError::NoPrivateIp {
            instance: instance.instance_id.clone(),
        })?;
    let vpc = instance.vpc_id.clone().unwrap_or_default();
    let xml = ec2
        .query(
            "DescribeInstanceConnectEndpoints",
            &[
                ("Filter.1.Name", "state"),
                ("Filter.1.Value.1", "create-complete"),
            ],
        )
        .await
        .map_err(EiceError::Describe)?;
    let endpoints = parse_endpoints(&xml).map_err(|message| {
        EiceError::Describe(CloudError::Protocol {
            url: ec2.endpoint().to_string(),
            message,
        })
    })?;
    let endpoint = endpoints
        .into_iter()
        .filter(|e| e.state == "create-complete" || e.state.is_empty())
        .find(|e| vpc.is_empty() || e.vpc_id.is_empty() || e.vpc_id == vpc)
        .ok_or_else(|| EiceError::NoEndpoint {
            vpc: if vpc.is_empty() {
                "?".into()
            } else {
                vpc.clone()
            },
            region: ec2.region().to_string(),
        })?;
    let base = configured
        .map(str::to_string)
        .or_else(|| std::env::var(ENDPOINT_ENV).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("wss://{}", endpoint.dns_name));
    let mut url = Url::parse(&base)
        .ok()
        .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some())
        .ok_or_else(|| EiceError::Endpoint {
            endpoint: base.clone(),
        })?;
    url.set_path("/openTunnel");
    url.set_query(None);
    url.query_pairs_mut()
        .append_pair(
            "instanceConnectEndpointId",
            &endpoint.instance_connect_endpoint_id,
        )
        .append_pair("remotePort", &port.to_string())
        .append_pair("privateIpAddress", &ip)
        .append_pair("maxTunnelDuration", &MAX_TUNNEL_DURATION.to_string());
    let credentials = ec2
        .credentials()
        .credentials()
        .await
        .map_err(EiceError::Credentials)?;
    let signed = super::aws_auth::presign(
        &url,
        &credentials,
        ec2.region(),
        SERVICE,
        chrono::Utc::now(),
        60,
    );
    let ws = WebSocket::connect(
        &signed,
        &[(
            "User-Agent",
            concat!("absconda/", env!("CARGO_PKG_VERSION")),
        )],
        None,
        timeout,
    )
    .await
    .map_err(|source| EiceError::Open {
        endpoint: endpoint.instance_connect_endpoint_id.clone(),
        source,
    })?;
    tracing::debug!(endpoint = %endpoint.instance_connect_endpoint_id, %ip, "EC2 Instance Connect Endpoint tunnel open");
    let (local, remote) = tokio::io::duplex(1 << 20);
    tokio::spawn(pump(ws, remote));
    Ok(local)
}

/// Moves bytes between the local pipe and the websocket until either ends.
async fn pump(mut ws: WebSocket, remote: DuplexStream) {
    let (mut rd, wr) = tokio::io::split(remote);
    let (tx, writer) = super::websocket::local_writer(wr);
    let mut buf = vec![0u8; 32 << 10];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    ws.close(1000).await;
                    break;
                }
                Ok(n) => {
                    if let Err(e) = ws.send(&buf[..n]).await {
                        tracing::warn!("the EC2 Instance Connect Endpoint tunnel failed: {}", super::iap::chain_text(&e));
                        break;
                    }
                }
            },
            m = ws.recv() => match m {
                Ok(Incoming::Binary(d)) => {
                    if tx.send(d).is_err() {
                        ws.close(1000).await;
                        break;
                    }
                }
                Ok(Incoming::Closed { code, reason }) => {
                    tracing::debug!(?code, %reason, "EC2 Instance Connect Endpoint tunnel closed");
                    break;
                }
                Err(e) => {
                    tracing::warn!("the EC2 Instance Connect Endpoint tunnel failed: {}", super::iap::chain_text(&e));
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_read_from_the_describe_answer() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstanceConnectEndpointsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <instanceConnectEndpointSet>
    <item>
      <ownerId>123456789012</ownerId>
      <instanceConnectEndpointId>eice-0123456789abcdef0</instanceConnectEndpointId>
      <dnsName>eice-0123456789abcdef0.0e1a2b3c.ec2-instance-connect-endpoint.us-east-1.amazonaws.com</dnsName>
      <state>create-complete</state>
      <vpcId>vpc-1</vpcId>
      <subnetId>subnet-1</subnetId>
    </item>
  </instanceConnectEndpointSet>
</DescribeInstanceConnectEndpointsResponse>"#;
        let e = parse_endpoints(xml).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].instance_connect_endpoint_id, "eice-0123456789abcdef0");
        assert_eq!(e[0].vpc_id, "vpc-1");
        assert!(e[0].dns_name.starts_with("eice-0123456789abcdef0."));
        assert!(
            parse_endpoints("<DescribeInstanceConnectEndpointsResponse/>")
                .unwrap()
                .is_empty()
        );
    }
}
