//! The byte streams an SSH session can run over.
//!
//! russh runs a session over anything that reads and writes bytes
//! (`client::connect_stream`). This module is that seam: a TCP socket, a
//! tunnel through an HTTP CONNECT or SOCKS5 proxy, a `direct-tcpip` channel
//! of a jump host, or a websocket that a cloud module opened (IAP, EC2
//! Instance Connect Endpoint) are all a [`BoxedStream`], and
//! [`crate::ssh::Session::connect_over`] turns one into an authenticated
//! session. Whoever knows how to reach the builder builds the stream; `ssh/`
//! does not know about clouds.

use tokio::io::{AsyncRead, AsyncWrite};

use super::SshError;
use super::proxy::Proxy;

/// A byte stream an SSH session can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Any transport, boxed.
pub type BoxedStream = Box<dyn Stream>;

/// Boxes a stream as a transport.
pub fn boxed<S: Stream>(stream: S) -> BoxedStream {
    Box::new(stream)
}

/// Opens a TCP connection to `host:port`, through `proxy` when one is given.
/// `addr` names the destination in errors.
pub async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&Proxy>,
    addr: &str,
) -> Result<BoxedStream, SshError> {
    match proxy {
        None => {
            let socket = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|source| SshError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            let _ = socket.set_nodelay(true);
            Ok(boxed(socket))
        }
        Some(proxy) => {
            let socket = proxy
                .connect(host, port)
                .await
                .map_err(|source| SshError::Proxy {
                    proxy: proxy.to_string(),
                    addr: addr.to_string(),
                    source,
                })?;
            Ok(boxed(socket))
        }
    }
}
