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
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Parser;
use surge_tests::harness::{
    bin, cleanup_pins, free_port, require_root, scratch, wait_listening, Agent, Proc, Sample, Scaler,
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

#[derive(Debug, Clone, Copy, Default)]
struct WrkResult {
    rps: f64,
    p99_ms: f64,
    requests: u64,
}

fn run_wrk(args: &Args, addr: SocketAddr) -> anyhow::Result<WrkResult> {
    let out = Command::new(&args.wrk)
        .args([
            format!("-t{}", args.threads),
            format!("-c{}", args.connections),
            format!("-d{}s", args.duration.as_secs().max(1)),
            "--latency".into(),
            format!("http://{addr}{}", args.path),
        ])
        .output()
        .with_context(|| format!("running {}", args.wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut r = WrkResult::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse()?,
            ["99%", v] => r.p99_ms = millis(v)?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            _ => {}
        }
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors: {text}");
    }
    if r.rps == 0.0 {
        bail!("no throughput in wrk's output: {text}");
    }
    Ok(r)
}

/// wrk's latency figures: `812.00us`, `1.21ms`, `2.00s`.
fn millis(v: &str) -> anyhow::Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("latency {v:?}")
    };
    Ok(num.parse::<f64>()? * scale)
}

fn haproxy_config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  \
         timeout client 60s\n  timeout server 60s\n\nfrontend bench\n  bind {listen}\n  default_backend sample\n\n\
         backend sample\n  server s1 {backend}\n"
    )
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

struct AgentRun {
    wrk: WrkResult,
    cpu_seconds: f64,
    peak_rss: u64,
    counted: u64,
}

fn with_agent(args: &Args, dir: &Path, scaler: &Scaler, web: SocketAddr) -> anyhow::Result<AgentRun> {
    let before = scaler.service("web")["requests_total"].as_u64().unwrap_or(0);
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
    let cpu0 = cpu_seconds(pid);
    let wrk = run_wrk(args, web)?;
    let cpu1 = cpu_seconds(pid);
    let peak = peak_rss(pid);
    // Let the last report in, then count what the agent saw of wrk's requests.
    scaler.wait_reports(2);
    let after = scaler.service("web")["requests_total"].as_u64().unwrap_or(0);
    drop(agent);
    cleanup_pins(&pin_dir);
    Ok(AgentRun {
        wrk,
        cpu_seconds: cpu1 - cpu0,
        peak_rss: peak,
        counted: after.saturating_sub(before),
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
                1 => a = Some(with_agent(&args, &dir, &scaler, web.addr)?),
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
    let rss = agent.iter().map(|a| a.peak_rss).max().unwrap_or(0);
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
        "  agent's own cost       {cpu:.3} CPU s per {}s run ({:.2} % of a core), peak RSS {:.1} MiB \
         (its kernel programs run in the server's and wrk's context: their cost is in agent / none)",
        args.duration.as_secs(),
        100.0 * cpu / args.duration.as_secs_f64(),
        rss as f64 / (1 << 20) as f64
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
    drop(proxy);
    Ok(())
}
