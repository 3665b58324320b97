//! Exponential backoff with full jitter under one deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::CloudError;

/// How to retry: the first delay, the cap and the overall deadline.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub deadline: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(20),
            deadline: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based), with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.min(16));
        let cap = exp.min(self.max);
        let millis = cap.as_millis() as u64;
        Duration::from_millis(rand::random_range(millis / 2..=millis.max(1)))
    }
}

/// Runs `op` until it succeeds, fails permanently or the deadline passes.
///
/// Transient errors ([`CloudError::is_transient`]) are retried; a server's
/// `Retry-After` is honoured when it fits before the deadline. When time runs
/// out the result is [`CloudError::Timeout`] carrying the last error.
pub async fn with_retry<T, F, Fut>(what: &str, backoff: Backoff, mut op: F) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let start = Instant::now();
    let deadline = start + backoff.deadline;
    let mut attempt = 0u32;
    // Kept so that a deadline hit mid-attempt still reports what went wrong before.
    let mut last: Option<CloudError> = None;
    loop {
        let err = match tokio::time::timeout_at(deadline, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !e.is_transient() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(CloudError::Timeout {
                    what: what.to_string(),
                    after: backoff.deadline,
                    last: last.map(Box::new),
                });
            }
        };
        let wait = err.retry_after().unwrap_or_else(|| backoff.delay(attempt));
        if Instant::now() + wait >= deadline {
            return Err(CloudError::Timeout {
                what: what.to_string(),
                after: backoff.deadline,
                last: Some(Box::new(err)),
            });
        }
        tracing::debug!(attempt, ?wait, error = %err, "{what}: transient error, retrying");
        tokio::time::sleep(wait).await;
        last = Some(err);
        attempt += 1;
    }
}
