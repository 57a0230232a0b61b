//! `surgectl`: checks a policy offline and replays traces through the real policy core.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use surge_policy::env::{EnvConfig, ProcessEnv};
use surge_policy::simulate::{changes, simulate, SimConfig};
use surge_policy::trace::Trace;
use surge_policy::{parse_policy, Defaults, Policy};

#[derive(Parser)]
#[command(name = "surgectl", about = "Surge policy tools")]
struct Cli {
    /// Take defaults (MIN_REPLICAS, COOLDOWN_SCALE_UP, …) from the environment.
    #[arg(long, global = true)]
    env: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check policy files; prints the effective policy as JSON with --show.
    Validate {
        /// Policy files (YAML).
        files: Vec<PathBuf>,
        /// Print the resolved policy with all defaults.
        #[arg(long)]
        show: bool,
    },
    /// Replay a trace (CSV or JSON) through a policy on a simulated clock.
    Simulate {
        /// Policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Trace file (.csv or .json).
        #[arg(long)]
        trace: PathBuf,
        /// Replica start-up delay (e.g. 10s).
        #[arg(long, default_value = "10s")]
        startup_delay: String,
        /// Replicas at the start.
        #[arg(long, default_value_t = 1)]
        initial_replicas: u32,
        /// Simulated tick (e.g. 1s).
        #[arg(long, default_value = "1s")]
        tick: String,
        /// Write a plot (.svg) of load, capacity and replicas.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Print every tick as JSON lines instead of the changes.
        #[arg(long)]
        json: bool,
    },
}

fn defaults(from_env: bool) -> anyhow::Result<Defaults> {
    if from_env {
        let cfg = EnvConfig::from_env(&ProcessEnv, surge_policy::config::KpaConfig::default())?;
        Ok(cfg.defaults)
    } else {
        Ok(Defaults::default())
    }
}

fn load_policy(path: &Path, d: &Defaults) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("policy");
    parse_policy(&text, d, stem).with_context(|| format!("{} is invalid", path.display()))
}

fn duration(s: &str) -> anyhow::Result<Duration> {
    Ok(surge_policy::time::parse_duration(s)?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let d = defaults(cli.env)?;
    match cli.command {
        Command::Validate { files, show } => {
            if files.is_empty() {
                bail!("no policy file given");
            }
            let mut bad = 0;
            for f in &files {
                match load_policy(f, &d) {
                    Ok(p) => {
                        println!("{}: ok (policy {:?}, {:?})", f.display(), p.name, p.algorithm);
                        if show {
                            println!("{}", serde_json::to_string_pretty(&p)?);
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        eprintln!("{}: invalid", f.display());
                        for line in format!("{:#}", e.root_cause()).lines() {
                            eprintln!("  {line}");
                        }
                    }
                }
            }
            if bad > 0 {
                std::process::exit(1);
            }
        }
        Command::Simulate {
            policy,
            trace,
            startup_delay,
            initial_replicas,
            tick,
            plot,
            json,
        } => {
            let p = load_policy(&policy, &d)?;
            let text =
                std::fs::read_to_string(&trace).with_context(|| format!("reading {}", trace.display()))?;
            let t =
                Trace::parse(&text).with_context(|| format!("{} is not a valid trace", trace.display()))?;
            let cfg = SimConfig {
                startup_delay: duration(&startup_delay)?,
                tick: duration(&tick)?,
                initial_replicas,
            };
            if cfg.tick.is_zero() {
                bail!("--tick must be greater than 0");
            }
            let name = p.name.clone();
            let points = simulate(Arc::new(p), &t, &cfg);
            if json {
                for pt in &points {
                    println!("{}", serde_json::to_string(pt)?);
                }
            } else {
                println!(
                    "{:>8}  {:>9}  {:>8}  {:>5}  reason",
                    "time(s)", "load", "desired", "ready"
                );
                for pt in changes(&points) {
                    println!(
                        "{:>8.0}  {:>9.1}  {:>8}  {:>5}  {}",
                        pt.time, pt.load, pt.desired, pt.ready, pt.reason
                    );
                }
            }
            if let Some(out) = plot {
                surge_policy::plot::plot(&points, &out, &format!("{name} on {}", trace.display()))?;
                eprintln!("wrote {}", out.display());
            }
        }
    }
    Ok(())
}
