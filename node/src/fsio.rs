//! Filesystem steps shared by the chunk store and the stage area, each failure tagged with what
//! was being done and where, then converted into the caller's own error type.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::store::IoOp;

/// An I/O failure: the operation, the path and the OS error. `StoreError::Io` and
/// `StageError::Io` carry exactly these fields.
#[derive(Debug)]
pub(crate) struct IoFailure {
    pub(crate) op: IoOp,
    pub(crate) path: PathBuf,
    pub(crate) source: io::Error,
}

/// Creates `dir` if missing. Returns whether it was created (so the caller flushes the parent).
pub(crate) fn ensure_dir(dir: &Path) -> Result<bool, IoFailure> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(failure(IoOp::CreateDir, dir, source)),
    }
}

/// Flushes a directory, making the creation, rename or removal of its entries durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), IoFailure> {
    let file = File::open(dir).map_err(|source| failure(IoOp::Open, dir, source))?;
    file.sync_all().map_err(|source| failure(IoOp::Sync, dir, source))
}

/// Removes a file. Returns `false` if it did not exist.
pub(crate) fn remove_file(path: &Path) -> Result<bool, IoFailure> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(failure(IoOp::Remove, path, source)),
    }
}

fn failure(op: IoOp, path: &Path, source: io::Error) -> IoFailure {
    IoFailure { op, path: path.to_owned(), source }
}
