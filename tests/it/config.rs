//! Where the builders file is found: `--remote-config`, then
//! `$ABSCONDA_REMOTE_CONFIG`, then `absconda-remote.yaml` in the current
//! folder or a parent, then `$XDG_CONFIG_HOME/absconda/`.

use std::path::Path;
use std::process::Command;

use crate::support::absconda::{BIN, text};

fn write(path: &Path, builder: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        path,
        format!("builders:\n  {builder}:\n    host: 127.0.0.1\n"),
    )
    .unwrap();
}

fn listed(dir: &Path, env: &[(&str, &Path)], args: &[&str]) -> String {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("HOME", dir.join("home"))
        .current_dir(dir.join("project/sub/deeper"));
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .args(["remote", "list", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["name"].as_str().unwrap().to_string()
}

#[test]
fn discovery_order_first_match_wins() {
    let t = crate::support::tempdir();
    let d = t.path();
    std::fs::create_dir_all(d.join("project/sub/deeper")).unwrap();
    write(&d.join("xdg/absconda/absconda-remote.yaml"), "from-xdg");
    let xdg = d.join("xdg");
    assert_eq!(listed(d, &[("XDG_CONFIG_HOME", &xdg)], &[]), "from-xdg");

    write(&d.join("project/absconda-remote.yaml"), "from-parent");
    assert_eq!(listed(d, &[("XDG_CONFIG_HOME", &xdg)], &[]), "from-parent");

    write(&d.join("elsewhere.yaml"), "from-env");
    let env_file = d.join("elsewhere.yaml");
    assert_eq!(
        listed(
            d,
            &[
                ("XDG_CONFIG_HOME", &xdg),
                ("ABSCONDA_REMOTE_CONFIG", &env_file)
            ],
            &[]
        ),
        "from-env"
    );

    write(&d.join("flag.yaml"), "from-flag");
    let flag = d.join("flag.yaml").display().to_string();
    assert_eq!(
        listed(
            d,
            &[
                ("XDG_CONFIG_HOME", &xdg),
                ("ABSCONDA_REMOTE_CONFIG", &env_file)
            ],
            &["--remote-config", &flag]
        ),
        "from-flag"
    );

    // Nothing anywhere: exit 2, naming where it looked.
    let empty = crate::support::tempdir();
    std::fs::create_dir_all(empty.path().join("project/sub/deeper")).unwrap();
    let out = Command::new(BIN)
        .env_clear()
        .env("HOME", empty.path().join("home"))
        .current_dir(empty.path().join("project/sub/deeper"))
        .args(["remote", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no `absconda-remote.yaml` found"), "{err}");
    assert!(
        err.contains(".config/absconda/absconda-remote.yaml"),
        "{err}"
    );
}

#[test]
fn a_deeply_nested_builders_file_is_refused_quickly() {
    let t = crate::support::tempdir();
    let file = t.path().join("absconda-remote.yaml");
    std::fs::write(&file, format!("builders: {}", "[".repeat(100_000))).unwrap();
    let start = std::time::Instant::now();
    let out = Command::new(BIN)
        .env("HOME", t.path())
        .args(["remote", "list", "--remote-config"])
        .arg(&file)
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error:") && err.contains("nested more than 64 levels deep"),
        "{err}"
    );
}
