//! `fleetwave-sim SCENARIO.toml`: runs one scenario, prints its summary (or JSON), writes the
//! JSON report and the plots. While it runs, a progress line goes to stderr every few seconds
//! (`--quiet` turns it off): the 50,000-host scenarios take minutes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fleetwave_sim::RunProgress;
use fleetwave_sim::scenario::Scenario;

/// Run one simulation scenario.
#[derive(Debug, Parser)]
#[command(name = "fleetwave-sim", version)]
struct Args {
    /// The scenario file (see simulations/scenarios/).
    scenario: PathBuf,
    /// Where to write NAME.json and the plots.
    #[arg(long, short, env = "FLEETWAVE_SIM_OUT", default_value = "target/sim")]
    out: PathBuf,
    /// Override the scenario's seed.
    #[arg(long, env = "FLEETWAVE_SIM_SEED")]
    seed: Option<u64>,
    /// Print the JSON report on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Do not draw plots.
    #[arg(long)]
    no_plots: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Wall time between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

fn progress_line(p: &RunProgress) -> String {
    let share = |n: u32| f64::from(n) * 100.0 / f64::from(p.hosts.max(1));
    let host_chunks = u64::from(p.hosts) * u64::from(p.chunks);
    format!(
        "simulated {:.1} s, {:.2} M events, {:.2} M pieces ({:.0} % of hosts x chunks): {} of {} hosts hold every chunk ({:.1} %), {} staged ({:.1} %), {} updated",
        p.at as f64 / 1e9,
        p.events as f64 / 1e6,
        p.pieces as f64 / 1e6,
        p.pieces as f64 * 100.0 / host_chunks.max(1) as f64,
        p.complete,
        p.hosts,
        share(p.complete),
        p.staged,
        share(p.staged),
        p.updated,
    )
}

#[allow(clippy::print_stdout, reason = "a command-line tool prints its report")]
#[allow(clippy::disallowed_methods, reason = "the wall time of the run is measured at the edge")]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut scenario = Scenario::load(&args.scenario)
        .with_context(|| format!("loading {}", args.scenario.display()))?;
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    // Wall time is measured here, outside the model, and never enters the report.
    let started = Instant::now();
    let mut last_line: Option<Instant> = None;
    let report = fleetwave_sim::run_observed(&scenario, |p| {
        let now = Instant::now();
        if args.quiet || last_line.is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY) {
            return;
        }
        last_line = Some(now);
        eprintln!("{}", progress_line(p));
    })
    .context("building the artifact")?;
    let wall = started.elapsed();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    let json_path = args.out.join(format!("{}.json", report.scenario));
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let plots = if args.no_plots {
        Vec::new()
    } else {
        fleetwave_sim::plot::write_all(&report, &args.out)?
    };
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.summary());
        println!("wall time {:.2} s; report {}", wall.as_secs_f64(), json_path.display());
        for p in plots {
            println!("plot {}", p.display());
        }
    }
    Ok(())
}
