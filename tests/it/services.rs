//! Build services as builders: CodeBuild against moto (S3, CodeBuild,
//! CloudWatch Logs), with the build status set through
//! [`CodeBuildGate`] because moto's CodeBuild runs nothing.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use absconda::cloud::aws_auth::Env;
use absconda::config::ConfigFile;
use absconda::service::codebuild::Aws;
use serde_json::json;
use url::Url;

use crate::support::absconda::BIN;
use crate::support::cloudbuild_fake::CloudBuildFake;
use crate::support::codebuild_gate::CodeBuildGate;
use crate::support::gce_fake::{Flow, GceFake};
use crate::support::moto::{Moto, REGION};
use crate::support::{tempdir, wait_until};

const BUCKET: &str = "absconda-contexts";
const PROJECT: &str = "absconda-builds";
const GROUP: &str = "/absconda/test";

/// moto, the gate in front of it, a project folder with a config naming
/// builder `cb`, and a client for setting things up.
pub(crate) struct Setup {
    _moto: Moto,
    pub gate: CodeBuildGate,
    dir: tempfile::TempDir,
    aws: Aws,
    /// The environment absconda runs with (HOME, the moto key).
    pub env: Vec<(String, String)>,
    /// Builder `cb`'s lines in a builders file.
    pub cb_yaml: String,
}

impl Setup {
    pub async fn start() -> Option<Setup> {
        let moto = Moto::start().await?;
        let gate = CodeBuildGate::start(moto.addr());
        let dir = tempdir();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY kept.txt /\n").unwrap();
        std::fs::write(ctx.join("kept.txt"), "kept").unwrap();
        std::fs::write(ctx.join("secret.env"), "TOKEN=1").unwrap();
        std::fs::write(ctx.join(".dockerignore"), "secret.env\n").unwrap();
        let cb_yaml = format!(
            "  cb:\n    provider: codebuild\n    region: {REGION}\n    api_endpoint: {}\n    bucket: {BUCKET}\n    codebuild_project: {PROJECT}\n    log_group: {GROUP}\n    timeout: 600\n",
            gate.endpoint()
        );
        let config = format!("builders:\n{cb_yaml}");
        let config_path = dir.path().join("absconda-remote.yaml");
        std::fs::write(&config_path, &config).unwrap();
        let builder = ConfigFile::parse(&config_path, &config)
            .unwrap()
            .builder("cb")
            .unwrap();
        let (key, secret) = moto.access_key();
        let env = vec![
            ("HOME".to_string(), home.display().to_string()),
            ("AWS_ACCESS_KEY_ID".into(), key.to_string()),
            ("AWS_SECRET_ACCESS_KEY".into(), secret.to_string()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            (
                "XDG_STATE_HOME".into(),
                home.join("state").display().to_string(),
            ),
        ];
        let aws = Aws::for_builder(&builder, Env::from_pairs(env.clone())).unwrap();
        aws.call(
            "s3",
            "CreateBucket",
            "PUT",
            &Url::parse(&format!("{}/{BUCKET}", gate.endpoint())).unwrap(),
            &[],
            b"",
        )
        .await
        .expect("create the bucket");
        aws.json(
            "codebuild",
            "CreateProject",
            &json!({
                "name": PROJECT,
                "source": {"type": "S3", "location": format!("{BUCKET}/none")},
                "artifacts": {"type": "NO_ARTIFACTS"},
                "environment": {
                    "type": "LINUX_CONTAINER",
                    "image": "aws/codebuild/standard:7.0",
                    "computeType": "BUILD_GENERAL1_SMALL"
                },
                "serviceRole": "arn:aws:iam::123456789012:role/absconda-codebuild"
            }),
        )
        .await
        .expect("create the project");
        aws.json("logs", "CreateLogGroup", &json!({"logGroupName": GROUP}))
            .await
            .expect("create the log group");
        Some(Setup {
            _moto: moto,
            gate,
            dir,
            aws,
            env,
            cb_yaml,
        })
    }

    /// `absconda build` on `cb`, stderr collected as it comes.
    fn spawn(&self, extra: &[&str]) -> (Child, Arc<Mutex<String>>) {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .args(["build", "--remote-builder", "cb", "--repository"])
            .arg("registry.example/app")
            .args(["-t", "1", "--context", "ctx"])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("run absconda");
        let out = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut o = o.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        (child, out)
    }

    pub async fn objects(&self) -> Vec<String> {
        let url = Url::parse(&format!("{}/{BUCKET}?list-type=2", self.gate.endpoint())).unwrap();
        let (_, body) = self
            .aws
            .call("s3", "ListObjectsV2", "GET", &url, &[], b"")
            .await
            .expect("list the bucket");
        let text = String::from_utf8_lossy(&body).into_owned();
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }

    async fn object(&self, key: &str) -> Vec<u8> {
        let url = Url::parse(&format!("{}/{BUCKET}/{key}", self.gate.endpoint())).unwrap();
        self.aws
            .call("s3", "GetObject", "GET", &url, &[], b"")
            .await
            .expect("get the object")
            .1
    }

    /// Waits for the build to start; its id.
    fn started(&self) -> String {
        wait_until("StartBuild", Duration::from_secs(120), || {
            !self.gate.build_ids().is_empty()
        });
        self.gate.build_ids()[0].clone()
    }

    async fn log(&self, id: &str, lines: &[&str]) {
        let stream = id.rsplit_once(':').unwrap().1;
        let _ = self
            .aws
            .json(
                "logs",
                "CreateLogStream",
                &json!({"logGroupName": GROUP, "logStreamName": stream}),
            )
            .await;
        let now = chrono::Utc::now().timestamp_millis();
        let events: Vec<_> = lines
            .iter()
            .map(|m| json!({"timestamp": now, "message": m}))
            .collect();
        self.aws
            .json(
                "logs",
                "PutLogEvents",
                &json!({"logGroupName": GROUP, "logStreamName": stream, "logEvents": events}),
            )
            .await
            .expect("put log events");
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("absconda did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The names in a gzip tar.
fn tar_names(gz: &[u8]) -> Vec<String> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .expect("a gzip archive");
    let mut names = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at] != 0 {
        let name = String::from_utf8_lossy(&tar[at..at + 100])
            .trim_end_matches('\0')
            .to_string();
        let size = u64::from_str_radix(
            String::from_utf8_lossy(&tar[at + 124..at + 136])
                .trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap_or(0) as usize;
        names.push(name);
        at += 512 + size.div_ceil(512) * 512;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codebuild_builds_from_s3_follows_the_log_and_deletes_the_context() {
    let Some(s) = Setup::start().await else {
        return;
    };
    let (mut child, err) = s.spawn(&[
        "--build-arg",
        "V=1 2",
        "--label",
        "team=x",
        "--target",
        "final",
        "--platform",
        "linux/amd64",
    ]);
    let id = s.started();

    // What absconda asked CodeBuild for.
    let start = &s.gate.started()[0];
    assert_eq!(start["projectName"], PROJECT);
    assert_eq!(start["sourceTypeOverride"], "S3");
    assert_eq!(start["privilegedModeOverride"], true);
    let location = start["sourceLocationOverride"].as_str().unwrap();
    let key = location
        .strip_prefix(&format!("{BUCKET}/"))
        .expect("the context in the configured bucket");
    let spec = start["buildspecOverride"].as_str().unwrap();
    for part in [
        "version: 0.2",
        "docker build -f Dockerfile -t registry.example/app:1",
        "--build-arg 'V=1 2'",
        "--label team=x",
        "--target final",
        "--platform linux/amd64",
        " .",
    ] {
        assert!(spec.contains(part), "`{part}` missing from:\n{spec}");
    }
    assert!(!spec.contains("docker push"), "no --push: {spec}");

    // The context is in S3 while the build runs, without ignored files.
    assert_eq!(s.objects().await, vec![key.to_string()]);
    let names = tar_names(&s.object(key).await);
    assert!(names.iter().any(|n| n == "Dockerfile"), "{names:?}");
    assert!(names.iter().any(|n| n == "kept.txt"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("secret.env")), "{names:?}");

    // Log events appear while the build is still running.
    s.log(&id, &["Step 1/2 : FROM scratch", "marker-line-one"])
        .await;
    wait_until("the log line on stderr", Duration::from_secs(30), || {
        err.lock().unwrap().contains("marker-line-one")
    });
    assert!(child.try_wait().unwrap().is_none(), "still running");
    s.log(&id, &["marker-line-two"]).await;
    wait_until("the second log line", Duration::from_secs(30), || {
        err.lock().unwrap().contains("marker-line-two")
    });

    s.gate.finish("SUCCEEDED", None);
    let code = wait_exit(&mut child, Duration::from_secs(60));
    let stderr = err.lock().unwrap().clone();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("no persistent layer cache"),
        "the summary says there is no cache: {stderr}"
    );
    assert!(s.objects().await.is_empty(), "the context was deleted");
    assert!(s.gate.stopped().is_empty());

    // `remote metrics`: the 61.5 s build, billed as two whole minutes at the
    // list price.
    let out = Command::new(BIN)
        .current_dir(s.dir.path())
        .args(["remote", "metrics", "cb", "--json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(s.env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = if v.is_array() { &v[0] } else { &v };
    assert_eq!(m["builds"], 1, "{v:#}");
    assert_eq!(m["vm_seconds"], 120.0, "{v:#}");
    let usd = m["cost"]["usd"].as_f64().unwrap();
    assert!((usd - 0.01).abs() < 1e-9, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codebuild_status_becomes_the_exit_code_and_ctrl_c_stops_the_build() {
    let Some(s) = Setup::start().await else {
        return;
    };
    // A failed build phase: exit 5. With --push, a failed push phase: exit 6.
    for (phase, push, want) in [("BUILD", false, 5), ("POST_BUILD", true, 6)] {
        s.gate.finish("FAILED", Some(phase));
        let args: &[&str] = if push { &["--push"] } else { &[] };
        let (mut child, err) = s.spawn(args);
        let code = wait_exit(&mut child, Duration::from_secs(120));
        let stderr = err.lock().unwrap().clone();
        assert_eq!(code, want, "{phase}: {stderr}");
        if push {
            let spec = s.gate.started().last().unwrap()["buildspecOverride"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                spec.contains("docker push registry.example/app:1"),
                "{spec}"
            );
        }
    }
    assert!(s.objects().await.is_empty(), "the contexts were deleted");

    // Ctrl-C while the build runs: StopBuild, exit 130, nothing left.
    let gate_before = s.gate.build_ids().len();
    s.gate.reopen();
    let (mut child, err) = s.spawn(&[]);
    wait_until("the next StartBuild", Duration::from_secs(120), || {
        s.gate.build_ids().len() > gate_before
    });
    let polls = s.gate.polls();
    wait_until("a status poll", Duration::from_secs(30), || {
        s.gate.polls() > polls
    });
    let id = s.gate.build_ids().last().unwrap().clone();
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let code = wait_exit(&mut child, Duration::from_secs(60));
    let stderr = err.lock().unwrap().clone();
    assert_eq!(code, 130, "{stderr}");
    assert_eq!(s.gate.stopped(), vec![id]);
    assert!(s.objects().await.is_empty(), "the context was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codebuild_uploads_a_large_context_to_s3_in_parts() {
    let Some(s) = Setup::start().await else {
        return;
    };
    // Incompressible and over the multipart threshold: three parts.
    let mut big = vec![0u8; 20 << 20];
    let mut x: u64 = 0x2545f4914f6cdd1d;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(s.dir.path().join("ctx/big.bin"), &big).unwrap();
    let (mut child, err) = s.spawn(&[]);
    s.started();
    let key = s.gate.started()[0]["sourceLocationOverride"]
        .as_str()
        .unwrap()
        .strip_prefix(&format!("{BUCKET}/"))
        .unwrap()
        .to_string();
    // The whole archive is there (too big for the client's answer limit
    // to fetch here: its size, from the listing).
    let url = Url::parse(&format!("{}/{BUCKET}?list-type=2", s.gate.endpoint())).unwrap();
    let (_, listing) = s
        .aws
        .call("s3", "ListObjectsV2", "GET", &url, &[], b"")
        .await
        .unwrap();
    let listing = String::from_utf8_lossy(&listing).into_owned();
    assert!(listing.contains(&format!("<Key>{key}</Key>")), "{listing}");
    let size: u64 = listing
        .split("<Size>")
        .nth(1)
        .and_then(|r| r.split("</Size>").next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(size > 20 << 20, "{size} bytes");
    let requests = s.gate.requests();
    let parts = requests
        .iter()
        .filter(|r| r.starts_with("PUT ") && r.contains("partNumber="))
        .count();
    assert_eq!(parts, 3, "{requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("POST ") && r.ends_with("?uploads")),
        "{requests:#?}"
    );
    s.gate.finish("SUCCEEDED", None);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)),
        0,
        "{}",
        err.lock().unwrap()
    );
    assert!(s.objects().await.is_empty(), "the context was deleted");
}

// ---------------------------------------------------------------------------
// Cloud Build, against the fake (no emulator runs builds).

const GCS_BUCKET: &str = "absconda-test-contexts";

/// The Cloud Build fake with the GCE fake's tokens, and a project folder
/// with builder `gb`.
struct GcpSetup {
    _gce: Arc<GceFake>,
    fake: CloudBuildFake,
    dir: tempfile::TempDir,
    env: Vec<(String, Option<String>)>,
}

impl GcpSetup {
    fn start() -> GcpSetup {
        let gce = Arc::new(GceFake::start());
        let g = gce.clone();
        let fake = CloudBuildFake::start(move |auth| g.principal_of(auth).is_some());
        let dir = tempdir();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY kept.txt /\n").unwrap();
        std::fs::write(ctx.join("kept.txt"), "kept").unwrap();
        std::fs::write(ctx.join("secret.env"), "TOKEN=1").unwrap();
        std::fs::write(ctx.join(".dockerignore"), "secret.env\n").unwrap();
        std::fs::write(
            dir.path().join("absconda-remote.yaml"),
            format!(
                "builders:\n  gb:\n    provider: cloudbuild\n    project: absconda-test\n    region: europe-west1\n    bucket: {GCS_BUCKET}\n    api_endpoint: {e}\n    storage_endpoint: {e}\n    machine_type: E2_HIGHCPU_8\n    timeout: 600\n",
                e = fake.endpoint()
            ),
        )
        .unwrap();
        let mut env: Vec<(String, Option<String>)> = gce
            .credential_env(Flow::ServiceAccountKey, dir.path())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.push(("HOME".into(), Some(home.display().to_string())));
        GcpSetup {
            _gce: gce,
            fake,
            dir,
            env,
        }
    }

    fn spawn(&self, extra: &[&str]) -> (Child, Arc<Mutex<String>>) {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .args(["build", "--remote-builder", "gb", "--repository"])
            .arg("europe-docker.pkg.dev/absconda-test/apps/app")
            .args(["-t", "1", "--context", "ctx"])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        let mut child = c.spawn().expect("run absconda");
        let out = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (child, out)
    }
}

#[test]
fn cloudbuild_builds_from_cloud_storage_follows_the_log_and_deletes_the_source() {
    let s = GcpSetup::start();
    let (mut child, err) = s.spawn(&[
        "--push",
        "--build-arg",
        "V=1 2",
        "--label",
        "team=x",
        "--target",
        "final",
        "--platform",
        "linux/amd64",
    ]);
    wait_until("builds.create", Duration::from_secs(120), || {
        !s.fake.build_ids().is_empty()
    });
    let id = s.fake.build_ids()[0].clone();
    let build = &s.fake.created()[0];
    let object = build["source"]["storageSource"]["object"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(build["source"]["storageSource"]["bucket"], GCS_BUCKET);
    let image = "europe-docker.pkg.dev/absconda-test/apps/app:1";
    assert_eq!(build["images"], json!([image]), "pushed through `images`");
    assert_eq!(build["options"]["machineType"], "E2_HIGHCPU_8");
    assert_eq!(build["timeout"], "600s");
    let step = &build["steps"][0];
    assert_eq!(step["name"], "gcr.io/cloud-builders/docker");
    let args: Vec<&str> = step["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(&args[..3], ["build", "-f", "Dockerfile"]);
    for pair in [
        ["-t", image],
        ["--build-arg", "V=1 2"],
        ["--label", "team=x"],
        ["--target", "final"],
        ["--platform", "linux/amd64"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
    }
    assert_eq!(args.last(), Some(&"."));
    // A small context: one media upload, as gzip, without ignored files.
    let uploads: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "POST" && p.starts_with("/upload/"))
        .collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert!(uploads[0].1.contains("uploadType=media"), "{uploads:?}");
    assert_eq!(uploads[0].2, "application/gzip");
    let names = tar_names(&s.fake.object(GCS_BUCKET, &object).unwrap());
    assert!(names.iter().any(|n| n == "kept.txt"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("secret.env")), "{names:?}");

    // The log, while the build runs.
    s.fake
        .append_log(&id, "Step 1/2 : FROM scratch\nmarker-gcs-one\n");
    wait_until("the log line on stderr", Duration::from_secs(30), || {
        err.lock().unwrap().contains("marker-gcs-one")
    });
    assert!(child.try_wait().unwrap().is_none(), "still running");
    s.fake.append_log(&id, "marker-gcs-two\n");
    wait_until("the second log line", Duration::from_secs(30), || {
        err.lock().unwrap().contains("marker-gcs-two")
    });
    s.fake.finish("SUCCESS", None);
    let code = wait_exit(&mut child, Duration::from_secs(60));
    let stderr = err.lock().unwrap().clone();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stderr.matches("marker-gcs-one").count(),
        1,
        "each log line once: {stderr}"
    );
    assert!(stderr.contains("no persistent layer cache"), "{stderr}");
    assert!(
        s.fake.objects(GCS_BUCKET).is_empty(),
        "the source was deleted"
    );
    assert_eq!(s.fake.unauthorized(), 0, "every request had a valid token");
}

#[test]
fn cloudbuild_resumes_a_large_upload_maps_statuses_and_cancels_on_ctrl_c() {
    let s = GcpSetup::start();
    // Incompressible: the archive is over the resumable threshold.
    let mut big = vec![0u8; 10 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(s.dir.path().join("ctx/big.bin"), &big).unwrap();
    s.fake.fail_chunks(1);
    s.fake.finish("FAILURE", Some("USER_BUILD_STEP"));
    let (mut child, err) = s.spawn(&[]);
    let code = wait_exit(&mut child, Duration::from_secs(120));
    assert_eq!(code, 5, "{}", err.lock().unwrap());
    let chunks: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "PUT" && p.contains("upload_id="))
        .collect();
    assert!(
        chunks.len() >= 4,
        "3 chunks, one failed and sent again: {chunks:?}"
    );
    let object = s.fake.created()[0]["source"]["storageSource"]["object"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(s.fake.objects(GCS_BUCKET).is_empty(), "{object} deleted");

    // A failed push: exit 6.
    s.fake.reopen();
    s.fake.finish("FAILURE", Some("PUSH_FAILED"));
    let (mut child, err) = s.spawn(&["--push"]);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(120)),
        6,
        "{}",
        err.lock().unwrap()
    );

    // Ctrl-C while it runs: builds.cancel, exit 130.
    s.fake.reopen();
    let before = s.fake.build_ids().len();
    let (mut child, err) = s.spawn(&[]);
    wait_until("the build running", Duration::from_secs(120), || {
        s.fake.build_ids().len() > before
            && s.fake
                .requests()
                .iter()
                .filter(|(m, p, _)| m == "GET" && p.contains("/builds/"))
                .count()
                >= 3
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let code = wait_exit(&mut child, Duration::from_secs(60));
    assert_eq!(code, 130, "{}", err.lock().unwrap());
    assert_eq!(s.fake.cancelled().len(), 1);
    assert!(s.fake.objects(GCS_BUCKET).is_empty());
}
