//! Untrusted tree streams: unpacking must never panic nor write outside its destination.
#![no_main]

use fleetwave_chunker::unpack::unpack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().expect("tempdir");
    let dest = parent.path().join("release");
    let ok = unpack(data, &dest).is_ok();
    // On failure nothing is left behind; on success only the destination exists.
    let entries: Vec<_> = std::fs::read_dir(parent.path()).expect("ls").collect();
    assert_eq!(entries.len(), usize::from(ok));
});
