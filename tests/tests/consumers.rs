//! Other programs consume Surge's merged metrics: a real Prometheus scrapes /metrics, a client
//! built from KEDA's external-scaler proto asks for values and activity, Subscribe streams keep
//! flowing past a stalled subscriber, and bad trigger metadata is refused with exact messages.
//! The tests that start the agent need root (eBPF).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use surge_proto::{
    externalscaler::{external_scaler_client::ExternalScalerClient, GetMetricsRequest, ScaledObjectRef},
    v1::{metrics_client::MetricsClient, MetricsUpdate, SubscribeRequest},
};
use surge_tests::{
    harness::{free_port, require_root, scratch, Agent, Proc, ReservedPort, Sample, Scaler},
    http_client::get_text,
    load::{run, LoadSpec},
    prometheus,
};
use tonic::transport::{Channel, Endpoint};

/// The agent's report interval in these tests (the harness starts it with 100ms).
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// A scaler watching `web` (the sample server) and `idle` (a port nobody uses), and an agent.
struct Rig {
    web: Sample,
    scaler: Scaler,
    _agent: Agent,
    _idle: ReservedPort,
    dir: PathBuf,
}

impl Rig {
    fn start(test: &str) -> Self {
        require_root();
        let dir = scratch(test);
        let web = Sample::start(&dir);
        let idle = ReservedPort::new();
        let scaler = Scaler::start(&dir, free_port(), &observe_flags(&web.addr.to_string(), &idle));
        let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
        scaler.wait_for("web", "first report", |v| v["reported"] == true);
        Self {
            web,
            scaler,
            _agent: agent,
            _idle: idle,
            dir,
        }
    }
}

fn observe_flags(web: &str, idle: &ReservedPort) -> Vec<String> {
    vec![
        "--observe".into(),
        format!("web={web}"),
        "--observe".into(),
        format!("idle={}", idle.addr),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn channel(scaler: &Scaler) -> Channel {
    Endpoint::from_shared(scaler.grpc_url())
        .expect("URL")
        .connect()
        .await
        .expect("connects to the scaler's gRPC port")
}

fn md(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "web".into(),
        namespace: "default".into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

fn send(spec: &LoadSpec) {
    let r = run(spec);
    assert_eq!(
        r.ok,
        spec.requests,
        "every request is answered: {:?}",
        &r.errors[..r.errors.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// A real Prometheus (Debian's package) scraping the scaler every second, on loopback.
fn start_prometheus(dir: &Path, target: SocketAddr) -> (Proc, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    (prometheus::start(dir, addr, "surge", target, None), addr)
}

/// The value of an instant PromQL query with a single result, if it has one.
fn prom_query(prom: SocketAddr, query: &str) -> Option<String> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = get_text(prom, &format!("/api/v1/query?query={encoded}")).ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    assert_eq!(status, 200, "{body}");
    let result = v["data"]["result"].as_array()?;
    result
        .first()
        .and_then(|r| r["value"][1].as_str())
        .map(str::to_string)
}

#[test]
fn prometheus_scrapes_the_exact_request_count() {
    let rig = Rig::start("prometheus");
    let (prom_proc, prom) = start_prometheus(&rig.dir, rig.scaler.http);
    let n = 1234;
    send(&LoadSpec {
        workers: 4,
        ..LoadSpec::get(rig.web.addr, n)
    });
    rig.scaler
        .wait_for("web", "every request merged", |v| v["requests_total"] == n as u64);
    let expected = n.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let queries = [
        r#"surge_service_requests_total{service="web"}"#,
        r#"surge_service_responses_total{service="web"}"#,
        r#"surge_service_request_latency_seconds_count{service="web"}"#,
        r#"surge_service_request_latency_seconds_bucket{service="web",le="+Inf"}"#,
    ];
    for q in queries {
        loop {
            let got = prom_query(prom, q);
            if got.as_deref() == Some(expected.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never showed {q} = {n}; last {got:?}\n{}",
                prom_proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The histogram is usable as Prometheus users use it.
    let p99 = prom_query(
        prom,
        r#"histogram_quantile(0.99, surge_service_request_latency_seconds_bucket{service="web"})"#,
    )
    .and_then(|s| s.parse::<f64>().ok())
    .expect("a p99");
    assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99} s");
    assert_eq!(prom_query(prom, "surge_agents_connected").as_deref(), Some("1"));
    assert_eq!(
        prom_query(prom, r#"surge_service_requests_total{service="idle"}"#).as_deref(),
        Some("0")
    );
}

// ---------------------------------------------------------------------------------------------
// KEDA external scaler

/// The API's number for a KEDA metric name, as GetMetrics should give it.
fn api_value(v: &Value, metric: &str) -> f64 {
    let f = |x: &Value| x.as_f64().unwrap_or_else(|| panic!("{metric} in {v}"));
    match metric {
        "rps" => f(&v["request_rate"]),
        "concurrency" => f(&v["concurrency"]),
        "in_flight" => f(&v["in_flight"]),
        "latency_p50_ms" => v["latency"]["p50_ms"].as_f64().unwrap_or(0.0),
        "latency_p90_ms" => v["latency"]["p90_ms"].as_f64().unwrap_or(0.0),
        "latency_p99_ms" => v["latency"]["p99_ms"].as_f64().unwrap_or(0.0),
        _ => panic!("unknown metric {metric}"),
    }
}

#[test]
fn a_keda_client_gets_the_same_numbers_as_the_api() {
    let rig = Rig::start("keda-values");
    let rt = runtime();
    let mut client = ExternalScalerClient::new(rt.block_on(channel(&rig.scaler)));
    let metrics = [
        "rps",
        "concurrency",
        "in_flight",
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
    ];

    let spec = rt
        .block_on(client.get_metric_spec(md(&[
            ("service", "web"),
            ("metric", "concurrency"),
            ("target", "2.5"),
        ])))
        .expect("GetMetricSpec")
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, "surge-web-concurrency");
    assert_eq!(spec.metric_specs[0].target_size_float, 2.5);
    assert_eq!(spec.metric_specs[0].target_size, 3);
    let idle = rt
        .block_on(client.is_active(md(&[("service", "web")])))
        .expect("IsActive")
        .into_inner();
    assert!(!idle.result, "no traffic yet: inactive");

    // Steady load with measurable latency and concurrency.
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run(&LoadSpec {
                workers: 4,
                path: "/sleep?ms=5".into(),
                // Long enough (about 10 s) for three clean comparisons on a loaded machine.
                ..LoadSpec::get(addr, 8000)
            })
        }
    });
    rig.scaler
        .wait_for("web", "traffic", |v| v["request_rate"].as_f64() > Some(10.0));
    // Between two API reads with no report merged in between, GetMetrics must agree exactly.
    let mut compared = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while compared < 3 {
        assert!(
            Instant::now() < deadline,
            "never saw two API reads within one report interval"
        );
        let reports = rig.scaler.reports();
        let before = rig.scaler.service("web");
        let got: Vec<(String, f64, i64)> = metrics
            .iter()
            .map(|m| {
                let r = GetMetricsRequest {
                    scaled_object_ref: Some(md(&[("service", "web"), ("metric", m)])),
                    metric_name: format!("surge-web-{}", m.replace('_', "-")),
                };
                let v = rt
                    .block_on(client.get_metrics(r))
                    .expect("GetMetrics")
                    .into_inner();
                assert_eq!(v.metric_values.len(), 1, "{v:?}");
                let mv = &v.metric_values[0];
                (mv.metric_name.clone(), mv.metric_value_float, mv.metric_value)
            })
            .collect();
        let active = rt
            .block_on(client.is_active(md(&[("service", "web")])))
            .expect("IsActive")
            .into_inner();
        let after = rig.scaler.service("web");
        if rig.scaler.reports() != reports || before != after {
            continue;
        }
        for (m, (name, value, int_value)) in metrics.iter().zip(&got) {
            assert_eq!(name, &format!("surge-web-{}", m.replace('_', "-")));
            assert_eq!(*value, api_value(&before, m), "{m}: GetMetrics vs {before}");
            assert_eq!(*int_value, value.round() as i64, "{m}");
        }
        assert_eq!(
            active.result,
            api_value(&before, "rps") > 0.0,
            "IsActive vs {before}"
        );
        if got[0].1 > 0.0 && got[1].1 > 0.0 && got[5].1 > 0.0 {
            compared += 1;
        }
    }
    assert_eq!(load.join().expect("load").ok, 8000);
}

#[test]
fn stream_is_active_pushes_activation_and_deactivation_within_a_report_interval() {
    let rig = Rig::start("keda-push");
    let rt = runtime();
    let mut client = ExternalScalerClient::new(rt.block_on(channel(&rig.scaler)));
    let mut stream = rt
        .block_on(client.stream_is_active(md(&[("service", "web"), ("metric", "rps")])))
        .expect("StreamIsActive")
        .into_inner();
    // The pushes, each with the instant it arrived.
    let (tx, pushes) = mpsc::channel::<(bool, Instant)>();
    rt.spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            if tx.send((m.result, Instant::now())).is_err() {
                break;
            }
        }
    });
    let first = pushes
        .recv_timeout(Duration::from_secs(5))
        .expect("the current state at once");
    assert!(!first.0, "inactive before any traffic");
    // Watch the API in the background: when did the scaler itself see rps > 0, then 0 again?
    let api = rig.scaler.http;
    let watcher = std::thread::spawn(move || {
        let (mut up, mut down) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while down.is_none() && Instant::now() < deadline {
            if let Ok((200, body)) = get_text(api, "/api/v1/services/web") {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                let rate = v["request_rate"].as_f64().unwrap_or(0.0);
                let now = Instant::now();
                if up.is_none() && rate > 0.0 {
                    up = Some(now);
                } else if up.is_some() && rate == 0.0 {
                    down = Some(now);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (up, down)
    });
    std::thread::sleep(Duration::from_millis(300));
    send(&LoadSpec::get(rig.web.addr, 20));
    let on = pushes
        .recv_timeout(Duration::from_secs(5))
        .expect("an activation push");
    assert!(on.0, "the push after traffic is an activation");
    let off = pushes
        .recv_timeout(Duration::from_secs(5))
        .expect("a deactivation push");
    assert!(!off.0, "then a deactivation");
    let (up, down) = watcher.join().expect("watcher");
    let (up, down) = (
        up.expect("the API saw the traffic"),
        down.expect("the API saw it end"),
    );
    // The push comes from the merge itself: no later than the API shows it plus one interval.
    assert!(
        on.1 <= up + REPORT_INTERVAL,
        "activation pushed {:?} after the API showed it",
        on.1 - up
    );
    assert!(
        off.1 <= down + REPORT_INTERVAL,
        "deactivation pushed {:?} after the API showed it",
        off.1 - down
    );
    assert!(
        pushes.recv_timeout(Duration::from_millis(500)).is_err(),
        "nothing more is pushed while nothing changes"
    );
}

// ---------------------------------------------------------------------------------------------
// Subscribe

/// Reads a Subscribe stream into a channel of (update, arrival); `window` limits what the client
/// accepts before it reads (HTTP/2 flow control), so a client that does not read stalls quickly.
fn subscribe(
    rt: &tokio::runtime::Runtime,
    scaler: &Scaler,
    req: SubscribeRequest,
    window: Option<u32>,
) -> tonic::Streaming<MetricsUpdate> {
    rt.block_on(async {
        let ch = Endpoint::from_shared(scaler.grpc_url())
            .expect("URL")
            .initial_stream_window_size(window)
            .connect()
            .await
            .expect("connects");
        MetricsClient::new(ch)
            .subscribe(req)
            .await
            .expect("Subscribe")
            .into_inner()
    })
}

fn pump(
    rt: &tokio::runtime::Runtime,
    mut s: tonic::Streaming<MetricsUpdate>,
) -> mpsc::Receiver<(MetricsUpdate, Instant)> {
    let (tx, rx) = mpsc::channel();
    rt.spawn(async move {
        while let Ok(Some(u)) = s.message().await {
            if tx.send((u, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

/// Every update accounts for the ones before it: `missed` is exactly the gap in `seq`.
fn assert_accounted(name: &str, updates: &[MetricsUpdate]) {
    for w in updates.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + w[1].missed + 1,
            "{name}: seq {} then {} with missed {}",
            w[0].seq,
            w[1].seq,
            w[1].missed
        );
    }
}

#[test]
fn a_stalled_subscriber_never_holds_back_another() {
    let rig = Rig::start("subscribe");
    let rt = runtime();
    let all = SubscribeRequest {
        services: vec![],
        min_interval_ms: 0,
    };
    // The stalled one: accepts ~1 KiB, then never reads.
    let stalled = subscribe(&rt, &rig.scaler, all.clone(), Some(1024));
    let live = pump(&rt, subscribe(&rt, &rig.scaler, all, None));
    let slow = pump(
        &rt,
        subscribe(
            &rt,
            &rig.scaler,
            SubscribeRequest {
                services: vec!["web".into()],
                min_interval_ms: 500,
            },
            None,
        ),
    );
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run(&LoadSpec {
                workers: 2,
                ..LoadSpec::get(addr, 3000)
            })
        }
    });
    let watch_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut got: Vec<(MetricsUpdate, Instant)> = Vec::new();
    while start.elapsed() < watch_for {
        if let Ok(u) = live.recv_timeout(Duration::from_millis(50)) {
            got.push(u);
        }
    }
    assert_eq!(load.join().expect("load").ok, 3000);
    let updates: Vec<MetricsUpdate> = got.iter().map(|u| u.0.clone()).collect();
    assert_accounted("live", &updates);
    // The live subscriber got every merged report, as they came: none missed, no long gap.
    assert!(
        updates.len() as u32 >= (watch_for.as_millis() / REPORT_INTERVAL.as_millis()) as u32 / 2,
        "only {} updates",
        updates.len()
    );
    assert_eq!(
        updates.iter().map(|u| u.missed).sum::<u64>(),
        0,
        "the live subscriber missed updates"
    );
    let longest = got.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or_default();
    assert!(
        longest < 5 * REPORT_INTERVAL,
        "a gap of {longest:?} between updates"
    );
    assert_eq!(
        updates[0]
            .services
            .iter()
            .map(|s| s.service.as_str())
            .collect::<Vec<_>>(),
        ["web", "idle"]
    );
    let last = updates.last().expect("updates");
    let web = last.services.iter().find(|s| s.service == "web").expect("web");
    assert!(
        web.reported && web.requests_total > 0 && web.latency_buckets.iter().sum::<u64>() > 0,
        "{web:?}"
    );

    // The min-interval subscriber: only web, at most one update per 500 ms, nothing "missed".
    let paced: Vec<MetricsUpdate> = slow.try_iter().map(|u| u.0).collect();
    assert!(paced.len() >= 3, "{} paced updates", paced.len());
    for w in paced.windows(2) {
        assert!(
            w[1].scaler_time_ms - w[0].scaler_time_ms >= 500,
            "{} then {}",
            w[0].scaler_time_ms,
            w[1].scaler_time_ms
        );
        assert_eq!(w[1].missed, 0);
    }
    assert!(paced
        .iter()
        .all(|u| u.services.len() == 1 && u.services[0].service == "web"));

    // The stalled one now reads: after what was in flight, the newest figures and the count missed.
    let newest = last.seq;
    let stalled = pump(&rt, stalled);
    let mut drained = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while drained.last().is_none_or(|u: &MetricsUpdate| u.seq < newest) {
        assert!(
            Instant::now() < deadline,
            "the stalled subscriber never caught up: {:?}",
            drained
                .iter()
                .map(|u: &MetricsUpdate| (u.seq, u.missed))
                .collect::<Vec<_>>()
        );
        if let Ok(u) = stalled.recv_timeout(Duration::from_millis(100)) {
            drained.push(u.0);
        }
    }
    assert_accounted("stalled", &drained);
    let missed: u64 = drained.iter().map(|u| u.missed).sum();
    assert!(
        missed >= 10,
        "the stalled subscriber missed only {missed}: {:?}",
        drained.iter().map(|u| (u.seq, u.missed)).collect::<Vec<_>>()
    );
    assert!(
        drained.len() < updates.len() / 2,
        "the stalled subscriber got {} updates, as if it had not stalled",
        drained.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input (no agent needed)

fn check<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: tonic::Code, message: &str) {
    let e = r.expect_err("refused");
    assert_eq!((e.code(), e.message()), (code, message));
}

#[test]
fn bad_trigger_metadata_is_refused_with_exact_messages() {
    let dir = scratch("keda-bad-input");
    let idle = ReservedPort::new();
    let scaler = Scaler::start(&dir, free_port(), &observe_flags("127.0.0.1:9", &idle));
    let rt = runtime();
    let ch = rt.block_on(channel(&scaler));
    let mut keda = ExternalScalerClient::new(ch.clone());
    let nf = tonic::Code::NotFound;
    let inv = tonic::Code::InvalidArgument;
    let unknown = r#"no service named "shop" (known: web, idle)"#;
    check(
        rt.block_on(keda.is_active(md(&[("service", "shop")]))),
        nf,
        unknown,
    );
    check(
        rt.block_on(keda.get_metric_spec(md(&[("service", "shop"), ("target", "1")]))),
        nf,
        unknown,
    );
    let req = GetMetricsRequest {
        scaled_object_ref: Some(md(&[("service", "shop")])),
        metric_name: "x".into(),
    };
    check(rt.block_on(keda.get_metrics(req)), nf, unknown);
    check(
        rt.block_on(keda.stream_is_active(md(&[("service", "shop")]))),
        nf,
        unknown,
    );
    check(
        rt.block_on(keda.is_active(md(&[("service", "web"), ("metric", "cpu")]))),
        inv,
        r#"scalerMetadata.metric = "cpu": must be one of rps, concurrency, in_flight, latency_p50_ms, latency_p90_ms, latency_p99_ms"#,
    );
    check(
        rt.block_on(keda.get_metric_spec(md(&[("service", "web")]))),
        inv,
        "scalerMetadata.target is missing: it must be a number greater than 0",
    );
    check(
        rt.block_on(keda.get_metric_spec(md(&[("service", "web"), ("target", "-3")]))),
        inv,
        r#"scalerMetadata.target = "-3": must be a number greater than 0"#,
    );
    check(
        rt.block_on(keda.is_active(md(&[("service", "web"), ("activationThreshold", "lots")]))),
        inv,
        r#"scalerMetadata.activationThreshold = "lots": must be a number of 0 or more"#,
    );
    check(
        rt.block_on(keda.is_active(md(&[]))),
        inv,
        "scalerMetadata.service is missing: it must name a Surge service",
    );
    // Subscribe refuses an unknown service the same way.
    let mut sub = MetricsClient::new(ch);
    check(
        rt.block_on(sub.subscribe(SubscribeRequest {
            services: vec!["web".into(), "shop".into()],
            min_interval_ms: 0,
        })),
        nf,
        unknown,
    );
    // A valid trigger on a service no agent reported yet: inactive, value 0.
    assert!(
        !rt.block_on(keda.is_active(md(&[("service", "web")])))
            .expect("IsActive")
            .into_inner()
            .result
    );
}
