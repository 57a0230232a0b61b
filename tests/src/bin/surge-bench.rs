//! surge-bench: what the agent costs a service, side by side in one run. The sample HTTP service
//! on loopback is loaded with `wrk` three ways, interleaved for several rounds: with nothing
//! attached, with surge-agent attached and watching it, and through `haproxy` in the path (what
//! sidecars and interceptors cost). Prints throughput and p99 latency for each, the ratios
//! agent ÷ none and agent ÷ proxy, the agent's own CPU and peak memory, and checks that the
//! agent counted the requests wrk sent. Needs root (the agent loads eBPF), wrk and haproxy.
//!
//! ```sh
//! cargo build --release && sudo target/release/surge-bench --duration 5s --rounds 3
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Parser;
use surge_tests::{
    harness::{
        bin, cleanup_pins, free_port, require_root, scratch, wait_listening, Agent, Proc, Sample, Scaler,
    },
    kernel_cost::{self, ProgramCost},
    wrk::{self, haproxy_config, median, WrkResult, WrkSpec},
};

#[derive(Parser, Clone)]
struct Args {
    /// Length of each wrk run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Rounds of (none, agent, proxy); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Path requested.
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "/usr/bin/wrk")]
    wrk: PathBuf,
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
}

fn run_wrk(args: &Args, addr: SocketAddr) -> anyhow::Result<WrkResult> {
    let spec = WrkSpec {
        wrk: &args.wrk,
        threads: args.threads,
        connections: args.connections,
        duration: args.duration,
        path: &args.path,
    };
    Ok(wrk::run_wrk(&spec, addr)?)
}

/// CPU seconds of a process so far, every thread included (/proc/PID/schedstat, nanoseconds).
fn cpu_seconds(pid: u32) -> f64 {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total as f64 / 1e9
}

/// Peak resident memory of a process, bytes (VmHWM).
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Kernel memory held by the BPF maps a process has open, bytes: the sum of their `memlock`.
fn map_memory(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l.starts_with("map_type:")))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

struct AgentRun {
    wrk: WrkResult,
    cpu_seconds: f64,
    peak_rss: u64,
    /// Kernel memory of the agent's maps.
    map_memory: u64,
    counted: u64,
    /// With `measure_kernel`: what each kernel program cost during the wrk run.
    kernel: Vec<ProgramCost>,
}

fn with_agent(
    args: &Args,
    dir: &Path,
    scaler: &Scaler,
    web: SocketAddr,
    measure_kernel: bool,
) -> anyhow::Result<AgentRun> {
    let before = scaler.service("web")["requests_total"].as_u64().unwrap_or(0);
    let programs_before = kernel_cost::program_ids();
    let pin_dir = Agent::new_pin_dir();
    let agent = Proc::spawn(
        &format!("agent-{}", free_port()),
        &bin("surge-agent"),
        &[
            "--scaler".into(),
            scaler.grpc_url(),
            "--report-interval".into(),
            "1s".into(),
            "--bpf-pin-dir".into(),
            pin_dir.display().to_string(),
        ],
        dir,
    );
    let pid = agent.pid().context("agent pid")?;
    // The agent is watching once it has reported twice.
    scaler.wait_reports(2);
    let stats = if measure_kernel {
        Some(kernel_cost::stats_on()?)
    } else {
        None
    };
    let k0 = kernel_cost::surge_programs_since(&programs_before);
    let cpu0 = cpu_seconds(pid);
    let wrk = run_wrk(args, web)?;
    let cpu1 = cpu_seconds(pid);
    let kernel = kernel_cost::delta(&k0, &kernel_cost::surge_programs_since(&programs_before));
    drop(stats);
    let peak = peak_rss(pid);
    let maps = map_memory(pid);
    // Let the last report in, then count what the agent saw of wrk's requests.
    scaler.wait_reports(2);
    let after = scaler.service("web")["requests_total"].as_u64().unwrap_or(0);
    drop(agent);
    cleanup_pins(&pin_dir);
    Ok(AgentRun {
        wrk,
        cpu_seconds: cpu1 - cpu0,
        peak_rss: peak,
        map_memory: maps,
        counted: after.saturating_sub(before),
        kernel,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    require_root();
    for (p, what) in [(&args.wrk, "wrk"), (&args.haproxy, "haproxy")] {
        if !p.exists() {
            bail!(
                "{what} is missing at {}: run deploy/setup.sh (it installs wrk and haproxy)",
                p.display()
            );
        }
    }
    let dir = scratch("bench");
    let web = Sample::start(&dir);
    let proxy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(proxy_addr, web.addr))?;
    let mut proxy = Proc::spawn(
        "haproxy",
        &args.haproxy,
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &dir,
    );
    wait_listening(proxy_addr, &mut proxy);
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &["--observe".into(), format!("web={}", web.addr)],
    );

    println!(
        "surge-bench: wrk -t{} -c{} -d{}s http://…{} against surge-sample on loopback, {} rounds",
        args.threads,
        args.connections,
        args.duration.as_secs(),
        args.path,
        args.rounds
    );
    // Warm up the server and the proxy.
    let _ = run_wrk(
        &Args {
            duration: Duration::from_secs(1),
            ..args.clone()
        },
        web.addr,
    )?;
    let _ = run_wrk(
        &Args {
            duration: Duration::from_secs(1),
            ..args.clone()
        },
        proxy_addr,
    )?;

    let (mut none, mut agent, mut proxied) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        // The order turns every round, so a drift in the machine's speed (other work on it)
        // does not always favour the same setup.
        let (mut n, mut a, mut p) = (None, None, None);
        for k in 0..3 {
            match (k + round as usize) % 3 {
                0 => n = Some(run_wrk(&args, web.addr)?),
                1 => a = Some(with_agent(&args, &dir, &scaler, web.addr, false)?),
                _ => p = Some(run_wrk(&args, proxy_addr)?),
            }
        }
        let (Some(n), Some(a), Some(p)) = (n, a, p) else {
            bail!("a setup did not run");
        };
        println!(
            "round {round}: none {:>9.0} req/s p99 {:>6.2} ms | agent {:>9.0} req/s p99 {:>6.2} ms \
             (agent CPU {:.3} s, peak RSS {:.1} MiB, counted {} of {}) | proxy {:>9.0} req/s p99 {:>6.2} ms",
            n.rps,
            n.p99_ms,
            a.wrk.rps,
            a.wrk.p99_ms,
            a.cpu_seconds,
            a.peak_rss as f64 / (1 << 20) as f64,
            a.counted,
            a.wrk.requests,
            p.rps,
            p.p99_ms
        );
        none.push(n);
        agent.push(a);
        proxied.push(p);
    }
    let m = |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(v.iter().map(f).collect());
    let agent_wrk: Vec<WrkResult> = agent.iter().map(|a| a.wrk).collect();
    let (n_rps, a_rps, p_rps) = (
        m(&none, |r| r.rps),
        m(&agent_wrk, |r| r.rps),
        m(&proxied, |r| r.rps),
    );
    let (n_p99, a_p99, p_p99) = (
        m(&none, |r| r.p99_ms),
        m(&agent_wrk, |r| r.p99_ms),
        m(&proxied, |r| r.p99_ms),
    );
    let cpu = median(agent.iter().map(|a| a.cpu_seconds).collect());
    // Ratios within each round (the setups ran back to back), then their median.
    let paired =
        |other: &[WrkResult]| median(agent.iter().zip(other).map(|(a, o)| a.wrk.rps / o.rps).collect());
    let (vs_none, vs_proxy) = (paired(&none), paired(&proxied));
    let none_vs_proxy = median(none.iter().zip(&proxied).map(|(n, p)| n.rps / p.rps).collect());
    let rss = agent.iter().map(|a| a.peak_rss).max().unwrap_or(0);
    let maps = agent.iter().map(|a| a.map_memory).max().unwrap_or(0);
    println!();
    println!("median of {} rounds         throughput      p99", args.rounds);
    println!("  none (no agent)        {n_rps:>10.0} req/s {n_p99:>7.2} ms");
    println!("  agent attached         {a_rps:>10.0} req/s {a_p99:>7.2} ms");
    println!("  through haproxy        {p_rps:>10.0} req/s {p_p99:>7.2} ms");
    println!(
        "  agent / none           {:>10.3} (goal ≥ 0.98; median of per-round ratios {vs_none:.3})   p99 ×{:.2}",
        a_rps / n_rps,
        a_p99 / n_p99
    );
    println!(
        "  agent / proxy          {:>10.2} (goal ≥ 2; median of per-round ratios {vs_proxy:.2})      p99 ×{:.2}",
        a_rps / p_rps,
        a_p99 / p_p99
    );
    println!(
        "  none / proxy           {:>10.2} (the ceiling of agent / proxy on this machine: no agent at all; \
         per-round median {none_vs_proxy:.2})",
        n_rps / p_rps
    );
    println!(
        "  agent's own cost       {cpu:.3} CPU s per {}s run ({:.2} % of a core), peak RSS {:.1} MiB, \
         kernel maps {:.1} MiB (its kernel programs run in the server's and wrk's context: their cost is in \
         agent / none)",
        args.duration.as_secs(),
        100.0 * cpu / args.duration.as_secs_f64(),
        rss as f64 / (1 << 20) as f64,
        maps as f64 / (1 << 20) as f64
    );
    let exact = agent.iter().all(|a| a.counted >= a.wrk.requests);
    println!(
        "  agent counted wrk's requests: {}",
        if exact {
            "all (≥ wrk's completed count in every round)"
        } else {
            "NOT all"
        }
    );
    print_kernel_cost(&with_agent(&args, &dir, &scaler, web.addr, true)?, n_rps);
    drop(proxy);
    Ok(())
}

/// One more agent run, with the kernel's BPF run-time statistics on (they slow every program
/// run, so the rounds above ran without them): what each program costs per run and per request.
fn print_kernel_cost(run: &AgentRun, none_rps: f64) {
    let requests = run.wrk.requests.max(1) as f64;
    println!();
    println!(
        "kernel programs during one more agent run ({} requests, BPF run-time statistics on):",
        run.wrk.requests
    );
    let mut total = 0.0;
    for p in run.kernel.iter().filter(|p| p.runs > 0) {
        let ns = p.time.as_nanos() as f64;
        total += ns;
        println!(
            "  {:<16} {:>10} runs {:>7.0} ns/run {:>7.0} ns/request",
            p.name,
            p.runs,
            ns / p.runs as f64,
            ns / requests
        );
    }
    // Without the agent, the 2 cores spend 1 / none_rps × cores seconds per request.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per_request_ns = 1e9 * cores / none_rps.max(1.0);
    println!(
        "  all programs            {:>7.0} ns per request = {:.1} % of the {:.0} ns of CPU a request takes without the agent",
        total / requests,
        100.0 * total / requests / per_request_ns,
        per_request_ns
    );
}
