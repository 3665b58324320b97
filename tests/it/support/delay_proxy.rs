//! A TCP proxy that delays every byte by a fixed time each way: the bench's
//! 100 ms link (benches/tools/delay_proxy.rs), here to count round trips
//! from outside absconda.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

#[allow(dead_code)]
#[path = "../../../benches/tools/delay_proxy.rs"]
mod tool;

/// A running proxy (it lives as long as the test process).
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `upstream`, each
    /// way `one_way` later.
    pub fn start(upstream: SocketAddr, one_way: Duration) -> DelayProxy {
        crate::support::watch();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the delay proxy");
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                tool::direction(client, server, one_way);
                tool::direction(s2, c2, one_way);
            }
        });
        DelayProxy { addr }
    }
}
