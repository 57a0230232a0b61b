//! surge-bench-cold: what scale-from-zero costs a client, side by side in one run. Needs root
//! (the agent loads eBPF), wrk and haproxy.
//!
//! Cold: for each size (1, 100, 1,000 by default) and round, a burst of that many HTTP/1.1
//! clients (one request each) connects at once to a service at zero. The agent holds them, the
//! scaler starts a replica (surge-sample, which starts listening `--startup-delay` plus a spread
//! of 0-99 ms after it is started, so readiness falls anywhere between two readiness probes, and
//! writes down that instant), and every client is answered once it is ready. Printed
//! per size, medians over the rounds:
//! - ready→answer: from the replica beginning to listen to each client's answer — the latency a
//!   held request adds over the replica's own readiness (goal: p99 ≤ 10 ms, 0 failures at 1,000);
//! - its two parts: how long the scaler's readiness probe took to see the replica listening, and
//!   from that probe to the answer (the scaler tells the agents, the holders connect and relay);
//! - the same burst sent straight to the now warm replica (what the burst costs with nothing cold).
//!
//! With `--grpc` the clients are gRPC channels (h2c), one unary call each, to the sample's Echo
//! service; the warm part (wrk speaks HTTP/1) is left out.
//!
//! Warm: wrk against the service address once it is active (the kernel's connect hook sends each
//! connection straight to the replica), straight to the replica's own address, and through
//! haproxy, interleaved for several rounds, with their ratios.
//!
//! ```sh
//! cargo build --release && sudo target/release/surge-bench-cold
//! ```

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context};
use clap::Parser;
use surge_tests::{
    harness::{bin, free_port, require_root, scratch, wait_listening, Agent, Proc, Scaler},
    wrk::{haproxy_config, median, run_wrk, WrkResult, WrkSpec},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Clone)]
struct Args {
    /// Concurrent cold clients, comma-separated: one cold start per size and round.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    clients: Vec<usize>,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// How long a replica takes to listen after it is started.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    startup_delay: Duration,
    /// Length of each warm wrk run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    #[arg(long, default_value = "/usr/bin/wrk")]
    wrk: PathBuf,
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// Cold clients are gRPC channels, one unary call each (the warm wrk part is left out).
    #[arg(long)]
    grpc: bool,
}

const MAX_CLIENTS: usize = 10_000;
const BODY: &[u8] = b"hello from surge-sample\n";

const POLICY: &str = "policy:
  name: cold
  algorithm: hpa
  minReplicaCount: 0
  maxReplicaCount: 1
  pollingInterval: 1
  cooldownPeriod: 3600
  triggers:
    - {metric: rps, metricType: AverageValue, threshold: 1000000}
";

/// One service at zero, started by one burst.
struct Cold {
    name: String,
    address: SocketAddr,
    clients: usize,
    /// How long its replica takes to listen.
    startup: Duration,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Raises this process's open-file limit (inherited by the agent, the scaler and the
/// replicas): a burst of N clients takes N descriptors here and 2N in the agent.
fn raise_open_files() -> anyhow::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        l.rlim_cur = l.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(l.rlim_cur)
}

fn configure(dir: &Path, services: &[Cold], grpc: bool) -> anyhow::Result<Vec<String>> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("cold.yaml"), POLICY)?;
    let sample = bin("surge-sample").display().to_string();
    let mut yaml = String::from("services:\n");
    for s in services {
        write!(
            yaml,
            "  - name: {name}
    actuator: local
    policy: cold
    replicas: 0
    local:
      command: [{sample:?}, \"--listen\", \"{{addr}}\", \"--startup-delay\", \"{delay}ms\", \"--ready-file\", {ready:?}{grpc}]
      service_address: \"{address}\"
      readiness: {{tcp: true}}
      drain_timeout: 2s
      grace_period: 1s
",
            name = s.name,
            delay = s.startup.as_millis(),
            ready = dir.join("{replica}.ready").display().to_string(),
            address = s.address,
            grpc = if grpc { ", \"--grpc\"" } else { "" },
        )?;
    }
    let config = dir.join("surge.yaml");
    std::fs::write(&config, yaml)?;
    Ok(vec![
        "--config".into(),
        config.display().to_string(),
        "--policy-dir".into(),
        policies.display().to_string(),
        "--tick".into(),
        "200ms".into(),
    ])
}

/// One client: connect, one request, its whole answer. Returns (start, answered) in Unix
/// nanoseconds.
async fn client(addr: SocketAddr, grpc: bool) -> Result<(i128, i128), String> {
    if grpc {
        grpc_client(addr).await
    } else {
        http_client(addr).await
    }
}

/// A gRPC channel (h2c) and one unary Echo call on it.
async fn grpc_client(addr: SocketAddr) -> Result<(i128, i128), String> {
    use surge_tests::echo::{echo_client::EchoClient, EchoRequest};
    let start = now_ns();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("endpoint: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let reply = EchoClient::new(channel)
        .echo(EchoRequest {
            id: 7,
            payload: BODY.to_vec(),
        })
        .await
        .map_err(|status| format!("call: {status}"))?
        .into_inner();
    let done = now_ns();
    if reply.id != 7 || reply.payload != BODY {
        return Err(format!("answer {reply:?}"));
    }
    Ok((start, done))
}

/// An HTTP/1.1 request with `Connection: close`, and the whole answer.
async fn http_client(addr: SocketAddr) -> Result<(i128, i128), String> {
    let start = now_ns();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::with_capacity(256);
    s.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let done = now_ns();
    if !answer.starts_with(b"HTTP/1.1 200 ") || !answer.ends_with(BODY) {
        return Err(format!("answer {:?}", String::from_utf8_lossy(&answer)));
    }
    Ok((start, done))
}

/// `n` clients at once; the timings of those answered and the errors of the others.
async fn burst(addr: SocketAddr, n: usize, grpc: bool) -> (Vec<(i128, i128)>, Vec<String>) {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(client(addr, grpc))).collect();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(timing)) => ok.push(timing),
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(format!("client task: {e}")),
        }
    }
    (ok, failed)
}

/// The q-quantile (nearest rank) of `v`, in milliseconds from nanoseconds.
fn quantile_ms(v: &[i128], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1] as f64 / 1e6
}

/// Unix nanoseconds of an RFC 3339 UTC timestamp as tracing writes it
/// (`2026-01-02T03:04:05.678901Z`).
fn parse_utc(ts: &str) -> Option<i128> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + min) * 60 + s) as i128 * 1_000_000_000 + nanos as i128)
}

/// When the scaler's probe found the service's replica ready, from its log.
fn probed_ready_at(scaler_log: &Path, service: &str) -> Option<i128> {
    let text = std::fs::read_to_string(scaler_log).ok()?;
    let needle = format!("replica ready service={service} ");
    text.lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| parse_utc(l.split_whitespace().next()?))
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

/// The replica's address and the instant it began to listen, from its ready file.
fn replica_ready(dir: &Path, service: &str) -> anyhow::Result<(SocketAddr, i128)> {
    let path = dir.join(format!("{service}-0.ready"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut f = text.split_whitespace();
    let addr = f.next().context("address in ready file")?.parse()?;
    let at = f.next().context("instant in ready file")?.parse()?;
    Ok((addr, at))
}

#[derive(Debug, Clone, Copy)]
struct ColdRun {
    held: u64,
    failures: usize,
    ready_p50: f64,
    ready_p99: f64,
    probe_lag: f64,
    probed_p50: f64,
    probed_p99: f64,
    direct_p50: f64,
    direct_p99: f64,
}

fn cold_run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    scaler: &Scaler,
    s: &Cold,
    grpc: bool,
) -> anyhow::Result<(ColdRun, SocketAddr)> {
    let (answered, failed) = rt.block_on(burst(s.address, s.clients, grpc));
    if let Some(e) = failed.first() {
        eprintln!(
            "  {}: {} of {} clients failed, first: {e}",
            s.name,
            failed.len(),
            s.clients
        );
    }
    let (replica, ready_at) = replica_ready(dir, &s.name)?;
    let probed_at =
        probed_ready_at(&scaler.proc.log, &s.name).context("the scaler's 'replica ready' line")?;
    let v = scaler.wait_for(&s.name, "no connection held", |v| v["held_connections"] == 0);
    let held = v["held_total"].as_u64().unwrap_or(0);
    let since = |from: i128| -> Vec<i128> { answered.iter().map(|(_, done)| done - from).collect() };
    let (after_ready, after_probe) = (since(ready_at), since(probed_at));
    // The same burst again, straight to the warm replica.
    let (direct, direct_failed) = rt.block_on(burst(replica, s.clients, grpc));
    if let Some(e) = direct_failed.first() {
        eprintln!("  {} direct: {} failed, first: {e}", s.name, direct_failed.len());
    }
    let direct: Vec<i128> = direct.iter().map(|(start, done)| done - start).collect();
    Ok((
        ColdRun {
            held,
            failures: failed.len(),
            ready_p50: quantile_ms(&after_ready, 0.5),
            ready_p99: quantile_ms(&after_ready, 0.99),
            probe_lag: (probed_at - ready_at) as f64 / 1e6,
            probed_p50: quantile_ms(&after_probe, 0.5),
            probed_p99: quantile_ms(&after_probe, 0.99),
            direct_p50: quantile_ms(&direct, 0.5),
            direct_p99: quantile_ms(&direct, 0.99),
        },
        replica,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    require_root();
    if args.clients.is_empty() || args.clients.iter().any(|&n| n == 0 || n > MAX_CLIENTS) {
        bail!(
            "--clients {:?}: each must be between 1 and {MAX_CLIENTS}",
            args.clients
        );
    }
    if args.rounds == 0 {
        bail!("--rounds 0: must be at least 1");
    }
    for (p, what) in [(&args.wrk, "wrk"), (&args.haproxy, "haproxy")] {
        if !p.exists() && !args.grpc {
            bail!(
                "{what} is missing at {}: run deploy/setup.sh (it installs wrk and haproxy)",
                p.display()
            );
        }
    }
    let nofile = raise_open_files()?;
    let need = 3 * args.clients.iter().max().copied().unwrap_or(1) as u64 + 256;
    if nofile < need {
        bail!("the open-file limit is {nofile}, {need} are needed: raise the hard limit (ulimit -Hn)");
    }
    let dir = scratch("bench-cold");
    let mut services = Vec::new();
    for round in 1..=args.rounds {
        for (j, &n) in args.clients.iter().enumerate() {
            // Readiness lands at a different point between two probes every time: each size's
            // rounds spread the replica's listening instant evenly over 0-99 ms.
            let spread = Duration::from_millis(
                (u64::from(round - 1) * 100 / u64::from(args.rounds) + j as u64 * 37) % 100,
            );
            services.push(Cold {
                name: format!("cold-{n}-{round}"),
                address: format!("127.0.0.1:{}", free_port()).parse()?,
                clients: n,
                startup: args.startup_delay + spread,
            });
        }
    }
    let scaler = Scaler::start(&dir, free_port(), &configure(&dir, &services, args.grpc)?);
    let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    for s in &services {
        scaler.wait_for(&s.name, "reported at zero", |v| {
            v["reported"] == true && v["replicas"]["current"] == 0
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "surge-bench-cold: bursts of {:?} cold {} against a service at zero whose \
         replica listens {} (+0-99 ms) after it starts; {} rounds, medians",
        args.clients,
        if args.grpc {
            "gRPC channels (h2c, one unary call each)"
        } else {
            "HTTP/1.1 clients (one request each)"
        },
        humantime::format_duration(args.startup_delay),
        args.rounds
    );
    let mut runs: Vec<(usize, ColdRun)> = Vec::new();
    let mut warm_target = None;
    for s in &services {
        let (r, replica) = cold_run(&rt, &dir, &scaler, s, args.grpc)?;
        println!(
            "  {:>5} clients ({}): held {:>5}, failed {} | ready→answer p50 {:>7.2} p99 {:>7.2} ms | probe lag {:>6.2} ms, \
             probe→answer p50 {:>7.2} p99 {:>7.2} ms | warm burst direct p50 {:>7.2} p99 {:>7.2} ms",
            s.clients, s.name, r.held, r.failures, r.ready_p50, r.ready_p99, r.probe_lag, r.probed_p50, r.probed_p99,
            r.direct_p50, r.direct_p99
        );
        warm_target.get_or_insert((s.name.clone(), s.address, replica));
        runs.push((s.clients, r));
    }

    println!();
    println!(
        "cold clients  failures  held   ready→answer ms      probe lag ms  probe→answer ms      warm burst direct ms  \
         p99 over direct ms"
    );
    println!(
        "                                p50      p99                       p50      p99         p50      p99     \
         ready→  probe→"
    );
    for &n in &args.clients {
        let of: Vec<&ColdRun> = runs.iter().filter(|(c, _)| *c == n).map(|(_, r)| r).collect();
        let m = |f: fn(&ColdRun) -> f64| median(of.iter().map(|r| f(r)).collect());
        let failures: usize = of.iter().map(|r| r.failures).sum();
        let held_all = of.iter().all(|r| r.held == n as u64);
        println!(
            "  {n:>10}  {failures:>8}  {:>4}  {:>7.2}  {:>7.2}      {:>8.2}  {:>7.2}  {:>7.2}     {:>7.2}  {:>7.2}  \
             {:>+7.2} {:>+7.2}",
            if held_all { "all" } else { "NOT all" },
            m(|r| r.ready_p50),
            m(|r| r.ready_p99),
            m(|r| r.probe_lag),
            m(|r| r.probed_p50),
            m(|r| r.probed_p99),
            m(|r| r.direct_p50),
            m(|r| r.direct_p99),
            m(|r| r.ready_p99) - m(|r| r.direct_p99),
            m(|r| r.probed_p99) - m(|r| r.direct_p99),
        );
    }
    println!(
        "  goal: ready→answer p99 ≤ 10 ms and 0 failures at 1000 clients. A starting replica is probed every \
         2 ms until it listens: the probe lag is the scaler's, probe→answer is the path through the agent"
    );
    if let Some(pid) = agent.proc.pid() {
        println!(
            "  agent peak RSS {:.1} MiB (with up to {} connections held at once)",
            peak_rss(pid) as f64 / (1 << 20) as f64,
            args.clients.iter().max().copied().unwrap_or(0)
        );
    }

    let Some((name, address, replica)) = warm_target else {
        bail!("no service was activated");
    };
    if args.grpc {
        return Ok(());
    }
    warm(&args, &dir, &scaler, &name, address, replica)
}

/// Warm throughput: the service address (connect hook, no proxy) vs the replica directly vs
/// haproxy in front of the replica.
fn warm(
    args: &Args,
    dir: &Path,
    scaler: &Scaler,
    name: &str,
    address: SocketAddr,
    replica: SocketAddr,
) -> anyhow::Result<()> {
    let proxy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(proxy_addr, replica))?;
    let mut proxy = Proc::spawn(
        "haproxy",
        &args.haproxy,
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        dir,
    );
    wait_listening(proxy_addr, &mut proxy);
    let spec = WrkSpec {
        wrk: &args.wrk,
        threads: args.threads,
        connections: args.connections,
        duration: args.duration,
        path: "/",
    };
    let held_before = scaler.service(name)["held_total"].as_u64();
    let warmup = WrkSpec {
        duration: Duration::from_secs(1),
        ..spec.clone()
    };
    for a in [address, replica, proxy_addr] {
        run_wrk(&warmup, a)?;
    }
    let (mut svc, mut direct, mut proxied) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds as usize {
        // The order turns every round, so a drift of the shared machine favours no setup.
        let (mut s, mut d, mut p) = (None, None, None);
        for k in 0..3 {
            match (k + round) % 3 {
                0 => s = Some(run_wrk(&spec, address)?),
                1 => d = Some(run_wrk(&spec, replica)?),
                _ => p = Some(run_wrk(&spec, proxy_addr)?),
            }
        }
        let (Some(s), Some(d), Some(p)) = (s, d, p) else {
            bail!("a setup did not run");
        };
        svc.push(s);
        direct.push(d);
        proxied.push(p);
    }
    scaler.wait_reports(2);
    let held_after = scaler.service(name)["held_total"].as_u64();
    let m = |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(v.iter().map(f).collect());
    let paired = |other: &[WrkResult]| median(svc.iter().zip(other).map(|(a, o)| a.rps / o.rps).collect());
    println!();
    println!(
        "warm, after activation: wrk -t{} -c{} -d{}s, median of {} rounds   throughput        p99",
        args.threads,
        args.connections,
        args.duration.as_secs(),
        args.rounds
    );
    println!(
        "  service address (connect hook → replica)  {:>10.0} req/s {:>7.2} ms",
        m(&svc, |r| r.rps),
        m(&svc, |r| r.p99_ms)
    );
    println!(
        "  the replica's own address                 {:>10.0} req/s {:>7.2} ms",
        m(&direct, |r| r.rps),
        m(&direct, |r| r.p99_ms)
    );
    println!(
        "  through haproxy                           {:>10.0} req/s {:>7.2} ms",
        m(&proxied, |r| r.rps),
        m(&proxied, |r| r.p99_ms)
    );
    println!(
        "  service / direct  {:.3} (goal: 1; median of per-round ratios)   service / haproxy  {:.2}",
        paired(&direct),
        paired(&proxied)
    );
    println!(
        "  warm connections held by the agent during wrk: {}",
        match (held_before, held_after) {
            (Some(a), Some(b)) if a == b => "none".to_string(),
            (a, b) => format!("{a:?} → {b:?} (NOT direct)"),
        }
    );
    drop(proxy);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_are_read_as_unix_nanoseconds() {
        assert_eq!(parse_utc("1970-01-01T00:00:00.000001Z"), Some(1_000));
        // date -u -d 2026-11-22T19:04:38Z +%s → 1795374278
        assert_eq!(
            parse_utc("2026-11-22T19:04:38.658280Z"),
            Some(1_795_374_278_658_280_000)
        );
        assert_eq!(parse_utc("2024-02-29T12:00:00Z"), Some(1_709_208_000_000_000_000));
        assert_eq!(parse_utc("not a time"), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<i128> = (1..=100).map(|ms| ms * 1_000_000).collect();
        assert_eq!(quantile_ms(&v, 0.5), 50.0);
        assert_eq!(quantile_ms(&v, 0.99), 99.0);
        assert_eq!(quantile_ms(&v[..1], 0.99), 1.0);
    }
}
