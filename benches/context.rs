//! Throughput of the context pipeline on a generated tree, in MB/s of file
//! content: the walk (metadata only), SHA-256 hashing, the tar writer with
//! and without gzip, and all three in a row as `absconda build` runs them.
//!
//! The tree mimics a source repository with some assets: 2,000 small
//! text-like files in 50 folders and four incompressible 8 MiB files (about
//! 42 MB). Everything is read from the page cache, so this measures our CPU
//! cost, not the disk. Run with `cargo bench --bench context -- --quick`.

use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use absconda::context::{
    Compression, DockerIgnore, EntryKind, sha256_file, sha256_files, walk, write_tar,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SMALL_DIRS: usize = 50;
const SMALL_PER_DIR: usize = 40;
const BIG_FILES: usize = 4;
const BIG_SIZE: usize = 8 * 1024 * 1024;

/// xorshift64*: deterministic bytes without a `rand` dependency in the bench.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes the tree and returns its total content size.
fn generate(root: &Path) -> io::Result<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let words = [
        "fn ",
        "let ",
        "match ",
        "impl ",
        "struct ",
        "return ",
        "self",
        ".into()",
        "(x)",
        ";\n",
        "{\n",
        "}\n",
        "    ",
        "// why this is so\n",
        "Result<",
        ">",
        "&mut ",
        "pub ",
        "use ",
    ];
    let mut total = 0;
    for d in 0..SMALL_DIRS {
        let dir = root.join(format!("src/module_{d:02}"));
        fs::create_dir_all(&dir)?;
        for f in 0..SMALL_PER_DIR {
            let size = 512 + (rng.next() % 7680) as usize;
            let mut text = String::with_capacity(size + 32);
            while text.len() < size {
                text.push_str(words[(rng.next() % words.len() as u64) as usize]);
            }
            fs::write(dir.join(format!("file_{f:03}.rs")), &text)?;
            total += text.len() as u64;
        }
    }
    fs::create_dir_all(root.join("assets"))?;
    for b in 0..BIG_FILES {
        let mut data = vec![0u8; BIG_SIZE];
        for word in data.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        fs::write(root.join(format!("assets/blob_{b}.bin")), &data)?;
        total += BIG_SIZE as u64;
    }
    Ok(total)
}

fn bench_context(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let root = dir.path();
    let total = generate(root).expect("the generated tree");
    let ignore = DockerIgnore::parse("**/*.tmp\n!keep.tmp\n");
    let entries = walk(root, &ignore, &[]).expect("walk");
    let files: Vec<PathBuf> = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File { .. }))
        .map(|e| e.abs.clone())
        .collect();
    let one = NonZeroUsize::MIN;

    let mut group = c.benchmark_group("context");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(total));

    group.bench_function("walk", |b| {
        b.iter(|| walk(root, &ignore, &[]).expect("walk").len())
    });
    group.bench_function("sha256 (1 thread)", |b| {
        b.iter(|| sha256_files(&files, one).len())
    });
    group.bench_function("tar (none)", |b| {
        b.iter(|| write_tar(&entries, &[], "context/", Compression::None, io::sink()).expect("tar"))
    });
    group.bench_function("tar (gzip)", |b| {
        b.iter(|| write_tar(&entries, &[], "context/", Compression::Gzip, io::sink()).expect("tar"))
    });
    group.bench_function("walk + sha256 + tar (none)", |b| {
        b.iter(|| {
            let entries = walk(root, &ignore, &[]).expect("walk");
            let files: Vec<PathBuf> = entries
                .iter()
                .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                .map(|e| e.abs.clone())
                .collect();
            sha256_files(&files, one);
            write_tar(&entries, &[], "context/", Compression::None, io::sink()).expect("tar")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("sha256 one 8 MiB file");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(BIG_SIZE as u64));
    let big = root.join("assets/blob_0.bin");
    group.bench_function("sha256_file", |b| {
        b.iter(|| sha256_file(&big).expect("hash"))
    });
    group.finish();
}

criterion_group!(benches, bench_context);
criterion_main!(benches);
