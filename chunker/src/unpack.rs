//! Safe unpacking of a packed tree into a directory.
//!
//! The stream normally comes from a verified, signed manifest, but the unpacker trusts nothing
//! in it. It refuses, naming the entry:
//!
//! - absolute paths, `..` components, and empty paths;
//! - symlinks whose target is absolute or leads outside the tree;
//! - entries whose parent is not a directory created earlier in the stream (so nothing is ever
//!   written through a symlink);
//! - device files, FIFOs, hard links and every other entry type but file, directory, symlink;
//! - duplicate entries.
//!
//! Everything is written into a temporary directory beside the destination, each file and
//! directory fsynced, and the temporary directory renamed onto the destination only when the
//! whole stream unpacked: a failure at any point leaves no destination and no temporary files.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Why unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Reading the stream or writing the tree failed.
    #[error("{}", path.display())]
    Io {
        /// The path being written, or the destination.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The destination exists already.
    #[error("{}: already exists", path.display())]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// An entry was refused.
    #[error("refusing entry {}: {reason}", entry.display())]
    Refused {
        /// The entry's path as written in the stream.
        entry: PathBuf,
        /// Why.
        reason: Refusal,
    },
    /// The stream is not a valid packed tree.
    #[error("malformed tree stream")]
    Malformed(#[source] io::Error),
}

/// Why an entry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Absolute path.
    #[error("absolute path")]
    Absolute,
    /// A `..` component.
    #[error("path contains '..'")]
    ParentDir,
    /// No path at all.
    #[error("empty path")]
    Empty,
    /// A symlink pointing outside the tree or to an absolute path.
    #[error("symlink escapes the tree")]
    SymlinkEscapes,
    /// The parent is not a directory created earlier (missing, a file or a symlink).
    #[error("parent is not a directory of this tree")]
    BadParent,
    /// Device, FIFO, hard link or another unsupported type.
    #[error("unsupported entry type")]
    UnsupportedType,
    /// The same path twice.
    #[error("duplicate entry")]
    Duplicate,
}

/// Statistics of an unpacked tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created (the root excluded).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file content written.
    pub file_bytes: u64,
}

/// Unpacks the tree stream `reader` into `dest`, which must not exist; its parent must.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Io { path, source }
    };
    if fs::symlink_metadata(dest).is_ok() {
        return Err(UnpackError::DestinationExists { path: dest.to_owned() });
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.unpack-"))
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    let stats = unpack_into(reader, tmp.path())?;
    sync_dir(tmp.path())?;
    let tmp_path = tmp.keep();
    if let Err(source) = fs::rename(&tmp_path, dest) {
        let _ = fs::remove_dir_all(&tmp_path);
        return Err(UnpackError::Io { path: dest.to_owned(), source });
    }
    sync_dir(parent)?;
    Ok(stats)
}

fn sync_dir(path: &Path) -> Result<(), UnpackError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| UnpackError::Io { path: path.to_owned(), source })
}

/// Checks an entry path and returns it as plain relative components.
fn clean_path(raw: &Path) -> Result<PathBuf, Refusal> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(out)
}

/// Whether the symlink at `link` (relative to the root) pointing at `target` stays inside.
fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    // Depth of the directory holding the link, then walk the target lexically.
    let mut depth = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn unpack_into<R: Read>(reader: R, root: &Path) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let mut created_dirs: Vec<PathBuf> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Malformed)? {
        let mut entry = entry.map_err(UnpackError::Malformed)?;
        let raw = entry.path().map_err(UnpackError::Malformed)?.into_owned();
        let refuse = |reason| UnpackError::Refused { entry: raw.clone(), reason };
        let rel = clean_path(&raw).map_err(refuse)?;
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !dirs.contains(parent) {
                return Err(refuse(Refusal::BadParent));
            }
        }
        if !seen.insert(rel.clone()) {
            return Err(refuse(Refusal::Duplicate));
        }
        let target = root.join(&rel);
        let io_err = |source| UnpackError::Io { path: target.clone(), source };
        let header = entry.header();
        let executable = header.mode().map_err(UnpackError::Malformed)? & 0o111 != 0;
        match header.entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir(&target).map_err(io_err)?;
                dirs.insert(rel);
                created_dirs.push(target);
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = if executable { 0o755 } else { 0o644 };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(io_err)?;
                let n = io::copy(&mut entry, &mut file).map_err(io_err)?;
                file.sync_all().map_err(io_err)?;
                stats.files += 1;
                stats.file_bytes += n;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Malformed)?
                    .ok_or_else(|| refuse(Refusal::SymlinkEscapes))?
                    .into_owned();
                if !symlink_stays_inside(&rel, &link) {
                    return Err(refuse(Refusal::SymlinkEscapes));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io_err)?;
                stats.symlinks += 1;
            }
            _ => return Err(refuse(Refusal::UnsupportedType)),
        }
    }
    for dir in created_dirs.iter().rev() {
        sync_dir(dir)?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(Path::new("./a/b")), Ok(PathBuf::from("a/b")));
        assert_eq!(clean_path(Path::new("/etc/passwd")), Err(Refusal::Absolute));
        assert_eq!(clean_path(Path::new("a/../../b")), Err(Refusal::ParentDir));
        assert_eq!(clean_path(Path::new("./")), Err(Refusal::Empty));
    }

    #[test]
    fn symlink_containment() {
        assert!(symlink_stays_inside(Path::new("bin/tool"), Path::new("../lib/tool")));
        assert!(symlink_stays_inside(Path::new("a"), Path::new("b/c")));
        assert!(!symlink_stays_inside(Path::new("a"), Path::new("../x")));
        assert!(!symlink_stays_inside(Path::new("bin/tool"), Path::new("../../etc")));
        assert!(!symlink_stays_inside(Path::new("a"), Path::new("/etc/passwd")));
        assert!(!symlink_stays_inside(Path::new("a/b"), Path::new("c/../../../x")));
    }
}
