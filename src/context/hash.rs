//! Content hashes of context files, for an incremental sync that sends only
//! what changed and for verifying the builder's copy.
//!
//! SHA-256 because the builder can check it with coreutils' `sha256sum`. The
//! `sha2` crate (0.10) detects SHA-NI at run time through `cpufeatures` and
//! uses the x86 SHA extensions when present (about 2 GB/s per core); its
//! `asm` feature would swap those for older assembly without SHA-NI, so it
//! stays off. Reads are large (256 KiB, reusing one buffer per thread) so
//! the hashing, not the syscalls, sets the pace.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

const READ_BUF: usize = 256 * 1024;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < READ_BUF {
            buf.resize(READ_BUF, 0);
        }
        let mut hasher = Sha256::new();
        loop {
            match file.read(&mut buf[..]) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(hasher.finalize().into())
    })
}

/// SHA-256 of many files on `threads` threads, results in input order. Files
/// are handed out one at a time, so a few large files do not leave the other
/// threads idle.
pub fn sha256_files(paths: &[PathBuf], threads: NonZeroUsize) -> Vec<io::Result<[u8; 32]>> {
    let threads = threads.get().min(paths.len().max(1));
    if threads == 1 {
        return paths.iter().map(|p| sha256_file(p)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, io::Result<[u8; 32]>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = paths.get(i) else {
                            break;
                        };
                        done.push((i, sha256_file(path)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| match worker.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(
            hex::encode(sha256_file(&empty).unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let abc = dir.path().join("abc");
        std::fs::write(&abc, "abc").unwrap();
        assert_eq!(
            hex::encode(sha256_file(&abc).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Larger than the read buffer, not a multiple of it.
        let big = dir.path().join("big");
        let data: Vec<u8> = (0..READ_BUF * 3 + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &data).unwrap();
        assert_eq!(
            sha256_file(&big).unwrap(),
            <[u8; 32]>::from(Sha256::digest(&data))
        );

        let paths = vec![big.clone(), dir.path().join("missing"), abc.clone(), empty];
        let results = sha256_files(&paths, NonZeroUsize::new(3).unwrap());
        assert_eq!(results.len(), 4);
        assert_eq!(*results[0].as_ref().unwrap(), sha256_file(&big).unwrap());
        assert!(results[1].is_err());
        assert_eq!(*results[2].as_ref().unwrap(), sha256_file(&abc).unwrap());
    }
}
