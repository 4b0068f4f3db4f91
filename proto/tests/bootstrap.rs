//! Regenerates the checked-in protobuf code and fails if it differs from what is committed.

use std::path::{Path, PathBuf};

const PROTOS: &[&str] =
    &["fleetwave/v1/manifest.proto", "fleetwave/v1/chunk.proto", "fleetwave/v1/coordinator.proto"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let include = crate_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Messages plus the gRPC services' client and server code (tonic).
    tonic_prost_build::configure()
        .out_dir(out_dir)
        .build_transport(true)
        .compile_with_config(config, &files, &[include])
        .expect("protoc runs");
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(tmp.path());
    let gen_dir = crate_dir().join("src").join("gen");
    let bless = std::env::var_os("FLEETWAVE_BLESS_PROTO").is_some();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(tmp.path()).expect("read generated dir") {
        let entry = entry.expect("dir entry");
        let fresh = std::fs::read_to_string(entry.path()).expect("read generated file");
        let checked_in = gen_dir.join(entry.file_name());
        let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
        if current != fresh {
            if bless {
                std::fs::create_dir_all(&gen_dir).expect("create gen dir");
                std::fs::write(&checked_in, fresh).expect("write generated file");
            } else {
                stale.push(checked_in.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated protobuf code is stale: {stale:?}; run \
         FLEETWAVE_BLESS_PROTO=1 cargo test -p fleetwave-proto --test bootstrap"
    );
}
