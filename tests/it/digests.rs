//! Digests for pipelines: `--iidfile`, `--metadata-file`, and the pushed
//! manifest digests in `--json` and the summary, checked against docker and
//! the registry's API.

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

#[test]
fn digests_match_docker_and_the_registry() {
    crate::require!(SSHD, "dockerd", "docker-registry", "htpasswd", "curl");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello.txt /hello.txt\n"),
    );
    p.file(
        "hello.txt",
        &format!("digests {:?}\n", std::time::SystemTime::now()),
    );
    let iid = p.dir.path().join("out/iid");
    let meta = p.dir.path().join("out/metadata.json");
    std::fs::create_dir_all(iid.parent().unwrap()).unwrap();
    let repo = format!("{}/digests/app", reg.addr);
    let out = p.build(
        &repo,
        &[
            "-t",
            "v1",
            "--tag",
            "latest",
            "--push",
            "--json",
            "--iidfile",
            iid.to_str().unwrap(),
            "--metadata-file",
            meta.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    // The image id as docker itself reports it.
    let inspect = d.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{repo}:v1"),
    ]);
    let docker_id = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
    assert!(docker_id.starts_with("sha256:"), "{docker_id}");
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), docker_id);

    // The manifest digests as the registry serves them.
    let v1 = reg.digest("digests/app", "v1").expect("v1 in the registry");
    let latest = reg
        .digest("digests/app", "latest")
        .expect("latest in the registry");
    assert_eq!(v1, latest);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["digests"][format!("{repo}:v1")], v1.as_str());
    assert_eq!(report["digests"][format!("{repo}:latest")], latest.as_str());
    assert_eq!(report["image_id"], docker_id.as_str());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("digest {v1}")), "{stderr}");

    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(m["containerimage.digest"], v1.as_str());
    assert_eq!(m["containerimage.config.digest"], docker_id.as_str());
    assert_eq!(m["image.name"], format!("{repo}:v1,{repo}:latest").as_str());
    // Nothing but the two files in their folder: no temporary left behind.
    assert_eq!(std::fs::read_dir(iid.parent().unwrap()).unwrap().count(), 2);
}
