//! A native SSH client for builders, on russh.
//!
//! One [`Session`] is one connection, authenticated once; everything a
//! build does (lease, upload, build, push, cleanup) runs in channels of that
//! connection, so there is one handshake and one host-key check per build.
//!
//! - [`transport`]: the byte stream a session runs over (TCP, a proxy
//!   tunnel, a jump host's channel, a cloud's websocket).
//! - [`proxy`]: HTTP CONNECT and SOCKS5 proxies.
//! - [`known_hosts`]: host key verification, the security boundary.
//! - [`auth`]: key files (with passphrases) and ssh-agent.
//! - [`agent`]: what answers forwarded agent channels (`--ssh`).
//! - [`exec`]: running commands with live output and exit statuses.
//!
//! Jump hosts: each hop is a full session of its own (its host key checked
//! under its own name, its own authentication); the next hop's session runs
//! over a `direct-tcpip` channel of the previous one.

pub mod agent;
pub mod auth;
pub mod exec;
pub mod jump;
pub mod known_hosts;
pub mod proxy;
pub mod ssh_config;
pub mod transport;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PublicKey, PublicKeyOrCertificate};

use known_hosts::{HostKeyPolicy, KnownHosts, Pin, Verdict, fingerprint, host_pattern};
use proxy::{Proxy, ProxyError};
use transport::BoxedStream;

/// Where and as whom to connect, and how to trust the host.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Key files to offer, in order; empty means the agent and OpenSSH's default files.
    pub identity_files: Vec<PathBuf>,
    /// OpenSSH user certificates to log in with (each with its private key
    /// among `identity_files`, or next to it as `NAME-cert.pub` → `NAME`).
    pub certificate_files: Vec<PathBuf>,
    /// Offer no ssh-agent keys (OpenSSH's `IdentitiesOnly yes`).
    pub identities_only: bool,
    /// The agent's socket (`IdentityAgent`): `none`, `SSH_AUTH_SOCK` or a path.
    pub identity_agent: Option<String>,
    /// Keepalive interval and how many unanswered ones end the connection
    /// (`ServerAliveInterval`/`ServerAliveCountMax`); default 15 s × 4.
    pub server_alive: Option<(Duration, usize)>,
    pub known_hosts: PathBuf,
    pub policy: HostKeyPolicy,
    pub pin: Option<Pin>,
    /// The name to look the host key up under instead of the address
    /// (for cloud VMs whose address changes at every start).
    pub host_key_alias: Option<String>,
    pub connect_timeout: Duration,
    /// The proxy the first TCP connection (to the first jump host, or to
    /// the host itself) goes through.
    pub proxy: Option<Proxy>,
    /// Jump hosts, in order: the session to `host` runs over a channel of
    /// the last one. Their own `jumps` and `proxy` are not used.
    pub jumps: Vec<Target>,
}

impl Target {
    /// A target with OpenSSH's defaults for everything but the address.
    pub fn new(host: &str, port: u16, user: &str, known_hosts: PathBuf) -> Target {
        Target {
            host: host.to_string(),
            port,
            user: user.to_string(),
            identity_files: Vec::new(),
            certificate_files: Vec::new(),
            identities_only: false,
            identity_agent: None,
            server_alive: None,
            known_hosts,
            policy: HostKeyPolicy::Strict,
            pin: None,
            host_key_alias: None,
            connect_timeout: Duration::from_secs(15),
            proxy: None,
            jumps: Vec::new(),
        }
    }

    /// How the connection is made, for `remote status` and messages:
    /// `direct`, `via proxy …`, `jump chain a → b`.
    pub fn route(&self) -> String {
        let mut parts = Vec::new();
        if !self.jumps.is_empty() {
            parts.push(format!(
                "jump chain {}",
                self.jumps
                    .iter()
                    .map(|j| j.display())
                    .chain(std::iter::once(self.display()))
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ));
        }
        if let Some(p) = &self.proxy {
            parts.push(format!("through proxy {p}"));
        }
        if parts.is_empty() {
            "direct".into()
        } else {
            parts.join(", ")
        }
    }

    /// The name the host key is recorded under in `known_hosts`.
    pub fn known_hosts_name(&self) -> String {
        host_pattern(
            self.host_key_alias.as_deref().unwrap_or(&self.host),
            self.port,
        )
    }

    /// `user@host:port`, for messages.
    pub fn display(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }
}

/// Errors while connecting, authenticating or running channels.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("could not connect to `{addr}`")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not reach `{addr}` through the proxy `{proxy}`")]
    Proxy {
        /// The proxy's URL, password hidden.
        proxy: String,
        addr: String,
        #[source]
        source: ProxyError,
    },
    #[error("the jump host `{hop}` could not open a connection to `{next}`")]
    JumpForward {
        hop: String,
        next: String,
        #[source]
        source: russh::Error,
    },
    #[error("the SSH server at `{addr}` could not open a connection to `{to}`")]
    Forward {
        addr: String,
        to: String,
        #[source]
        source: russh::Error,
    },
    #[error("connecting to `{addr}` timed out after {}s", after.as_secs())]
    ConnectTimeout { addr: String, after: Duration },
    #[error("SSH handshake with `{addr}` failed")]
    Handshake {
        addr: String,
        #[source]
        source: russh::Error,
    },
    #[error(
        "the host key of `{name}` is not known ({algorithm} key {fingerprint}); refusing to connect"
    )]
    UnknownHostKey {
        name: String,
        algorithm: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },
    #[error(
        "HOST KEY MISMATCH for `{name}`: the server presented {algorithm} key {fingerprint}, but `{}` records a different key at line {} ({}); this may be a man-in-the-middle attack",
        known_hosts.display(),
        lines.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
        recorded.join("; ")
    )]
    HostKeyChanged {
        name: String,
        algorithm: String,
        fingerprint: String,
        known_hosts: PathBuf,
        lines: Vec<usize>,
        recorded: Vec<String>,
    },
    #[error(
        "HOST KEY MISMATCH for `{name}`: the server presented {fingerprint}, but the config pins `host_key: {pinned}`"
    )]
    PinMismatch {
        name: String,
        fingerprint: String,
        pinned: String,
    },
    #[error("the host key {fingerprint} of `{name}` is marked @revoked in `{}` line {line}", known_hosts.display())]
    HostKeyRevoked {
        name: String,
        fingerprint: String,
        known_hosts: PathBuf,
        line: usize,
    },
    #[error("could not record the host key of `{name}` in `{}`", path.display())]
    RecordHostKey {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read `{}`", path.display())]
    KnownHostsRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("SSH channel for {what} on `{addr}` failed")]
    Channel {
        what: String,
        addr: String,
        #[source]
        source: russh::Error,
    },
    #[error("the connection to `{addr}` was lost")]
    Lost { addr: String },
    #[error("the SSH server `{addr}` refused agent forwarding (`--ssh`)")]
    AgentRefused { addr: String },
    #[error(
        "{what} on `{addr}` sent more than {} on {stream}, the most absconda reads from it; the builder's programs (its `docker`?) print far more than they should",
        crate::util::human_bytes(*limit as u64)
    )]
    TooMuchOutput {
        what: String,
        addr: String,
        stream: &'static str,
        limit: usize,
    },
}

impl SshError {
    /// True for failures of host key verification: the one class of error
    /// that must never be retried or worked around.
    pub fn is_host_key(&self) -> bool {
        matches!(
            self,
            SshError::UnknownHostKey { .. }
                | SshError::HostKeyChanged { .. }
                | SshError::PinMismatch { .. }
                | SshError::HostKeyRevoked { .. }
        )
    }
}

/// The russh event handler: checks the host key and remembers why it
/// refused, and serves agent channels the server opens (only ever for a
/// channel that asked for agent forwarding, see [`Session::exec_with_agent`]).
struct Client {
    check: Arc<Mutex<HostCheck>>,
    /// What answers the agent channels the server opens.
    agent: Arc<Mutex<Option<agent::AgentForward>>>,
}

struct HostCheck {
    name: String,
    known: KnownHosts,
    policy: HostKeyPolicy,
    pin: Option<Pin>,
    refusal: Option<SshError>,
    accepted: Option<PublicKey>,
}

impl HostCheck {
    fn verify(&mut self, key: &PublicKey) -> bool {
        let fp = fingerprint(key);
        let algorithm = key.algorithm().to_string();
        if let Some(pin) = &self.pin {
            if pin.matches(key) {
                self.accepted = Some(key.clone());
                return true;
            }
            self.refusal = Some(SshError::PinMismatch {
                name: self.name.clone(),
                fingerprint: fp,
                pinned: pin.fingerprint().to_string(),
            });
            return false;
        }
        match self.known.check(&self.name, key) {
            Verdict::Known { line } => {
                tracing::debug!(host = %self.name, line, "host key matches known_hosts");
                self.accepted = Some(key.clone());
                true
            }
            Verdict::Unknown if self.policy == HostKeyPolicy::AcceptNew => {
                if let Err(source) = self.known.record(&self.name, key) {
                    self.refusal = Some(SshError::RecordHostKey {
                        name: self.name.clone(),
                        path: self.known.path().to_path_buf(),
                        source,
                    });
                    return false;
                }
                tracing::warn!(
                    "recorded new host key for `{}` ({algorithm} {fp}) in `{}`",
                    self.name,
                    self.known.path().display()
                );
                self.accepted = Some(key.clone());
                true
            }
            Verdict::Unknown => {
                self.refusal = Some(SshError::UnknownHostKey {
                    name: self.name.clone(),
                    algorithm,
                    fingerprint: fp,
                    known_hosts: self.known.path().to_path_buf(),
                });
                false
            }
            Verdict::Changed { lines, recorded } => {
                self.refusal = Some(SshError::HostKeyChanged {
                    name: self.name.clone(),
                    algorithm,
                    fingerprint: fp,
                    known_hosts: self.known.path().to_path_buf(),
                    lines,
                    recorded,
                });
                false
            }
            Verdict::Revoked { line } => {
                self.refusal = Some(SshError::HostKeyRevoked {
                    name: self.name.clone(),
                    fingerprint: fp,
                    known_hosts: self.known.path().to_path_buf(),
                    line,
                });
                false
            }
        }
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // We never advertise certificate algorithms, so a server cannot
            // legitimately answer with one.
            PublicKeyOrCertificate::Certificate(_) => return Ok(false),
        };
        let mut check = self.check.lock().unwrap_or_else(|p| p.into_inner());
        Ok(check.verify(&key))
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let forward = self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(forward) = forward else {
            // Never asked for: refuse.
            drop(reply);
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(async move {
            match forward {
                agent::AgentForward::Socket(socket) => {
                    match tokio::net::UnixStream::connect(&socket).await {
                        Ok(mut agent) => {
                            let mut stream = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut agent, &mut stream).await;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "cannot reach the SSH agent at `{}`: {e}",
                                socket.display()
                            );
                        }
                    }
                }
                agent::AgentForward::Keys(keys) => {
                    if let Err(e) = keys.serve(channel.into_stream()).await {
                        tracing::debug!(error = %e, "a forwarded agent channel ended");
                    }
                }
            }
        });
        Ok(())
    }
}

/// An authenticated SSH connection to a builder.
pub struct Session {
    handle: Handle<Client>,
    addr: String,
    host_key: PublicKey,
    route: String,
    user: String,
    /// The jump hosts' sessions, which carry this one; kept open as long as it.
    hops: Vec<Handle<Client>>,
    agent: Arc<Mutex<Option<agent::AgentForward>>>,
}

impl Session {
    /// Connects along the target's route (proxy, jump hosts), verifies every
    /// host key, and authenticates with every hop and the host.
    ///
    /// No byte of user data is sent before the host key has been accepted:
    /// russh calls the check during key exchange, before authentication. A
    /// hop whose host key is refused is never asked to open the next hop.
    pub async fn connect(target: &Target) -> Result<Session, SshError> {
        let mut hops: Vec<Session> = Vec::new();
        let total = target.jumps.len();
        for (i, hop) in target.jumps.iter().enumerate() {
            let label = format!("{}:{} (jump host {} of {total})", hop.host, hop.port, i + 1);
            let stream = match hops.last() {
                None => {
                    let proxy = target.proxy.as_ref();
                    with_timeout(hop.connect_timeout, &label, async {
                        transport::dial(&hop.host, hop.port, proxy, &label).await
                    })
                    .await?
                }
                Some(prev) => prev.forward(&hop.host, hop.port).await?,
            };
            let session = Session::handshake(hop, stream, label).await?;
            hops.push(session);
        }
        let addr = format!("{}:{}", target.host, target.port);
        let stream = match hops.last() {
            None => {
                with_timeout(target.connect_timeout, &addr, async {
                    transport::dial(&target.host, target.port, target.proxy.as_ref(), &addr).await
                })
                .await?
            }
            Some(prev) => prev.forward(&target.host, target.port).await?,
        };
        let mut session = Session::handshake(target, stream, addr).await?;
        session.route = target.route();
        session.hops = hops.into_iter().flat_map(|h| h.into_handles()).collect();
        Ok(session)
    }

    /// Runs an SSH session over `stream`, which already leads to the
    /// target's sshd (a websocket tunnel, a channel, a socket): verifies the
    /// host key and authenticates. The target's `jumps` and `proxy` are not
    /// used: the stream replaces them.
    pub async fn connect_over(target: &Target, stream: BoxedStream) -> Result<Session, SshError> {
        let addr = format!("{}:{}", target.host, target.port);
        Session::handshake(target, stream, addr).await
    }

    /// Opens a `direct-tcpip` channel to `host:port` from this session's
    /// server, as the transport of the next hop.
    async fn forward(&self, host: &str, port: u16) -> Result<BoxedStream, SshError> {
        let channel = self
            .handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|source| SshError::JumpForward {
                hop: self.addr.clone(),
                next: format!("{host}:{port}"),
                source,
            })?;
        Ok(transport::boxed(channel.into_stream()))
    }

    /// Opens a TCP connection from the server's side to `host:port` (a
    /// `direct-tcpip` channel, dialled by its sshd), for a service that only
    /// the server can reach. Nothing runs on the server for it.
    pub async fn open_tcp(&self, host: &str, port: u16) -> Result<BoxedStream, SshError> {
        if self.handle.is_closed() {
            return Err(SshError::Lost {
                addr: self.addr.clone(),
            });
        }
        let channel = self
            .handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|source| SshError::Forward {
                addr: self.addr.clone(),
                to: format!("{host}:{port}"),
                source,
            })?;
        Ok(transport::boxed(channel.into_stream()))
    }

    fn into_handles(self) -> Vec<Handle<Client>> {
        let mut all = self.hops;
        all.push(self.handle);
        all
    }

    async fn handshake(
        target: &Target,
        stream: BoxedStream,
        addr: String,
    ) -> Result<Session, SshError> {
        let known =
            KnownHosts::load(&target.known_hosts).map_err(|source| SshError::KnownHostsRead {
                path: target.known_hosts.clone(),
                source,
            })?;
        let name = target.known_hosts_name();

        let mut config = client::Config {
            // Builds can be silent for a long time (a big `RUN` step): never
            // drop the connection for inactivity, detect a dead peer with
            // keepalives instead.
            inactivity_timeout: None,
            keepalive_interval: Some(
                target
                    .server_alive
                    .map(|(i, _)| i)
                    .unwrap_or(Duration::from_secs(15)),
            ),
            keepalive_max: target.server_alive.map(|(_, n)| n).unwrap_or(4),
            nodelay: true,
            window_size: 8 * 1024 * 1024,
            ..Default::default()
        };
        // Offer the algorithms we have recorded keys for first, as OpenSSH
        // does, so a host with several keys proves the one we know.
        let known_algs = known.algorithms_for(&name);
        if !known_algs.is_empty() && target.pin.is_none() {
            let mut prefs: Vec<_> = known_algs.clone();
            for a in config.preferred.key.iter() {
                if !prefs.contains(a) {
                    prefs.push(a.clone());
                }
            }
            config.preferred.key = prefs.into();
        }

        let check = Arc::new(Mutex::new(HostCheck {
            name,
            known,
            policy: target.policy,
            pin: target.pin.clone(),
            refusal: None,
            accepted: None,
        }));
        let agent = Arc::new(Mutex::new(None));
        let handler = Client {
            check: check.clone(),
            agent: agent.clone(),
        };
        let result = with_timeout(target.connect_timeout, &addr, async {
            client::connect_stream(Arc::new(config), stream, handler)
                .await
                .map_err(|source| SshError::Handshake {
                    addr: addr.clone(),
                    source,
                })
        })
        .await;
        let (refusal, accepted) = {
            let mut check = check.lock().unwrap_or_else(|p| p.into_inner());
            (check.refusal.take(), check.accepted.take())
        };
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        let mut handle = result?;
        let host_key = accepted.ok_or_else(|| SshError::Handshake {
            addr: addr.clone(),
            source: russh::Error::UnknownKey,
        })?;

        auth::authenticate(&mut handle, target).await?;
        tracing::debug!(%addr, "authenticated");
        Ok(Session {
            handle,
            addr,
            host_key,
            route: "direct".into(),
            user: target.user.clone(),
            hops: Vec::new(),
            agent,
        })
    }

    /// How this session reached its host: `direct`, a jump chain, a proxy.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Marks a session made over a caller's stream with how that stream was
    /// made (`IAP tunnel`, …), for `remote status`.
    pub fn set_route(&mut self, route: impl Into<String>) {
        self.route = route.into();
    }

    /// The user this session is logged in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the builder is reached on this machine's loopback.
    pub fn on_loopback(&self) -> bool {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The verified host key.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Opens a session channel and starts `command` in it.
    pub async fn exec(&self, what: &str, command: &str) -> Result<exec::RemoteProcess, SshError> {
        let err = |source| SshError::Channel {
            what: what.to_string(),
            addr: self.addr.clone(),
            source,
        };
        if self.handle.is_closed() {
            return Err(SshError::Lost {
                addr: self.addr.clone(),
            });
        }
        tracing::trace!(%what, %command, "exec");
        tracing::debug!(%what, "channel open and exec");
        let channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.exec(true, command).await.map_err(err)?;
        Ok(exec::RemoteProcess::new(channel, what, &self.addr))
    }

    /// Opens a session channel now, to start a command in it later with
    /// [`Opened::exec`]: opening costs a round trip, which is then spent
    /// while something else is still going on.
    pub async fn open(&self, what: &str) -> Result<Opened, SshError> {
        if self.handle.is_closed() {
            return Err(SshError::Lost {
                addr: self.addr.clone(),
            });
        }
        let channel =
            self.handle
                .channel_open_session()
                .await
                .map_err(|source| SshError::Channel {
                    what: what.to_string(),
                    addr: self.addr.clone(),
                    source,
                })?;
        tracing::debug!(%what, "channel opened ahead");
        Ok(Opened {
            channel,
            what: what.to_string(),
            addr: self.addr.clone(),
        })
    }

    /// Like [`Session::exec`], with `forward` (the local agent, or keys
    /// absconda serves itself) forwarded to the command (`SSH_AUTH_SOCK` is
    /// set there by the server). Fails with [`SshError::AgentRefused`] when
    /// the server does not allow it.
    pub async fn exec_with_agent(
        &self,
        what: &str,
        command: &str,
        forward: &agent::AgentForward,
    ) -> Result<exec::RemoteProcess, SshError> {
        let err = |source| SshError::Channel {
            what: what.to_string(),
            addr: self.addr.clone(),
            source,
        };
        if self.handle.is_closed() {
            return Err(SshError::Lost {
                addr: self.addr.clone(),
            });
        }
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(forward.clone());
        let mut channel = self.handle.channel_open_session().await.map_err(err)?;
        channel.agent_forward(true).await.map_err(err)?;
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match channel.wait().await {
                    Some(russh::ChannelMsg::Success) => return true,
                    Some(russh::ChannelMsg::Failure) | None => return false,
                    Some(_) => continue,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !answer {
            return Err(SshError::AgentRefused {
                addr: self.addr.clone(),
            });
        }
        tracing::trace!(%what, %command, "exec with agent forwarding");
        channel.exec(true, command).await.map_err(err)?;
        Ok(exec::RemoteProcess::new(channel, what, &self.addr))
    }

    /// Runs `command` to completion, feeding it `stdin`, and collects its
    /// output: at most [`exec::OUTPUT_LIMIT`] of stdout (more is an error)
    /// and the last [`exec::STDERR_LIMIT`] of stderr.
    pub async fn output(
        &self,
        what: &str,
        command: &str,
        stdin: &[u8],
    ) -> Result<exec::Output, SshError> {
        self.output_limited(what, command, stdin, exec::OUTPUT_LIMIT)
            .await
    }

    /// [`Session::output`] with another limit for stdout.
    pub async fn output_limited(
        &self,
        what: &str,
        command: &str,
        stdin: &[u8],
        stdout_limit: usize,
    ) -> Result<exec::Output, SshError> {
        self.exec(what, command)
            .await?
            .output_limited(stdin, stdout_limit)
            .await
    }

    /// Closes the connection politely, then the jump hosts' (last first).
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        for hop in self.hops.iter().rev() {
            let _ = hop
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }
}

/// A session channel opened ahead of its command (see [`Session::open`]).
pub struct Opened {
    channel: russh::Channel<russh::client::Msg>,
    what: String,
    addr: String,
}

impl Opened {
    /// Starts `command` in the channel (no round trip: its output is the
    /// answer).
    pub async fn exec(self, command: &str) -> Result<exec::RemoteProcess, SshError> {
        tracing::trace!(what = %self.what, %command, "exec in an opened channel");
        self.channel
            .exec(true, command)
            .await
            .map_err(|source| SshError::Channel {
                what: self.what.clone(),
                addr: self.addr.clone(),
                source,
            })?;
        Ok(exec::RemoteProcess::new(
            self.channel,
            &self.what,
            &self.addr,
        ))
    }
}

/// Runs `fut` with the connect timeout.
async fn with_timeout<T>(
    after: Duration,
    addr: &str,
    fut: impl std::future::Future<Output = Result<T, SshError>>,
) -> Result<T, SshError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| SshError::ConnectTimeout {
            addr: addr.to_string(),
            after,
        })?
}
