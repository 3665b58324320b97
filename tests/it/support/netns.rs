//! A network namespace the test makes, joined to this one by a veth pair,
//! and deleted on drop.
//!
//! A daemon inside it listening on the namespace's own loopback cannot be
//! dialled from here, while one listening on [`Netns::inner_ip`] can; both
//! reach each other inside. That is the shape of a bastion in front of a
//! private host.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Netns {
    pub name: String,
    /// The namespace's end of the veth pair, reachable from here.
    pub inner_ip: String,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 4000) * 16 + n % 16;
        let name = format!("sshnet-{}-{n}", std::process::id());
        // 10.200.0.0/16 split in /30s: one per namespace of this process.
        let (a, b) = ((id * 4) / 256 % 256, (id * 4) % 256);
        let outer_ip = format!("10.200.{a}.{}", b + 1);
        let inner_ip = format!("10.200.{a}.{}", b + 2);
        let host_if = format!("snh{}", id);
        let ns_if = format!("snn{}", id);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{outer_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{inner_ip}/30"), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        Netns { name, inner_ip }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
