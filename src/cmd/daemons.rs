//! The daemons run from the `fleetwave` binary (`fleetwave daemon node|coordinator --config
//! FILE`), so that `fleetwave demo` and the end-to-end tests start real processes of the very
//! same code as `fleetwave-node` and `fleetwave-coordinator`, from one binary.

use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

fn serve<F, Fut, E>(f: F) -> Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let signals = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stop.cancel();
                Ok::<_, std::io::Error>(())
            })
        };
        let result = f(stop).await.map_err(Into::into);
        signals.abort();
        result
    })
}

/// Runs a node daemon from its TOML config.
pub(crate) fn node(config: &Path) -> Result<()> {
    let config: fleetwave_node::daemon::config::Config = read_toml(config)?;
    config.validate()?;
    serve(|stop| fleetwave_node::daemon::run(config, Default::default(), stop))
}

/// Runs the coordinator from its TOML config.
pub(crate) fn coordinator(config: &Path) -> Result<()> {
    let config: fleetwave_coordinator::daemon::Config = read_toml(config)?;
    config.validate()?;
    serve(|stop| fleetwave_coordinator::daemon::run(config, stop))
}
