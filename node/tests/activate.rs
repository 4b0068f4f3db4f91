//! Activation on a host: hooks, health checks, switching back, crash-interrupted hooks, secrets.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::pack::ArtifactStream;
use fleetwave_chunker::{BuildInfo, ChunkerParams, Manifest, ManifestId, SigningKey, TrustedKeys};
use fleetwave_node::activate::{ActivateError, Activator, Hook, Secrets};
use fleetwave_node::stage::StageArea;

const SECRET: &str = "hunter2-very-secret";

struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    area: StageArea,
    key: SigningKey,
    /// Where hooks append their names.
    trail: PathBuf,
}

impl Host {
    fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let area = StageArea::open(root.join("data"), 3).unwrap();
        let trail = root.join("trail");
        Host { _tmp: tmp, root, area, key: SigningKey::generate(), trail }
    }

    fn secrets(&self) -> Secrets {
        Secrets::from_pairs([
            ("DB_PASSWORD".to_owned(), SECRET.to_owned()),
            ("TRAIL".to_owned(), self.trail.to_string_lossy().into_owned()),
        ])
    }

    fn activator(&self) -> (Activator, Vec<String>) {
        Activator::open(&self.root.join("data"), self.area.clone(), self.secrets()).unwrap()
    }

    /// Stages a release of `web` whose `fleetwave.toml` is `hooks`.
    fn stage(&self, version: &str, hooks: &str) -> ManifestId {
        let src = self.root.join(format!("src-{version}"));
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("VERSION"), version).unwrap();
        fs::write(src.join("fleetwave.toml"), hooks).unwrap();
        let server = src.join("bin/server");
        fs::write(&server, "#!/bin/sh\necho ok\n").unwrap();
        fs::set_permissions(&server, fs::Permissions::from_mode(0o755)).unwrap();
        let params = ChunkerParams::default();
        let mut stream = ArtifactStream::open(&src).unwrap();
        let mut chunks = Vec::new();
        let summary = chunk_stream(&mut stream, params, |c| {
            chunks.push(c.data.to_vec());
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        let kind = stream.kind;
        stream.finish().unwrap();
        let manifest = Manifest::from_summary(
            "web".into(),
            version.into(),
            kind,
            params,
            summary,
            BuildInfo::default(),
        )
        .unwrap();
        let signed = self.key.sign(manifest);
        let trusted = TrustedKeys::new([self.key.verifying_key()]);
        let mut job = self.area.begin(&signed, &trusted).unwrap();
        for (i, chunk) in chunks.iter().enumerate() {
            job.write_chunk(i as u32, chunk).unwrap();
        }
        job.sync().unwrap();
        job.finish().unwrap();
        signed.id()
    }

    fn trail(&self) -> Vec<String> {
        fs::read_to_string(&self.trail).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn current_version(&self, activator: &Activator) -> String {
        let dir = activator.current("web").expect("current/web");
        fs::read_to_string(dir.join("VERSION")).unwrap()
    }
}

/// Hooks that record their names (and version) in the trail, with `validate` as given.
fn hooks(validate: &str) -> String {
    format!(
        r#"[hooks]
before_install = "echo before_install $FLEETWAVE_VERSION >> $TRAIL"
after_install = "echo after_install $FLEETWAVE_VERSION >> $TRAIL"
start = "echo start $FLEETWAVE_VERSION >> $TRAIL"
validate = "{validate}"
timeout = "5s"
"#
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn activation_runs_the_hooks_in_order_and_switches_current() {
    let host = Host::new();
    let v1 = host.stage("1.0.0", &hooks("test -x bin/server"));
    let (activator, interrupted) = host.activator();
    assert!(interrupted.is_empty());
    let outcome = runtime().block_on(activator.activate("web", v1, None)).unwrap();
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(host.current_version(&activator), "1.0.0");
    assert_eq!(host.trail(), ["before_install 1.0.0", "after_install 1.0.0", "start 1.0.0"]);
    assert_eq!(host.area.active("web").unwrap(), Some(v1));
    // The link is relative, so the data directory may move.
    let link = fs::read_link(host.root.join("data/current/web")).unwrap();
    assert!(link.is_relative(), "{}", link.display());
}

#[test]
fn a_failing_validate_switches_back_and_restarts_the_previous_release() {
    let host = Host::new();
    let v1 = host.stage("1.0.0", &hooks("true"));
    let v2 = host.stage("2.0.0", &hooks("echo broken; exit 3"));
    let (activator, _) = host.activator();
    let rt = runtime();
    assert!(rt.block_on(activator.activate("web", v1, None)).unwrap().ok);
    let outcome = rt.block_on(activator.activate("web", v2, None)).unwrap();
    assert!(!outcome.ok);
    assert_eq!(outcome.failed_hook, Some(Hook::Validate));
    assert!(outcome.rolled_back);
    assert_eq!(host.current_version(&activator), "1.0.0");
    assert_eq!(host.area.active("web").unwrap(), Some(v1));
    let trail = host.trail();
    assert_eq!(trail.last().map(String::as_str), Some("start 1.0.0"), "{trail:?}");
    // The previous release's own start hook ran again after the switch back.
    let starts = trail.iter().filter(|l| l.starts_with("start")).count();
    assert_eq!(starts, 3, "{trail:?}");
    let state = activator.state("web").unwrap();
    assert_eq!(state.active.unwrap().id, v1.to_hex());
    assert!(state.pending.is_none());
}

#[test]
fn a_failing_health_check_rolls_back_and_rollback_is_a_switch() {
    let host = Host::new();
    let v1 = host.stage("1.0.0", &hooks("true"));
    let unhealthy =
        format!("{}\n[health]\ncommand = \"exit 1\"\ntimeout = \"1s\"\n", hooks("true"));
    let v2 = host.stage("2.0.0", &unhealthy);
    let v3 = host.stage("3.0.0", &hooks("true"));
    let (activator, _) = host.activator();
    let rt = runtime();
    assert!(rt.block_on(activator.activate("web", v1, None)).unwrap().ok);
    let outcome = rt.block_on(activator.activate("web", v2, None)).unwrap();
    assert_eq!(outcome.failed_hook, Some(Hook::Health));
    assert_eq!(host.current_version(&activator), "1.0.0");
    assert!(rt.block_on(activator.activate("web", v3, None)).unwrap().ok);
    assert_eq!(host.current_version(&activator), "3.0.0");
    let back = rt.block_on(activator.rollback("web")).unwrap();
    assert!(back.ok && back.rolled_back);
    assert_eq!(host.current_version(&activator), "1.0.0");
    assert_eq!(host.area.active("web").unwrap(), Some(v1));
}

#[test]
fn a_hook_interrupted_by_a_crash_is_reported_failed_and_never_rerun() {
    let host = Host::new();
    let v1 = host.stage("1.0.0", &hooks("true"));
    let slow = hooks("echo validating >> $TRAIL; sleep 30");
    let v2 = host.stage("2.0.0", &slow);
    let (activator, _) = host.activator();
    let rt = runtime();
    assert!(rt.block_on(activator.activate("web", v1, None)).unwrap().ok);
    rt.block_on(async {
        let running = activator.clone();
        let task = tokio::spawn(async move { running.activate("web", v2, None).await });
        // Wait (bounded) until validate is running, then "crash": the task
        // is dropped mid-hook, the hook's process killed, nothing after it runs.
        for _ in 0..500 {
            let state = activator.state("web").unwrap();
            let running = state.pending.and_then(|p| p.running) == Some(Hook::Validate);
            if running && host.trail().iter().any(|l| l == "validating") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        let _ = task.await;
    });
    assert_eq!(host.current_version(&activator), "2.0.0", "the crash left v2 switched in");
    let (reopened, interrupted) = host.activator();
    assert_eq!(interrupted, ["web"]);
    let state = reopened.state("web").unwrap();
    let last = state.last.unwrap();
    assert!(!last.ok);
    assert_eq!(last.failed_hook, Some(Hook::Validate));
    assert!(last.rolled_back);
    assert_eq!(host.current_version(&reopened), "1.0.0");
    // Opening again does not report (or run) it again.
    let (_, again) = host.activator();
    assert!(again.is_empty());
    let validations = host.trail().iter().filter(|l| *l == "validating").count();
    assert_eq!(validations, 1);
}

#[test]
fn secrets_reach_hooks_and_never_their_logs() {
    let host = Host::new();
    let check = format!("test \\\"$DB_PASSWORD\\\" = {SECRET} && echo password is $DB_PASSWORD");
    let v1 = host.stage("1.0.0", &hooks(&check));
    let (activator, _) = host.activator();
    let outcome = runtime().block_on(activator.activate("web", v1, None)).unwrap();
    assert!(outcome.ok, "{outcome:?}");
    let log =
        fs::read_to_string(host.root.join("data/activation/logs/web-1.0.0-validate.log")).unwrap();
    assert!(log.contains("password is [REDACTED]"), "{log}");
    assert!(!log.contains(SECRET));
    assert!(
        !fs::read_to_string(host.root.join("data/activation/web.json")).unwrap().contains(SECRET)
    );
    assert!(!format!("{:?}", host.secrets()).contains(SECRET));
}

#[test]
fn bad_secret_files_and_unstaged_manifests_are_refused() {
    let host = Host::new();
    let file = host.root.join("secrets.env");
    fs::write(&file, "DB_PASSWORD=x\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(Secrets::read_file(&file), Err(ActivateError::SecretsReadable { .. })));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Secrets::read_file(&file).is_ok());
    fs::write(&file, "not a pair\n").unwrap();
    assert!(matches!(Secrets::read_file(&file), Err(ActivateError::SecretsSyntax { line: 1, .. })));
    let (activator, _) = host.activator();
    let unknown = ManifestId::of(b"nothing");
    let err = runtime().block_on(activator.activate("web", unknown, None)).unwrap_err();
    assert!(matches!(err, ActivateError::NotStaged { .. }));
    let _ = Path::new("");
}
