//! Azure builders against the fake ARM, Entra ID and IMDS: every credential
//! source, the life cycle of a VM (always deallocated, never only powered
//! off), long-running operations, and the faults ARM throws at a client.

use std::path::Path;
use std::time::{Duration, Instant};

use absconda::cloud::azure::{Azure, AzureSettings};
use absconda::cloud::azure_auth::{AzureAuth, AzureCredentialSource};
use absconda::cloud::gce::AddressKind;
use absconda::cloud::retry::Backoff;
use absconda::cloud::{CloudError, Provider, Status};

use crate::support::azure_fake::{AzureFake, CLIENT_SECRET, Fault, RESOURCE_GROUP, SUBSCRIPTION};

fn settings(fake: &AzureFake, vm: &str, deadline: Duration) -> AzureSettings {
    AzureSettings {
        subscription_id: SUBSCRIPTION.into(),
        resource_group: RESOURCE_GROUP.into(),
        vm_name: vm.into(),
        api_endpoint: Some(fake.endpoint()),
        address: AddressKind::External,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(300),
            deadline,
        },
    }
}

fn auth(env: Vec<(String, String)>) -> AzureAuth {
    AzureAuth::from_lookup(
        move |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
        None,
    )
    .expect("credentials")
}

fn azure(fake: &AzureFake, vm: &str, env: Vec<(String, String)>) -> Azure {
    Azure::with_auth(settings(fake, vm, Duration::from_secs(15)), auth(env)).expect("provider")
}

/// Start, check, stop, check: what a build with `--remote-off` does.
async fn life_cycle(fake: &AzureFake, a: &Azure, vm: &str) {
    let info = a.describe().await.unwrap();
    assert_eq!(info.id, AzureFake::resource_id(vm));
    assert_eq!(info.status, Status::Stopped);
    assert_eq!(info.raw_status, "deallocated");
    assert_eq!(info.address, None);

    a.start().await.unwrap();
    // The operation was followed to its end: the VM is running now.
    assert_eq!(fake.power(vm).as_deref(), Some("running"));
    let info = a.describe().await.unwrap();
    assert_eq!(info.status, Status::Running, "{info:?}");
    assert!(info.address.is_some());
    assert_eq!(info.address, fake.public_ip(vm));

    a.stop().await.unwrap();
    assert_eq!(fake.power(vm).as_deref(), Some("deallocated"));
    let info = a.describe().await.unwrap();
    assert_eq!(info.status, Status::Stopped);
    assert_eq!(info.address, None);
    assert_eq!(fake.transitions(vm), 2);
    assert_eq!(fake.count("POST", "/powerOff"), 0, "a stop must deallocate");
}

#[tokio::test]
async fn client_secret_life_cycle() {
    let fake = AzureFake::start();
    fake.add_vm("sp-vm", "deallocated");
    let a = azure(&fake, "sp-vm", fake.secret_env(CLIENT_SECRET));
    assert!(matches!(
        a.credential_source(),
        AzureCredentialSource::ClientSecret { .. }
    ));
    life_cycle(&fake, &a, "sp-vm").await;
    // One token for the whole life cycle, and long-running operations
    // followed through Azure-AsyncOperation.
    assert_eq!(fake.count("POST", "/oauth2/v2.0/token"), 1);
    assert!(
        fake.requests()
            .iter()
            .any(|l| l.method == "GET" && l.path.contains("/locations/westeurope/operations/")),
        "{:#?}",
        fake.requests()
    );
}

#[tokio::test]
async fn certificate_signs_a_client_assertion() {
    if !crate::support::require("openssl") {
        return;
    }
    let fake = AzureFake::start();
    fake.add_vm("cert-vm", "deallocated");
    let dir = tempfile::tempdir().unwrap();
    let a = azure(&fake, "cert-vm", fake.certificate_env(dir.path()));
    assert!(matches!(
        a.credential_source(),
        AzureCredentialSource::ClientCertificate { .. }
    ));
    life_cycle(&fake, &a, "cert-vm").await;
}

#[tokio::test]
async fn a_certificate_the_app_does_not_know_is_refused() {
    if !crate::support::require("openssl") {
        return;
    }
    let fake = AzureFake::start();
    fake.add_vm("cert-vm", "deallocated");
    let dir = tempfile::tempdir().unwrap();
    let env = fake.certificate_env(dir.path());
    // The app registration now holds another certificate.
    let other = tempfile::tempdir().unwrap();
    fake.certificate_env(other.path());
    let a = azure(&fake, "cert-vm", env);
    let e = a.describe().await.unwrap_err();
    assert!(matches!(e, CloudError::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("AADSTS700027"), "{msg}");
    assert!(msg.contains("AZURE_CLIENT_CERTIFICATE_PATH"), "{msg}");
    assert!(!msg.contains("PRIVATE KEY"), "{msg}");
}

#[tokio::test]
async fn workload_identity_sends_the_federated_token() {
    let fake = AzureFake::start();
    fake.add_vm("wi-vm", "deallocated");
    let dir = tempfile::tempdir().unwrap();
    let a = azure(&fake, "wi-vm", fake.federated_env(dir.path()));
    assert!(matches!(
        a.credential_source(),
        AzureCredentialSource::WorkloadIdentity { .. }
    ));
    life_cycle(&fake, &a, "wi-vm").await;
}

#[tokio::test]
async fn managed_identity_from_imds() {
    let fake = AzureFake::start();
    fake.add_vm("mi-vm", "deallocated");
    let a = azure(&fake, "mi-vm", fake.managed_identity_env());
    assert!(matches!(
        a.credential_source(),
        AzureCredentialSource::ManagedIdentity {
            client_id: Some(_),
            ..
        }
    ));
    life_cycle(&fake, &a, "mi-vm").await;
}

#[tokio::test]
async fn a_wrong_secret_is_an_auth_error_that_names_the_source_and_hides_the_secret() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "deallocated");
    let a = azure(&fake, "vm", fake.secret_env("not-the-secret-42"));
    let t = Instant::now();
    let e = a.start().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "auth errors are not retried"
    );
    assert!(matches!(e, CloudError::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("AADSTS7000215"), "{msg}");
    assert!(msg.contains("AZURE_CLIENT_SECRET"), "{msg}");
    assert!(!msg.contains("not-the-secret-42"), "{msg}");
    assert_eq!(fake.transitions("vm"), 0);
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "deallocated");
    let a = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    fake.inject(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    fake.inject(Fault::Internal, 2);
    let t = Instant::now();
    a.start().await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(fake.power("vm").as_deref(), Some("running"));
    let statuses: Vec<u16> = fake.requests().iter().map(|l| l.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(fake.transitions("vm"), 1);
}

#[tokio::test]
async fn a_permanent_500_times_out_with_the_last_error() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "deallocated");
    let a = Azure::with_auth(
        settings(&fake, "vm", Duration::from_secs(2)),
        auth(fake.secret_env(CLIENT_SECRET)),
    )
    .unwrap();
    fake.inject_always(Fault::Internal);
    let e = a.start().await.unwrap_err();
    match &e {
        CloudError::Timeout {
            last: Some(last), ..
        } => {
            assert!(last.to_string().contains("InternalServerError"), "{last}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_conflict_during_a_transition_is_waited_out() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "running");
    let a = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    // The first deallocate meets another operation holding the VM.
    fake.inject(Fault::Conflict, 1);
    a.stop().await.unwrap();
    assert_eq!(fake.power("vm").as_deref(), Some("deallocated"));
    assert!(fake.requests().iter().any(|l| l.status == 409));
    // A stop while the VM is still starting waits for it, then deallocates.
    let a2 = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    let start = tokio::spawn(async move { a2.start().await });
    let until = Instant::now() + Duration::from_secs(5);
    while fake.power("vm").as_deref() != Some("starting") {
        assert!(Instant::now() < until, "never starting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.stop().await.unwrap();
    start.await.unwrap().unwrap();
    assert_eq!(fake.power("vm").as_deref(), Some("deallocated"));
}

#[tokio::test]
async fn a_vm_only_powered_off_is_deallocated() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "stopped");
    let a = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    assert_eq!(a.describe().await.unwrap().raw_status, "stopped");
    a.stop().await.unwrap();
    assert_eq!(fake.power("vm").as_deref(), Some("deallocated"));
    assert_eq!(fake.count("POST", "/deallocate"), 1);
}

#[tokio::test]
async fn the_internal_address_is_the_nics_private_ip() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "running");
    let mut s = settings(&fake, "vm", Duration::from_secs(10));
    s.address = AddressKind::Internal;
    let a = Azure::with_auth(s, auth(fake.secret_env(CLIENT_SECRET))).unwrap();
    let info = a.describe().await.unwrap();
    assert_eq!(info.address, fake.private_ip("vm"));
}

#[tokio::test]
async fn an_unknown_vm_is_not_found() {
    let fake = AzureFake::start();
    let a = azure(&fake, "nope", fake.secret_env(CLIENT_SECRET));
    let e = a.describe().await.unwrap_err();
    assert!(matches!(e, CloudError::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn host_key_fingerprints_come_from_the_serial_log() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "running");
    let fp = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    fake.set_serial_log(
        "vm",
        &format!(
            "[  OK  ] Started ssh.service\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 {fp} root@builder (ED25519)\n-----END SSH HOST KEY FINGERPRINTS-----\nlogin:\n"
        ),
    );
    let a = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    assert_eq!(
        a.serial_log_host_key_fingerprints().await.unwrap(),
        vec![fp.to_string()]
    );
}

// ---- the binary, end to end ---------------------------------------------------

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn azure_project(fake: &AzureFake, sshd: &Sshd, env: Vec<(String, String)>) -> Project {
    let yaml = format!(
        "    provider: azure\n    subscription_id: {SUBSCRIPTION}\n    resource_group: {RESOURCE_GROUP}\n    vm_name: builder\n    api_endpoint: {}\n    authority_host: {}\n    ready_timeout: 60\n",
        fake.endpoint(),
        fake.endpoint()
    );
    let mut p = Project::with_builder(sshd, &yaml);
    p.env.extend(env);
    p
}

#[test]
fn azure_builder_is_started_built_on_and_deallocated_with_remote_off() {
    if !(crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry"))
    {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let fake = AzureFake::start();
    fake.add_vm("builder", "deallocated");
    let mut p = azure_project(&fake, &sshd, fake.secret_env(CLIENT_SECRET));
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "from an Azure builder\n");

    let out = p.build(
        &format!("{}/cloud/azure", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fake.power("builder").as_deref(),
        Some("deallocated"),
        "the VM was left allocated"
    );
    assert_eq!(fake.transitions("builder"), 2, "one start, one deallocate");
    assert_eq!(fake.count("POST", "/powerOff"), 0);
    assert_eq!(
        reg.files("cloud/azure", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"from an Azure builder\n"[..])
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(CLIENT_SECRET), "{err}");
    assert_eq!(p.state()["builders"]["local"]["status"], "stopped");
}

#[test]
fn a_wrong_client_secret_exits_8_with_the_source_named() {
    if !crate::support::require(SSHD) {
        return;
    }
    let sshd = Sshd::start(None);
    let fake = AzureFake::start();
    fake.add_vm("builder", "deallocated");
    let p = azure_project(&fake, &sshd, fake.secret_env("wrong-secret-value-7"));
    let out = p.cmd().args(["remote", "start", "local"]).output().unwrap();
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:"), "{err}");
    assert!(err.contains("AADSTS7000215"), "{err}");
    assert!(err.contains("AZURE_CLIENT_SECRET"), "{err}");
    assert!(!err.contains("wrong-secret-value-7"), "{err}");
    assert!(err.lines().count() <= 12, "not one screen: {err}");
    assert_eq!(fake.transitions("builder"), 0);
}

#[test]
fn remote_commands_report_and_retry_through_500s() {
    if !crate::support::require(SSHD) {
        return;
    }
    let sshd = Sshd::start(None);
    let fake = AzureFake::start();
    fake.add_vm("builder", "deallocated");
    let p = azure_project(&fake, &sshd, fake.secret_env(CLIENT_SECRET));
    fake.inject(Fault::Internal, 2);
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["status"], "stopped");
    assert_eq!(st["cloud_status"], "deallocated");
    assert_eq!(
        fake.requests().iter().filter(|l| l.status == 500).count(),
        2
    );
}

/// The builder deallocates itself through ARM with its managed identity
/// after `stop_delay`, once IMDS proves it is that VM; on another VM it
/// does nothing.
#[test]
fn self_stop_deallocates_through_arm_with_the_managed_identity() {
    // A machine of its own: on the one every test shares, another test's
    // build would rightly keep the builder on.
    if !(crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("curl")
        && crate::support::require("unshare")
        && crate::support::require("nsenter"))
    {
        return;
    }
    let d = docker();
    let sshd = Sshd::start_on_own_machine(Some(&d.host));
    let fake = AzureFake::start();
    fake.add_vm("builder", "running");
    fake.add_vm("other", "running");
    let extra = format!(
        "    auto_stop: true\n    stop_delay: 1\n    metadata_endpoint: {}\n",
        fake.imds_endpoint()
    );
    let p = azure_project(&fake, &sshd, fake.secret_env(CLIENT_SECRET));
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        yaml.replace(
            "    ready_timeout: 60\n",
            &format!("    ready_timeout: 60\n{extra}"),
        ),
    )
    .unwrap();
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));

    // IMDS says this is `other`: the script cannot prove it runs on
    // `builder`, so nothing is deallocated.
    fake.set_imds_vm("other");
    let out = p.build("selfstop/azure", &["--network", "none"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = p.workspace.join(".self-stop.log");
    // The self-stop runs on this machine: wait until its process has ended.
    crate::cloud::wait_for_self_stop(&p.workspace);
    assert!(
        fake.requests()
            .iter()
            .any(|l| l.path.ends_with("/compute/resourceId")),
        "the self-stop never asked IMDS who it is"
    );
    assert_eq!(fake.power("builder").as_deref(), Some("running"));
    assert_eq!(fake.power("other").as_deref(), Some("running"));
    assert!(!log.exists());

    fake.set_imds_vm("builder");
    let out = p.build("selfstop/azure", &["--network", "none"]);
    assert!(out.status.success(), "{}", text(&out));
    fake.wait_for_power("builder", "deallocated", Duration::from_secs(20));
    assert_eq!(fake.power("other").as_deref(), Some("running"));
    assert_eq!(fake.count("POST", "/powerOff"), 0);
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
}

/// `infra/azure`'s idle-watchdog helper deallocates the VM through ARM with
/// the managed identity, under dash and busybox sh, and only the VM IMDS
/// names.
#[test]
fn the_idle_watchdog_helper_deallocates_only_its_own_vm() {
    if !crate::support::require("curl") {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/infra/azure/absconda-azure-deallocate.sh"
    );
    let shells: Vec<Vec<&str>> = [vec!["dash"], vec!["busybox", "sh"]]
        .into_iter()
        .filter(|s| crate::support::require(s[0]))
        .collect();
    for sh in shells {
        let fake = AzureFake::start();
        fake.add_vm("builder", "running");
        fake.add_vm("other", "running");
        fake.set_imds_vm("other");
        let run = || {
            std::process::Command::new(sh[0])
                .args(&sh[1..])
                .arg(script)
                .env("ABSCONDA_AZURE_VM_ID", AzureFake::resource_id("builder"))
                .env(
                    "ABSCONDA_AZURE_CLIENT_ID",
                    crate::support::azure_fake::MANAGED_IDENTITY_CLIENT_ID,
                )
                .env("ABSCONDA_METADATA_URL", fake.imds_endpoint())
                .env("ABSCONDA_ARM_ENDPOINT", fake.endpoint())
                .output()
                .unwrap()
        };
        let out = run();
        assert!(!out.status.success(), "{sh:?}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not deallocating"));
        assert_eq!(fake.count("POST", "/deallocate"), 0);

        fake.set_imds_vm("builder");
        let out = run();
        assert!(out.status.success(), "{sh:?}: {}", text(&out));
        fake.wait_for_power("builder", "deallocated", Duration::from_secs(10));
        assert_eq!(fake.power("other").as_deref(), Some("running"));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("fake-arm-token"));
    }
}

/// `remote provision` of an Azure builder with the offline loopback module:
/// the module names the VM after the builder, the host key fingerprint the
/// VM printed to its serial console is read through boot diagnostics and
/// pinned (no trust on first use), and `remote stop` then deallocates the VM
/// the state names.
#[test]
fn provision_of_an_azure_builder_pins_the_serial_log_fingerprint() {
    if !(crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("terraform"))
    {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let fake = AzureFake::start();
    fake.add_vm("azb", "running");
    fake.set_serial_log(
        "azb",
        &format!(
            "cloud-init[1]: Cloud-init v. 24.1 running 'modules:final'\n-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 {} root@azb (ED25519)\n-----END SSH HOST KEY FINGERPRINTS-----\n",
            sshd.fingerprint()
        ),
    );
    let mut p = Project::new(&sshd);
    let module = p.dir.path().join("module");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/terraform/loopback/main.tf"
        ),
        module.join("main.tf"),
    )
    .unwrap();
    std::fs::write(
        module.join("terraform.auto.tfvars"),
        format!("address = \"127.0.0.1\"\nport    = {}\n", sshd.port),
    )
    .unwrap();
    std::fs::write(
        &p.config,
        format!(
            "builders:\n  azb:\n    provider: azure\n    subscription_id: {SUBSCRIPTION}\n    resource_group: {RESOURCE_GROUP}\n    api_endpoint: {api}\n    authority_host: {api}\n    terraform_dir: {module}\n    user: root\n    identity_file: {key}\n    known_hosts: {kh}\n    workspace: {ws}\n    docker: {docker}\n    ready_timeout: 60\n    connect_timeout: 5\n",
            api = fake.endpoint(),
            module = module.display(),
            key = sshd.user_key.display(),
            kh = sshd.known_hosts.display(),
            ws = p.workspace.display(),
            docker = crate::support::docker::DOCKER_CLI,
        ),
    )
    .unwrap();
    p.env.extend(fake.secret_env(CLIENT_SECRET));
    // The child's PATH is the harness's: name Terraform explicitly.
    let tf = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("terraform"))
        .find(|p| p.is_file())
        .unwrap();
    p.env
        .push(("ABSCONDA_TERRAFORM".into(), tf.display().to_string()));
    let out = p
        .cmd()
        .args(["remote", "provision", "azb"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let state = p.state();
    assert_eq!(
        state["builders"]["azb"]["host_key_fingerprints"],
        serde_json::json!([sshd.fingerprint()])
    );
    assert_eq!(state["builders"]["azb"]["instance"], "azb");
    assert!(fake.count("POST", "/retrieveBootDiagnosticsData") >= 1);
    assert_eq!(
        std::fs::read_to_string(&sshd.known_hosts).unwrap_or_default(),
        "",
        "pinned through the state, not recorded on first use"
    );

    let out = p.cmd().args(["remote", "stop", "azb"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fake.power("azb").as_deref(), Some("deallocated"));
}

#[test]
fn azure_config_keys_alias_and_missing_keys() {
    use absconda::config::{ConfigFile, ProviderKind};
    let f = ConfigFile::parse(
        Path::new("absconda-remote.yaml"),
        "builders:\n  a:\n    provider: az\n    subscription_id: s\n    resource_group: rg\n    vm_name: vm\n    address: internal\n    authority_host: https://login.example\n  b:\n    provider: azure\n    subscription_id: s\n    vm_name: vm\n",
    )
    .unwrap();
    let a = f.builder("a").unwrap();
    assert_eq!(a.provider, ProviderKind::Azure);
    assert_eq!(a.vm_name.as_deref(), Some("vm"));
    assert_eq!(a.authority_host.as_deref(), Some("https://login.example"));
    assert!(a.auto_start, "cloud builders start by default");
    let e = f.builder("b").unwrap_err().to_string();
    assert!(
        e.contains("key `resource_group`: required for provider `azure`"),
        "{e}"
    );
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once() {
    let fake = AzureFake::start();
    fake.add_vm("vm", "deallocated");
    let a = azure(&fake, "vm", fake.secret_env(CLIENT_SECRET));
    a.describe().await.unwrap();
    fake.revoke_all();
    a.start().await.unwrap();
    assert_eq!(fake.power("vm").as_deref(), Some("running"));
    assert_eq!(fake.count("POST", "/oauth2/v2.0/token"), 2);
    assert_eq!(
        fake.requests().iter().filter(|l| l.status == 401).count(),
        1
    );
}
