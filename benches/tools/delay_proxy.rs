//! delay_proxy: a TCP proxy that delays every byte by a fixed time in each
//! direction, for benches/compare.sh's "100 ms RTT" link (netem is not
//! available on the machines the benchmark runs on).
//!
//! Usage: delay_proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_MS
//!
//! Each direction has a reader, which stamps what it reads with the time it
//! may leave, and a writer, which sends it no earlier than that. At most
//! `IN_FLIGHT` bytes wait in each direction, like the data a TCP window
//! holds on a real link: the sender is slowed by the round trip, as over a
//! long path, instead of filling the proxy's memory. It uses only the
//! standard library, so compare.sh builds it with `rustc -O` in a second.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// Read size; with `SLOTS` of them in flight, 8 MiB per direction.
const CHUNK: usize = 64 * 1024;
const SLOTS: usize = 128;
/// For the documentation: the bytes that may wait in one direction.
#[allow(dead_code)]
const IN_FLIGHT: usize = CHUNK * SLOTS;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delay_proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_MS");
        std::process::exit(2);
    }
    let delay = match args[3].parse::<u64>() {
        Ok(ms) => Duration::from_millis(ms),
        Err(_) => {
            eprintln!("delay_proxy: ONE_WAY_MS must be a number of milliseconds");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(&args[1]).unwrap_or_else(|e| {
        eprintln!("delay_proxy: cannot listen on {}: {e}", args[1]);
        std::process::exit(1);
    });
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect(&args[2]) else {
            eprintln!("delay_proxy: cannot reach {}", args[2]);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        direction(client, server, delay);
        direction(s2, c2, delay);
    }
}

/// Copies `from` to `to`, each chunk leaving `delay` after it arrived.
pub fn direction(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx): (SyncSender<(Instant, Vec<u8>)>, Receiver<_>) = sync_channel(SLOTS);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` tells the writer the stream ended.
    });
    std::thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
