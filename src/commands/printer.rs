//! The CLI's [`Reporter`]: progress bars on a terminal, plain lines otherwise.
//!
//! Remote build output goes to our stdout/stderr as the builder wrote it,
//! except with `--json`, where stdout is reserved for the report, and with
//! `--quiet`, where it is kept (the last 64 KiB) and shown only if the build
//! fails. When stderr is not a terminal nothing but plain lines is written:
//! no cursor movement, no colour. `NO_COLOR` turns colour off on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::build::human_bytes;
use crate::commands::human;
use crate::report::{Phase, Reporter};

/// `--quiet`: only errors and the final image names.
static QUIET: AtomicBool = AtomicBool::new(false);

/// How much of the build output `--quiet` keeps for a failure.
const QUIET_TAIL: usize = 64 * 1024;

/// How often plain (non-terminal) upload progress lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Upload {
    started: Option<Instant>,
    wire: u64,
    done: u64,
    total: u64,
    last_line: Option<Instant>,
    is_bar: bool,
}

/// The `--output` download: a bar on a terminal, plain lines otherwise.
#[derive(Default)]
struct Download {
    started: Option<Instant>,
    received: u64,
    total: Option<u64>,
    last_line: Option<Instant>,
    bar: Option<ProgressBar>,
}

pub struct Printer {
    json: bool,
    quiet: bool,
    bar: Mutex<Option<(Phase, ProgressBar)>>,
    tty: bool,
    colour: bool,
    upload: Mutex<Upload>,
    download: Mutex<Download>,
    /// With `--quiet`: the end of the build output, for a failure.
    tail: Mutex<Vec<u8>>,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        let tty = std::io::stderr().is_terminal();
        Printer {
            json,
            quiet: quiet(),
            bar: Mutex::new(None),
            tty,
            colour: tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            upload: Mutex::new(Upload::default()),
            download: Mutex::new(Download::default()),
            tail: Mutex::new(Vec::new()),
        }
    }

    fn finish_bar(&self) {
        if let Some((_, bar)) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bar.finish_and_clear();
        }
    }

    /// With `--quiet`, writes the kept build output to stderr (after a failure).
    pub fn show_kept_output(&self) {
        let tail = std::mem::take(&mut *self.tail.lock().unwrap_or_else(|p| p.into_inner()));
        if !tail.is_empty() {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(&tail);
            let _ = e.flush();
        }
    }

    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((_, bar)) => bar.println(format!("absconda: {text}")),
            None => eprintln!("absconda: {text}"),
        }
    }

    fn spinner(&self, message: String) -> ProgressBar {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} · {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    fn upload_bar_style(&self) -> ProgressStyle {
        let template = if self.colour {
            "sending the context [{bar:30.cyan/blue}] {bytes}/{total_bytes} {percent}% · {binary_bytes_per_sec} · {eta} left"
        } else {
            "sending the context [{bar:30}] {bytes}/{total_bytes} {percent}% · {binary_bytes_per_sec} · {eta} left"
        };
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    fn download_bar(&self, total: Option<u64>) -> ProgressBar {
        let (bar, template) = match total {
            Some(t) => (
                ProgressBar::new(t),
                if self.colour {
                    "receiving the build output [{bar:30.cyan/blue}] {bytes}/{total_bytes} {percent}% · {binary_bytes_per_sec} · {eta} left"
                } else {
                    "receiving the build output [{bar:30}] {bytes}/{total_bytes} {percent}% · {binary_bytes_per_sec} · {eta} left"
                },
            ),
            None => (
                ProgressBar::no_length(),
                "{spinner} receiving the build output: {bytes} · {binary_bytes_per_sec} · {elapsed}",
            ),
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

fn label(phase: Phase) -> &'static str {
    match phase {
        Phase::Start => "starting the builder",
        Phase::Ready => "waiting until the builder is ready",
        Phase::Connect => "connecting",
        Phase::Lease => "taking the builder lease",
        Phase::Upload => "sending the context",
        Phase::Build => "building",
        Phase::Push => "pushing",
        Phase::Cleanup => "cleaning up",
        Phase::Stop => "stopping the builder",
    }
}

fn since() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}

/// "12.0 MiB of 40.3 MiB (30%), 5.2 MiB/s, 5 s left"
fn plain_progress(u: &Upload) -> String {
    let secs = u
        .started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or_default();
    let rate = if secs > 0.0 {
        u.done as f64 / secs
    } else {
        0.0
    };
    let pct = (u.done * 100).checked_div(u.total).unwrap_or(100);
    let left = if rate > 0.0 && u.total > u.done {
        format!(
            ", {} left",
            human::duration(Duration::from_secs_f64((u.total - u.done) as f64 / rate))
        )
    } else {
        String::new()
    };
    format!(
        "{} of {} ({pct}%), {}/s{left}",
        human_bytes(u.done),
        human_bytes(u.total),
        human_bytes(rate as u64)
    )
}

/// "12.0 MiB received, 5.2 MiB/s" or, with a known total,
/// "12.0 MiB of 40.3 MiB (30%), 5.2 MiB/s"
fn plain_download(d: &Download) -> String {
    let secs = d
        .started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or_default();
    let rate = if secs > 0.0 {
        human_bytes((d.received as f64 / secs) as u64)
    } else {
        human_bytes(0)
    };
    match d.total {
        Some(total) => format!(
            "{} of {} ({}%), {rate}/s",
            human_bytes(d.received),
            human_bytes(total),
            (d.received * 100).checked_div(total).unwrap_or(100)
        ),
        None => format!("{} received, {rate}/s", human_bytes(d.received)),
    }
}

impl Reporter for Printer {
    fn phase(&self, phase: Phase) {
        self.finish_bar();
        if phase == Phase::Upload {
            *self.upload.lock().unwrap_or_else(|p| p.into_inner()) = Upload {
                started: Some(Instant::now()),
                ..Upload::default()
            };
        }
        if self.quiet {
            return;
        }
        let label = label(phase);
        if self.tty
            && matches!(
                phase,
                Phase::Upload | Phase::Start | Phase::Ready | Phase::Lease
            )
        {
            let message = match phase {
                Phase::Start | Phase::Ready => format!("{label} (since {})", since()),
                _ => label.to_string(),
            };
            let bar = self.spinner(message);
            *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some((phase, bar));
        } else if matches!(phase, Phase::Start | Phase::Ready) {
            eprintln!("absconda: {label} (since {})", since());
        } else {
            eprintln!("absconda: {label}");
        }
    }

    fn phase_done(&self, phase: Phase, took: Duration) {
        self.finish_bar();
        if self.quiet {
            return;
        }
        if phase == Phase::Upload {
            let u = self.upload.lock().unwrap_or_else(|p| p.into_inner());
            let ratio = if u.done > 0 {
                format!(" ({:.0}% of it)", u.wire as f64 * 100.0 / u.done as f64)
            } else {
                String::new()
            };
            eprintln!(
                "absconda: upload done in {}: {} of content, {} on the wire{ratio}",
                human::duration(took),
                human_bytes(u.done),
                human_bytes(u.wire),
            );
        } else if phase == Phase::Start || phase == Phase::Ready {
            eprintln!(
                "absconda: {} done in {}",
                phase.name(),
                human::duration(took)
            );
        }
    }

    fn info(&self, message: &str) {
        if self.quiet {
            return;
        }
        // What a VM wait is waiting for goes into its spinner.
        if let Some((Phase::Start | Phase::Ready, bar)) =
            &*self.bar.lock().unwrap_or_else(|p| p.into_inner())
            && message.starts_with("waiting for ")
        {
            bar.set_message(format!("{message} (since {})", since()));
            return;
        }
        self.line(message);
    }

    fn upload_progress(&self, sent: u64) {
        self.upload.lock().unwrap_or_else(|p| p.into_inner()).wire = sent;
    }

    fn upload_content(&self, done: u64, total: u64) {
        let mut u = self.upload.lock().unwrap_or_else(|p| p.into_inner());
        u.done = done;
        u.total = total;
        if self.quiet {
            return;
        }
        if self.tty {
            if let Some((Phase::Upload, bar)) = &*self.bar.lock().unwrap_or_else(|p| p.into_inner())
            {
                if !u.is_bar {
                    u.is_bar = true;
                    bar.set_length(total);
                    bar.set_style(self.upload_bar_style());
                    bar.reset_elapsed();
                }
                bar.set_position(done.min(total));
            }
        } else {
            let due = match u.last_line {
                Some(t) => t.elapsed() >= PLAIN_EVERY,
                None => u.started.is_some_and(|s| s.elapsed() >= PLAIN_EVERY),
            };
            if due {
                u.last_line = Some(Instant::now());
                eprintln!("absconda: sending the context: {}", plain_progress(&u));
            }
        }
    }

    fn download_progress(&self, received: u64, total: Option<u64>) {
        if self.quiet {
            return;
        }
        let mut d = self.download.lock().unwrap_or_else(|p| p.into_inner());
        let first = d.started.is_none();
        if first {
            *d = Download {
                started: Some(Instant::now()),
                ..Download::default()
            };
        }
        d.received = received;
        d.total = total;
        if self.tty {
            if d.bar.is_none() {
                d.bar = Some(self.download_bar(total));
            }
            if let Some(bar) = &d.bar {
                if let Some(t) = total {
                    bar.set_length(t);
                }
                bar.set_position(received);
            }
        } else if first || d.last_line.is_some_and(|t| t.elapsed() >= PLAIN_EVERY) {
            d.last_line = Some(Instant::now());
            eprintln!(
                "absconda: receiving the build output: {}",
                plain_download(&d)
            );
        }
    }

    fn download_done(&self, received: u64, took: Duration) {
        let d = std::mem::take(&mut *self.download.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(bar) = d.bar {
            bar.finish_and_clear();
        }
        if self.quiet || d.started.is_none() {
            return;
        }
        let secs = took.as_secs_f64();
        let rate = if secs > 0.0 {
            human_bytes((received as f64 / secs) as u64)
        } else {
            human_bytes(0)
        };
        eprintln!(
            "absconda: received {} of build output in {} ({rate}/s)",
            human_bytes(received),
            human::duration(took)
        );
    }

    fn output(&self, stderr: bool, data: &[u8]) {
        if self.quiet {
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            tail.extend_from_slice(data);
            if tail.len() > QUIET_TAIL {
                let cut = tail.len() - QUIET_TAIL;
                tail.drain(..cut);
            }
            return;
        }
        if stderr || self.json {
            let write = || {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(data);
                let _ = e.flush();
            };
            // Around a download bar, so that it is redrawn below the text.
            match &self.download.lock().unwrap_or_else(|p| p.into_inner()).bar {
                Some(bar) => bar.suspend(write),
                None => write(),
            }
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(data);
            let _ = o.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_download_has_bytes_rate_and_total_when_known() {
        let mut d = Download {
            started: Instant::now().checked_sub(Duration::from_secs(2)),
            received: 10 * 1024 * 1024,
            ..Download::default()
        };
        let line = plain_download(&d);
        assert!(line.starts_with("10.0 MiB received, "), "{line}");
        assert!(line.ends_with("/s"), "{line}");
        d.total = Some(40 * 1024 * 1024);
        let line = plain_download(&d);
        assert!(line.starts_with("10.0 MiB of 40.0 MiB (25%), "), "{line}");
        assert!(line.chars().all(|c| !c.is_control()), "{line:?}");
    }

    #[test]
    fn plain_progress_has_total_percent_rate_and_time_left() {
        let u = Upload {
            started: Instant::now().checked_sub(Duration::from_secs(2)),
            done: 10 * 1024 * 1024,
            total: 40 * 1024 * 1024,
            ..Upload::default()
        };
        let line = plain_progress(&u);
        assert!(line.starts_with("10.0 MiB of 40.0 MiB (25%), "), "{line}");
        assert!(line.contains("/s, ") && line.ends_with(" left"), "{line}");
        assert!(line.chars().all(|c| !c.is_control()), "{line:?}");
    }
}
