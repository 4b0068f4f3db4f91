//! Deterministic packing of a directory tree into one byte stream.
//!
//! The stream is a tar archive (GNU format, long names as GNU long-name entries) with everything
//! that varies between machines or checkouts normalized away, so the same tree always yields the
//! same bytes, and so the same chunks:
//!
//! - entries are visited depth first, children sorted by the bytes of their names, each
//!   directory before its contents; the root itself is not an entry;
//! - only regular files, directories and symbolic links are packed (anything else is refused);
//!   a hard-linked file is packed as an ordinary file each time it appears;
//! - owner and group are 0 with empty names, every mtime is 0;
//! - modes are 0755 for directories and for files with any execute bit, 0644 for other files,
//!   0777 for symlinks: the executable bit is the only permission that survives.
//!
//! A single file is not packed at all: the artifact is the file's bytes.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::manifest::ArtifactKind;

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A path could not be read.
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file type Fleetwave does not pack (device, socket, FIFO).
    #[error("{}: cannot pack a {kind} (only files, directories and symlinks)", path.display())]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A file changed size while it was being packed.
    #[error("{}: file changed while being packed", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// Writing the stream failed (for example the reader went away).
    #[error("writing the packed stream")]
    Write(#[source] io::Error),
    /// The packing thread died.
    #[error("packing thread failed")]
    Thread,
}

#[derive(Debug)]
enum EntryKind {
    Dir,
    File { size: u64, executable: bool },
    Symlink { target: PathBuf },
}

#[derive(Debug)]
struct Entry {
    /// Path relative to the root, '/'-separated.
    rel: PathBuf,
    abs: PathBuf,
    kind: EntryKind,
}

/// Statistics of a packed tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files.
    pub files: u64,
    /// Directories (the root excluded).
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Sum of the regular files' sizes.
    pub file_bytes: u64,
}

/// An artifact opened for chunking: a reader over its stream, and what it is.
pub struct ArtifactStream {
    /// File or tree.
    pub kind: ArtifactKind,
    /// Expected stream length if known in advance (exact for a file, an estimate for a tree),
    /// for progress reporting.
    pub size_hint: u64,
    /// Tree statistics (zero for a file).
    pub stats: PackStats,
    reader: Box<dyn Read + Send>,
    packer: Option<JoinHandle<Result<(), PackError>>>,
}

impl std::fmt::Debug for ArtifactStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStream")
            .field("kind", &self.kind)
            .field("size_hint", &self.size_hint)
            .finish_non_exhaustive()
    }
}

impl ArtifactStream {
    /// Opens `path`: a regular file is taken as it is; a directory is packed on a background
    /// thread into a pipe.
    pub fn open(path: &Path) -> Result<Self, PackError> {
        let io_err = |source| PackError::Io { path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(io_err)?;
        if meta.is_file() {
            let file = File::open(path).map_err(io_err)?;
            return Ok(Self {
                kind: ArtifactKind::File,
                size_hint: meta.len(),
                stats: PackStats::default(),
                reader: Box::new(file),
                packer: None,
            });
        }
        if !meta.is_dir() {
            return Err(PackError::Unsupported { path: path.to_owned(), kind: kind_name(&meta) });
        }
        let entries = walk(path)?;
        let stats = stats_of(&entries);
        // Headers are 512 bytes, data is padded to 512, long names cost two more blocks.
        let size_hint = entries.len() as u64 * 1024 + stats.file_bytes + 1024;
        let (reader, writer) = io::pipe().map_err(PackError::Write)?;
        let packer = std::thread::Builder::new()
            .name("fleetwave-pack".into())
            .spawn(move || write_entries(&entries, writer))
            .map_err(PackError::Write)?;
        Ok(Self {
            kind: ArtifactKind::Tree,
            size_hint,
            stats,
            reader: Box::new(reader),
            packer: Some(packer),
        })
    }

    /// Waits for the packer (if any) and reports whether the whole tree was packed. Call after
    /// the stream was read to its end: a packing error ends the stream early, and only this
    /// tells a short stream from a complete one.
    pub fn finish(self) -> Result<(), PackError> {
        drop(self.reader);
        match self.packer {
            None => Ok(()),
            Some(handle) => handle.join().map_err(|_| PackError::Thread)?,
        }
    }
}

impl Read for ArtifactStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// Packs the directory `root` into `out`, synchronously.
pub fn pack_tree<W: Write>(root: &Path, out: W) -> Result<PackStats, PackError> {
    let entries = walk(root)?;
    write_entries(&entries, out)?;
    Ok(stats_of(&entries))
}

fn stats_of(entries: &[Entry]) -> PackStats {
    let mut s = PackStats::default();
    for e in entries {
        match e.kind {
            EntryKind::Dir => s.dirs += 1,
            EntryKind::File { size, .. } => {
                s.files += 1;
                s.file_bytes += size;
            }
            EntryKind::Symlink { .. } => s.symlinks += 1,
        }
    }
    s
}

fn kind_name(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Lists the tree in packing order.
fn walk(root: &Path) -> Result<Vec<Entry>, PackError> {
    let mut out = Vec::new();
    walk_dir(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk_dir(abs: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<(), PackError> {
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source| PackError::Io { path: p, source }
    };
    let mut children = fs::read_dir(abs)
        .map_err(io_err(abs))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(abs))?;
    children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in children {
        let child_abs = abs.join(&name);
        let child_rel = rel.join(&name);
        let meta = fs::symlink_metadata(&child_abs).map_err(io_err(&child_abs))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(Entry {
                rel: child_rel.clone(),
                abs: child_abs.clone(),
                kind: EntryKind::Dir,
            });
            walk_dir(&child_abs, &child_rel, out)?;
        } else if ft.is_file() {
            let executable = meta.permissions().mode() & 0o111 != 0;
            let kind = EntryKind::File { size: meta.len(), executable };
            out.push(Entry { rel: child_rel, abs: child_abs, kind });
        } else if ft.is_symlink() {
            let target = fs::read_link(&child_abs).map_err(io_err(&child_abs))?;
            out.push(Entry { rel: child_rel, abs: child_abs, kind: EntryKind::Symlink { target } });
        } else {
            return Err(PackError::Unsupported { path: child_abs, kind: kind_name(&meta) });
        }
    }
    Ok(())
}

fn base_header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    // Empty names cannot fail to fit.
    let _ = h.set_username("");
    let _ = h.set_groupname("");
    h
}

fn write_entries<W: Write>(entries: &[Entry], out: W) -> Result<(), PackError> {
    let mut builder = tar::Builder::new(out);
    for entry in entries {
        match &entry.kind {
            EntryKind::Dir => {
                let mut h = base_header(tar::EntryType::Directory, 0o755, 0);
                builder.append_data(&mut h, &entry.rel, io::empty()).map_err(PackError::Write)?;
            }
            EntryKind::File { size, executable } => {
                let mode = if *executable { 0o755 } else { 0o644 };
                let mut h = base_header(tar::EntryType::Regular, mode, *size);
                let file = File::open(&entry.abs)
                    .map_err(|source| PackError::Io { path: entry.abs.clone(), source })?;
                let mut exact = ExactReader { inner: file.take(*size), left: *size };
                builder.append_data(&mut h, &entry.rel, &mut exact).map_err(|e| {
                    match e.get_ref().and_then(|i| i.downcast_ref::<ChangedMarker>()) {
                        Some(_) => PackError::Changed { path: entry.abs.clone() },
                        None => PackError::Write(e),
                    }
                })?;
                // A file that grew since it was listed would now have bytes left over.
                let mut probe = [0u8; 1];
                if exact.inner.into_inner().read(&mut probe).unwrap_or(0) != 0 {
                    return Err(PackError::Changed { path: entry.abs.clone() });
                }
            }
            EntryKind::Symlink { target } => {
                let mut h = base_header(tar::EntryType::Symlink, 0o777, 0);
                builder.append_link(&mut h, &entry.rel, target).map_err(PackError::Write)?;
            }
        }
    }
    builder.into_inner().map_err(PackError::Write)?.flush().map_err(PackError::Write)?;
    Ok(())
}

#[derive(Debug)]
struct ChangedMarker;

impl std::fmt::Display for ChangedMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("file changed while being packed")
    }
}

impl std::error::Error for ChangedMarker {}

/// Reads exactly `left` bytes, failing if the file ends sooner (it shrank).
struct ExactReader<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::other(ChangedMarker));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
