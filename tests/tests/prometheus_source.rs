//! Prometheus as a metric source, end to end: a real Prometheus (Debian's package, on loopback)
//! scrapes a test exporter whose gauges the test sets; the scaler's policy has a PromQL trigger
//! on them and scales a simulated service. Stopping Prometheus drives the policy into fallback;
//! bad queries and unreachable servers are errors on the service, not crashes. A TLS Prometheus
//! is reached through a custom CA certificate. No root needed.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use surge_tests::{
    harness::{bin, free_port, scratch, wait_listening, Proc, Scaler},
    http_client::get_text,
    prometheus,
};

/// A `/metrics` endpoint with one gauge the test sets and a gauge with two series.
struct Exporter {
    value: Arc<AtomicU64>,
    addr: SocketAddr,
}

impl Exporter {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let value = Arc::new(AtomicU64::new(0f64.to_bits()));
        let v = Arc::clone(&value);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let v = Arc::clone(&v);
                std::thread::spawn(move || serve(stream, &v));
            }
        });
        Self { value, addr }
    }

    fn set(&self, v: f64) {
        self.value.store(v.to_bits(), Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, value: &AtomicU64) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        // One request per loop; headers end at an empty line.
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => return,
                Ok(_) if h.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let v = f64::from_bits(value.load(Ordering::SeqCst));
        let body = format!(
            "# TYPE surge_test_queue_depth gauge\nsurge_test_queue_depth {v}\n\
             # TYPE surge_test_split gauge\nsurge_test_split{{part=\"a\"}} 1\nsurge_test_split{{part=\"b\"}} 2\n"
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if reader.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A real Prometheus scraping `target` every second, at `addr`; with `tls` (cert, key) it
/// serves HTTPS.
fn start_prometheus(dir: &Path, addr: SocketAddr, target: SocketAddr, tls: Option<(&Path, &Path)>) -> Proc {
    prometheus::start(dir, addr, "exporter", target, tls)
}

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("address")
}

/// A KEDA ScaledObject-style policy with one Prometheus trigger and fast settings.
fn write_policy(dir: &Path, name: &str, metadata: &str) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join(format!("{name}.yaml")),
        format!(
            "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: {name}\nspec:\n\
             \x20 pollingInterval: 1\n  cooldownPeriod: 1\n  minReplicaCount: 1\n  maxReplicaCount: 10\n\
             \x20 fallback:\n    failureThreshold: 3\n    replicas: 6\n\
             \x20 advanced:\n    horizontalPodAutoscalerConfig:\n      behavior:\n        scaleDown:\n          stabilizationWindowSeconds: 0\n\
             \x20       scaleUp:\n          policies: [{{type: Pods, value: 100, periodSeconds: 1}}]\n\
             \x20 triggers:\n    - type: prometheus\n      name: queue_depth\n      metadata:\n        threshold: \"10\"\n{metadata}"
        ),
    )
    .expect("policy file");
}

/// A scaler with simulated services (each `(service, policy)`), started with `env` set.
fn start_scaler(dir: &Path, services: &[(&str, &str)], env: &[(&str, String)]) -> Scaler {
    let mut config = String::from("services:\n");
    for (service, policy) in services {
        config.push_str(&format!(
            "  - name: {service}\n    endpoints: [\"127.0.0.1:{}\"]\n    actuator: simulated\n    startup: 0s\n    replicas: 1\n    policy: {policy}\n",
            free_port()
        ));
    }
    let config_file = dir.join("surge.yaml");
    std::fs::write(&config_file, config).expect("surge.yaml");
    let http = loopback();
    let grpc = loopback();
    // `env` sets the variables for the scaler alone; the test process's environment is untouched.
    let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.push(bin("surge-scaler").display().to_string());
    args.extend([
        "--http-listen".into(),
        http.to_string(),
        "--grpc-listen".into(),
        grpc.to_string(),
        "--config".into(),
        config_file.display().to_string(),
        "--policy-dir".into(),
        dir.join("policies").display().to_string(),
        "--tick".into(),
        "200ms".into(),
    ]);
    let mut proc = Proc::spawn(
        &format!("scaler-{}", http.port()),
        Path::new("/usr/bin/env"),
        &args,
        dir,
    );
    wait_listening(http, &mut proc);
    wait_listening(grpc, &mut proc);
    Scaler { proc, http, grpc }
}

/// Waits (up to `secs`) until `pred` holds for the service.
fn wait(scaler: &Scaler, service: &str, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = scaler.service(service);
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {service}: {what}; last: {v}\n{}",
            scaler.proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn desired(v: &Value) -> Option<u64> {
    v["replicas"]["desired"].as_u64()
}

fn mode(v: &Value) -> &str {
    v["last_decision"]["mode"].as_str().unwrap_or("")
}

#[test]
fn promql_trigger_scales_up_and_down_and_falls_back_while_prometheus_is_away() {
    let dir = scratch("prom-scale");
    let exporter = Exporter::start();
    let prom_addr = loopback();
    let mut prometheus = start_prometheus(&dir, prom_addr, exporter.addr, None);
    write_policy(
        &dir,
        "queue",
        &format!("        serverAddress: http://{prom_addr}\n        query: sum(surge_test_queue_depth)\n"),
    );
    let scaler = start_scaler(&dir, &[("worker", "queue")], &[]);

    // 0 → the policy's minimum, 1 replica.
    wait(&scaler, "worker", "a decision on the query", 60, |v| {
        desired(v) == Some(1) && mode(v) == "stable" && v["source_errors"] == serde_json::json!([])
    });
    // 45 with a threshold of 10 per replica → 5 replicas.
    exporter.set(45.0);
    let v = wait(&scaler, "worker", "scale up to 5", 30, |v| desired(v) == Some(5));
    let input = &v["last_decision"]["inputs"][0];
    assert_eq!(input["metric"], "external:queue_depth", "{v}");
    assert_eq!(input["value"], 45.0, "{v}");
    // 15 → 2 replicas.
    exporter.set(15.0);
    wait(&scaler, "worker", "scale down to 2", 30, |v| {
        desired(v) == Some(2)
    });

    // Prometheus goes away: after failureThreshold (3) failed polls, fallback.replicas (6).
    prometheus.stop_with(libc::SIGTERM);
    let v = wait(&scaler, "worker", "fallback", 30, |v| {
        mode(v) == "fallback" && desired(v) == Some(6)
    });
    assert_eq!(
        v["source_errors"][0],
        format!("triggers[0] (external:queue_depth): cannot reach http://{prom_addr}: connection refused"),
        "{v}"
    );
    assert!(alive(&scaler), "the scaler keeps running");

    // It comes back (same port, same data): out of fallback, back to what the value asks.
    let _prometheus = start_prometheus(&dir, prom_addr, exporter.addr, None);
    let v = wait(&scaler, "worker", "back from fallback", 60, |v| {
        mode(v) == "stable" && desired(v) == Some(2)
    });
    assert_eq!(v["source_errors"], serde_json::json!([]), "{v}");
}

#[test]
fn bad_queries_and_unreachable_servers_are_errors_on_the_service() {
    let dir = scratch("prom-bad");
    let exporter = Exporter::start();
    let prom_addr = loopback();
    let _prometheus = start_prometheus(&dir, prom_addr, exporter.addr, None);
    let server = format!("        serverAddress: http://{prom_addr}\n");
    write_policy(
        &dir,
        "invalid",
        &format!("{server}        query: sum(surge_test_queue_depth\n"),
    );
    write_policy(
        &dir,
        "split",
        &format!("{server}        query: surge_test_split\n"),
    );
    let dead = free_port();
    write_policy(
        &dir,
        "dead",
        &format!("        serverAddress: http://127.0.0.1:{dead}\n        query: up\n"),
    );
    write_policy(&dir, "nowhere", "        query: up\n");
    let scaler = start_scaler(
        &dir,
        &[
            ("invalid", "invalid"),
            ("split", "split"),
            ("dead", "dead"),
            ("nowhere", "nowhere"),
        ],
        &[],
    );
    let error_of = |service: &str| {
        let v = wait(&scaler, service, "a source error", 60, |v| {
            v["source_errors"][0].is_string()
        });
        v["source_errors"][0].as_str().unwrap_or_default().to_string()
    };
    // Prometheus's own words, after the trigger and the query.
    assert_eq!(
        error_of("invalid"),
        "triggers[0] (external:queue_depth): query \"sum(surge_test_queue_depth\" failed: HTTP 400: \
         bad_data: invalid parameter \"query\": 1:27: parse error: unclosed left parenthesis"
    );
    // Several series: the count is named (once Prometheus has scraped them).
    let v = wait(&scaler, "split", "two series", 60, |v| {
        v["source_errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("2 series"))
    });
    assert_eq!(
        v["source_errors"][0],
        "triggers[0] (external:queue_depth): query \"surge_test_split\" returned 2 series; it must return one (aggregate it, e.g. sum(...))"
    );
    assert_eq!(
        error_of("dead"),
        format!(
            "triggers[0] (external:queue_depth): cannot reach http://127.0.0.1:{dead}: connection refused"
        )
    );
    assert_eq!(
        error_of("nowhere"),
        "triggers[0] (external:queue_depth): no Prometheus server: set metadata.serverAddress on the trigger or PROMETHEUS_ENDPOINT"
    );
    // Failing queries count toward the fallback; a trigger that cannot run holds the count.
    wait(&scaler, "invalid", "fallback", 30, |v| {
        mode(v) == "fallback" && desired(v) == Some(6)
    });
    wait(&scaler, "dead", "fallback", 30, |v| {
        mode(v) == "fallback" && desired(v) == Some(6)
    });
    let v = scaler.service("nowhere");
    assert_ne!(mode(&v), "fallback", "{v}");
    assert!(alive(&scaler), "the scaler keeps running");
}

/// openssl, run to completion in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Surge test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("san.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

#[test]
fn tls_prometheus_through_a_custom_ca() {
    let dir = scratch("prom-tls");
    let (ca, cert, key) = make_certificates(&dir);
    let exporter = Exporter::start();
    exporter.set(35.0);
    let prom_addr = loopback();
    let _prometheus = start_prometheus(&dir, prom_addr, exporter.addr, Some((&cert, &key)));
    write_policy(&dir, "queue", "        query: sum(surge_test_queue_depth)\n");
    // PROMETHEUS_ENDPOINT is the server; the CA comes from PROMETHEUS_CA_FILE.
    let endpoint = format!("https://{prom_addr}");
    let trusted = start_scaler(
        &dir,
        &[("worker", "queue")],
        &[
            ("PROMETHEUS_ENDPOINT", endpoint.clone()),
            ("PROMETHEUS_CA_FILE", ca.display().to_string()),
        ],
    );
    wait(&trusted, "worker", "35 / 10 → 4 replicas over TLS", 60, |v| {
        desired(v) == Some(4)
    });
    // Without the CA, the server's certificate is refused, with the reason.
    let untrusted = start_scaler(
        &dir,
        &[("worker", "queue")],
        &[("PROMETHEUS_ENDPOINT", endpoint.clone())],
    );
    let v = wait(&untrusted, "worker", "a certificate error", 30, |v| {
        v["source_errors"][0].is_string()
    });
    assert_eq!(
        v["source_errors"][0],
        format!("triggers[0] (external:queue_depth): cannot reach {endpoint}: invalid peer certificate: UnknownIssuer"),
        "{v}"
    );
    // A CA file that is not a certificate stops the scaler at start with the variable named.
    std::fs::write(dir.join("bad.pem"), "not a certificate\n").expect("bad.pem");
    let (code, _, stderr) = surge_tests::harness::run_to_end(
        Path::new("/usr/bin/env"),
        &[
            &format!("PROMETHEUS_CA_FILE={}", dir.join("bad.pem").display()),
            &bin("surge-scaler").display().to_string(),
            "--http-listen",
            &loopback().to_string(),
            "--grpc-listen",
            &loopback().to_string(),
            "--policy-dir",
            &dir.join("policies").display().to_string(),
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "PROMETHEUS_CA_FILE = {}: holds no PEM certificate",
            dir.join("bad.pem").display()
        )),
        "{stderr}"
    );
}

/// The scaler still answers (polling its process needs `&mut`; answering is the proof).
fn alive(scaler: &Scaler) -> bool {
    get_text(scaler.http, "/healthz").is_ok_and(|(s, _)| s == 200)
}
