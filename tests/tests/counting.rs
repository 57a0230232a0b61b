//! Kernel-counted HTTP requests reach the scaler exactly: the agent's eBPF programs against a real
//! HTTP server under real load, the scaler's API against the number of requests sent. Needs root.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use serde_json::Value;
use surge_tests::{
    harness::{
        deferred_accept_listener, free_port, require_root, scratch, Agent, ReservedPort, Sample, Scaler,
    },
    http_client::{get_text, request_head, Connection},
    load::{run, LoadSpec},
};

/// A scaler watching `web` (the sample server) and `idle` (a port nobody uses), and an agent.
struct Rig {
    web: Sample,
    idle: SocketAddr,
    /// Keeps `idle`'s port from every other socket until a test gives it up.
    idle_reserved: Option<ReservedPort>,
    scaler: Scaler,
    agent: Agent,
    dir: PathBuf,
}

impl Rig {
    fn start(test: &str) -> Self {
        require_root();
        let dir = scratch(test);
        let web = Sample::start(&dir);
        let reserved = ReservedPort::new();
        let idle = reserved.addr;
        let scaler = Scaler::start(&dir, free_port(), &observe_flags(&web, idle));
        let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
        let rig = Self {
            web,
            idle,
            idle_reserved: Some(reserved),
            scaler,
            agent,
            dir,
        };
        rig.scaler
            .wait_for("web", "first report", |v| v["reported"] == true);
        rig.scaler
            .wait_for("idle", "first report", |v| v["reported"] == true);
        rig
    }

    /// Waits for the agent to report everything counted so far, then returns web's entry.
    fn settled(&self) -> Value {
        self.scaler.wait_reports(3);
        self.scaler.service("web")
    }

    fn assert_idle_untouched(&self) {
        let idle = self.scaler.service("idle");
        assert_eq!(idle["requests_total"], 0, "{idle}");
        assert_eq!(idle["rx_bytes_total"], 0, "{idle}");
    }
}

/// A loopback endpoint nobody listens on.
fn idle_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn observe_flags(web: &Sample, idle: SocketAddr) -> Vec<String> {
    vec![
        "--observe".into(),
        format!("web={}", web.addr),
        "--observe".into(),
        format!("idle={idle}"),
    ]
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

fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} in {v}"))
}

#[test]
fn keep_alive_requests_are_counted_exactly() {
    let rig = Rig::start("keepalive");
    let n = 3000;
    send(&LoadSpec {
        workers: 4,
        ..LoadSpec::get(rig.web.addr, n)
    });
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    rig.assert_idle_untouched();
}

#[test]
fn a_new_connection_per_request_is_counted_exactly() {
    let rig = Rig::start("newconn");
    let n = 2000;
    send(&LoadSpec {
        workers: 4,
        keep_alive: false,
        ..LoadSpec::get(rig.web.addr, n)
    });
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    rig.assert_idle_untouched();
}

#[test]
fn bodies_that_span_many_segments_count_once() {
    let rig = Rig::start("bodies");
    let (n_up, n_down, size) = (300, 300, 256 * 1024);
    // Large request bodies, over keep-alive and over fresh connections.
    let upload = LoadSpec {
        method: "POST".into(),
        path: "/echo".into(),
        body: size,
        workers: 2,
        ..LoadSpec::get(rig.web.addr, n_up)
    };
    send(&upload);
    send(&LoadSpec {
        keep_alive: false,
        ..upload.clone()
    });
    // Large response bodies.
    send(&LoadSpec {
        path: format!("/bytes?n={size}"),
        workers: 2,
        ..LoadSpec::get(rig.web.addr, n_down)
    });
    // Small ones in between.
    send(&LoadSpec {
        method: "POST".into(),
        path: "/echo".into(),
        body: 10,
        ..LoadSpec::get(rig.web.addr, 100)
    });
    let total = (2 * n_up + n_down + 100) as u64;
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), total, "{v}");
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    assert!(count(&v, "rx_bytes_total") >= (2 * n_up * size) as u64, "{v}");
    assert!(count(&v, "tx_bytes_total") >= (n_down * size) as u64, "{v}");
    rig.assert_idle_untouched();
}

/// Health probes (the kubelet's `kube-probe/…`, the local actuator's `surge-probe`) are not
/// traffic: counted apart, left out of requests and responses, so a service at rest can scale to
/// zero however often it is probed.
#[test]
fn health_probes_are_counted_apart_and_left_out_of_the_traffic() {
    let rig = Rig::start("probes");
    let (n, kube_probes, surge_probes) = (40, 10, 5);
    let mut keep_alive = Connection::open(rig.web.addr).expect("connect");
    for i in 0..n {
        let r = keep_alive.request("GET", "/", b"", false).expect("answered");
        assert_eq!(r.status, 200);
        if i % 8 == 0 {
            // The local actuator's probe, between requests on a kept-alive connection.
            keep_alive
                .send_raw(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: surge-probe\r\n\r\n")
                .expect("probe");
            assert_eq!(keep_alive.read_response().expect("probe answered").status, 200);
        }
    }
    for _ in 0..kube_probes {
        // As the kubelet probes: a connection per probe.
        let mut c = Connection::open(rig.web.addr).expect("connect");
        c.send_raw(b"GET / HTTP/1.1\r\nHost: 10.0.0.7:8080\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n")
            .expect("probe");
        assert_eq!(c.read_response().expect("probe answered").status, 200);
    }
    // A probe the server takes 1.5 s to answer is never in flight: the agent reports every
    // 100 ms meanwhile.
    let mut slow = Connection::open(rig.web.addr).expect("connect");
    slow.send_raw(
        b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n",
    )
    .expect("slow probe");
    let during = std::time::Instant::now();
    let mut seen = 0;
    while during.elapsed() < Duration::from_millis(1200) {
        let v = rig.scaler.service("web");
        assert_eq!(v["in_flight"], 0, "a probe is not in flight: {v}");
        seen += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen >= 5);
    assert_eq!(slow.read_response().expect("slow probe answered").status, 200);
    // A probe whose User-Agent comes in a later segment than its request line: in flight
    // until then, and its answer ends no request.
    let mut split = Connection::open(rig.web.addr).expect("connect");
    split
        .send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("request line");
    std::thread::sleep(Duration::from_millis(300));
    split
        .send_raw(b"User-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n")
        .expect("the rest");
    assert_eq!(split.read_response().expect("split probe answered").status, 200);
    drop(keep_alive);
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(
        count(&v, "probe_requests_total"),
        (kube_probes + surge_probes + 2) as u64,
        "{v}"
    );
    assert_eq!(v["in_flight"], 0, "{v}");
    // Nor are probes in the latency histogram: only the requests are.
    let (_, metrics) = get_text(rig.scaler.http, "/metrics").expect("/metrics");
    let line = format!("surge_service_request_latency_seconds_count{{service=\"web\"}} {n}");
    assert!(
        metrics.lines().any(|l| l == line),
        "missing {line:?} in:\n{metrics}"
    );
}

/// While nothing listens on a watched endpoint, a client may be given its port for a connection
/// of its own (an ephemeral port, or bound on purpose): that client's traffic is not the service's.
#[test]
fn a_client_using_a_watched_endpoints_port_counts_nowhere() {
    let mut rig = Rig::start("clientport");
    // Nothing listens on idle's port any more: a client may now have it.
    drop(rig.idle_reserved.take());
    let n = 25;
    let mut conn = Connection::open_from(rig.idle, rig.web.addr).expect("connect from idle's port");
    for i in 0..n {
        let r = conn
            .request("POST", "/echo", &vec![b'x'; 100 + i], false)
            .expect("answered");
        assert_eq!(r.status, 200);
    }
    drop(conn);
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    rig.assert_idle_untouched();
    let idle = rig.scaler.service("idle");
    assert_eq!(idle["tx_bytes_total"], 0, "{idle}");
    assert_eq!(idle["connections_opened_total"], 0, "{idle}");
    assert_eq!(idle["connections_closed_total"], 0, "{idle}");
}

#[test]
fn traffic_to_an_unwatched_port_counts_nowhere() {
    let rig = Rig::start("unwatched");
    let other = Sample::start(&rig.dir);
    send(&LoadSpec {
        workers: 2,
        ..LoadSpec::get(other.addr, 1000)
    });
    send(&LoadSpec::get(rig.web.addr, 7));
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), 7, "{v}");
    rig.assert_idle_untouched();
}

/// A deterministic byte stream (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_on_a_watched_port_counts_nothing_and_breaks_nothing() {
    let mut rig = Rig::start("garbage");
    let mut payloads: Vec<Vec<u8>> = (0..40).map(|i| noise(i + 1, 64 + 97 * i as usize)).collect();
    // A TLS ClientHello start, an HTTP/2 preface, a lone method, a response sent by a client.
    payloads.push(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-hello".to_vec());
    payloads.push(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec());
    payloads.push(b"GET".to_vec());
    payloads.push(b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
    for p in &payloads {
        let mut s = TcpStream::connect(rig.web.addr).expect("connect");
        let _ = s.write_all(p);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    let v = rig.settled();
    // The fake TLS hello makes the service's requests unavailable (null) until one is seen.
    assert_eq!(v["requests_available"], false, "{v}");
    assert!(v["requests_total"].is_null(), "{v}");
    assert!(
        rig.agent.proc.is_running(),
        "the agent survived: {}",
        rig.agent.proc.log_tail()
    );
    // Real requests still count exactly afterwards.
    send(&LoadSpec::get(rig.web.addr, 100));
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), 100, "{v}");
}

#[test]
fn restarting_the_scaler_loses_no_counts() {
    require_root();
    let dir = scratch("scaler-restart");
    let web = Sample::start(&dir);
    let grpc_port = free_port();
    let mut scaler = Scaler::start(&dir, grpc_port, &observe_flags(&web, idle_addr()));
    let agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("web", "first report", |v| v["reported"] == true);

    send(&LoadSpec::get(web.addr, 700));
    scaler.wait_for("web", "the first 700", |v| v["requests_total"] == 700);
    scaler.proc.stop_with(libc::SIGKILL);
    // While the scaler is away the agent keeps counting in the kernel.
    send(&LoadSpec {
        keep_alive: false,
        ..LoadSpec::get(web.addr, 500)
    });
    let scaler = Scaler::start(&dir, grpc_port, &observe_flags(&web, idle_addr()));
    let v = scaler.wait_for("web", "all 1200 after the restart", |v| {
        v["requests_total"].as_u64() >= Some(1200)
    });
    scaler.wait_reports(3);
    let v2 = scaler.service("web");
    assert_eq!(count(&v2, "requests_total"), 1200, "{v} then {v2}");
    assert!(agent.proc.log_tail().contains("connected to the scaler"));
}

/// A connection's service is cached on its socket: when the scaler gives the connection's endpoint
/// to another service, the requests that follow on the same open connection count for the new
/// service only.
#[test]
fn an_open_connection_follows_its_endpoint_to_another_service() {
    require_root();
    let dir = scratch("endpoint-moves");
    let web = Sample::start(&dir);
    let idle = idle_addr();
    let grpc_port = free_port();
    let mut scaler = Scaler::start(&dir, grpc_port, &observe_flags(&web, idle));
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("web", "first report", |v| v["reported"] == true);

    let mut conn = Connection::open(web.addr).expect("connect");
    let mut ask = |n: usize| {
        for _ in 0..n {
            let r = conn.request("GET", "/", b"", false).expect("answered");
            assert_eq!(r.status, 200);
        }
    };
    ask(30);
    scaler.wait_for("web", "the first 30", |v| v["requests_total"] == 30);
    scaler.proc.stop_with(libc::SIGKILL);
    // The next scaler gives web's endpoint to `moved`, and web a port nobody uses.
    let scaler = Scaler::start(
        &dir,
        grpc_port,
        &[
            "--observe".into(),
            format!("web={idle}"),
            "--observe".into(),
            format!("moved={}", web.addr),
        ],
    );
    scaler.wait_for("moved", "first report", |v| v["reported"] == true);
    ask(20);
    drop(conn);
    scaler.wait_reports(3);
    let moved = scaler.service("moved");
    let web_now = scaler.service("web");
    assert_eq!(count(&moved, "requests_total"), 20, "{moved}");
    assert_eq!(count(&moved, "responses_total"), 20, "{moved}");
    assert_eq!(count(&web_now, "requests_total"), 30, "{web_now}");
    assert_eq!(count(&web_now, "responses_total"), 30, "{web_now}");
}

#[test]
fn restarting_the_agent_is_never_a_negative_rate() {
    let mut rig = Rig::start("agent-restart");
    send(&LoadSpec::get(rig.web.addr, 400));
    rig.scaler
        .wait_for("web", "the first 400", |v| v["requests_total"] == 400);
    rig.agent.proc.stop_with(libc::SIGTERM);
    let agent = Agent::start(&rig.dir, &rig.scaler.grpc_url(), &[]);
    // The new instance reports from zero: the scaler carries the old totals over.
    rig.scaler
        .wait_for("web", "the new agent's first report", |v| v["resets"] == 1);
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run(&LoadSpec {
                workers: 2,
                ..LoadSpec::get(addr, 600)
            })
        }
    });
    let mut min_rate = f64::MAX;
    let mut last_total = 0;
    while !load.is_finished() {
        let v = rig.scaler.service("web");
        min_rate = min_rate.min(v["request_rate"].as_f64().unwrap_or(-1.0));
        let total = count(&v, "requests_total");
        assert!(
            total >= last_total,
            "the total went backwards: {last_total} then {total}"
        );
        last_total = total;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(load.join().expect("load").ok, 600);
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), 1000, "{v}");
    assert!(min_rate >= 0.0, "a negative rate was reported: {min_rate}");
    drop(agent);
}

/// HTTP/1.1 keep-alive connections of three requests, answered by a minimal server whose
/// listener accepts with `TCP_DEFER_ACCEPT` (see `deferred_accept_listener`).
fn deferred_accept_server() -> SocketAddr {
    use std::io::Read;
    let listener = deferred_accept_listener();
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Every request is a GET without a body: answer each whole head.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if conn
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn requests_whose_first_data_completes_the_handshake_are_counted_exactly() {
    require_root();
    let dir = scratch("deferred");
    let server = deferred_accept_server();
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &["--observe".into(), format!("deferred={server}")],
    );
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("deferred", "first report", |v| v["reported"] == true);
    let (connections, per_connection) = (200, 3);
    let mut open = Vec::new();
    for _ in 0..connections {
        let mut c = Connection::open(server).expect("connect");
        for _ in 0..per_connection {
            let r = c.request("GET", "/", b"", false).expect("answered");
            assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        }
        open.push(c);
    }
    // Counted while the connections are open (in flight must be 0 before any closes), then
    // after they close.
    let total = (connections * per_connection) as u64;
    scaler.wait_reports(3);
    let v = scaler.service("deferred");
    assert_eq!(count(&v, "requests_total"), total, "{v}");
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    // Every byte once, the first request's with the handshake too.
    let request_len = request_head("GET", "/", b"", false).len() as u64;
    assert_eq!(count(&v, "rx_bytes_total"), total * request_len, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    drop(open);
    scaler.wait_reports(3);
    let v = scaler.service("deferred");
    assert_eq!(v["in_flight"], 0, "{v}");
    assert_eq!(count(&v, "connections_closed_total"), connections as u64, "{v}");
    // A TLS client's hello completes its handshake the same way: one TLS connection, its bytes.
    let mut tls = TcpStream::connect(server).expect("connect");
    tls.write_all(TLS_HELLO).expect("hello");
    drop(tls);
    let v = scaler.wait_for("deferred", "the TLS connection closed", |v| {
        v["connections_closed_total"].as_u64() >= Some(connections as u64 + 1)
    });
    assert_eq!(count(&v, "tls_connections_total"), 1, "{v}");
    assert_eq!(
        count(&v, "rx_bytes_total"),
        total * request_len + TLS_HELLO.len() as u64,
        "{v}"
    );
}

/// A request's segment that arrives again (a retransmission) adds neither a request nor its
/// bytes: both count once.
#[test]
fn a_retransmitted_request_counts_once_with_its_bytes() {
    let rig = Rig::start("retransmit");
    let web = ipv4(rig.web.addr);
    let from = unused_loopback_port();
    let mut c = Connection::open_from(from.into(), rig.web.addr).expect("connect");
    let head = request_head("GET", "/", b"", false);
    let ask = |c: &mut Connection, n: usize| {
        for _ in 0..n {
            assert_eq!(c.request("GET", "/", b"", false).expect("answered").status, 200);
        }
    };
    ask(&mut c, 5);
    // The fifth request was answered, so all of it was received: send it again.
    let next = surge_tests::raw_tcp::next_send_seq(&c.writer().expect("socket")).expect("repair mode");
    surge_tests::raw_tcp::send_segment(from, web, next.wrapping_sub(head.len() as u32), head.as_bytes())
        .expect("a raw segment");
    ask(&mut c, 5);
    drop(c);
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), 10, "{v}");
    assert_eq!(count(&v, "responses_total"), 10, "{v}");
    assert_eq!(count(&v, "rx_bytes_total"), 10 * head.len() as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}

/// The sample's address, which is IPv4 (raw segments are sent over IPv4).
fn ipv4(addr: SocketAddr) -> std::net::SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("the sample listens on IPv4"),
    }
}

/// A loopback address whose port no socket has: a raw segment's source.
fn unused_loopback_port() -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, free_port())
}

/// A ClientHello's first bytes: a handshake record, TLS 1.0 record version, ClientHello.
const TLS_HELLO: &[u8] = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03surge-fake-random-bytes-0123456789";

/// A request that reaches a listening socket with no connection and no handshake to complete
/// (as a client's late request does after the server reset its connection away) is refused by
/// the kernel: it is not counted, and what was framed of it does not pass to a later connection
/// from the same address and port, which is counted exactly.
#[test]
fn a_late_request_at_a_listening_socket_counts_nowhere_and_misleads_no_later_connection() {
    let rig = Rig::start("stray");
    let web = ipv4(rig.web.addr);
    let from = unused_loopback_port();
    surge_tests::raw_tcp::send_segment(from, web, 0x5eed_0001, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("a raw segment");
    // And a TLS hello's first bytes from another port: no TLS connection either.
    let from_tls = unused_loopback_port();
    surge_tests::raw_tcp::send_segment(from_tls, web, 0x5eed_0002, TLS_HELLO).expect("a raw segment");
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), 0, "{v}");
    assert_eq!(count(&v, "rx_bytes_total"), 0, "{v}");
    assert_eq!(count(&v, "tls_connections_total"), 0, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");

    let n = 20;
    let mut c = Connection::open_from(from.into(), rig.web.addr).expect("connect from the same port");
    for _ in 0..n {
        assert_eq!(c.request("GET", "/", b"", false).expect("answered").status, 200);
    }
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n, "{v}");
    assert_eq!(count(&v, "responses_total"), n, "{v}");
    let request_len = request_head("GET", "/", b"", false).len() as u64;
    assert_eq!(count(&v, "rx_bytes_total"), n * request_len, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    drop(c);
}
