//! Remote processes: one exec'd command in one SSH channel.
//!
//! stdout and stderr stay apart (SSH carries stderr as extended data 1), the
//! exit status or signal is reported as the server sent it, and writing to
//! stdin respects the channel window so a fast producer waits for a slow
//! network instead of buffering.
//!
//! Whatever is buffered has a cap, whatever the builder sends: collected
//! stdout ([`OUTPUT_LIMIT`], more is an error), a protocol line
//! ([`LINE_LIMIT`], more ends the stream), and stderr kept for messages (the
//! last [`STDERR_LIMIT`]). Build logs are streamed, never collected.

use russh::ChannelMsg;
use russh::client::Msg;
use russh::{Channel, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::AsyncWriteExt;

use super::SshError;

/// The most stdout [`RemoteProcess::output`] collects (probe, status and
/// health reports are a few hundred bytes).
pub const OUTPUT_LIMIT: usize = 1 << 20;
/// The longest line [`Reader::line`] buffers (protocol lines are short).
pub const LINE_LIMIT: usize = 64 << 10;
/// How much stderr is kept for error messages: the last this many bytes.
pub const STDERR_LIMIT: usize = 64 << 10;

/// Appends `data` to `buf`, keeping only the last `limit` bytes.
pub fn keep_tail(buf: &mut Vec<u8>, data: &[u8], limit: usize) {
    if data.len() >= limit {
        buf.clear();
        buf.extend_from_slice(&data[data.len() - limit..]);
        return;
    }
    buf.extend_from_slice(data);
    if buf.len() > limit {
        let excess = buf.len() - limit;
        buf.drain(..excess);
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    Signal(String),
    /// The channel closed without a status: the connection or the server
    /// went away under it.
    Unknown,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }

    pub fn code(&self) -> Option<u32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            _ => None,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit status {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
            ExitStatus::Unknown => f.write_str("no exit status (connection lost?)"),
        }
    }
}

/// A finished command's status and captured output.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last lines of stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

/// Something a remote process sent.
#[derive(Debug)]
pub enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// The reading side of a remote process.
pub struct Reader {
    read: ChannelReadHalf,
    status: Option<ExitStatus>,
    done: bool,
    /// Set when [`Reader::line`] met a line longer than [`LINE_LIMIT`].
    overlong: bool,
}

impl Reader {
    /// The next output chunk or the exit status; `None` once the channel is closed.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            match self.read.wait().await {
                Some(ChannelMsg::Data { data }) => return Some(Event::Stdout(data.to_vec())),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    return Some(Event::Stderr(data.to_vec()));
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let s = ExitStatus::Code(exit_status);
                    self.status = Some(s.clone());
                    return Some(Event::Exit(s));
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    let s = ExitStatus::Signal(format!("{signal_name:?}"));
                    self.status = Some(s.clone());
                    return Some(Event::Exit(s));
                }
                Some(ChannelMsg::Close) | None => {
                    self.done = true;
                    if self.status.is_none() {
                        self.status = Some(ExitStatus::Unknown);
                        return Some(Event::Exit(ExitStatus::Unknown));
                    }
                    return None;
                }
                Some(_) => continue,
            }
        }
    }

    /// Reads until the channel closes, handing output to `sink`, and returns the status.
    pub async fn drain(&mut self, mut sink: impl FnMut(bool, &[u8])) -> ExitStatus {
        while let Some(ev) = self.next().await {
            match ev {
                Event::Stdout(d) => sink(false, &d),
                Event::Stderr(d) => sink(true, &d),
                Event::Exit(_) => {}
            }
        }
        self.status.clone().unwrap_or(ExitStatus::Unknown)
    }

    /// True once [`Reader::line`] gave up on a line longer than
    /// [`LINE_LIMIT`]: the `None` it returned was not the channel closing.
    pub fn overlong(&self) -> bool {
        self.overlong
    }

    /// Reads one line of stdout (without the newline); `None` once the
    /// channel is closed and nothing is left, or at a line longer than
    /// [`LINE_LIMIT`] (see [`Reader::overlong`]). Stderr seen meanwhile is
    /// appended to `stderr`, of which the last [`STDERR_LIMIT`] bytes are
    /// kept. Output may still arrive after the exit status, so reading goes
    /// on until the channel closes.
    pub async fn line(&mut self, buf: &mut Vec<u8>, stderr: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            if self.overlong || buf.len() > LINE_LIMIT {
                self.overlong = true;
                buf.clear();
                return None;
            }
            match self.next().await {
                Some(Event::Stdout(d)) => buf.extend_from_slice(&d),
                Some(Event::Stderr(d)) => keep_tail(stderr, &d, STDERR_LIMIT),
                Some(Event::Exit(_)) => {}
                None => {
                    if buf.is_empty() {
                        return None;
                    }
                    let line = String::from_utf8_lossy(buf).into_owned();
                    buf.clear();
                    return Some(line);
                }
            }
        }
    }
}

/// The writing side of a remote process (its stdin).
pub struct Writer {
    write: ChannelWriteHalf<Msg>,
    what: String,
    addr: String,
}

impl Writer {
    fn err(&self, source: russh::Error) -> SshError {
        SshError::Channel {
            what: self.what.clone(),
            addr: self.addr.clone(),
            source,
        }
    }

    /// Writes to stdin, waiting for window space (backpressure).
    pub async fn write_all(&self, data: &[u8]) -> Result<(), SshError> {
        let mut w = self.write.make_writer();
        w.write_all(data)
            .await
            .map_err(|e| self.err(russh::Error::IO(e)))?;
        w.flush().await.map_err(|e| self.err(russh::Error::IO(e)))
    }

    /// Closes stdin.
    pub async fn eof(&self) -> Result<(), SshError> {
        self.write.eof().await.map_err(|e| self.err(e))
    }

    /// A `tokio::io::AsyncWrite` for stdin, for streaming copies.
    pub fn stream(&self) -> impl tokio::io::AsyncWrite + Unpin + 'static {
        self.write.make_writer()
    }
}

/// One command running in one channel.
pub struct RemoteProcess {
    pub reader: Reader,
    pub writer: Writer,
}

impl RemoteProcess {
    pub(super) fn new(channel: Channel<Msg>, what: &str, addr: &str) -> RemoteProcess {
        let (read, write) = channel.split();
        RemoteProcess {
            reader: Reader {
                read,
                status: None,
                done: false,
                overlong: false,
            },
            writer: Writer {
                write,
                what: what.to_string(),
                addr: addr.to_string(),
            },
        }
    }

    /// Feeds `stdin`, closes it, and collects everything until exit (at
    /// most [`OUTPUT_LIMIT`] of stdout, see [`RemoteProcess::output_limited`]).
    pub async fn output(self, stdin: &[u8]) -> Result<Output, SshError> {
        self.output_limited(stdin, OUTPUT_LIMIT).await
    }

    /// Feeds `stdin`, closes it, and collects stdout up to `stdout_limit`
    /// bytes and the last [`STDERR_LIMIT`] bytes of stderr. More stdout is
    /// an error at once: the channel is dropped unread rather than buffered.
    pub async fn output_limited(
        mut self,
        stdin: &[u8],
        stdout_limit: usize,
    ) -> Result<Output, SshError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let writer = &self.writer;
        let reader = &mut self.reader;
        let write = async {
            if !stdin.is_empty() {
                writer.write_all(stdin).await?;
            }
            writer.eof().await
        };
        let read = async {
            while let Some(ev) = reader.next().await {
                match ev {
                    Event::Stdout(d) => {
                        if stdout.len() + d.len() > stdout_limit {
                            return Err(SshError::TooMuchOutput {
                                what: writer.what.clone(),
                                addr: writer.addr.clone(),
                                stream: "stdout",
                                limit: stdout_limit,
                            });
                        }
                        stdout.extend_from_slice(&d);
                    }
                    Event::Stderr(d) => keep_tail(&mut stderr, &d, STDERR_LIMIT),
                    Event::Exit(_) => {}
                }
            }
            Ok(reader.status.clone().unwrap_or(ExitStatus::Unknown))
        };
        // Too much output ends the write too: a process flooding stdout
        // may never read its stdin.
        let (w, status) = {
            tokio::pin!(write);
            tokio::pin!(read);
            let mut written = None;
            let status = loop {
                tokio::select! {
                    r = &mut write, if written.is_none() => written = Some(r),
                    s = &mut read => break s?,
                }
            };
            let w = match written {
                Some(r) => r,
                None => write.await,
            };
            (w, status)
        };
        // A process may exit without reading its stdin; that is not our error.
        if let Err(e) = w
            && status == ExitStatus::Unknown
        {
            return Err(e);
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}
