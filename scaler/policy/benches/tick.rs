//! Tick benchmark: one full tick (record 5 metrics + decide) for 10,000 services, against the 100 ms goal.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use surge_policy::{parse_policy, Defaults, Engine, Metric, Replicas, Sample, Timestamp};

const SERVICES: usize = 10_000;
const GOAL: Duration = Duration::from_millis(100);

const KPA: &str = "policy:\n  algorithm: kpa\n  minReplicaCount: 1\n  maxReplicaCount: 100\n  knative: {stable-window: 60s}\n  triggers:\n  - {metric: rps, threshold: 100}\n  - {metric: concurrency, threshold: 20}\n  - {metric: cpu, threshold: 70}\n  - {metric: memory, threshold: 80}\n  - {metric: latency_p99, metricType: Value, threshold: 250}\n";
const HPA: &str = "policy:\n  pollingInterval: 1\n  minReplicaCount: 1\n  maxReplicaCount: 100\n  triggers:\n  - {metric: rps, threshold: 100}\n  - {metric: concurrency, threshold: 20}\n  - {metric: cpu, threshold: 70}\n  - {metric: memory, threshold: 80}\n  - {metric: latency_p99, metricType: Value, threshold: 250}\n";

fn bench(name: &str, yaml: &str, tick: Duration) -> Duration {
    let p = Arc::new(parse_policy(yaml, &Defaults::default(), name).expect("valid"));
    let metrics = [
        Metric::Rps,
        Metric::Concurrency,
        Metric::Cpu,
        Metric::Memory,
        Metric::LatencyP99,
    ];
    let mut engines: Vec<Engine> = (0..SERVICES)
        .map(|_| Engine::new(Arc::clone(&p), Timestamp::ZERO))
        .collect();
    let mut replicas = vec![3u32; SERVICES];
    let mut now = Timestamp::ZERO;
    let mut times = Vec::new();
    for round in 0..80 {
        now = now + tick;
        let start = Instant::now();
        for (i, (e, r)) in engines.iter_mut().zip(replicas.iter_mut()).enumerate() {
            let load = 100.0 + ((i * 7 + round * 13) % 500) as f64;
            for (k, m) in metrics.iter().enumerate() {
                e.record(now, m, Sample::Value(load / (k + 1) as f64));
            }
            let d = e.decide(
                now,
                Replicas {
                    current: *r,
                    ready: *r,
                },
            );
            *r = black_box(d.desired);
        }
        let el = start.elapsed();
        if round >= 60 {
            times.push(el); // windows full (60 s of 2 s ticks)
        }
    }
    times.sort();
    times[times.len() / 2]
}

fn main() {
    println!("one tick = record 5 metrics + decide, for {SERVICES} services, one core; median of 20 ticks");
    for (name, yaml, tick) in [
        ("kpa", KPA, Duration::from_secs(2)),
        ("hpa", HPA, Duration::from_secs(1)),
    ] {
        let t = bench(name, yaml, tick);
        println!(
            "{name}: {:.2} ms per tick, {:.0} decisions/s, ratio to the 100 ms goal = {:.3}",
            t.as_secs_f64() * 1e3,
            SERVICES as f64 / t.as_secs_f64(),
            t.as_secs_f64() / GOAL.as_secs_f64()
        );
    }
}
