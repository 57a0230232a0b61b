//! HTTP/2 (h2c) and gRPC measured in the kernel: streams are requests, counted exactly over one
//! connection, with concurrency and latency as for HTTP/1.1. Needs root.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use surge_proto::externalscaler::{external_scaler_client::ExternalScalerClient, ScaledObjectRef};
use surge_tests::harness::{free_port, require_root, scratch, Agent, Scaler};
use tonic::transport::Endpoint;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} in {v}"))
}

/// An h2c server (prior knowledge) that answers every stream after `delay` with a short body.
async fn h2_server(listener: tokio::net::TcpListener, delay: Duration) {
    while let Ok((sock, _)) = listener.accept().await {
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(sock).await else {
                return;
            };
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let response = http::Response::builder().status(200).body(()).expect("response");
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"hello over h2\n"), true);
                    }
                });
            }
        });
    }
}

/// Sends `n` GETs over one h2c connection from `lanes` closed loops (each sends its next request
/// when its last answer is in); returns the successes.
async fn h2_client(addr: SocketAddr, n: usize, lanes: usize) -> usize {
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // No Nagle delay: a request held back by the client is not in flight at the server.
    sock.set_nodelay(true).expect("nodelay");
    let (client, conn) = h2::client::handshake(sock).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let client = client.clone();
            let mine = n / lanes + usize::from(lane < n % lanes);
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..mine {
                    let Ok(mut c) = client.clone().ready().await else {
                        break;
                    };
                    let req = http::Request::get(format!("http://{addr}/"))
                        .body(())
                        .expect("request");
                    let Ok((resp, _)) = c.send_request(req, true) else {
                        break;
                    };
                    let Ok(resp) = resp.await else {
                        continue;
                    };
                    let status = resp.status();
                    let mut body = resp.into_body();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    ok += usize::from(status == 200);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap_or(0);
    }
    ok
}

#[test]
fn http2_requests_over_one_connection_are_counted_exactly() {
    require_root();
    let dir = scratch("h2");
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    rt.spawn(h2_server(listener, Duration::from_millis(20)));
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("h2={addr}")]);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("h2", "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);

    // 8 closed loops of streams for about 1.3 s: the concurrency is 8 while they run.
    let n = 480;
    let load = rt.spawn(h2_client(addr, n, 8));
    std::thread::sleep(Duration::from_millis(500));
    let mut readings = Vec::new();
    let mut p50s = Vec::new();
    for _ in 0..6 {
        let v = scaler.service("h2");
        readings.push(v["concurrency"].as_f64().unwrap_or(0.0));
        if let Some(p) = v["latency"]["p50_ms"].as_f64() {
            p50s.push(p);
        }
        std::thread::sleep(Duration::from_millis(120));
    }
    assert_eq!(rt.block_on(load).expect("client"), n);
    scaler.wait_reports(3);
    let v = scaler.service("h2");
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    assert_eq!(count(&v, "connections_opened_total"), 1, "one connection: {v}");
    let c = readings.iter().sum::<f64>() / readings.len() as f64;
    eprintln!("h2: concurrency {c:.3} (8 streams), p50 readings {p50s:?} ms");
    assert!(
        (c - 8.0).abs() <= 0.8,
        "concurrency {c} ({readings:?}), 8 streams at a time"
    );
    p50s.sort_by(f64::total_cmp);
    let p50 = p50s.get(p50s.len() / 2).copied().unwrap_or(0.0);
    assert!(
        (p50 - 20.0).abs() <= 2.0,
        "p50 {p50} ms ({p50s:?}), the server waits 20 ms"
    );
}

#[test]
fn grpc_unary_calls_are_counted_exactly() {
    require_root();
    let dir = scratch("grpc");
    // A second scaler is the gRPC server under test: nothing else talks to it.
    let target_port = free_port();
    let target = Scaler::start(&dir, target_port, &["--observe".into(), "web=127.0.0.1:1".into()]);
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &["--observe".into(), format!("grpc={}", target.grpc)],
    );
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("grpc", "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);

    let rt = runtime();
    let n = 300;
    let answered = rt.block_on(async {
        let ch = Endpoint::from_shared(target.grpc_url())
            .expect("URL")
            .connect()
            .await
            .expect("connects");
        let mut client = ExternalScalerClient::new(ch);
        let mut answered = 0;
        for _ in 0..n {
            let r = ScaledObjectRef {
                name: "web".into(),
                namespace: "default".into(),
                scaler_metadata: [("service".to_string(), "web".to_string())].into_iter().collect(),
            };
            // Every call is answered (a value or a status): each is one complete stream.
            let _ = client.is_active(r).await;
            answered += 1;
        }
        answered
    });
    assert_eq!(answered, n);
    scaler.wait_reports(3);
    let v = scaler.service("grpc");
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    assert_eq!(
        count(&v, "connections_opened_total"),
        1,
        "one channel, one connection: {v}"
    );
    drop(target);
}
