//! What Surge's kernel programs cost, read from the kernel's own accounting: with BPF run-time
//! statistics on (`BPF_ENABLE_STATS`, held by a file descriptor), every program's run count and
//! total run time, so a benchmark can print nanoseconds per run and per request.
//!
//! The statistics themselves cost two clock reads per run, so a benchmark measures throughput
//! with them off and reads the costs in a separate run.

use std::{collections::BTreeSet, os::fd::OwnedFd, time::Duration};

use anyhow::Context;

/// Run-time statistics are collected while this is alive.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

/// Turns BPF run-time statistics on until the returned guard is dropped.
pub fn stats_on() -> anyhow::Result<StatsOn> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    Ok(StatsOn(fd))
}

/// One program's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramCost {
    pub id: u32,
    /// The kernel keeps the first 15 bytes of the name.
    pub name: String,
    pub runs: u64,
    pub time: Duration,
}

/// The ids of every program loaded now.
pub fn program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// Totals of the programs named `surge_…` that are not in `before` (the ones an agent started
/// since then loaded), in name order.
pub fn surge_programs_since(before: &BTreeSet<u32>) -> Vec<ProgramCost> {
    let mut out: Vec<ProgramCost> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| !before.contains(&p.id()))
        .filter_map(|p| {
            let name = p.name_as_str()?.to_string();
            name.starts_with("surge_").then(|| ProgramCost {
                id: p.id(),
                name,
                runs: p.run_count(),
                time: p.run_time(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The change of each program's totals between two readings of the same programs.
pub fn delta(before: &[ProgramCost], after: &[ProgramCost]) -> Vec<ProgramCost> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgramCost {
                runs: a.runs - b.map_or(0, |b| b.runs),
                time: a.time.saturating_sub(b.map_or(Duration::ZERO, |b| b.time)),
                ..a.clone()
            }
        })
        .collect()
}
