//! A TCP proxy that counts the bytes passing each way: what absconda really
//! sent over the network, measured outside absconda.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A running proxy; stops accepting when dropped.
pub struct CountingProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl CountingProxy {
    /// Listens on `listen` (port 0 picks one; the socket is bound here and
    /// kept, so no other process can take the port) and forwards to `upstream`.
    pub fn start(listen: &str, upstream: SocketAddr) -> CountingProxy {
        crate::support::watch();
        let listener = TcpListener::bind(listen).expect("bind the counting proxy");
        let addr = listener.local_addr().unwrap();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (up2, down2, stop2) = (up.clone(), down.clone(), stop.clone());
        let paused2 = paused.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    up2.clone(),
                    paused2.clone(),
                );
                pipe(server, client, down2.clone(), paused2.clone());
            }
        });
        CountingProxy {
            addr,
            up,
            down,
            stop,
            paused,
        }
    }

    /// Bytes from the client to the server so far.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Holds every byte from now on (a link that went silent) until
    /// [`CountingProxy::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Bytes from the server to the client so far.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: Arc<AtomicU64>, paused: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while paused.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Counted before passing on: once the other side has it, it shows.
            count.fetch_add(n as u64, Ordering::Relaxed);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.paused.store(false, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}
