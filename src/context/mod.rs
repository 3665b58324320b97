//! The build context: which local files go to the builder, and how they
//! travel.
//!
//! Users have no `tar` or `docker` on their machine, so absconda decides
//! itself what `docker build` would see: [`ignore`] reads `.dockerignore`
//! with Docker's exact rules, [`walk()`] lists the context in a deterministic
//! order without following symlinks, [`tar`] streams those entries as a tar
//! archive with bounded memory, and [`hash`] fingerprints file contents. The
//! walk records size, mtime and inode of every entry, and hashing is separate
//! from archiving, so an incremental sync can compare a walk against an
//! earlier manifest and stream only what changed (`write_tar` takes any
//! subset of a walk).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use absconda::context::{DockerIgnore, Compression, tar_stream, walk};
//! use std::path::Path;
//!
//! let ctx = Path::new(".");
//! let ignore = DockerIgnore::for_context(ctx, &ctx.join("Dockerfile"))?;
//! let entries = walk(ctx, &ignore, &["Dockerfile", ".dockerignore"])?;
//! let (mut chunks, writer) = tar_stream(entries, vec![], "context/".into(), Compression::Gzip, 256 * 1024);
//! while let Some(chunk) = chunks.recv().await {
//!     let _bytes = chunk?; // send them to the builder
//! }
//! let stats = writer.await??;
//! # let _ = stats; Ok(()) }
//! ```

pub mod guard;
pub mod hash;
pub mod ignore;
pub mod tar;
pub mod walk;

use std::io;
use std::path::PathBuf;

pub use hash::{sha256_file, sha256_files};
pub use ignore::{DockerIgnore, InvalidPattern};
pub use tar::{
    Compression, ExtraFile, HardLink, TarChunks, TarStats, TarTask, archive_len, tar_stream,
    tar_stream_with_links, tar_stream_with_progress, two_archives_stream, write_tar,
    write_tar_links, write_two_archives,
};
pub use walk::{Entry, EntryKind, walk};

/// Everything that can go wrong while reading or archiving a context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the build context `{}` is not a folder", path.display())]
    NotADirectory { path: PathBuf },

    #[error("cannot list the folder `{}`", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot inspect `{}`", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot read `{}`, which is part of the build context", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot read the target of the symlink `{}`", path.display())]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the name of `{}` is not valid UTF-8; rename it or add it to .dockerignore", path.display())]
    NonUtf8Name { path: PathBuf },

    #[error("`{}` changed while it was being sent ({expected} bytes expected, {actual} read)", path.display())]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error(
        "files of the context changed while it was being sent (an archive of {expected} bytes was announced, {actual} were written); build again"
    )]
    ContextChanged { expected: u64, actual: u64 },

    #[error("invalid archive prefix `{prefix}`")]
    InvalidPrefix { prefix: String },

    #[error("invalid name `{name}` for a file added to the context")]
    InvalidExtraName { name: String },

    #[error("`{name}` is both in the context folder and added by absconda")]
    DuplicateName { name: String },

    #[error("cannot write the context archive (at `{}`)", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the context stream was closed by its reader (at `{}`)", path.display())]
    StreamClosed { path: PathBuf },

    #[error(
        "cannot add `{name}` to the build context: `{}` is {}",
        path.display(),
        if *symlink { "a symlink, and the builder would write through it" } else { "not a folder" }
    )]
    InputParentNotAFolder {
        name: String,
        path: PathBuf,
        symlink: bool,
    },

    #[error(
        "the Dockerfile `{}` is a symlink to `{}`, outside the build context; absconda does not read it",
        path.display(),
        target.display()
    )]
    DockerfileOutside { path: PathBuf, target: PathBuf },
}
