//! GCE builders against the fake compute API: every credential flow, the
//! life cycle of a VM, and the faults a real API throws at a client.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use absconda::cloud::gce::{AddressKind, Gce, GceSettings};
use absconda::cloud::gcp_auth::{CredentialSource, GcpAuth};
use absconda::cloud::retry::Backoff;
use absconda::cloud::{CloudError, Provider, Status};

use crate::support::gce_fake::{Fault, Flow, GceFake, Route, Scope, Timings};

fn backoff(deadline: Duration) -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(300),
        deadline,
    }
}

fn settings(fake: &GceFake, instance: &str) -> GceSettings {
    GceSettings {
        project: fake.project().into(),
        zone: fake.zone().into(),
        instance: instance.into(),
        api_endpoint: Some(fake.api_endpoint()),
        address: AddressKind::External,
        backoff: backoff(Duration::from_secs(10)),
    }
}

/// Credentials found through an environment that only has `vars`.
fn auth_from(vars: &[(&str, &str)]) -> GcpAuth {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    GcpAuth::from_lookup(move |k| map.get(k).cloned()).expect("credentials")
}

fn service_account_auth(fake: &GceFake, dir: &Path) -> GcpAuth {
    let key = fake.write_service_account_key(dir);
    auth_from(&[("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap())])
}

/// gcloud's `application_default_credentials.json` under `$HOME`.
fn user_auth(fake: &GceFake, dir: &Path) -> GcpAuth {
    let home = dir.join("home");
    fake.write_authorized_user(&home.join(".config/gcloud/application_default_credentials.json"));
    auth_from(&[("HOME", home.to_str().unwrap())])
}

fn metadata_auth(fake: &GceFake, dir: &Path) -> GcpAuth {
    // A HOME without gcloud credentials, so the search ends at the metadata server.
    auth_from(&[
        ("HOME", dir.to_str().unwrap()),
        ("GCE_METADATA_HOST", &fake.metadata_host()),
    ])
}

fn gce(fake: &GceFake, instance: &str, auth: GcpAuth) -> Gce {
    Gce::with_auth(settings(fake, instance), auth).expect("provider")
}

/// Start, check, stop, check: what a build with `--remote-off` does.
async fn life_cycle(fake: &GceFake, g: &Gce, name: &str) {
    let info = g.describe().await.unwrap();
    assert_eq!(info.id, name);
    assert_eq!(info.status, Status::Stopped);
    assert_eq!(info.raw_status, "TERMINATED");
    assert_eq!(info.address, None);

    g.start().await.unwrap();
    let info = g.describe().await.unwrap();
    assert_eq!(info.status, Status::Running, "{info:?}");
    assert_eq!(info.address, fake.nat_ip(name));
    assert!(info.address.is_some());
    assert_eq!(fake.status(name).as_deref(), Some("RUNNING"));

    g.stop().await.unwrap();
    let info = g.describe().await.unwrap();
    assert_eq!(info.status, Status::Stopped);
    assert_eq!(info.address, None);
    assert_eq!(fake.status(name).as_deref(), Some("TERMINATED"));
    assert_eq!(fake.transitions(name), 2);
}

#[tokio::test]
async fn service_account_key_signs_its_own_jwt() {
    let fake = GceFake::start();
    fake.add_instance("sa-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "sa-vm", service_account_auth(&fake, dir.path()));
    assert!(matches!(
        g.credential_source(),
        CredentialSource::EnvFile { kind, .. } if kind == "service_account"
    ));
    life_cycle(&fake, &g, "sa-vm").await;

    let log = fake.requests();
    let email = fake.service_account().client_email;
    assert!(
        log.iter()
            .filter(|l| l.route != Route::Token)
            .all(|l| l.credential == Some("self-signed-jwt")
                && l.principal.as_deref() == Some(&format!("serviceAccount:{email}"))),
        "{log:#?}"
    );
    // The key signs locally: no token endpoint involved.
    assert_eq!(fake.count(Route::Token), 0);
}

#[tokio::test]
async fn gcloud_user_credentials_refresh_at_the_files_token_uri() {
    let fake = GceFake::start();
    fake.add_instance("user-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "user-vm", user_auth(&fake, dir.path()));
    assert!(matches!(
        g.credential_source(),
        CredentialSource::GcloudFile { kind, .. } if kind == "authorized_user"
    ));
    life_cycle(&fake, &g, "user-vm").await;

    // One refresh, then the cached access token for every call.
    assert_eq!(fake.count(Route::Token), 1);
    let api: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|l| l.route != Route::Token)
        .collect();
    assert!(
        api.iter().all(|l| l.credential == Some("minted")
            && l.principal.as_deref() == Some("user:dev@example.com")),
        "{api:#?}"
    );
}

#[tokio::test]
async fn an_impersonated_service_account_acts_for_the_user_who_logged_in() {
    let fake = GceFake::start();
    fake.add_instance("imp-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("impersonated.json");
    fake.write_impersonated(&file);
    let g = gce(
        &fake,
        "imp-vm",
        auth_from(&[("GOOGLE_APPLICATION_CREDENTIALS", file.to_str().unwrap())]),
    );
    life_cycle(&fake, &g, "imp-vm").await;

    // The user's refresh token once, one generateAccessToken made with the
    // user's token, then every call as the service account.
    let email = fake.service_account().client_email;
    assert_eq!(fake.count(Route::Token), 1);
    let log = fake.requests();
    let generated: Vec<_> = log
        .iter()
        .filter(|l| l.route == Route::GenerateAccessToken)
        .collect();
    assert_eq!(generated.len(), 1, "{log:#?}");
    assert_eq!(generated[0].status, 200);
    assert_eq!(
        generated[0].principal.as_deref(),
        Some("user:dev@example.com")
    );
    assert!(generated[0].path.contains(&email));
    let api: Vec<_> = log
        .iter()
        .filter(|l| !matches!(l.route, Route::Token | Route::GenerateAccessToken))
        .collect();
    assert!(!api.is_empty());
    assert!(
        api.iter().all(|l| l.credential == Some("minted")
            && l.principal.as_deref() == Some(&format!("serviceAccount:{email}"))),
        "{api:#?}"
    );

    // Refused impersonation: a clear authentication error, not retried.
    fake.add_instance("imp-vm2", "TERMINATED");
    let file2 = dir.path().join("impersonated2.json");
    fake.write_impersonated(&file2);
    let text = std::fs::read_to_string(&file2)
        .unwrap()
        .replace(&email, "nobody@example.iam.gserviceaccount.com");
    std::fs::write(&file2, text).unwrap();
    let g = gce(
        &fake,
        "imp-vm2",
        auth_from(&[("GOOGLE_APPLICATION_CREDENTIALS", file2.to_str().unwrap())]),
    );
    let err = g.describe().await.unwrap_err();
    assert!(matches!(err, CloudError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("generateAccessToken") && msg.contains("404"),
        "{msg}"
    );
}

#[tokio::test]
async fn metadata_server_token_with_the_flavor_header() {
    let fake = GceFake::start();
    fake.add_instance("mds-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "mds-vm", metadata_auth(&fake, dir.path()));
    assert!(matches!(
        g.credential_source(),
        CredentialSource::MetadataServer { explicit: true, .. }
    ));
    life_cycle(&fake, &g, "mds-vm").await;
    assert!(fake.count(Route::Metadata) >= 1);
    assert!(
        fake.requests()
            .iter()
            .filter(|l| l.route != Route::Metadata)
            .all(|l| l.credential == Some("minted")),
    );
}

/// `start` and `stop` return only once the VM got there (their operation
/// DONE), however long its transitions take: checked right after each call,
/// not by catching the intermediate states in time.
#[tokio::test]
async fn start_and_stop_return_only_when_the_vm_got_there() {
    let fake = GceFake::start();
    fake.set_timings(Timings {
        provisioning: Duration::from_millis(300),
        staging: Duration::from_millis(300),
        stopping: Duration::from_millis(400),
        ..Timings::default()
    });
    fake.add_instance("slow-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "slow-vm", service_account_auth(&fake, dir.path()));

    g.start().await.unwrap();
    assert_eq!(fake.status("slow-vm").as_deref(), Some("RUNNING"));
    assert_eq!(g.describe().await.unwrap().raw_status, "RUNNING");
    let waits = fake.count(Route::WaitOperation);
    assert!(waits >= 1, "start waited for its operation");

    g.stop().await.unwrap();
    assert_eq!(fake.status("slow-vm").as_deref(), Some("TERMINATED"));
    assert_eq!(g.describe().await.unwrap().raw_status, "TERMINATED");
    assert!(fake.count(Route::WaitOperation) > waits, "stop waited too");
    assert_eq!(fake.transitions("slow-vm"), 2);
}

#[tokio::test]
async fn every_start_gets_a_new_external_ip_and_the_internal_one_stays() {
    let fake = GceFake::start();
    fake.add_instance("ip-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let external = gce(&fake, "ip-vm", service_account_auth(&fake, dir.path()));
    let mut internal_settings = settings(&fake, "ip-vm");
    internal_settings.address = AddressKind::Internal;
    let internal =
        Gce::with_auth(internal_settings, service_account_auth(&fake, dir.path())).unwrap();

    let mut ips = Vec::new();
    for _ in 0..3 {
        external.start().await.unwrap();
        let ext = external.describe().await.unwrap().address.expect("a natIP");
        let int = internal.describe().await.unwrap().address;
        assert_eq!(int, fake.network_ip("ip-vm"));
        ips.push(ext);
        external.stop().await.unwrap();
        assert_eq!(external.describe().await.unwrap().address, None);
        // The internal address survives a stop.
        assert_eq!(
            internal.describe().await.unwrap().address,
            fake.network_ip("ip-vm")
        );
    }
    ips.dedup();
    assert_eq!(ips.len(), 3, "{ips:?}");
}

#[tokio::test]
async fn start_and_stop_are_idempotent() {
    let fake = GceFake::start();
    fake.add_instance("idem-vm", "RUNNING");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "idem-vm", service_account_auth(&fake, dir.path()));

    // Starting a running VM sends nothing.
    g.start().await.unwrap();
    assert_eq!(fake.count(Route::Start), 0);

    g.stop().await.unwrap();
    assert_eq!(fake.count(Route::Stop), 1);
    // Stopping a stopped VM sends nothing either.
    g.stop().await.unwrap();
    assert_eq!(fake.count(Route::Stop), 1);

    // Stopping a VM that is already stopping is a no-op too.
    fake.set_status("idem-vm", "STOPPING");
    fake.schedule_status("idem-vm", Duration::from_millis(300), "TERMINATED");
    g.stop().await.unwrap();
    assert_eq!(fake.count(Route::Stop), 1);

    // Starting one that is still stopping waits for TERMINATED, then starts.
    g.start().await.unwrap();
    assert_eq!(fake.count(Route::Start), 1);
    assert_eq!(fake.status("idem-vm").as_deref(), Some("RUNNING"));
}

#[tokio::test]
async fn two_clients_starting_at_once_start_the_vm_once() {
    let fake = GceFake::start();
    fake.add_instance("race-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let a = gce(&fake, "race-vm", service_account_auth(&fake, dir.path()));
    let b = gce(&fake, "race-vm", user_auth(&fake, dir.path()));
    let (ra, rb) = tokio::join!(
        tokio::spawn(async move { a.start().await }),
        tokio::spawn(async move { b.start().await })
    );
    ra.unwrap().unwrap();
    rb.unwrap().unwrap();
    assert_eq!(fake.transitions("race-vm"), 1);
    let c = gce(&fake, "race-vm", service_account_auth(&fake, dir.path()));
    let info = c.describe().await.unwrap();
    assert!(
        matches!(info.status, Status::Starting | Status::Running),
        "{info:?}"
    );

    // And two stops at once.
    fake.set_status("race-vm", "RUNNING");
    let d = gce(&fake, "race-vm", service_account_auth(&fake, dir.path()));
    let (rc, rd) = tokio::join!(c.stop(), d.stop());
    rc.unwrap();
    rd.unwrap();
    assert_eq!(fake.transitions("race-vm"), 2);
    assert_eq!(fake.status("race-vm").as_deref(), Some("TERMINATED"));
}

#[tokio::test]
async fn a_vm_not_ready_for_a_start_is_tried_again() {
    let fake = GceFake::start();
    fake.add_instance("busy-vm", "TERMINATED");
    fake.inject(Scope::Mutations, Fault::NotReady, 2);
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "busy-vm", service_account_auth(&fake, dir.path()));
    g.start().await.unwrap();
    assert_eq!(fake.status("busy-vm").as_deref(), Some("RUNNING"));
    let starts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|l| l.route == Route::Start)
        .collect();
    assert_eq!(
        starts.iter().map(|l| l.status).collect::<Vec<_>>(),
        [400, 400, 200]
    );
    // Each new attempt is a new request, with a new requestId.
    assert_ne!(starts[0].query, starts[2].query);
}

#[tokio::test]
async fn a_poweroff_inside_the_vm_shows_as_terminated() {
    let fake = GceFake::start();
    // Long enough that the look right after the poweroff still sees STOPPING.
    fake.set_timings(Timings {
        stopping: Duration::from_secs(3),
        ..Timings::default()
    });
    fake.add_instance("self-stop-vm", "RUNNING");
    fake.set_metadata_instance("self-stop-vm");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(
        &fake,
        "self-stop-vm",
        service_account_auth(&fake, dir.path()),
    );
    // What the builder's self-stop script checks before powering off.
    let name = reqwest::Client::new()
        .get(format!(
            "http://{}/computeMetadata/v1/instance/name",
            fake.metadata_host()
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(name, "self-stop-vm");
    let hook = reqwest::Client::new()
        .post(fake.guest_poweroff_url())
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status(), 200);
    assert_eq!(g.describe().await.unwrap().raw_status, "STOPPING");
    let limit = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = g.describe().await.unwrap();
        if info.raw_status != "STOPPING" || Instant::now() > limit {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info.status, Status::Stopped);
    assert_eq!(info.address, None);
}

#[tokio::test]
async fn a_suspended_vm_is_resumed() {
    let fake = GceFake::start();
    fake.add_instance("susp-vm", "SUSPENDED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "susp-vm", service_account_auth(&fake, dir.path()));
    let info = g.describe().await.unwrap();
    assert_eq!(info.status, Status::Stopped);
    g.start().await.unwrap();
    assert_eq!(fake.count(Route::Resume), 1);
    assert_eq!(fake.count(Route::Start), 0);
    assert_eq!(g.describe().await.unwrap().status, Status::Running);
}

#[tokio::test]
async fn a_failed_operation_is_surfaced_with_its_errors() {
    let fake = GceFake::start();
    fake.add_instance("full-vm", "TERMINATED");
    fake.fail_next_operation(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone 'projects/absconda-test/zones/us-central1-a' does not have enough resources available to fulfill the request.",
    );
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "full-vm", service_account_auth(&fake, dir.path()));
    let err = g.start().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CloudError::OperationFailed { .. }), "{err:?}");
    assert!(text.contains("ZONE_RESOURCE_POOL_EXHAUSTED"), "{text}");
    assert!(text.contains("does not have enough resources"), "{text}");
    assert!(text.contains("(start)"), "{text}");
    assert_eq!(g.describe().await.unwrap().raw_status, "TERMINATED");
}

#[tokio::test]
async fn wait_returning_early_is_called_again() {
    let fake = GceFake::start();
    fake.set_timings(Timings {
        provisioning: Duration::from_millis(400),
        staging: Duration::from_millis(400),
        wait_max: Duration::ZERO,
        ..Timings::default()
    });
    fake.add_instance("early-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "early-vm", service_account_auth(&fake, dir.path()));
    g.start().await.unwrap();
    assert!(fake.count(Route::WaitOperation) >= 3);
    assert_eq!(fake.status("early-vm").as_deref(), Some("RUNNING"));
}

#[tokio::test]
async fn a_rejected_key_is_an_auth_error_without_retries() {
    let fake = GceFake::start();
    fake.add_instance("auth-vm", "TERMINATED");
    let dir = tempfile::tempdir().unwrap();
    let key = fake.write_unknown_service_account_key(dir.path());
    let g = gce(
        &fake,
        "auth-vm",
        auth_from(&[("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap())]),
    );
    let err = g.start().await.unwrap_err();
    let text = err.to_string();
    let CloudError::Auth {
        source_name,
        message,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert!(source_name.contains(key.to_str().unwrap()), "{text}");
    assert!(
        source_name.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{text}"
    );
    assert!(message.contains("HTTP 401"), "{text}");
    assert!(message.contains("roles/compute.instanceAdmin.v1"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert_eq!(fake.api_requests(), 1, "no retries after a 401");
}

#[tokio::test]
async fn a_revoked_refresh_token_names_the_gcloud_file() {
    let fake = GceFake::start();
    fake.add_instance("revoked-vm", "RUNNING");
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "revoked-vm", user_auth(&fake, dir.path()));
    fake.revoke_all();
    let err = g.describe().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CloudError::Auth { .. }), "{err:?}");
    assert!(
        text.contains("application_default_credentials.json"),
        "{text}"
    );
    assert!(text.contains("invalid_grant"), "{text}");
    assert!(
        text.contains("gcloud auth application-default login"),
        "{text}"
    );
    assert_eq!(fake.count(Route::Token), 1, "no retries");
    assert_eq!(fake.api_requests(), 0);
    // No secret from the file leaks into the message.
    let file = std::fs::read_to_string(
        dir.path()
            .join("home/.config/gcloud/application_default_credentials.json"),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&file).unwrap();
    for secret in ["refresh_token", "client_secret"] {
        assert!(
            !text.contains(json[secret].as_str().unwrap()),
            "{secret} leaked: {text}"
        );
    }
}

#[tokio::test]
async fn a_missing_iam_role_is_an_auth_error() {
    let fake = GceFake::start();
    fake.add_instance("iam-vm", "TERMINATED");
    fake.deny_iam(true);
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "iam-vm", metadata_auth(&fake, dir.path()));
    let err = g.describe().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CloudError::Auth { .. }), "{err:?}");
    assert!(text.contains("metadata server"), "{text}");
    assert!(text.contains("compute.instances.get"), "{text}");
    assert_eq!(fake.api_requests(), 1);
}

#[tokio::test]
async fn bursts_of_503_are_retried() {
    let fake = GceFake::start();
    fake.add_instance("flaky-vm", "TERMINATED");
    fake.inject(Scope::Api, Fault::Unavailable, 3);
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "flaky-vm", service_account_auth(&fake, dir.path()));
    g.start().await.unwrap();
    assert_eq!(fake.status("flaky-vm").as_deref(), Some("RUNNING"));
    let statuses: Vec<u16> = fake.requests().iter().map(|l| l.status).collect();
    assert_eq!(&statuses[..4], &[503, 503, 503, 200], "{statuses:?}");
    // And on the mutations and the operations alone.
    fake.inject(Scope::Mutations, Fault::Unavailable, 2);
    fake.inject(Scope::Operations, Fault::Unavailable, 2);
    g.stop().await.unwrap();
    assert_eq!(fake.status("flaky-vm").as_deref(), Some("TERMINATED"));
    assert_eq!(fake.transitions("flaky-vm"), 2);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let fake = GceFake::start();
    fake.add_instance("busy-vm", "TERMINATED");
    fake.inject(
        Scope::Mutations,
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    fake.inject(Scope::Api, Fault::RateLimitForbidden, 1);
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "busy-vm", service_account_auth(&fake, dir.path()));
    g.start().await.unwrap();
    let log = fake.requests();
    let throttled = log.iter().find(|l| l.status == 429).expect("a 429");
    let next = log
        .iter()
        .find(|l| l.route == Route::Start && l.status == 200)
        .expect("the retried start");
    let gap = next.at - throttled.at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(
        log.iter().any(|l| l.status == 403),
        "the 403 rateLimitExceeded was retried"
    );
}

#[tokio::test]
async fn connection_resets_are_retried_without_acting_twice() {
    let fake = GceFake::start();
    fake.add_instance("reset-vm", "TERMINATED");
    fake.inject(Scope::Api, Fault::Reset, 2);
    // The start is carried out but its answer is lost: the retry carries the
    // same requestId, so the fake returns the same operation.
    fake.inject(Scope::Mutations, Fault::ResetAfterHandling, 1);
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "reset-vm", service_account_auth(&fake, dir.path()));
    g.start().await.unwrap();
    assert_eq!(fake.status("reset-vm").as_deref(), Some("RUNNING"));
    assert_eq!(fake.transitions("reset-vm"), 1);
    let starts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|l| l.route == Route::Start)
        .collect();
    assert!(starts.len() >= 2, "{starts:#?}");
    assert!(
        starts
            .iter()
            .all(|l| l.query == starts[0].query && l.query.contains("requestId="))
    );
}

#[tokio::test]
async fn token_endpoint_and_metadata_faults_are_retried() {
    let fake = GceFake::start();
    fake.add_instance("tok-vm", "RUNNING");
    let dir = tempfile::tempdir().unwrap();
    fake.inject(Scope::Token, Fault::Unavailable, 2);
    let g = gce(&fake, "tok-vm", user_auth(&fake, dir.path()));
    assert_eq!(g.describe().await.unwrap().status, Status::Running);
    assert_eq!(fake.count(Route::Token), 3);

    fake.inject(Scope::Metadata, Fault::Reset, 2);
    let m = gce(&fake, "tok-vm", metadata_auth(&fake, dir.path()));
    assert_eq!(m.describe().await.unwrap().status, Status::Running);
}

#[tokio::test]
async fn a_permanent_500_times_out_with_the_last_error() {
    let fake = GceFake::start();
    fake.add_instance("down-vm", "TERMINATED");
    fake.inject_always(Scope::Api, Fault::Internal);
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&fake, "down-vm");
    s.backoff = backoff(Duration::from_secs(2));
    let g = Gce::with_auth(s, service_account_auth(&fake, dir.path())).unwrap();
    let began = Instant::now();
    let err = g.start().await.unwrap_err();
    let took = began.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let CloudError::Timeout { after, last, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*after, Duration::from_secs(2));
    let last = last.as_deref().expect("the last error");
    assert!(
        matches!(last, CloudError::Api { status: 500, code, .. } if code == "INTERNAL"),
        "{last:?}"
    );
    assert!(fake.api_requests() >= 3);
    assert!(
        err.to_string().contains("did not finish within 2s"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_instance_is_not_found() {
    let fake = GceFake::start();
    let dir = tempfile::tempdir().unwrap();
    let g = gce(&fake, "ghost", service_account_auth(&fake, dir.path()));
    for result in [
        g.describe().await.map(|_| ()),
        g.start().await,
        g.stop().await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, CloudError::NotFound { instance } if instance.ends_with("/instances/ghost")),
            "{err:?}"
        );
    }
    assert_eq!(fake.api_requests(), 3, "a 404 is not retried");
}

#[tokio::test]
async fn an_html_404_is_a_clear_error() {
    let fake = GceFake::start();
    fake.add_instance("vm", "RUNNING");
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&fake, "vm");
    s.api_endpoint = Some(format!("{}/wrong/prefix", fake.api_endpoint()));
    let g = Gce::with_auth(s, service_account_auth(&fake, dir.path())).unwrap();
    let err = g.describe().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CloudError::Protocol { .. }), "{err:?}");
    assert!(text.contains("/wrong/prefix/compute/v1/"), "{text}");
    let CloudError::Protocol { message, .. } = &err else {
        unreachable!()
    };
    assert!(
        message.contains("HTTP 404 with a non-JSON body (text/html)"),
        "{message}"
    );
    assert!(message.contains("api_endpoint"), "{message}");

    // An HTML 502 from a proxy in between is retried like any 5xx.
    fake.inject(Scope::Api, Fault::Html(502), 2);
    let g = gce(&fake, "vm", service_account_auth(&fake, dir.path()));
    assert_eq!(g.describe().await.unwrap().status, Status::Running);
}

/// Runs in a child process started by
/// `gce_new_reads_the_process_environment`, whose environment it reads.
#[tokio::test]
#[ignore = "run in a child process by gce_new_reads_the_process_environment"]
async fn from_env_child() {
    let Ok(endpoint) = std::env::var("ABSCONDA_TEST_GCE_ENDPOINT") else {
        return;
    };
    let g = Gce::new(GceSettings {
        project: "absconda-test".into(),
        zone: "us-central1-a".into(),
        instance: "env-vm".into(),
        api_endpoint: Some(endpoint),
        address: AddressKind::External,
        backoff: backoff(Duration::from_secs(10)),
    })
    .unwrap();
    println!("source: {}", g.credential_source());
    let info = g.describe().await.unwrap();
    assert_eq!(info.status, Status::Running);
}

#[tokio::test]
async fn gce_new_reads_the_process_environment() {
    let fake = GceFake::start();
    fake.add_instance("env-vm", "RUNNING");
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for flow in [
        Flow::ServiceAccountKey,
        Flow::GcloudUser,
        Flow::MetadataServer,
    ] {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["--exact", "gce::from_env_child", "--ignored", "--nocapture"])
            .env("HOME", dir.path())
            .env("ABSCONDA_TEST_GCE_ENDPOINT", fake.api_endpoint());
        for (name, value) in fake.credential_env(flow, dir.path()) {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{flow:?}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let seen: Vec<_> = fake
        .requests()
        .iter()
        .filter(|l| l.route == Route::GetInstance)
        .map(|l| l.principal.clone().unwrap_or_default())
        .collect();
    assert_eq!(seen.len(), 3);
    assert!(
        seen[0].starts_with("serviceAccount:absconda-builder@"),
        "{seen:?}"
    );
    assert_eq!(seen[1], "user:dev@example.com");
    assert!(
        seen[2].ends_with("-compute@developer.gserviceaccount.com"),
        "{seen:?}"
    );
}
