//! Builder pools: several builders behind one name, with no coordinator.
//!
//! The only shared state is what the builders already have: their leases
//! (an exclusive `flock` per workspace, see [`crate::remote`]) and the
//! cloud APIs' view of which VMs run. A build on a pool:
//!
//! 1. asks every member's state at once (a cloud VM: its status; an `ssh`
//!    builder is always on);
//! 2. tries the running members without waiting, in the pool's order of
//!    preference — `affinity` first the builders this machine synced the
//!    context to (most recent first), `cheapest` by `hourly_cost` — and
//!    takes the first free lease;
//! 3. if all are busy and fewer than `max_running` of the pool's VMs run,
//!    starts a stopped one (cheapest first for `cheapest`) and builds there;
//!    a VM that cannot start (no capacity in the zone, quota) is skipped
//!    with one line and the next one tried;
//! 4. otherwise waits in the queue of every running member at once and
//!    builds on the first that is free. Each builder's queue is first come,
//!    first served (tickets in its workspace), and a build joins all queues
//!    at the same moment, so the pool serves builds in the order they came.
//!
//! A member that cannot be reached is skipped and named; the build fails
//! only when no member could be used, with every member's reason.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;

use crate::build::{self, BuildError, BuildRequest, Lease};
use crate::cloud::Status;
use crate::config::{Builder, Pool, Prefer};
use crate::lifecycle::{self, Cloud, Ready};
use crate::platform::Platform;
use crate::report::{Reporter, Silent};
use crate::state::StateFile;

/// One builder of a pool, resolved.
pub struct Member {
    pub builder: Builder,
    pub cloud: Option<Cloud>,
    /// Its platform: declared (`platform:`) or asked from its docker;
    /// `None` when neither is known.
    pub platform: Option<Platform>,
}

/// The member a build got, connected and with its lease held.
pub struct Chosen {
    /// Index into the members.
    pub index: usize,
    pub ready: Ready,
    pub lease: Lease,
    /// How long the build waited in the queues.
    pub queued: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no builder of pool `{pool}` could be used: {}", reasons.iter().map(|(b, r)| format!("`{b}`: {r}")).collect::<Vec<_>>().join("; "))]
    NoneUsable {
        pool: String,
        reasons: Vec<(String, String)>,
    },
    /// Every usable member is busy and the pool has an `overflow:` service
    /// to send the build to instead of waiting.
    #[error("every builder of pool `{pool}` is busy")]
    AllBusy { pool: String },
}

/// What a member is doing, as far as the cloud knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    On,
    Off,
    Unusable,
}

/// Picks a member, connects and takes its lease (see the module docs).
/// `skip` names members not to use (they failed this build before);
/// with `platform`, only members of that platform are used.
#[allow(clippy::too_many_arguments)]
pub async fn choose(
    pool: &Pool,
    members: &[Member],
    req: &BuildRequest,
    platform: Option<&Platform>,
    skip: &[String],
    state: &StateFile,
    remote_off: bool,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
) -> anyhow::Result<Chosen> {
    let mut reasons: Vec<(String, String)> = skip
        .iter()
        .map(|s| (s.clone(), "failed this build before".to_string()))
        .collect();

    // 1. Every member's power state, at once.
    let powers = futures_util::future::join_all(members.iter().map(|m| async move {
        if skip.contains(&m.builder.name) || !serves(m, platform) {
            return (Power::Unusable, None);
        }
        let Some(cloud) = &m.cloud else {
            return (Power::On, None);
        };
        match cloud.describe().await {
            Ok(info) => match info.status {
                Status::Running | Status::Starting => (Power::On, None),
                Status::Stopped | Status::Stopping | Status::Unknown => (Power::Off, None),
                Status::Gone => (
                    Power::Unusable,
                    Some(format!("the instance is {}", info.raw_status)),
                ),
            },
            Err(e) => (
                Power::Unusable,
                Some(crate::exit::one_line(&anyhow::Error::new(e))),
            ),
        }
    }))
    .await;
    for (m, (_, why)) in members.iter().zip(&powers) {
        if let Some(why) = why {
            skipped(reporter, pool, &mut reasons, &m.builder.name, why.clone());
        }
    }
    let order = preference(pool, members, req);
    let on: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| powers[i].0 == Power::On)
        .collect();
    let off: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| powers[i].0 == Power::Off)
        .collect();

    // 2. A running member that is free right now.
    let mut busy: Vec<(usize, Ready)> = Vec::new();
    for &i in &on {
        let m = &members[i];
        let ready = match connect(m, false, state, reporter, cancel).await {
            Ok(r) => r,
            Err(e) if is_interrupted(&e) => return Err(e),
            Err(e) => {
                let why = crate::exit::one_line(&e);
                skipped(reporter, pool, &mut reasons, &m.builder.name, why);
                continue;
            }
        };
        let stop = self_stop(m, &ready, remote_off);
        match build::acquire_lease(
            &ready.session,
            &m.builder,
            Duration::ZERO,
            stop.as_ref(),
            &Silent,
        )
        .await
        {
            Ok(lease) => {
                return Ok(Chosen {
                    index: i,
                    ready,
                    lease,
                    queued: Duration::ZERO,
                });
            }
            Err(BuildError::LeaseTimeout { .. }) => busy.push((i, ready)),
            Err(e) => {
                let why = crate::exit::one_line(&anyhow::Error::new(e));
                skipped(reporter, pool, &mut reasons, &m.builder.name, why);
                ready.session.close().await;
            }
        }
    }

    // 3. Start a stopped VM, if the pool may run one more.
    let running = on.iter().filter(|&&i| members[i].cloud.is_some()).count();
    if pool.max_running.is_none_or(|max| running < max) {
        for &i in &off {
            let m = &members[i];
            if !busy.is_empty() {
                reporter.info(&format!(
                    "pool `{}`: {} running builder(s) busy; starting `{}`",
                    pool.name,
                    busy.len(),
                    m.builder.name
                ));
            }
            let ready = match connect(m, true, state, reporter, cancel).await {
                Ok(r) => r,
                Err(e) if is_interrupted(&e) => {
                    close_all(busy).await;
                    return Err(e);
                }
                Err(e) => {
                    let why = crate::exit::one_line(&e);
                    skipped(reporter, pool, &mut reasons, &m.builder.name, why);
                    continue;
                }
            };
            let stop = self_stop(m, &ready, remote_off);
            match build::acquire_lease(
                &ready.session,
                &m.builder,
                req.remote_wait,
                stop.as_ref(),
                reporter,
            )
            .await
            {
                Ok(lease) => {
                    close_all(busy).await;
                    return Ok(Chosen {
                        index: i,
                        ready,
                        lease,
                        queued: Duration::ZERO,
                    });
                }
                Err(e) => {
                    let why = crate::exit::one_line(&anyhow::Error::new(e));
                    skipped(reporter, pool, &mut reasons, &m.builder.name, why);
                    ready.session.close().await;
                }
            }
        }
    } else if !off.is_empty() {
        tracing::debug!(
            running,
            "pool `{}`: max_running reached, not starting another VM",
            pool.name
        );
    }

    // 4. Queue for every busy member at once.
    if busy.is_empty() {
        return Err(PoolError::NoneUsable {
            pool: pool.name.clone(),
            reasons,
        }
        .into());
    }
    if pool.overflow.is_some() {
        close_all(busy).await;
        return Err(PoolError::AllBusy {
            pool: pool.name.clone(),
        }
        .into());
    }
    reporter.info(&format!(
        "pool `{}`: all {} usable builder(s) busy ({}); waiting up to {}s in their queues (--remote-wait)",
        pool.name,
        busy.len(),
        busy.iter()
            .map(|(i, _)| format!("`{}`", members[*i].builder.name))
            .collect::<Vec<_>>()
            .join(", "),
        req.remote_wait.as_secs()
    ));
    let started = Instant::now();
    let stops: Vec<_> = busy
        .iter()
        .map(|(i, ready)| self_stop(&members[*i], ready, remote_off))
        .collect();
    let won = {
        let mut waits: FuturesUnordered<_> = busy
            .iter()
            .zip(&stops)
            .enumerate()
            .map(|(slot, ((i, ready), stop))| async move {
                let r = build::acquire_lease(
                    &ready.session,
                    &members[*i].builder,
                    req.remote_wait,
                    stop.as_ref(),
                    &Silent,
                )
                .await;
                (slot, r)
            })
            .collect();
        let mut last_err = None;
        let mut won = None;
        loop {
            tokio::select! {
                next = waits.next() => match next {
                    Some((slot, Ok(lease))) => {
                        won = Some((slot, lease));
                        break;
                    }
                    Some((_, Err(e))) => last_err = Some(e),
                    None => break,
                },
                _ = cancel.cancelled() => {
                    last_err = Some(BuildError::Interrupted);
                    break;
                }
            }
        }
        // Dropping the other waits closes their channels: their lease
        // scripts leave the queues at their next line.
        drop(waits);
        won.ok_or_else(|| {
            last_err.unwrap_or(BuildError::LeaseTimeout {
                builder: pool.name.clone(),
                holder: "other builds".into(),
                waited: req.remote_wait,
            })
        })
    };
    let queued = started.elapsed();
    let (slot, lease) = match won {
        Ok(w) => w,
        Err(e) => {
            close_all(busy).await;
            return Err(e.into());
        }
    };
    let (index, ready) = busy.swap_remove(slot);
    close_all(busy).await;
    reporter.info(&format!(
        "pool `{}`: builder `{}` is free after {:.1}s in the queue",
        pool.name,
        members[index].builder.name,
        queued.as_secs_f64()
    ));
    Ok(Chosen {
        index,
        ready,
        lease,
        queued,
    })
}

/// Whether a member builds `platform` natively (any member, without one).
pub fn serves(m: &Member, platform: Option<&Platform>) -> bool {
    match platform {
        None => true,
        Some(want) => m.platform.as_ref().is_some_and(|p| p.serves(want)),
    }
}

/// The members in the order the pool prefers them.
fn preference(pool: &Pool, members: &[Member], req: &BuildRequest) -> Vec<usize> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    match pool.prefer {
        Prefer::Idle => {}
        Prefer::Cheapest => order.sort_by(|&a, &b| {
            let cost = |i: usize| members[i].builder.hourly_cost.unwrap_or(f64::INFINITY);
            cost(a).total_cmp(&cost(b))
        }),
        Prefer::Affinity => {
            let identity = crate::sync::identity(req.context_dir.as_deref(), &req.extra_files);
            let synced: Vec<Option<std::time::SystemTime>> = members
                .iter()
                .map(|m| crate::sync::last_synced(&identity, &m.builder.name))
                .collect();
            // Most recently synced first; never-synced keep the pool's order.
            order.sort_by(|&a, &b| synced[b].cmp(&synced[a]));
        }
    }
    order
}

async fn connect(
    m: &Member,
    start: bool,
    state: &StateFile,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
) -> anyhow::Result<Ready> {
    lifecycle::bring_up(&m.builder, m.cloud.as_ref(), start, state, reporter, cancel).await
}

fn self_stop(m: &Member, ready: &Ready, remote_off: bool) -> Option<crate::remote::SelfStop> {
    if remote_off {
        None
    } else {
        lifecycle::self_stop(&m.builder, m.cloud.as_ref(), ready)
    }
}

/// Says that `builder` is skipped and why, and keeps the reason for the
/// error when no member can be used.
fn skipped(
    reporter: &dyn Reporter,
    pool: &Pool,
    reasons: &mut Vec<(String, String)>,
    builder: &str,
    why: String,
) {
    reporter.info(&format!(
        "pool `{}`: skipping builder `{builder}`: {why}",
        pool.name
    ));
    reasons.push((builder.to_string(), why));
}

fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<BuildError>(),
            Some(BuildError::Interrupted)
        )
    })
}

async fn close_all(sessions: Vec<(usize, Ready)>) {
    for (_, ready) in sessions {
        ready.session.close().await;
    }
}
