//! EC2 builders against moto's server with signature checks on.
//!
//! Every test starts its own moto (IAM checks on, an admin user's key) and
//! talks to it through absconda's own client: describe by id and by Name tag,
//! stop and start, idempotence, the credential chain (environment, profile
//! files, `credential_process`, session tokens), auth failures that are not
//! retried, and retries through a proxy that injects faults.

use std::time::{Duration, Instant};

use absconda::cloud::aws_auth::Env;
use absconda::cloud::ec2::{Ec2, Ec2Instance, Ec2Settings};
use absconda::cloud::{CloudError, Provider, Status};

use crate::support::faulty_proxy::{Fault, FaultyProxy};
use crate::support::moto::{Moto, fast_backoff};

/// Starts moto, or returns from the test (outside CI) when it cannot run.
macro_rules! moto {
    () => {
        match Moto::start().await {
            Some(moto) => moto,
            None => return,
        }
    };
}

/// Settings that reach moto through `proxy`.
fn via(proxy: &FaultyProxy, moto: &Moto, instance: Ec2Instance, deadline: Duration) -> Ec2Settings {
    Ec2Settings {
        endpoint: Some(proxy.url()),
        backoff: fast_backoff(deadline),
        ..moto.settings(instance)
    }
}

#[tokio::test]
async fn describe_by_id_and_by_name_tag() {
    let moto = moto!();
    let id = moto.run_instance(Some("absconda-builder")).await;
    let _other = moto.run_instance(Some("someone-else")).await;

    let by_id = moto
        .ec2(Ec2Instance::Id(id.clone()))
        .describe()
        .await
        .unwrap();
    assert_eq!(by_id.id, id);
    assert_eq!(by_id.status, Status::Running);
    assert_eq!(by_id.raw_status, "running");
    let address = by_id.address.clone().expect("an address");
    assert!(address.parse::<std::net::IpAddr>().is_ok(), "{address}");

    let ec2 = moto.ec2(Ec2Instance::Name("absconda-builder".into()));
    assert_eq!(ec2.kind(), "ec2");
    let by_name = ec2.describe().await.unwrap();
    assert_eq!(by_name, by_id);

    // Characters that form encoding and signing must agree on.
    let odd = "build box #1 (ci)*~/é";
    let odd_id = moto.run_instance(Some(odd)).await;
    let info = moto
        .ec2(Ec2Instance::Name(odd.into()))
        .describe()
        .await
        .unwrap();
    assert_eq!(info.id, odd_id);
}

#[tokio::test]
async fn stop_then_start() {
    let moto = moto!();
    let id = moto.run_instance(Some("stop-start")).await;
    let ec2 = moto.ec2(Ec2Instance::Name("stop-start".into()));

    ec2.stop().await.unwrap();
    assert_eq!(moto.state(&id).await, "stopped");
    assert_eq!(ec2.describe().await.unwrap().status, Status::Stopped);

    ec2.start().await.unwrap();
    assert_eq!(moto.state(&id).await, "running");
    assert_eq!(ec2.describe().await.unwrap().status, Status::Running);
}

#[tokio::test]
async fn start_and_stop_are_idempotent() {
    let moto = moto!();
    let id = moto.run_instance(None).await;
    let proxy = FaultyProxy::start(moto.addr()).await;
    let settings = via(
        &proxy,
        &moto,
        Ec2Instance::Id(id.clone()),
        Duration::from_secs(20),
    );
    let ec2 = Ec2::with_env(settings, moto.env()).unwrap();

    // Running: start only looks.
    proxy.script([], Fault::Pass);
    ec2.start().await.unwrap();
    assert_eq!(proxy.actions(), ["DescribeInstances"]);

    proxy.script([], Fault::Pass);
    ec2.stop().await.unwrap();
    assert_eq!(proxy.actions(), ["DescribeInstances", "StopInstances"]);
    assert_eq!(moto.state(&id).await, "stopped");

    // Stopped: stop again only looks.
    proxy.script([], Fault::Pass);
    ec2.stop().await.unwrap();
    ec2.stop().await.unwrap();
    assert_eq!(proxy.actions(), ["DescribeInstances", "DescribeInstances"]);

    // Two clients starting at once both succeed.
    let other = Ec2::with_env(
        via(
            &proxy,
            &moto,
            Ec2Instance::Id(id.clone()),
            Duration::from_secs(20),
        ),
        moto.env(),
    )
    .unwrap();
    let (a, b) = tokio::join!(ec2.start(), other.start());
    a.unwrap();
    b.unwrap();
    assert_eq!(moto.state(&id).await, "running");
}

/// A DescribeInstances answer showing `id` in `state`.
fn describe_answer(id: &str, state: &str) -> Fault {
    Fault::Answer {
        status: 200,
        body: format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>proxy</requestId>
<reservationSet><item><reservationId>r-1</reservationId><instancesSet><item>
<instanceId>{id}</instanceId><instanceState><code>0</code><name>{state}</name></instanceState>
<privateIpAddress>10.0.0.1</privateIpAddress></item></instancesSet></item></reservationSet>
</DescribeInstancesResponse>"#
        ),
    }
}

#[tokio::test]
async fn an_instance_half_way_the_other_way_is_waited_for() {
    let moto = moto!();
    let id = moto.run_instance(None).await;
    let proxy = FaultyProxy::start(moto.addr()).await;
    let ec2 = Ec2::with_env(
        via(
            &proxy,
            &moto,
            Ec2Instance::Id(id.clone()),
            Duration::from_secs(20),
        ),
        moto.env(),
    )
    .unwrap();

    // Still `pending` when asked to stop: wait until it runs, then stop it.
    proxy.script(
        [
            describe_answer(&id, "pending"),
            describe_answer(&id, "pending"),
        ],
        Fault::Pass,
    );
    ec2.stop().await.unwrap();
    assert_eq!(
        proxy.actions(),
        [
            "DescribeInstances",
            "DescribeInstances",
            "DescribeInstances",
            "StopInstances"
        ]
    );
    assert_eq!(moto.state(&id).await, "stopped");

    // Still `stopping` when asked to start: wait until stopped, then start.
    proxy.script([describe_answer(&id, "stopping")], Fault::Pass);
    ec2.start().await.unwrap();
    assert_eq!(
        proxy.actions(),
        ["DescribeInstances", "DescribeInstances", "StartInstances"]
    );
    assert_eq!(moto.state(&id).await, "running");

    // Another client changed the state between our look and our call: look again.
    ec2.stop().await.unwrap();
    proxy.script(
        [
            Fault::Pass,
            Fault::Ec2Error {
                status: 400,
                code: "IncorrectInstanceState",
            },
        ],
        Fault::Pass,
    );
    ec2.start().await.unwrap();
    assert_eq!(
        proxy.actions(),
        [
            "DescribeInstances",
            "StartInstances",
            "DescribeInstances",
            "StartInstances"
        ]
    );
    assert_eq!(moto.state(&id).await, "running");

    // A state that never settles ends at the deadline, saying what it waited for.
    let ec2 = Ec2::with_env(
        via(
            &proxy,
            &moto,
            Ec2Instance::Id(id.clone()),
            Duration::from_secs(2),
        ),
        moto.env(),
    )
    .unwrap();
    proxy.script([], describe_answer(&id, "stopping"));
    let err = ec2.start().await.unwrap_err();
    let CloudError::Timeout { what, .. } = &err else {
        panic!("not a timeout: {err:?}");
    };
    assert!(what.contains("stopping"), "{what}");
}

#[tokio::test]
async fn wrong_secret_key_is_an_auth_error_without_retries() {
    let moto = moto!();
    let id = moto.run_instance(None).await;
    let proxy = FaultyProxy::start(moto.addr()).await;
    let (key_id, _) = moto.access_key();
    let env = moto
        .env_without_credentials()
        .with("AWS_ACCESS_KEY_ID", key_id)
        .with("AWS_SECRET_ACCESS_KEY", "not-the-secret-key");
    let ec2 = Ec2::with_env(
        via(&proxy, &moto, Ec2Instance::Id(id), Duration::from_secs(20)),
        env,
    )
    .unwrap();

    for op in ["describe", "start", "stop"] {
        proxy.script([], Fault::Pass);
        let started = Instant::now();
        let err = match op {
            "describe" => ec2.describe().await.map(|_| ()),
            "start" => ec2.start().await,
            _ => ec2.stop().await,
        }
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{op}: {:?}",
            started.elapsed()
        );
        let CloudError::Auth {
            source_name,
            message,
        } = &err
        else {
            panic!("{op}: not an auth error: {err:?}");
        };
        assert!(
            source_name.contains("environment variables AWS_ACCESS_KEY_ID"),
            "{source_name}"
        );
        assert!(message.contains("AuthFailure"), "{message}");
        assert!(message.contains("check AWS_ACCESS_KEY_ID"), "{message}");
        assert!(!err.to_string().contains("not-the-secret-key"), "{err}");
        assert_eq!(proxy.requests(), 1, "{op}: retried: {:?}", proxy.actions());
    }

    // An access key moto has never issued: the same.
    let env = moto
        .env_without_credentials()
        .with("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        .with("AWS_SECRET_ACCESS_KEY", "whatever");
    let err = Ec2::with_env(moto.settings(Ec2Instance::Id("i-1".into())), env)
        .unwrap()
        .describe()
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Auth { .. }), "{err:?}");
}

#[tokio::test]
async fn unknown_instances_are_not_found() {
    let moto = moto!();
    moto.run_instance(Some("present")).await;

    let err = moto
        .ec2(Ec2Instance::Id("i-0123456789abcdef0".into()))
        .describe()
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("i-0123456789abcdef0"), "{err}");

    let ec2 = moto.ec2(Ec2Instance::Name("absent".into()));
    let err = ec2.describe().await.unwrap_err();
    assert!(matches!(err, CloudError::NotFound { .. }), "{err:?}");
    assert!(matches!(
        ec2.start().await,
        Err(CloudError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_name_tag_on_several_instances_is_refused() {
    let moto = moto!();
    let first = moto.run_instance(Some("twin")).await;
    let second = moto.run_instance(Some("twin")).await;
    let ec2 = moto.ec2(Ec2Instance::Name("twin".into()));

    let err = ec2.describe().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CloudError::Config { .. }), "{err:?}");
    assert!(text.contains(&first) && text.contains(&second), "{text}");
    assert!(text.contains("instance_id:"), "{text}");
    assert!(ec2.start().await.is_err());

    // Terminated instances do not count.
    moto.terminate(&first).await;
    let info = ec2.describe().await.unwrap();
    assert_eq!(info.id, second);

    // Once the last one is terminated too, the builder is gone.
    moto.terminate(&second).await;
    assert_eq!(ec2.describe().await.unwrap().status, Status::Gone);
    ec2.stop().await.unwrap();
    assert!(matches!(
        ec2.start().await,
        Err(CloudError::OperationFailed { .. })
    ));
}

#[tokio::test]
async fn credentials_from_profile_files() {
    let moto = moto!();
    let id = moto.run_instance(Some("profiled")).await;
    let (key_id, secret) = moto.access_key();
    let aws = moto.home().join(".aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = AKIAWRONGWRONGWRONG0\naws_secret_access_key = nope\n\n\
             # the builder's profile\n[builder]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        aws.join("config"),
        format!(
            "[profile from-config]\nregion = us-east-1\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
        ),
    )
    .unwrap();

    // The builder's `profile:`.
    let settings = Ec2Settings {
        profile: Some("builder".into()),
        ..moto.settings(Ec2Instance::Name("profiled".into()))
    };
    let ec2 = Ec2::with_env(settings, moto.env_without_credentials()).unwrap();
    assert_eq!(ec2.describe().await.unwrap().id, id);
    ec2.stop().await.unwrap();
    assert_eq!(moto.state(&id).await, "stopped");

    // AWS_PROFILE, a profile of the config file, and its region.
    let env = moto
        .env_without_credentials()
        .with("AWS_PROFILE", "from-config")
        .with("AWS_REGION", "");
    let settings = Ec2Settings {
        region: None,
        ..moto.settings(Ec2Instance::Id(id.clone()))
    };
    let ec2 = Ec2::with_env(settings, env).unwrap();
    assert_eq!(ec2.region(), "us-east-1");
    ec2.start().await.unwrap();
    assert_eq!(moto.state(&id).await, "running");

    // The default profile holds a wrong key: the error names it.
    let ec2 = Ec2::with_env(
        moto.settings(Ec2Instance::Id(id)),
        moto.env_without_credentials(),
    )
    .unwrap();
    let err = ec2.describe().await.unwrap_err();
    let CloudError::Auth { source_name, .. } = &err else {
        panic!("not an auth error: {err:?}");
    };
    assert_eq!(source_name, "profile `default` in `~/.aws/credentials`");
}

/// Writes an executable `sh` script that prints `json` and counts its runs.
fn credential_script(dir: &std::path::Path, json: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("credentials.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\necho run >> \"$(dirname \"$0\")/runs\"\ncat <<'EOF'\n{json}\nEOF\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn credentials_from_credential_process() {
    let moto = moto!();
    let id = moto.run_instance(Some("processed")).await;
    let (key_id, secret) = moto.access_key();
    let script = credential_script(
        moto.home(),
        &format!(r#"{{"Version": 1, "AccessKeyId": "{key_id}", "SecretAccessKey": "{secret}"}}"#),
    );
    std::fs::create_dir_all(moto.home().join(".aws")).unwrap();
    std::fs::write(
        moto.home().join(".aws/config"),
        format!(
            "[profile tool]\ncredential_process = {}\n",
            script.display()
        ),
    )
    .unwrap();
    let settings = Ec2Settings {
        profile: Some("tool".into()),
        ..moto.settings(Ec2Instance::Name("processed".into()))
    };
    let ec2 = Ec2::with_env(settings, moto.env_without_credentials()).unwrap();
    ec2.stop().await.unwrap();
    ec2.start().await.unwrap();
    assert_eq!(moto.state(&id).await, "running");
    // No Expiration: fetched once for all those calls.
    let runs = std::fs::read_to_string(moto.home().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1);
}

#[tokio::test]
async fn session_tokens_are_signed() {
    let moto = moto!();
    let id = moto.run_instance(Some("temporary")).await;
    let session = moto.session_credentials().await;

    // From the environment.
    let env = moto
        .env_without_credentials()
        .with("AWS_ACCESS_KEY_ID", session.access_key_id.clone())
        .with("AWS_SECRET_ACCESS_KEY", session.secret_access_key.clone())
        .with("AWS_SESSION_TOKEN", session.session_token.clone());
    let ec2 = Ec2::with_env(moto.settings(Ec2Instance::Id(id.clone())), env.clone()).unwrap();
    ec2.stop().await.unwrap();
    assert_eq!(moto.state(&id).await, "stopped");

    // From a credential_process, with its Expiration.
    let script = credential_script(
        moto.home(),
        &format!(
            r#"{{"Version": 1, "AccessKeyId": "{}", "SecretAccessKey": "{}", "SessionToken": "{}", "Expiration": "{}"}}"#,
            session.access_key_id,
            session.secret_access_key,
            session.session_token,
            session.expiration
        ),
    );
    std::fs::create_dir_all(moto.home().join(".aws")).unwrap();
    std::fs::write(
        moto.home().join(".aws/credentials"),
        format!("[sts]\ncredential_process = sh '{}'\n", script.display()),
    )
    .unwrap();
    let settings = Ec2Settings {
        profile: Some("sts".into()),
        ..moto.settings(Ec2Instance::Name("temporary".into()))
    };
    let ec2 = Ec2::with_env(settings, moto.env_without_credentials()).unwrap();
    ec2.start().await.unwrap();
    assert_eq!(moto.state(&id).await, "running");

    // A wrong session token is refused, naming the environment.
    let ec2 = Ec2::with_env(
        moto.settings(Ec2Instance::Id(id)),
        env.with("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEBogus"),
    )
    .unwrap();
    let err = ec2.describe().await.unwrap_err();
    assert!(matches!(err, CloudError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("AWS_SESSION_TOKEN"), "{err}");
}

#[tokio::test]
async fn bursts_of_faults_are_retried_within_the_deadline() {
    let moto = moto!();
    let id = moto.run_instance(Some("flaky")).await;
    let proxy = FaultyProxy::start(moto.addr()).await;
    let deadline = Duration::from_secs(15);
    let ec2 = Ec2::with_env(
        via(&proxy, &moto, Ec2Instance::Name("flaky".into()), deadline),
        moto.env(),
    )
    .unwrap();

    proxy.script(
        [
            Fault::Status(503),
            Fault::Status(503),
            Fault::Reset,
            Fault::TooManyRequests { retry_after: 1 },
            Fault::Status(502),
            Fault::Ec2Error {
                status: 503,
                code: "RequestLimitExceeded",
            },
        ],
        Fault::Pass,
    );
    let started = Instant::now();
    let info = ec2.describe().await.unwrap();
    let took = started.elapsed();
    assert_eq!(info.id, id);
    assert_eq!(proxy.requests(), 7, "{:?}", proxy.actions());
    // The 429's Retry-After was waited out.
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < deadline, "{took:?}");

    // Faults on both the describe and the stop call; throttling with a 400.
    proxy.script(
        [
            Fault::Reset,
            Fault::Pass,
            Fault::Status(500),
            Fault::Ec2Error {
                status: 400,
                code: "RequestLimitExceeded",
            },
            Fault::TooManyRequests { retry_after: 1 },
        ],
        Fault::Pass,
    );
    ec2.stop().await.unwrap();
    assert_eq!(moto.state(&id).await, "stopped");
    assert_eq!(
        proxy.actions(),
        [
            "DescribeInstances",
            "DescribeInstances",
            "StopInstances",
            "StopInstances",
            "StopInstances",
            "StopInstances"
        ]
    );

    proxy.script(
        [Fault::Status(503), Fault::Reset, Fault::Status(503)],
        Fault::Pass,
    );
    ec2.start().await.unwrap();
    assert_eq!(moto.state(&id).await, "running");
}

#[tokio::test]
async fn a_permanent_500_times_out_with_the_last_error() {
    let moto = moto!();
    moto.run_instance(Some("broken")).await;
    let proxy = FaultyProxy::start(moto.addr()).await;
    let deadline = Duration::from_secs(3);
    let ec2 = Ec2::with_env(
        via(&proxy, &moto, Ec2Instance::Name("broken".into()), deadline),
        moto.env(),
    )
    .unwrap();
    proxy.script([], Fault::Status(500));

    let started = Instant::now();
    let err = ec2.start().await.unwrap_err();
    let took = started.elapsed();
    assert!(took <= deadline + Duration::from_secs(1), "{took:?}");
    let CloudError::Timeout { what, after, last } = &err else {
        panic!("not a timeout: {err:?}");
    };
    assert_eq!(*after, deadline);
    assert!(what.contains("DescribeInstances"), "{what}");
    let last = last.as_ref().expect("the last error");
    assert!(
        matches!(**last, CloudError::Api { status: 500, .. }),
        "{last:?}"
    );
    assert!(
        err.to_string().contains("did not finish within 3s"),
        "{err}"
    );
    assert!(proxy.requests() > 3, "{}", proxy.requests());
}

#[tokio::test]
async fn the_environment_alone_configures_the_provider() {
    let moto = moto!();
    let id = moto.run_instance(None).await;
    // No region or endpoint in the settings: AWS_REGION and AWS_ENDPOINT_URL.
    let env = Env::from_pairs([
        ("HOME", moto.home().display().to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", moto.endpoint().to_string()),
        ("AWS_ACCESS_KEY_ID", moto.access_key().0.to_string()),
        ("AWS_SECRET_ACCESS_KEY", moto.access_key().1.to_string()),
    ]);
    let settings = Ec2Settings {
        region: None,
        endpoint: None,
        ..moto.settings(Ec2Instance::Id(id.clone()))
    };
    let ec2 = Ec2::with_env(settings, env).unwrap();
    assert_eq!(ec2.describe().await.unwrap().id, id);
}

#[tokio::test]
async fn listing_follows_next_token_and_filters_by_tag() {
    let moto = moto!();
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(moto.run_instance(Some(&format!("box-{i:02}"))).await);
    }
    let ec2 = moto.ec2(Ec2Instance::Id(ids[0].clone()));
    for id in &ids[..7] {
        ec2.query(
            "CreateTags",
            &[
                ("ResourceId.1", id.as_str()),
                ("Tag.1.Key", "pool"),
                ("Tag.1.Value", "builders"),
            ],
        )
        .await
        .unwrap();
    }
    moto.terminate(&ids[11]).await;
    // Five per page: three pages for the eleven that are not terminated.
    let all = ec2.list_instances_paged(&[], 5).await.unwrap();
    let names: Vec<_> = all.iter().filter_map(|i| i.name.clone()).collect();
    let want: Vec<_> = (0..11).map(|i| format!("box-{i:02}")).collect();
    assert_eq!(names, want);
    let pool = ec2
        .list_instances_paged(&[("pool".into(), Some("builders".into()))], 5)
        .await
        .unwrap();
    let got: Vec<_> = pool.iter().map(|i| i.instance_id.clone()).collect();
    let mut want = ids[..7].to_vec();
    want.sort_by_key(|id| ids.iter().position(|x| x == id));
    assert_eq!(got, want);
    let none = ec2
        .list_instances(&[("pool".into(), Some("nobody".into()))])
        .await
        .unwrap();
    assert!(none.is_empty());
}
