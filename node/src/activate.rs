//! Activation on a host: switching a service to a staged release, running its lifecycle hooks,
//! checking its health, and switching back.
//!
//! # Layout
//!
//! ```text
//! <data>/current/<service>            symlink to ../releases/<service>/<version>, switched atomically
//! <data>/activation/<service>.json    the service's activation state (below), rewritten atomically
//! <data>/activation/logs/             the last output of each hook run (secrets redacted)
//! ```
//!
//! # An activation
//!
//! Activating manifest `M` (staged) of service `S`:
//!
//! 1. the state records `pending = {target: M, phase}` before anything runs;
//! 2. `before_install` runs (the old release is still current);
//! 3. `current/S` is switched to `M`'s release: a new symlink is created beside it and renamed
//!    over it, then the directory is flushed, so `current/S` always names one whole release;
//! 4. `after_install`, `start` and `validate` run, then the health check (a command, or an HTTP
//!    GET answered 2xx, retried until its deadline);
//! 5. on success the state records `M` active (and the stage area pins it against garbage
//!    collection); on any failure after the switch, `current/S` is switched back to the
//!    previous release and its `start` hook runs again, and the failure is recorded.
//!
//! Before each hook starts, the state records which hook is running. If the node dies while a
//! hook runs, the next [`Activator::open`] finds that record: the activation is reported failed
//! (`Interrupted`), `current/S` is switched back to the previous release, and the hook is never
//! silently re-run. Rolling back ([`Activator::rollback`]) is a switch to the previous release
//! (still on disk: the stage area keeps the last releases) and its `start` hook.
//!
//! # Hooks
//!
//! Commands (`sh -c`), each bounded by a timeout (killed past it, which fails the hook), from
//! the deployment spec or, when it names none, from `fleetwave.toml` at the root of the
//! release:
//!
//! ```toml
//! [hooks]
//! before_install = "..."
//! after_install = "..."
//! start = "systemctl restart web"
//! validate = "./bin/selftest"
//! stop = "systemctl stop web"        # when the service is taken off the host
//! timeout = "60s"
//!
//! [health]
//! http = "http://127.0.0.1:8080/healthz"   # or: command = "..."
//! timeout = "30s"
//! ```
//!
//! A hook runs in the release directory with `FLEETWAVE_SERVICE`, `FLEETWAVE_VERSION`,
//! `FLEETWAVE_MANIFEST`, `FLEETWAVE_RELEASE_DIR` and `FLEETWAVE_PREVIOUS_RELEASE_DIR` set, plus
//! the node's secrets.
//!
//! # Secrets
//!
//! Secrets come from the node's secret source, a `KEY=VALUE` file readable only by its owner,
//! and are injected into the hooks' environment at activation. They are never written into a
//! release, never logged: hook output is kept (its last 64 KiB) with every secret value
//! replaced by `[REDACTED]`, and errors name secrets by key only.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fleetwave_chunker::ManifestId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use crate::stage::{StageArea, StageError, StageStatus};

/// Name of the hooks file at the root of a release.
pub const HOOKS_FILE: &str = "fleetwave.toml";

/// Bytes of a hook's output kept.
const OUTPUT_TAIL: usize = 64 * 1024;

/// Most bytes of a hooks or secrets file read.
const MAX_FILE: u64 = 1 << 20;

/// The lifecycle hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// Before the switch, with the old release current.
    BeforeInstall,
    /// Right after the switch.
    AfterInstall,
    /// Starts (restarts) the service on the new release.
    Start,
    /// Checks the started release.
    Validate,
    /// The health check (not a hook, but run and recorded the same way).
    Health,
    /// Stops the service when nothing of it should run any more (see
    /// [`Activator::deactivate`]).
    Stop,
}

impl Hook {
    /// The hook's name.
    pub fn name(self) -> &'static str {
        match self {
            Hook::BeforeInstall => "before_install",
            Hook::AfterInstall => "after_install",
            Hook::Start => "start",
            Hook::Validate => "validate",
            Hook::Health => "health",
            Hook::Stop => "stop",
        }
    }
}

/// Hook commands and their timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hooks {
    /// Runs before the switch.
    pub before_install: Option<String>,
    /// Runs after the switch.
    pub after_install: Option<String>,
    /// Starts the service.
    pub start: Option<String>,
    /// Validates it.
    pub validate: Option<String>,
    /// Stops it, when the service is taken off the host (a rollback of its first release).
    #[serde(default)]
    pub stop: Option<String>,
    /// Longest any hook may run. Default 60 s.
    #[serde(with = "humantime_serde", default = "default_hook_timeout")]
    pub timeout: Duration,
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}

/// How to tell that an activated release is healthy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    /// A command that exits 0 when healthy.
    pub command: Option<String>,
    /// A URL answered 2xx when healthy.
    pub http: Option<String>,
    /// How long to keep trying. Default 30 s.
    #[serde(with = "humantime_serde", default = "default_health_timeout")]
    pub timeout: Duration,
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(30)
}

/// What a release says about its activation (`fleetwave.toml`), or a deployment spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActivationSpec {
    /// The hooks.
    pub hooks: Hooks,
    /// The health check.
    pub health: Health,
}

impl ActivationSpec {
    /// Reads `fleetwave.toml` from a release directory; none there is an empty spec.
    pub fn from_release(dir: &Path) -> Result<Self, ActivateError> {
        let path = dir.join(HOOKS_FILE);
        let text = match read_capped(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ActivateError::Io { path, source }),
        };
        toml::from_str(&text).map_err(|err| ActivateError::HooksFile {
            path,
            message: err.message().replace('\n', " "),
        })
    }
}

/// Secrets injected into hooks.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    vars: BTreeMap<String, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.vars.keys()).finish()
    }
}

impl Secrets {
    /// Reads a `KEY=VALUE` file (blank lines and `#` comments skipped), which must not be
    /// readable by group or others.
    pub fn read_file(path: &Path) -> Result<Self, ActivateError> {
        let io = |source| ActivateError::Io { path: path.to_owned(), source };
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ActivateError::SecretsReadable { path: path.to_owned(), mode });
        }
        let text = read_capped(path).map_err(io)?;
        let mut vars = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ActivateError::SecretsSyntax { path: path.to_owned(), line: n + 1 });
            };
            let key = key.trim();
            let valid = !key.is_empty()
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !key.starts_with("FLEETWAVE_");
            if !valid {
                return Err(ActivateError::SecretsSyntax { path: path.to_owned(), line: n + 1 });
            }
            vars.insert(key.to_owned(), value.to_owned());
        }
        Ok(Self { vars })
    }

    /// Secrets from pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self { vars: pairs.into_iter().collect() }
    }

    /// Replaces every secret value in `text`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in self.vars.values().filter(|v| v.len() >= 3) {
            out = out.replace(value.as_str(), "[REDACTED]");
        }
        out
    }
}

/// An activation in progress, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The manifest being activated.
    pub target: String,
    /// Its release directory.
    pub target_dir: PathBuf,
    /// Whether `current` already points at it.
    pub switched: bool,
    /// The hook running now, if any.
    pub running: Option<Hook>,
}

/// How the last activation (or rollback) of a service ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The manifest it tried to activate.
    pub target: String,
    /// Whether it is active now.
    pub ok: bool,
    /// The hook (or health check) that failed.
    pub failed_hook: Option<Hook>,
    /// Why, in one line.
    pub reason: Option<String>,
    /// Whether the previous release was switched back.
    pub rolled_back: bool,
}

/// A release, as the state remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// The manifest.
    pub id: String,
    /// Its version.
    pub version: String,
    /// `releases/<service>/<version>` under the data directory.
    pub dir: PathBuf,
}

/// A service's activation state (`activation/<service>.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The active release.
    pub active: Option<ReleaseRef>,
    /// The one before it: what a rollback switches to.
    pub previous: Option<ReleaseRef>,
    /// An activation in progress.
    pub pending: Option<Pending>,
    /// How the last one ended.
    pub last: Option<Outcome>,
    /// A release started beside the active one without traffic (blue-green), and whether its
    /// start and health check passed.
    #[serde(default)]
    pub standby: Option<(ReleaseRef, bool)>,
}

/// Errors of activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stage area failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The manifest is not staged here.
    #[error("manifest {id} is not staged on this host")]
    NotStaged {
        /// The manifest.
        id: ManifestId,
    },
    /// The manifest is of another service.
    #[error("manifest {id} is a release of {actual}, not {service}")]
    WrongService {
        /// The manifest.
        id: ManifestId,
        /// The service asked for.
        service: String,
        /// Its service.
        actual: String,
    },
    /// Another activation of the service is running.
    #[error("an activation of {service} is already running")]
    Busy {
        /// The service.
        service: String,
    },
    /// No previous release to roll back to.
    #[error("{service} has no previous release to roll back to")]
    NothingToRollBack {
        /// The service.
        service: String,
    },
    /// A release's `fleetwave.toml` is invalid.
    #[error("{path} is invalid: {message}")]
    HooksFile {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The secrets file is readable by others.
    #[error("secrets file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    SecretsReadable {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A line of the secrets file is not `KEY=VALUE`.
    #[error("secrets file {path}: line {line} is not KEY=VALUE with a valid key")]
    SecretsSyntax {
        /// The file.
        path: PathBuf,
        /// The line number.
        line: usize,
    },
    /// The state file is unreadable.
    #[error("activation state {path} is corrupt: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Activates, and rolls back, the services of one host (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Activator {
    data_dir: PathBuf,
    area: StageArea,
    secrets: Secrets,
    /// Services with an activation running.
    running: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Activator {
    /// Opens the activation state. Activations a crash interrupted are finished as failures
    /// here: `current` is switched back to the previous release (its `start` hook is not run:
    /// the service manager restarts what was running), and the outcome says which hook was
    /// running. Returns the services whose activation was interrupted.
    pub fn open(
        data_dir: &Path,
        area: StageArea,
        secrets: Secrets,
    ) -> Result<(Self, Vec<String>), ActivateError> {
        let this =
            Self { data_dir: data_dir.to_owned(), area, secrets, running: Default::default() };
        for dir in [this.current_dir(), this.state_dir(), this.state_dir().join("logs")] {
            fs::create_dir_all(&dir).map_err(|source| ActivateError::Io { path: dir, source })?;
        }
        let mut interrupted = Vec::new();
        let entries = fs::read_dir(this.state_dir())
            .map_err(|source| ActivateError::Io { path: this.state_dir(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(service) = name.strip_suffix(".json") else { continue };
            if service.starts_with('.') {
                continue;
            }
            let mut state = this.load(service)?;
            let Some(pending) = state.pending.take() else { continue };
            let hook = pending.running;
            warn!(service, target = %pending.target, hook = hook.map(Hook::name), "activation interrupted by a restart; reporting it failed");
            let mut rolled_back = false;
            if pending.switched {
                if let Some(active) = &state.active {
                    this.switch(service, &active.dir)?;
                    rolled_back = true;
                }
            }
            state.last = Some(Outcome {
                target: pending.target,
                ok: false,
                failed_hook: hook,
                reason: Some(match hook {
                    Some(h) => format!("interrupted: the node stopped while {} ran", h.name()),
                    None => "interrupted: the node stopped during the activation".into(),
                }),
                rolled_back,
            });
            this.save(service, &state)?;
            interrupted.push(service.to_owned());
        }
        Ok((this, interrupted))
    }

    fn current_dir(&self) -> PathBuf {
        self.data_dir.join("current")
    }

    fn state_dir(&self) -> PathBuf {
        self.data_dir.join("activation")
    }

    fn state_path(&self, service: &str) -> PathBuf {
        self.state_dir().join(format!("{service}.json"))
    }

    /// The activation state of `service`.
    pub fn state(&self, service: &str) -> Result<ServiceState, ActivateError> {
        self.load(service)
    }

    /// The states of every service that has one.
    pub fn states(&self) -> Vec<(String, ServiceState)> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(self.state_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(service) = name.strip_suffix(".json") {
                    if let Ok(state) = self.load(service) {
                        out.push((service.to_owned(), state));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn load(&self, service: &str) -> Result<ServiceState, ActivateError> {
        let path = self.state_path(service);
        match read_capped(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ActivateError::State { path, message: e.to_string() }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ServiceState::default()),
            Err(source) => Err(ActivateError::Io { path, source }),
        }
    }

    fn save(&self, service: &str, state: &ServiceState) -> Result<(), ActivateError> {
        let path = self.state_path(service);
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| ActivateError::State { path: path.clone(), message: e.to_string() })?;
        write_atomic(&self.state_dir(), &path, &json)
            .map_err(|source| ActivateError::Io { path, source })
    }

    /// Points `current/<service>` at `release` atomically.
    fn switch(&self, service: &str, release: &Path) -> Result<(), ActivateError> {
        let link = self.current_dir().join(service);
        let tmp = self.current_dir().join(format!(".{service}.tmp"));
        let target = Path::new("..").join(release.strip_prefix(&self.data_dir).unwrap_or(release));
        let io = |source| ActivateError::Io { path: link.clone(), source };
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(io)?;
        fs::rename(&tmp, &link).map_err(io)?;
        fs::File::open(self.current_dir()).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Where `current/<service>` points, if anywhere.
    pub fn current(&self, service: &str) -> Option<PathBuf> {
        fs::canonicalize(self.current_dir().join(service)).ok()
    }

    /// The stage entry and release directory of `id`, which must be a staged release of
    /// `service`.
    fn staged_release(
        &self,
        service: &str,
        id: ManifestId,
    ) -> Result<(crate::stage::StageEntry, PathBuf), ActivateError> {
        let entry = self.area.status_of(&id)?.ok_or(ActivateError::NotStaged { id })?;
        if entry.service != service {
            return Err(ActivateError::WrongService {
                id,
                service: service.to_owned(),
                actual: entry.service,
            });
        }
        let (StageStatus::Staged, Some(dir)) = (&entry.status, entry.release.clone()) else {
            return Err(ActivateError::NotStaged { id });
        };
        Ok((entry, dir))
    }

    /// Activates staged manifest `id` of `service`, with `spec` (or, when `None`, the
    /// release's own `fleetwave.toml`). `Ok` says how it ended: a failed hook is an outcome,
    /// not an error (the previous release is back). Errors are refusals before anything ran.
    pub async fn activate(
        &self,
        service: &str,
        id: ManifestId,
        spec: Option<ActivationSpec>,
    ) -> Result<Outcome, ActivateError> {
        let (entry, dir) = self.staged_release(service, id)?;
        let _guard = self.claim(service)?;
        let spec = match spec {
            Some(spec) => spec,
            None => ActivationSpec::from_release(&dir)?,
        };
        let mut state = self.load(service)?;
        if state.active.as_ref().is_some_and(|a| a.id == id.to_hex()) {
            return Ok(Outcome {
                target: id.to_hex(),
                ok: true,
                failed_hook: None,
                reason: None,
                rolled_back: false,
            });
        }
        let target =
            ReleaseRef { id: id.to_hex(), version: entry.version.clone(), dir: dir.clone() };
        state.pending = Some(Pending {
            target: id.to_hex(),
            target_dir: dir.clone(),
            switched: false,
            running: None,
        });
        self.save(service, &state)?;
        let env = HookEnv {
            service,
            version: &entry.version,
            manifest: id,
            dir: &dir,
            previous: state.active.as_ref().map(|a| a.dir.clone()),
            standby: false,
        };
        info!(service, version = %entry.version, manifest = %id, "activating");

        let failure = 'run: {
            if let Err(reason) = self
                .run_hook(
                    &mut state,
                    service,
                    Hook::BeforeInstall,
                    spec.hooks.before_install.as_deref(),
                    spec.hooks.timeout,
                    &env,
                )
                .await?
            {
                break 'run Some((Hook::BeforeInstall, reason));
            }
            self.switch(service, &dir)?;
            if let Some(p) = state.pending.as_mut() {
                p.switched = true;
            }
            self.save(service, &state)?;
            for (hook, command) in [
                (Hook::AfterInstall, spec.hooks.after_install.as_deref()),
                (Hook::Start, spec.hooks.start.as_deref()),
                (Hook::Validate, spec.hooks.validate.as_deref()),
            ] {
                if let Err(reason) = self
                    .run_hook(&mut state, service, hook, command, spec.hooks.timeout, &env)
                    .await?
                {
                    break 'run Some((hook, reason));
                }
            }
            if let Err(reason) = self.check_health(&mut state, service, &spec.health, &env).await? {
                break 'run Some((Hook::Health, reason));
            }
            None
        };

        let switched = state.pending.as_ref().is_some_and(|p| p.switched);
        let outcome = match failure {
            None => {
                self.area.set_active(service, id)?;
                // Switching to the standby (blue-green) keeps the release it replaces running
                // beside it, as the new standby.
                let was_standby = state.standby.as_ref().is_some_and(|(r, _)| r.id == id.to_hex());
                state.previous = state.active.take();
                state.standby = match (&state.previous, was_standby) {
                    (Some(p), true) => Some((p.clone(), true)),
                    _ => None,
                };
                state.active = Some(target);
                info!(service, manifest = %id, "active");
                Outcome {
                    target: id.to_hex(),
                    ok: true,
                    failed_hook: None,
                    reason: None,
                    rolled_back: false,
                }
            }
            Some((hook, reason)) => {
                warn!(service, manifest = %id, hook = hook.name(), %reason, "activation failed");
                let mut rolled_back = false;
                if switched {
                    if let Some(active) = state.active.clone() {
                        self.switch(service, &active.dir)?;
                        rolled_back = true;
                        // The previous release restarts with its own hooks.
                        let spec = ActivationSpec::from_release(&active.dir).unwrap_or_default();
                        let manifest = active.id.parse().unwrap_or(id);
                        let back = HookEnv {
                            service,
                            version: &active.version,
                            manifest,
                            dir: &active.dir,
                            previous: Some(dir.clone()),
                            standby: false,
                        };
                        state.pending = None;
                        let start = spec.hooks.start.as_deref();
                        let restarted = self
                            .run_hook(
                                &mut state,
                                service,
                                Hook::Start,
                                start,
                                spec.hooks.timeout,
                                &back,
                            )
                            .await?;
                        if let Err(reason) = restarted {
                            warn!(service, %reason, "the previous release did not restart");
                        }
                    }
                }
                Outcome {
                    target: id.to_hex(),
                    ok: false,
                    failed_hook: Some(hook),
                    reason: Some(reason),
                    rolled_back,
                }
            }
        };
        state.pending = None;
        state.last = Some(outcome.clone());
        self.save(service, &state)?;
        Ok(outcome)
    }

    /// Starts staged release `id` of `service` beside the active one, without switching
    /// `current/SERVICE` (blue-green): runs its `start` hook in its release directory with
    /// `FLEETWAVE_SLOT=standby`, then its health check, and records it as the standby (healthy
    /// or not). A later [`Activator::activate`] of it is the switch; the release it replaces
    /// is then recorded as the standby, still running, for an instant switch back.
    pub async fn start_standby(
        &self,
        service: &str,
        id: ManifestId,
    ) -> Result<Outcome, ActivateError> {
        let (entry, dir) = self.staged_release(service, id)?;
        let _guard = self.claim(service)?;
        let mut state = self.load(service)?;
        if state.standby.as_ref().is_some_and(|(r, _)| r.id == id.to_hex())
            || state.active.as_ref().is_some_and(|a| a.id == id.to_hex())
        {
            let ok = state.standby.as_ref().is_none_or(|(_, ok)| *ok);
            return Ok(Outcome {
                target: id.to_hex(),
                ok,
                failed_hook: None,
                reason: None,
                rolled_back: false,
            });
        }
        let spec = ActivationSpec::from_release(&dir)?;
        let env = HookEnv {
            service,
            version: &entry.version,
            manifest: id,
            dir: &dir,
            previous: state.active.as_ref().map(|a| a.dir.clone()),
            standby: true,
        };
        info!(service, version = %entry.version, manifest = %id, "starting beside the active release");
        let mut result = self
            .run_hook(
                &mut state,
                service,
                Hook::Start,
                spec.hooks.start.as_deref(),
                spec.hooks.timeout,
                &env,
            )
            .await?
            .map_err(|r| (Hook::Start, r));
        if result.is_ok() {
            result = self
                .check_health(&mut state, service, &spec.health, &env)
                .await?
                .map_err(|r| (Hook::Health, r));
        }
        let target =
            ReleaseRef { id: id.to_hex(), version: entry.version.clone(), dir: dir.clone() };
        state.standby = Some((target, result.is_ok()));
        self.save(service, &state)?;
        Ok(match result {
            Ok(()) => Outcome {
                target: id.to_hex(),
                ok: true,
                failed_hook: None,
                reason: None,
                rolled_back: false,
            },
            Err((hook, reason)) => {
                warn!(service, manifest = %id, hook = hook.name(), %reason, "standby failed");
                Outcome {
                    target: id.to_hex(),
                    ok: false,
                    failed_hook: Some(hook),
                    reason: Some(reason),
                    rolled_back: false,
                }
            }
        })
    }

    /// Takes `service` off this host: runs the active release's `stop` hook (if it has one),
    /// removes `current/SERVICE` and records nothing active (the release stays on disk, as
    /// the previous one). What a rollback of a service's first release does on a host that
    /// ran nothing of it before.
    pub async fn deactivate(&self, service: &str) -> Result<Outcome, ActivateError> {
        let _guard = self.claim(service)?;
        let mut state = self.load(service)?;
        let Some(active) = state.active.clone() else {
            return Ok(Outcome {
                target: String::new(),
                ok: true,
                failed_hook: None,
                reason: None,
                rolled_back: false,
            });
        };
        let spec = ActivationSpec::from_release(&active.dir).unwrap_or_default();
        let manifest = active.id.parse().map_err(|_| ActivateError::State {
            path: self.state_path(service),
            message: "bad manifest id".into(),
        })?;
        let env = HookEnv {
            service,
            version: &active.version,
            manifest,
            dir: &active.dir,
            previous: None,
            standby: false,
        };
        info!(service, version = %active.version, "taking the service off this host");
        let stopped = self
            .run_hook(
                &mut state,
                service,
                Hook::Stop,
                spec.hooks.stop.as_deref(),
                spec.hooks.timeout,
                &env,
            )
            .await?;
        if let Err(reason) = &stopped {
            warn!(service, %reason, "stop hook failed; the service is taken off anyway");
        }
        let link = self.current_dir().join(service);
        let io = |source| ActivateError::Io { path: link.clone(), source };
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        fs::File::open(self.current_dir()).and_then(|d| d.sync_all()).map_err(io)?;
        state.previous = state.active.take();
        state.standby = None;
        let outcome = Outcome {
            target: String::new(),
            ok: stopped.is_ok(),
            failed_hook: stopped.as_ref().err().map(|_| Hook::Stop),
            reason: stopped.err(),
            rolled_back: false,
        };
        state.last = Some(outcome.clone());
        self.save(service, &state)?;
        Ok(outcome)
    }

    /// Switches `service` back to its previous release and runs that release's `start` hook.
    pub async fn rollback(&self, service: &str) -> Result<Outcome, ActivateError> {
        let _guard = self.claim(service)?;
        let mut state = self.load(service)?;
        let Some(previous) = state.previous.clone() else {
            return Err(ActivateError::NothingToRollBack { service: service.to_owned() });
        };
        let id: ManifestId = previous.id.parse().map_err(|_| ActivateError::State {
            path: self.state_path(service),
            message: "bad manifest id".into(),
        })?;
        let spec = ActivationSpec::from_release(&previous.dir)?;
        self.switch(service, &previous.dir)?;
        self.area.set_active(service, id)?;
        let env = HookEnv {
            service,
            version: &previous.version,
            manifest: id,
            dir: &previous.dir,
            previous: state.active.as_ref().map(|a| a.dir.clone()),
            standby: false,
        };
        let started = self
            .run_hook(
                &mut state,
                service,
                Hook::Start,
                spec.hooks.start.as_deref(),
                spec.hooks.timeout,
                &env,
            )
            .await?;
        state.previous = state.active.take();
        state.active = Some(previous);
        let outcome = Outcome {
            target: id.to_hex(),
            ok: started.is_ok(),
            failed_hook: started.is_err().then_some(Hook::Start),
            reason: started.err(),
            rolled_back: true,
        };
        info!(service, manifest = %id, "rolled back");
        state.pending = None;
        state.last = Some(outcome.clone());
        self.save(service, &state)?;
        Ok(outcome)
    }

    fn claim(&self, service: &str) -> Result<ClaimGuard, ActivateError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(service.to_owned()) {
            return Err(ActivateError::Busy { service: service.to_owned() });
        }
        Ok(ClaimGuard {
            running: std::sync::Arc::clone(&self.running),
            service: service.to_owned(),
        })
    }

    /// Runs one hook (if configured), recording it as running first. `Ok(Err(reason))` is a
    /// failed hook.
    async fn run_hook(
        &self,
        state: &mut ServiceState,
        service: &str,
        hook: Hook,
        command: Option<&str>,
        timeout: Duration,
        env: &HookEnv<'_>,
    ) -> Result<Result<(), String>, ActivateError> {
        let Some(command) = command else { return Ok(Ok(())) };
        if let Some(p) = state.pending.as_mut() {
            p.running = Some(hook);
            self.save(service, state)?;
        }
        let result = self.run_command(service, hook, command, timeout, env).await;
        if let Some(p) = state.pending.as_mut() {
            p.running = None;
            self.save(service, state)?;
        }
        Ok(result)
    }

    async fn run_command(
        &self,
        service: &str,
        hook: Hook,
        command: &str,
        timeout: Duration,
        env: &HookEnv<'_>,
    ) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(env.dir)
            .env("FLEETWAVE_SERVICE", env.service)
            .env("FLEETWAVE_VERSION", env.version)
            .env("FLEETWAVE_MANIFEST", env.manifest.to_hex())
            .env("FLEETWAVE_RELEASE_DIR", env.dir)
            .env("FLEETWAVE_SLOT", if env.standby { "standby" } else { "active" })
            .envs(self.secrets.vars.iter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(previous) = &env.previous {
            cmd.env("FLEETWAVE_PREVIOUS_RELEASE_DIR", previous);
        }
        let mut child = cmd.spawn().map_err(|e| format!("{} cannot start: {e}", hook.name()))?;
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let collect = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let read_out = async {
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(s) = stderr.as_mut() {
                    let _ = s.read_to_end(&mut err).await;
                }
            };
            tokio::join!(read_out, read_err);
            let status = child.wait().await;
            (status, out, err)
        };
        let result = tokio::time::timeout(timeout, collect).await;
        let (verdict, output) = match result {
            Err(_) => (Err(format!("{} timed out after {timeout:?}", hook.name())), Vec::new()),
            Ok((Err(e), out, _)) => (Err(format!("{} failed: {e}", hook.name())), out),
            Ok((Ok(status), mut out, err)) => {
                out.extend_from_slice(&err);
                if status.success() {
                    (Ok(()), out)
                } else {
                    (Err(format!("{} exited with {status}", hook.name())), out)
                }
            }
        };
        self.keep_output(service, env.version, hook, &output);
        verdict
    }

    fn keep_output(&self, service: &str, version: &str, hook: Hook, output: &[u8]) {
        let tail = &output[output.len().saturating_sub(OUTPUT_TAIL)..];
        let text = self.secrets.redact(&String::from_utf8_lossy(tail));
        let path =
            self.state_dir().join("logs").join(format!("{service}-{version}-{}.log", hook.name()));
        if let Err(err) = fs::write(&path, text) {
            warn!(path = %path.display(), %err, "cannot keep hook output");
        }
    }

    async fn check_health(
        &self,
        state: &mut ServiceState,
        service: &str,
        health: &Health,
        env: &HookEnv<'_>,
    ) -> Result<Result<(), String>, ActivateError> {
        if let Some(command) = &health.command {
            return self
                .run_hook(state, service, Hook::Health, Some(command), health.timeout, env)
                .await;
        }
        let Some(url) = &health.http else { return Ok(Ok(())) };
        if let Some(p) = state.pending.as_mut() {
            p.running = Some(Hook::Health);
            self.save(service, state)?;
        }
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + health.timeout;
        let verdict = loop {
            let last = match client.get(url).send().await {
                Ok(resp) if resp.status().is_success() => break Ok(()),
                Ok(resp) => format!("{url} answered {}", resp.status()),
                Err(err) => format!("{url}: {err}"),
            };
            if tokio::time::Instant::now() + Duration::from_millis(500) > deadline {
                break Err(format!("health check failed: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if let Some(p) = state.pending.as_mut() {
            p.running = None;
            self.save(service, state)?;
        }
        Ok(verdict)
    }
}

#[derive(Clone)]
struct HookEnv<'a> {
    service: &'a str,
    version: &'a str,
    manifest: ManifestId,
    dir: &'a Path,
    previous: Option<PathBuf>,
    /// Started beside the active release (`FLEETWAVE_SLOT=standby`; else `active`).
    standby: bool,
}

struct ClaimGuard {
    running: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    service: String,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.service);
    }
}

fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    fs::File::open(path)?.take(MAX_FILE).read_to_string(&mut text)?;
    Ok(text)
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
