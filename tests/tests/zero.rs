//! Scale from zero: connections to a service with no ready replica are held by the agent (the
//! kernel's connect hook sends them to its holder), the demand activates the service at once,
//! and every held client gets its answer when the replica is ready. Needs root (eBPF).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use surge_tests::{
    harness::{bin, free_port, require_root, scratch, Agent, Scaler},
    http_client::Connection,
};

const POLICY: &str = "policy:
  name: zero
  algorithm: hpa
  minReplicaCount: 0
  maxReplicaCount: 2
  pollingInterval: 1
  cooldownPeriod: 300
  triggers:
    - {metric: rps, metricType: AverageValue, threshold: 100000}
";

fn configure(dir: &Path, address: SocketAddr, startup: &str) -> Vec<String> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(policies.join("zero.yaml"), POLICY).expect("policy");
    let config = dir.join("surge.yaml");
    std::fs::write(
        &config,
        format!(
            "services:
  - name: cold
    actuator: local
    policy: zero
    replicas: 0
    local:
      command: [{sample:?}, \"--listen\", \"{{addr}}\", \"--startup-delay\", \"{startup}\"]
      service_address: \"{address}\"
      readiness: {{tcp: true}}
      drain_timeout: 2s
      grace_period: 1s
",
            sample = bin("surge-sample").display().to_string()
        ),
    )
    .expect("config");
    vec![
        "--config".into(),
        config.display().to_string(),
        "--policy-dir".into(),
        policies.display().to_string(),
        "--tick".into(),
        "200ms".into(),
    ]
}

#[test]
fn two_hundred_cold_clients_all_get_their_answer_and_warm_traffic_goes_direct() {
    require_root();
    let dir = scratch("zero");
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let scaler = Scaler::start(&dir, free_port(), &configure(&dir, address, "2s"));
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("cold", "the agent's first report at zero", |v| {
        v["reported"] == true && v["replicas"]["current"] == 0
    });

    // 200 clients at once: half send two requests over one connection, half one request each.
    let started = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || -> Result<Vec<u16>, String> {
                let mut c = Connection::open(address).map_err(|e| e.to_string())?;
                let rounds = if i % 2 == 0 { 2 } else { 1 };
                (0..rounds)
                    .map(|r| {
                        c.request("GET", "/", &[], r == rounds - 1 && i % 2 == 1)
                            .map(|resp| resp.status)
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(
            c.join()
                .expect("client thread")
                .expect("every held client is answered"),
        );
    }
    assert_eq!(statuses.len(), 300);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The replica needed 2 s to listen: the clients really waited for it.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let v = scaler.service("cold");
    assert!(v["held_total"].as_u64() >= Some(200), "{v}");
    assert_eq!(v["hold_timeouts"], 0, "{v}");

    // Warm now: a new connection goes straight to the replica, which sees the client itself.
    scaler.wait_for("cold", "the held connections are gone", |v| {
        v["held_connections"] == 0
    });
    let mut c = Connection::open(address).expect("connect");
    let me = c.local_addr().expect("local addr");
    let reply = c.request("GET", "/whoami", &[], true).expect("whoami");
    assert_eq!(reply.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&reply.body).trim(),
        me.to_string(),
        "the replica sees the client itself"
    );
    let held_before = scaler.service("cold")["held_total"].as_u64();
    let mut c = Connection::open(address).expect("connect");
    let _ = c.request("GET", "/", &[], true).expect("warm request");
    scaler.wait_reports(3);
    assert_eq!(
        scaler.service("cold")["held_total"].as_u64(),
        held_before,
        "a warm connection is not held"
    );
}

#[test]
fn a_client_held_past_the_timeout_gets_503_with_retry_after_and_the_next_one_succeeds() {
    require_root();
    let dir = scratch("zero-timeout");
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let scaler = Scaler::start(&dir, free_port(), &configure(&dir, address, "6s"));
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &["--hold-timeout".into(), "2s".into()]);
    scaler.wait_for("cold", "the agent's first report at zero", |v| {
        v["reported"] == true && v["replicas"]["current"] == 0
    });

    let mut c = Connection::open(address).expect("connect");
    let reply = c.request("GET", "/", &[], false).expect("an answer, not a reset");
    assert_eq!(reply.status, 503);
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        "no replica became ready in time\n"
    );
    let v = scaler.wait_for("cold", "the timeout counted", |v| v["hold_timeouts"] == 1);
    assert!(
        v["replicas"]["desired"].as_u64() >= Some(1),
        "the demand activated the service: {v}"
    );

    scaler.wait_for("cold", "the replica ready", |v| v["replicas"]["ready"] == 1);
    let mut c = Connection::open(address).expect("connect");
    assert_eq!(c.request("GET", "/", &[], true).expect("answer").status, 200);
}
