//! HTTP/2 (h2c) and gRPC measured in the kernel: streams are requests, counted exactly over one
//! connection, with concurrency and latency as for HTTP/1.1. Needs root.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use surge_proto::externalscaler::{external_scaler_client::ExternalScalerClient, ScaledObjectRef};
use surge_tests::{
    harness::{deferred_accept_listener, free_port, require_root, scratch, Agent, Scaler},
    http_client::get_text,
};
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

/// An [`h2_server`] answering after `delay`, observed as service `name` by a scaler and an agent,
/// once the agent reports it.
fn observed_h2_server(
    test: &str,
    name: &str,
    delay: Duration,
) -> (tokio::runtime::Runtime, SocketAddr, Scaler, Agent) {
    require_root();
    let dir = scratch(test);
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    rt.spawn(h2_server(listener, delay));
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("{name}={addr}")]);
    let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for(name, "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);
    (rt, addr, scaler, agent)
}

#[test]
fn http2_requests_over_one_connection_are_counted_exactly() {
    let (rt, addr, scaler, _agent) = observed_h2_server("h2", "h2", Duration::from_millis(20));

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

/// An h2c server that answers each stream after the milliseconds its path names (`/ms/400`).
async fn h2_server_delay_by_path(listener: tokio::net::TcpListener) {
    while let Ok((sock, _)) = listener.accept().await {
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(sock).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let ms: u64 = req.uri().path().trim_start_matches("/ms/").parse().unwrap_or(0);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let response = http::Response::builder().status(200).body(()).expect("response");
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"done\n"), true);
                    }
                });
            }
        });
    }
}

/// An [`h2_server_delay_by_path`] observed as service `name` by a scaler and an agent, once the
/// agent reports it.
fn observed_delay_server(test: &str, name: &str) -> (tokio::runtime::Runtime, SocketAddr, Scaler, Agent) {
    require_root();
    let dir = scratch(test);
    let rt = runtime();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    rt.spawn(h2_server_delay_by_path(listener));
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("{name}={addr}")]);
    let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for(name, "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);
    (rt, addr, scaler, agent)
}

/// An h2c client connection (prior knowledge, no Nagle delay), driven in the background.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let (client, conn) = h2::client::handshake(sock).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A gRPC call cancelled by its client (a deadline, say) ends with the client's RST_STREAM: the
/// server never answers it. It is no longer in flight from then on, while its connection stays
/// open; it was a request, and there was no response. Twenty calls at once: more than the
/// connection's 8 slots in the kernel, so those past them are ended too.
#[test]
fn http2_streams_the_client_cancels_are_no_longer_in_flight() {
    let (rt, addr, scaler, _agent) = observed_delay_server("h2-cancel", "h2x");
    let n = 20;
    let client = rt.block_on(h2_connect(addr));
    // Calls the server would answer in a minute.
    let pending: Vec<_> = rt.block_on(async {
        let mut pending = Vec::new();
        for _ in 0..n {
            let mut c = client.clone().ready().await.expect("ready");
            let req = http::Request::get(format!("http://{addr}/ms/60000"))
                .body(())
                .expect("request");
            pending.push(c.send_request(req, true).expect("sent").0);
        }
        pending
    });
    scaler.wait_for("h2x", "the calls in flight", |v| v["in_flight"] == n);
    // Dropped unanswered: the client resets each stream; the connection stays.
    drop(pending);
    let v = scaler.wait_for("h2x", "no call in flight", |v| v["in_flight"] == 0);
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), 0, "{v}");
    assert_eq!(
        count(&v, "connections_closed_total"),
        0,
        "the connection is still open: {v}"
    );
    drop(client);
}

/// The cumulative count of `service`'s latency histogram at the largest bucket bound ≤ `seconds`,
/// and the total count, from /metrics.
fn latency_counts(scaler: &Scaler, service: &str, seconds: f64) -> (u64, u64) {
    let (_, text) = get_text(scaler.http, "/metrics").expect("/metrics");
    let suffix = format!("\",service=\"{service}\"}}");
    let mut at = (0.0, 0);
    let mut total = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("surge_service_request_latency_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once(&suffix) else {
            continue;
        };
        let count: u64 = count.trim().parse().expect("a count");
        if le == "+Inf" {
            total = count;
        } else {
            let le: f64 = le.parse().expect("a bound");
            if le <= seconds && le >= at.0 {
                at = (le, count);
            }
        }
    }
    (at.1, total)
}

/// A server answers HTTP/2 streams in any order: a long request started first ends after short
/// ones started later on the same connection. Each stream's latency is its own (matching ends to
/// the oldest start would make every one of them about 100-150 ms here).
#[test]
fn http2_streams_answered_out_of_order_each_get_their_own_latency() {
    let (rt, addr, scaler, _agent) = observed_delay_server("h2-order", "h2o");
    let rounds = 5;
    let answered = rt.block_on(async move {
        let client = h2_connect(addr).await;
        let mut answered = 0;
        for _ in 0..rounds {
            // One stream of 400 ms, then every 100 ms one of 50 ms: they all end before it.
            let mut streams = Vec::new();
            for (i, ms) in [400u64, 50, 50, 50].into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut c = client.clone().ready().await.expect("ready");
                let req = http::Request::get(format!("http://{addr}/ms/{ms}"))
                    .body(())
                    .expect("request");
                let (resp, _) = c.send_request(req, true).expect("sent");
                streams.push(tokio::spawn(async move {
                    let resp = resp.await.expect("answered");
                    let mut body = resp.into_body();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                }));
            }
            for s in streams {
                s.await.expect("stream");
                answered += 1;
            }
        }
        answered
    });
    assert_eq!(answered, 4 * rounds);
    scaler.wait_reports(3);
    let v = scaler.service("h2o");
    assert_eq!(count(&v, "requests_total"), 4 * rounds as u64, "{v}");
    let (fast, total) = latency_counts(&scaler, "h2o", 0.2);
    let (below_300ms, _) = latency_counts(&scaler, "h2o", 0.3);
    assert_eq!(total, 4 * rounds as u64);
    assert_eq!(
        fast,
        3 * rounds as u64,
        "the 50 ms streams, and only they, are under 200 ms"
    );
    assert_eq!(
        below_300ms, fast,
        "nothing between 200 and 300 ms: the 400 ms streams are 400 ms"
    );
}

/// Sends a GET of `/ms/{ms}` on a new stream; the answer's task, which reads it to the end.
async fn stream_of(
    client: &h2::client::SendRequest<bytes::Bytes>,
    addr: SocketAddr,
    ms: u64,
) -> tokio::task::JoinHandle<()> {
    let mut c = client.clone().ready().await.expect("ready");
    let req = http::Request::get(format!("http://{addr}/ms/{ms}"))
        .body(())
        .expect("request");
    let (resp, _) = c.send_request(req, true).expect("sent");
    tokio::spawn(async move {
        let resp = resp.await.expect("answered");
        let mut body = resp.into_body();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    })
}

/// Many streams open at once on one connection, as a gRPC channel multiplexes its calls: more
/// than the connection's 8 slots in the kernel. Each still gets its own latency: 12 streams of
/// 400 ms, then, 200 ms later, 8 of 50 ms that end first (matched to the oldest open start, as
/// without a slot of their own, they would be about 250 ms).
#[test]
fn http2_streams_past_eight_open_at_once_each_get_their_own_latency() {
    let (rt, addr, scaler, _agent) = observed_delay_server("h2-many", "h2m");
    rt.block_on(async move {
        let client = h2_connect(addr).await;
        let mut streams = Vec::new();
        for _ in 0..12 {
            streams.push(stream_of(&client, addr, 400).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..8 {
            streams.push(stream_of(&client, addr, 50).await);
        }
        for s in streams {
            s.await.expect("stream");
        }
    });
    scaler.wait_reports(3);
    let v = scaler.service("h2m");
    assert_eq!(count(&v, "requests_total"), 20, "{v}");
    assert_eq!(count(&v, "in_flight"), 0, "{v}");
    let (fast, total) = latency_counts(&scaler, "h2m", 0.2);
    let (below_300ms, _) = latency_counts(&scaler, "h2m", 0.3);
    assert_eq!(total, 20);
    assert_eq!(fast, 8, "the 50 ms streams, and only they, are under 200 ms");
    assert_eq!(below_300ms, 8, "the 400 ms streams are 400 ms");
}

/// One HTTP/2 frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads whole frames from `from` until `ends` streams have ended (END_STREAM); returns the ids
/// of the HEADERS frames seen. `buf` holds bytes read but not yet taken.
fn read_frames(from: &mut std::net::TcpStream, buf: &mut Vec<u8>, ends: usize) -> Vec<u32> {
    use std::io::Read;
    let (mut headers, mut ended) = (Vec::new(), 0);
    while ended < ends {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            if kind == 1 {
                headers.push(stream);
            }
            if (kind == 0 || kind == 1) && flags & 1 != 0 {
                ended += 1;
            }
            buf.drain(..9 + len);
        }
        if ended >= ends {
            break;
        }
        let mut chunk = [0u8; 4096];
        let n = from.read(&mut chunk).expect("read frames");
        assert!(n > 0, "the peer closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
    headers
}

/// A client that upgrades an HTTP/1.1 connection to HTTP/2 (h2c, RFC 7540 §3.2), as curl's
/// `--http2` does without TLS: the kernel follows the connection from HTTP/1.1 into HTTP/2.
#[test]
fn an_h2c_upgrade_is_followed_into_http2() {
    use std::io::{Read, Write};

    require_root();
    let dir = scratch("h2c-upgrade");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let streams = [3u32, 5, 7, 9, 11];
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut byte).expect("upgrade request");
            head.push(byte[0]);
        }
        let mut out =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec();
        frame(&mut out, 4, 0, 0, &[]);
        c.write_all(&out).expect("101");
        let mut preface = [0u8; 24];
        c.read_exact(&mut preface).expect("client preface");
        let mut buf = Vec::new();
        let opened = read_frames(&mut c, &mut buf, streams.len());
        // The upgrade request's own answer on stream 1 comes after the client's streams are
        // open: the 101 answered that request already, so this end must not end another.
        let mut out = Vec::new();
        frame(&mut out, 1, 4, 1, &[0x88]);
        frame(&mut out, 0, 1, 1, b"upgraded\n");
        c.write_all(&out).expect("stream 1");
        // The client's streams take 300 ms each.
        std::thread::sleep(Duration::from_millis(300));
        let mut out = Vec::new();
        for id in opened.iter().rev() {
            frame(&mut out, 1, 4, *id, &[0x88]);
            frame(&mut out, 0, 1, *id, b"ok\n");
        }
        c.write_all(&out).expect("responses");
        opened
    });
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("h2c={addr}")]);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("h2c", "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);

    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    c.write_all(
        b"GET / HTTP/1.1\r\nHost: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).expect("101");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut buf = Vec::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    for id in streams {
        frame(&mut out, 1, 5, id, &[0x82, 0x86, 0x84]);
    }
    c.write_all(&out).expect("streams");
    let answered = read_frames(&mut c, &mut buf, 1 + streams.len());
    assert_eq!(answered.len(), 1 + streams.len(), "stream 1 and the client's");
    assert_eq!(server.join().expect("server"), streams);
    drop(c);

    scaler.wait_reports(3);
    let v = scaler.service("h2c");
    // The upgrade request (answered by the 101) and the five streams.
    assert_eq!(count(&v, "requests_total"), 1 + streams.len() as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), 1 + streams.len() as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    // The 101 came at once; each stream took its 300 ms (had stream 1's end been taken for a
    // stream's, one of them would be near 0 ms and the last end would be left over).
    let (fast, total) = latency_counts(&scaler, "h2c", 0.2);
    assert_eq!((fast, total), (1, 1 + streams.len() as u64), "{v}");
}

/// A client's reset and the server's end of the same stream can cross: the server writes its
/// answer before it reads the reset. That late end is of a stream that ended already, so it
/// ends no other open stream, and it is no response.
#[test]
fn an_end_that_crosses_the_clients_reset_ends_no_other_stream() {
    use std::io::{Read, Write};

    require_root();
    let dir = scratch("h2-cross");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let (go, told) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut out = Vec::new();
        frame(&mut out, 4, 0, 0, &[]);
        c.write_all(&out).expect("server settings");
        // Told once the client's two streams and its reset of stream 1 are in: stream 1 is
        // answered as if the reset had not been read yet.
        told.recv().expect("go");
        let mut out = Vec::new();
        frame(&mut out, 1, 5, 1, &[0x88]);
        c.write_all(&out).expect("the crossing end");
        told.recv().expect("done");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("h2r={addr}")]);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("h2r", "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);

    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    for id in [1u32, 3] {
        frame(&mut out, 1, 5, id, &[0x82, 0x86, 0x84]);
    }
    // RST_STREAM (3) of stream 1, error CANCEL (8).
    frame(&mut out, 3, 0, 1, &8u32.to_be_bytes());
    c.write_all(&out).expect("streams and reset");
    scaler.wait_for("h2r", "stream 3 in flight", |v| {
        v["requests_total"] == 2 && v["in_flight"] == 1
    });
    go.send(()).expect("server");
    let mut buf = Vec::new();
    read_frames(&mut c, &mut buf, 1);
    scaler.wait_reports(3);
    let v = scaler.service("h2r");
    assert_eq!(v["in_flight"], 1, "stream 3 is still open: {v}");
    assert_eq!(count(&v, "responses_total"), 0, "{v}");
    go.send(()).expect("server");
    drop(c);
    server.join().expect("server");
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

/// Many short h2c connections, one request each: the server's SETTINGS leaves as the client's
/// preface arrives, so the kernel's first sight of each connection comes from both sides at once,
/// on both CPUs. Every request is counted; none is lost to a connection whose state was created
/// twice.
#[test]
fn http2_connections_whose_both_sides_speak_at_once_are_each_counted() {
    let (rt, addr, scaler, _agent) = observed_h2_server("h2-many", "h2m", Duration::ZERO);

    let (connections, at_once) = (1200usize, 4usize);
    let answered = rt.block_on(async {
        let lanes: Vec<_> = (0..at_once)
            .map(|_| {
                tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..connections / at_once {
                        ok += h2_client(addr, 1, 1).await;
                    }
                    ok
                })
            })
            .collect();
        let mut ok = 0;
        for lane in lanes {
            ok += lane.await.expect("lane");
        }
        ok
    });
    assert_eq!(answered, connections);
    scaler.wait_for("h2m", "every connection closed", |v| {
        v["connections_closed_total"] == connections
    });
    scaler.wait_reports(2);
    let v = scaler.service("h2m");
    assert_eq!(count(&v, "connections_opened_total"), connections as u64, "{v}");
    assert_eq!(count(&v, "requests_total"), connections as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), connections as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}

/// One h2c connection under many streams at once, answered at once: the client's streams arrive
/// on one CPU while the server's answers leave on the other, and both directions update the
/// connection's open requests. Every request and every response is counted, and none stays in
/// flight while the connection is still open (its end would hide one that did).
#[test]
fn http2_streams_opened_and_answered_on_both_cpus_at_once_are_all_counted() {
    let (rt, addr, scaler, _agent) = observed_h2_server("h2-busy", "h2b", Duration::ZERO);

    let (n, lanes) = (40_000, 32);
    let client = rt.block_on(h2_connect(addr));
    let answered = rt.block_on(async {
        let tasks: Vec<_> = (0..lanes)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..n / lanes {
                        let mut c = client.clone().ready().await.expect("ready");
                        let req = http::Request::get(format!("http://{addr}/"))
                            .body(())
                            .expect("request");
                        let (resp, _) = c.send_request(req, true).expect("sent");
                        let resp = resp.await.expect("response");
                        let mut body = resp.into_body();
                        while let Some(chunk) = body.data().await {
                            let chunk = chunk.expect("body");
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += t.await.expect("lane");
        }
        ok
    });
    assert_eq!(answered, n);
    scaler.wait_reports(3);
    let v = scaler.service("h2b");
    assert_eq!(count(&v, "connections_closed_total"), 0, "still open: {v}");
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    drop(client);
    scaler.wait_for("h2b", "the connection closed", |v| {
        v["connections_closed_total"] == 1
    });
    assert_eq!(scaler.service("h2b")["in_flight"], 0);
}

/// A client opens 60 streams in one write (more than the 32 stream ids the kernel keeps per
/// segment: those past them have no start of their own); a raw server answers them in the given
/// writes, each one segment. Each end ends one open stream, so all 60 are answered and none is
/// left in flight on the open connection.
fn sixty_http2_streams_answered_in(test: &str, writes: Vec<Vec<u32>>) {
    use std::io::{Read, Write};

    require_root();
    let dir = scratch(test);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let streams: Vec<u32> = (0..60).map(|i| 1 + 2 * i).collect();
    let mut answers = writes.concat();
    answers.sort_unstable();
    assert_eq!(answers, streams, "every stream answered once");
    let (done, finish) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_nodelay(true).expect("nodelay");
        let mut preface = [0u8; 24];
        c.read_exact(&mut preface).expect("client preface");
        let mut out = Vec::new();
        frame(&mut out, 4, 0, 0, &[]);
        c.write_all(&out).expect("server settings");
        let mut buf = Vec::new();
        let opened = read_frames(&mut c, &mut buf, 60);
        for ids in writes {
            // HEADERS with END_STREAM, `:status 200`, one write each.
            let mut out = Vec::new();
            for id in ids {
                frame(&mut out, 1, 5, id, &[0x88]);
            }
            c.write_all(&out).expect("answers");
            std::thread::sleep(Duration::from_millis(50));
        }
        finish.recv().expect("finish");
        opened.len()
    });
    let name = test.replace('-', "");
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("{name}={addr}")]);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for(&name, "first report", |v| v["reported"] == true);
    scaler.wait_reports(3);

    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    for id in &streams {
        frame(&mut out, 1, 5, *id, &[0x82, 0x86, 0x84]);
    }
    c.write_all(&out).expect("streams");
    let mut buf = Vec::new();
    let answered = read_frames(&mut c, &mut buf, 60);
    assert_eq!(answered.len(), 60);
    scaler.wait_reports(3);
    let v = scaler.service(&name);
    assert_eq!(count(&v, "connections_closed_total"), 0, "still open: {v}");
    assert_eq!(count(&v, "requests_total"), 60, "{v}");
    assert_eq!(count(&v, "responses_total"), 60, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    done.send(()).expect("server");
    assert_eq!(server.join().expect("server"), 60);
    drop(c);
}

/// All 60 answered in one write, newest first.
#[test]
fn sixty_http2_streams_answered_in_one_segment_all_end() {
    let newest_first: Vec<u32> = (0..60).rev().map(|i| 1 + 2 * i).collect();
    sixty_http2_streams_answered_in("h2-sixty", vec![newest_first]);
}

/// In two writes, so that ends whose ids the kernel did not keep (past the 32nd of the first
/// write) take other streams' claims, and streams of the second write then find theirs gone:
/// first the 28 streams that have no start of their own, the 4 oldest, and 8 more past the ids
/// kept; then the other 20.
#[test]
fn sixty_http2_streams_answered_in_two_segments_all_end() {
    let ids = |range: std::ops::Range<u32>| range.map(|i| 1 + 2 * i).collect::<Vec<u32>>();
    let first = [ids(32..60), ids(0..4), ids(4..12)].concat();
    sixty_http2_streams_answered_in("h2-sixty-two", vec![first, ids(12..32)]);
}

/// An h2c server that accepts with `TCP_DEFER_ACCEPT` (nginx's `listen … deferred`): each
/// connection's handshake completes with the client's preface, which the kernel filters on the
/// listening socket before the connection's own socket exists. Every stream is still counted,
/// and none stays in flight.
#[test]
fn http2_connections_whose_preface_completes_the_handshake_are_counted_exactly() {
    require_root();
    let dir = scratch("h2-deferred");
    let rt = runtime();
    let listener = deferred_accept_listener();
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    let listener = rt
        .block_on(async { tokio::net::TcpListener::from_std(listener) })
        .expect("listener");
    rt.spawn(h2_server(listener, Duration::ZERO));
    let scaler = Scaler::start(&dir, free_port(), &["--observe".into(), format!("h2d={addr}")]);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("h2d", "first report", |v| v["reported"] == true);

    let (connections, per_connection) = (300usize, 2usize);
    let answered = rt.block_on(async {
        let mut ok = 0;
        for _ in 0..connections {
            ok += h2_client(addr, per_connection, 1).await;
        }
        ok
    });
    assert_eq!(answered, connections * per_connection);
    scaler.wait_for("h2d", "every connection closed", |v| {
        v["connections_closed_total"] == connections
    });
    scaler.wait_reports(2);
    let v = scaler.service("h2d");
    let total = (connections * per_connection) as u64;
    assert_eq!(count(&v, "requests_total"), total, "{v}");
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}
