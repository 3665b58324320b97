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
    // Kept across attempts so that a deadline passing in the middle of an
    // attempt still reports what went wrong before.
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
        last = Some(err);
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// [`with_retry`] for a call that must finish by `deadline`, a point inside a
/// longer operation governed by `budget`.
///
/// The call gets what is left until `deadline`; a timeout reports the whole
/// budget (`budget.deadline`), which is what the user configured, not the
/// remainder this one call happened to get.
pub async fn with_retry_until<T, F, Fut>(
    what: &str,
    budget: Backoff,
    deadline: Instant,
    op: F,
) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let backoff = Backoff {
        deadline: deadline.saturating_duration_since(Instant::now()),
        ..budget
    };
    with_retry(what, backoff, op).await.map_err(|e| match e {
        CloudError::Timeout { what, last, .. } => CloudError::Timeout {
            what,
            after: budget.deadline,
            last,
        },
        e => e,
    })
}

/// Waits before looking again at something that is between states (a VM
/// starting or stopping), backing off up to `cap`; attempt `polls` counts up.
/// When the wait would pass `deadline`, fails with [`CloudError::Timeout`]
/// for `what`, reporting the whole budget.
pub async fn settle_pause(
    budget: Backoff,
    cap: Duration,
    polls: &mut u32,
    deadline: Instant,
    what: impl FnOnce() -> String,
) -> Result<(), CloudError> {
    let pause = budget.delay(*polls).min(cap);
    if Instant::now() + pause >= deadline {
        return Err(CloudError::Timeout {
            what: what(),
            after: budget.deadline,
            last: None,
        });
    }
    tokio::time::sleep(pause).await;
    *polls += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> CloudError {
        CloudError::Api {
            service: "test",
            operation: "op".into(),
            status: 503,
            code: "UNAVAILABLE".into(),
            message: "down".into(),
            retry_after: None,
        }
    }

    #[tokio::test]
    async fn a_deadline_passing_mid_attempt_keeps_the_last_error() {
        let backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(10),
            deadline: Duration::from_millis(300),
        };
        let mut calls = 0;
        let err = with_retry("op", backoff, || {
            calls += 1;
            let first = calls == 1;
            async move {
                if first {
                    Err::<(), _>(transient())
                } else {
                    // Hangs past the deadline.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                }
            }
        })
        .await
        .unwrap_err();
        match err {
            CloudError::Timeout {
                last: Some(last), ..
            } => {
                assert!(matches!(*last, CloudError::Api { status: 503, .. }))
            }
            other => panic!("{other:?}"),
        }
    }
}
