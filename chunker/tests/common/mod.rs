//! Helpers shared by the chunker's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// xorshift64*: a fixed pseudo-random generator, so golden vectors never depend on a crate's RNG.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What a tree holds, for comparing a tree before packing and after unpacking.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink(std::path::PathBuf),
}

pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if meta.file_type().is_symlink() {
            out.insert(rel, Node::Symlink(std::fs::read_link(&path).expect("readlink")));
        } else if meta.is_dir() {
            out.insert(rel, Node::Dir);
            walk(root, &path, out);
        } else {
            let executable = meta.permissions().mode() & 0o111 != 0;
            out.insert(rel, Node::File { data: std::fs::read(&path).expect("read"), executable });
        }
    }
}

pub fn write_file(path: &Path, data: &[u8], executable: bool) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, data).expect("write");
    let mode = if executable { 0o755 } else { 0o640 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
