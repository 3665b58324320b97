//! The CLI's [`Reporter`]: progress bars on a terminal, plain lines otherwise.
//!
//! Remote build output goes to our stdout/stderr as the builder wrote it,
//! except with `--json`, where stdout is reserved for the report.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{Phase, Reporter};

pub struct Printer {
    json: bool,
    bar: Mutex<Option<ProgressBar>>,
    tty: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer {
            json,
            bar: Mutex::new(None),
            tty: std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|_| true),
        }
    }

    fn finish_bar(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

impl Reporter for Printer {
    fn phase(&self, phase: Phase) {
        self.finish_bar();
        let label = match phase {
            Phase::Start => "starting the builder",
            Phase::Ready => "waiting until the builder is ready",
            Phase::Connect => "connecting",
            Phase::Lease => "taking the builder lease",
            Phase::Upload => "sending the context",
            Phase::Build => "building",
            Phase::Push => "pushing",
            Phase::Cleanup => "cleaning up",
            Phase::Stop => "stopping the builder",
        };
        if self.tty
            && matches!(
                phase,
                Phase::Upload | Phase::Start | Phase::Ready | Phase::Lease
            )
        {
            let bar = if phase == Phase::Upload {
                let b = ProgressBar::new_spinner();
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} {bytes} ({bytes_per_sec}) {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b
            } else {
                ProgressBar::new_spinner()
            };
            bar.set_message(label);
            bar.enable_steady_tick(Duration::from_millis(120));
            *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
        } else {
            eprintln!("absconda: {label}");
        }
    }

    fn phase_done(&self, phase: Phase, took: Duration) {
        self.finish_bar();
        if phase == Phase::Upload || phase == Phase::Start || phase == Phase::Ready {
            eprintln!(
                "absconda: {} done in {:.1}s",
                phase.name(),
                took.as_secs_f64()
            );
        }
    }

    fn info(&self, message: &str) {
        match &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(bar) => bar.println(format!("absconda: {message}")),
            None => eprintln!("absconda: {message}"),
        }
    }

    fn upload_progress(&self, sent: u64) {
        if let Some(bar) = &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            bar.set_position(sent);
        }
    }

    fn output(&self, stderr: bool, data: &[u8]) {
        if stderr || self.json {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(data);
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(data);
            let _ = o.flush();
        }
    }
}
