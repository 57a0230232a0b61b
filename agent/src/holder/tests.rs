use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};

use super::*;

/// A replica that echoes everything it reads.
async fn echo_replica() -> SocketAddr {
    replica(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// A replica on a loopback port that serves each connection it accepts with `serve`.
async fn replica<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

async fn holder(
    config: HoldConfig,
) -> (
    SocketAddr,
    watch::Sender<Vec<SocketAddr>>,
    Arc<HoldStats>,
    Arc<Notify>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (tx, rx) = watch::channel(Vec::new());
    let demand = Arc::new(Notify::new());
    let h = Holder::new(l, rx, config, Arc::clone(&demand));
    let (addr, stats) = (h.local_addr().expect("addr"), h.stats());
    tokio::spawn(h.run());
    (addr, tx, stats, demand)
}

#[tokio::test]
async fn a_held_connection_is_relayed_once_a_replica_is_ready() {
    let (addr, backends, stats, demand) = holder(HoldConfig::default()).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    demand.notified().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(stats.held_now.load(Ordering::Relaxed), 1);
    assert_eq!(stats.relaying_now.load(Ordering::Relaxed), 0);
    backends.send_replace(vec![echo_replica().await]);
    let mut got = vec![0u8; 18];
    c.read_exact(&mut got).await.expect("relayed");
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
    // Handed over: no longer waiting, still relayed.
    assert_eq!(stats.held_now.load(Ordering::Relaxed), 0);
    assert_eq!(stats.relaying_now.load(Ordering::Relaxed), 1);
    // The relay goes both ways after the buffer.
    c.write_all(b"more").await.expect("write");
    let mut more = [0u8; 4];
    c.read_exact(&mut more).await.expect("read");
    assert_eq!(&more, b"more");
    assert_eq!(stats.forwarded_total.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_body_larger_than_the_buffer_arrives_intact() {
    let config = HoldConfig {
        buffer: 4096,
        ..HoldConfig::default()
    };
    let (addr, backends, _stats, _) = holder(config).await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(&body).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        backends.send_replace(vec![echo_replica().await]);
    };
    let mut echoed = Vec::new();
    let receive = async { r.read_to_end(&mut echoed).await.expect("read") };
    tokio::join!(send, release, receive);
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "bytes changed on the way");
}

#[tokio::test(start_paused = true)]
async fn an_http_client_gets_503_with_retry_after_on_timeout() {
    let config = HoldConfig {
        timeout: Duration::from_secs(20),
        retry_after: 2,
        ..HoldConfig::default()
    };
    let (addr, _backends, stats, _) = holder(config).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    c.read_to_string(&mut response).await.expect("read");
    assert!(
        response.starts_with("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n"),
        "{response}"
    );
    assert_eq!(stats.timeouts_total.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn another_tcp_client_is_closed_on_timeout() {
    let (addr, _backends, stats, _) = holder(HoldConfig::default()).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"\x00\x01binary").await.expect("write");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.expect("read");
    assert!(rest.is_empty(), "closed without a word");
    assert_eq!(stats.timeouts_total.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn many_clients_are_spread_over_replicas_and_all_answered() {
    let (addr, backends, stats, _) = holder(HoldConfig::default()).await;
    let mut clients = Vec::new();
    for i in 0..200u32 {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(format!("client {i:03}").as_bytes())
            .await
            .expect("write");
        clients.push(c);
    }
    backends.send_replace(vec![echo_replica().await, echo_replica().await]);
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = [0u8; 10];
        c.read_exact(&mut got).await.expect("relayed");
        assert_eq!(got, *format!("client {i:03}").as_bytes());
    }
    assert_eq!(stats.forwarded_total.load(Ordering::Relaxed), 200);
    assert_eq!(stats.held_total.load(Ordering::Relaxed), 200);
}

#[tokio::test(start_paused = true)]
async fn every_wait_is_recorded_once_whether_forwarded_or_timed_out() {
    use surge_common::latency::bucket_of;

    let config = HoldConfig {
        timeout: Duration::from_secs(20),
        ..HoldConfig::default()
    };
    let (addr, backends, stats, demand) = holder(config).await;
    // Forwarded after 3 s (the paused clock makes the wait exact).
    let mut a = TcpStream::connect(addr).await.expect("connect");
    a.write_all(b"hello").await.expect("write");
    demand.notified().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    backends.send_replace(vec![echo_replica().await]);
    let mut got = [0u8; 5];
    a.read_exact(&mut got).await.expect("relayed");
    assert_eq!(&got, b"hello");
    assert_eq!(stats.waits.count(), 1, "recorded at forward, not at the end");
    drop(a);

    // Timed out after 20 s, on a holder with no replica.
    let (addr, _none, stats_b, _) = holder(config).await;
    let mut b = TcpStream::connect(addr).await.expect("connect");
    b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut response = String::new();
    b.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");

    let (counts, sum) = stats.waits.snapshot();
    assert_eq!(counts.iter().sum::<u64>(), 1);
    assert_eq!(counts[bucket_of(3_000_000)], 1);
    assert_eq!(sum, 3.0);
    let (counts, sum) = stats_b.waits.snapshot();
    assert_eq!(counts.iter().sum::<u64>(), 1);
    assert_eq!(counts[bucket_of(20_000_000)], 1);
    assert_eq!(sum, 20.0);
    assert_eq!(stats_b.held_total.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_http2_client_gets_503_on_every_stream_and_a_goaway_on_timeout() {
    let config = HoldConfig {
        timeout: Duration::from_millis(300),
        retry_after: 3,
        ..HoldConfig::default()
    };
    let (addr, _backends, stats, _) = holder(config).await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let mut responses = Vec::new();
    for i in 0..3 {
        let request = http::Request::get(format!("http://held.example/{i}"))
            .body(())
            .expect("request");
        let (response, _) = client.send_request(request, true).expect("sent");
        responses.push(response);
    }
    for response in responses {
        let response = response.await.expect("a response on every stream");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["grpc-status"], "14");
    }
    let ended = connection.await.expect("the connection task");
    if let Err(e) = ended {
        assert_eq!(e.reason(), Some(h2::Reason::NO_ERROR), "{e}");
    }
    assert_eq!(stats.timeouts_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.held_now.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_grpc_client_gets_unavailable_on_timeout() {
    use surge_proto::externalscaler::{external_scaler_client::ExternalScalerClient, ScaledObjectRef};

    let config = HoldConfig {
        timeout: Duration::from_millis(300),
        ..HoldConfig::default()
    };
    let (addr, _backends, stats, _) = holder(config).await;
    let mut client = ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let status = client
        .is_active(ScaledObjectRef {
            name: "held".into(),
            namespace: "default".into(),
            scaler_metadata: Default::default(),
        })
        .await
        .expect_err("no replica: refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert_eq!(status.message(), "no replica became ready in time");
    assert_eq!(stats.timeouts_total.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn the_gauge_counts_a_connection_from_accept_to_the_end_of_its_relay() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (tx, rx) = watch::channel(Vec::new());
    let gauge = Arc::new(AtomicUsize::new(0));
    let demand = Arc::new(Notify::new());
    let h = Holder::new(l, rx, HoldConfig::default(), Arc::clone(&demand)).counted_in(Arc::clone(&gauge));
    let addr = h.local_addr().expect("addr");
    tokio::spawn(h.run());
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"ping").await.expect("write");
    demand.notified().await;
    assert_eq!(gauge.load(Ordering::Acquire), 1, "held");
    tx.send_replace(vec![echo_replica().await]);
    let mut got = [0u8; 4];
    c.read_exact(&mut got).await.expect("relayed");
    assert_eq!(gauge.load(Ordering::Acquire), 1, "relayed");
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gauge.load(Ordering::Acquire) != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A keep-alive HTTP/1.1 replica: answers each `GET` request with `200` and a 5-byte body, and
/// keeps the connection open for more.
async fn http_replica() -> SocketAddr {
    replica(|mut s| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_keep_alive_client_is_told_to_reconnect_and_its_connection_leaves_the_path() {
    let (addr, backends, stats, _) = holder(HoldConfig::default()).await;
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    backends.send(vec![http_replica().await]).expect("backends");
    // The whole answer, then the end of the connection: the client's next request will open a
    // new one, which the connect hook sends straight to a replica.
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.expect("read to the end");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    // As a client told `Connection: close` does, it closes its end too.
    drop(client);
    left_the_path_once(&stats).await;
}

#[tokio::test]
async fn a_replica_that_resets_ends_the_relay_and_the_client_is_not_left_waiting() {
    let (addr, backends, stats, _) = holder(HoldConfig::default()).await;
    let resetting = replica(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        // Closing with a zero linger sends a reset instead of an answer.
        let _ = s.set_zero_linger();
    })
    .await;
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    backends.send(vec![resetting]).expect("backends");
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer)).await;
    assert!(
        ended.is_ok(),
        "the client still waits 10 s after the replica reset"
    );
    assert!(answer.is_empty(), "{answer:?}");
    for _ in 0..300 {
        if stats.relaying_now.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.relaying_now.load(Ordering::Relaxed), 0);
}

/// An HTTP/2 client connected to `addr` (a holder) with one GET sent on it: the client, the
/// response to come, and the connection's task.
async fn held_h2_request(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::ResponseFuture,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::get("http://held.example/")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("sent while held");
    (client, response, connection)
}

/// The whole body of an HTTP/2 response.
async fn body_of(response: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.expect("body"));
    }
    got
}

/// Waits for an HTTP/2 client connection to end, and checks that it ended without an error.
async fn ends_gracefully(connection: tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection ends")
        .expect("the connection task");
    if let Err(e) = ended {
        assert_eq!(e.reason(), Some(h2::Reason::NO_ERROR), "{e}");
    }
}

/// Waits (3 s at most) for one relayed connection to have left the path, and none to be
/// relayed still.
async fn left_the_path_once(stats: &HoldStats) {
    for _ in 0..300 {
        if stats.left_path_total.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.left_path_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.relaying_now.load(Ordering::Relaxed), 0);
}

/// An HTTP/2 replica: answers every request with `200` and `hello`, and keeps the connection
/// open for more.
async fn h2_replica() -> SocketAddr {
    replica(|s| async move {
        let Ok(mut connection) = h2::server::handshake(s).await else {
            return;
        };
        while let Some(Ok((_, mut respond))) = connection.accept().await {
            let response = http::Response::builder().status(200).body(()).expect("response");
            if let Ok(mut body) = respond.send_response(response, false) {
                let _ = body.send_data(bytes::Bytes::from_static(b"hello"), true);
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_http2_client_is_told_to_go_away_after_its_answer_and_its_connection_leaves_the_path() {
    let (addr, backends, stats, _) = holder(HoldConfig::default()).await;
    let (client, response, connection) = held_h2_request(addr).await;
    backends.send(vec![h2_replica().await]).expect("backends");

    let response = response.await.expect("the held request's answer");
    assert_eq!(response.status(), 200);
    let got = body_of(response).await;
    assert_eq!(got, b"hello");
    // A graceful end: the client was told to open new streams elsewhere, and its connection
    // closed without an error once nothing was left on it.
    ends_gracefully(connection).await;
    assert!(client.ready().await.is_err(), "no new stream on this connection");
    left_the_path_once(&stats).await;
}

#[tokio::test]
async fn a_stopping_agent_tells_an_http2_client_to_go_away_while_its_call_is_answered() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (backends, rx) = watch::channel(Vec::new());
    let (stopping, stopping_rx) = watch::channel(false);
    let h = Holder::new(l, rx, HoldConfig::default(), Arc::new(Notify::new())).stopping_on(stopping_rx);
    let (addr, stats) = (h.local_addr().expect("addr"), h.stats());
    tokio::spawn(h.run());
    // A replica that answers after 300 ms.
    let slow = replica(|s| async move {
        let Ok(mut connection) = h2::server::handshake(s).await else {
            return;
        };
        while let Some(Ok((_, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let response = http::Response::builder().status(200).body(()).expect("response");
                if let Ok(mut body) = respond.send_response(response, false) {
                    let _ = body.send_data(bytes::Bytes::from_static(b"late"), true);
                }
            });
        }
    })
    .await;

    let (client, response, connection) = held_h2_request(addr).await;
    backends.send(vec![slow]).expect("backends");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stats.relaying_now.load(Ordering::Relaxed),
        1,
        "relayed, its answer pending"
    );
    stopping.send_replace(true);
    // Told at once, while its call is still open: no new stream on this connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let another = http::Request::get("http://held.example/2")
        .body(())
        .expect("request");
    let refused = match client.clone().ready().await {
        Ok(mut c) => c.send_request(another, true).is_err(),
        Err(_) => true,
    };
    assert!(refused, "the client was not told to go away");

    // The open call is still answered in full, and then the connection ends gracefully.
    let response = response.await.expect("the call's answer");
    assert_eq!(response.status(), 200);
    let got = body_of(response).await;
    assert_eq!(got, b"late");
    ends_gracefully(connection).await;
    left_the_path_once(&stats).await;
}

#[tokio::test]
async fn a_replica_read_that_ends_inside_a_frame_header_reaches_the_client_once() {
    let (addr, backends, _stats, _) = holder(HoldConfig::default()).await;
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let ping = [
        0u8, 0, 8, 6, 0, 0, 0, 0, 0, b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'8',
    ];
    let sent_by_replica = [&settings[..], &ping[..]].concat();
    let bytes = sent_by_replica.clone();
    // The replica writes its SETTINGS and the first 4 bytes of a PING's header, then the rest.
    let split = replica(move |mut s| {
        let bytes = bytes.clone();
        async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&bytes[..13]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = s.write_all(&bytes[13..]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    let mut client = TcpStream::connect(addr).await.expect("connect");
    // The preface, SETTINGS, and stream 1 open (so the holder adds nothing of its own).
    let hello = [
        &h2_preface()[..],
        &settings[..],
        &[0, 0, 1, 1, 4, 0, 0, 0, 1, 0x82][..],
    ]
    .concat();
    client.write_all(&hello).await.expect("send");
    backends.send(vec![split]).expect("backends");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(400), async {
        while let Ok(n @ 1..) = client.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(got, sent_by_replica, "each byte once, in order");
}

fn h2_preface() -> Vec<u8> {
    super::exit::http2::PREFACE.to_vec()
}
