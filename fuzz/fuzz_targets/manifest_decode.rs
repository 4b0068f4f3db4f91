//! Untrusted manifest bytes: decoding must never panic, and anything accepted must be canonical.
#![no_main]

use fleetwave_chunker::{Manifest, SignedManifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(s) = SignedManifest::decode(data) {
        assert_eq!(Manifest::decode(s.manifest_bytes()).ok().as_ref(), Some(s.manifest()));
    }
});
