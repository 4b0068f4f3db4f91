//! Subcommand implementations.

pub(crate) mod coordinator;
mod daemons;
mod demo;
mod inspect;
mod node;
mod ops;
mod publish;
mod verify;

use anyhow::{Context, Result};

use fleetwave_chunker::{ManifestId, SignedManifest};
use fleetwave_node::store::ChunkStore;

use crate::cli::{Cli, Command, DaemonKind, NodeCommand};

pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Publish(args) => {
            // Set up before publishing, so that a bad URL or token is found before the upload.
            let registrar = match &args.register.coordinator {
                Some(url) => Some(ops::registrar(url, args.register.token_file.as_deref())?),
                None => None,
            };
            let report = publish::run(&publish::Options::from_args(args)?)?;
            report.print();
            if let Some(client) = registrar {
                let m = &report.manifest;
                ops::register(&client, &m.service, &m.version, &report.envelope).with_context(
                    || format!("published {}@{}, but it is not registered", m.service, m.version),
                )?;
            }
            Ok(())
        }
        Command::Ops(command) => ops::run(command),
        Command::Verify { manifest, origin, trust } => {
            let store = open_store(&origin.origin)?;
            let report = verify::run(&store, &manifest, &trust, true)?;
            report.print();
            Ok(())
        }
        Command::Inspect { manifest, origin, against } => {
            let store = open_store(&origin.origin)?;
            inspect::run(&store, &manifest, against.as_deref())
        }
        Command::Demo { keep } => demo::run(keep),
        Command::Daemon { which } => match which {
            DaemonKind::Node { config } => daemons::node(&config),
            DaemonKind::Coordinator { config } => daemons::coordinator(&config),
        },
        Command::Node { api, command } => match command {
            NodeCommand::Stage { manifest, wait, quiet } => {
                node::stage(&api, &manifest, wait, quiet)
            }
            NodeCommand::Activate { manifest, service } => {
                node::activate(&api, &service, &manifest)
            }
            NodeCommand::Rollback { service } => node::rollback(&api, &service),
            NodeCommand::Status => node::status(&api),
        },
    }
}

fn keygen(out: &std::path::Path) -> Result<()> {
    let key = fleetwave_chunker::SigningKey::generate();
    let public = key.write_files(out).context("cannot write key")?;
    println!("secret key: {}", out.display());
    println!("public key: {}", public.display());
    println!("key id:     {}", key.verifying_key());
    Ok(())
}

pub(crate) fn open_store(dir: &std::path::Path) -> Result<ChunkStore> {
    ChunkStore::open(dir).context("cannot open origin")
}

/// Resolves what an operator typed: `SERVICE@VERSION`, a full id or a unique id prefix.
pub(crate) fn resolve(store: &ChunkStore, spec: &str) -> Result<ManifestId> {
    if let Some((service, version)) = spec.split_once('@') {
        return store
            .resolve_ref(service, version)?
            .with_context(|| format!("{service}@{version} is not published on this origin"));
    }
    Ok(store.resolve_manifest_prefix(spec)?)
}

/// Loads and decodes a stored signed manifest, checking that it is the one asked for.
pub(crate) fn load(store: &ChunkStore, id: ManifestId) -> Result<SignedManifest> {
    let bytes = store.get_manifest(&id)?;
    SignedManifest::decode_expecting(id, &bytes)
        .with_context(|| format!("manifest {id} in {} is unusable", store.dir().display()))
}
