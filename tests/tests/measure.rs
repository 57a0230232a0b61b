//! What a scaling decision needs, measured in the kernel and checked against ground truth: the
//! concurrency of a closed loop (N) and of an open loop (Little's law, λ·L), latency percentiles,
//! CPU against the cgroup's own cpu.stat, memory, active connections, pipelined and chunked
//! requests counted one by one, and TLS, garbage and half-open connections counted as
//! connections only. Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use surge_tests::{
    harness::{free_port, require_root, scratch, Agent, Sample, Scaler},
    http_client::Connection,
    load::{run, run_open, LoadSpec, OpenLoop},
};

/// A scaler watching `web` (the sample server), and an agent; `cgroup` also attributes a cgroup.
struct Rig {
    web: Sample,
    scaler: Scaler,
    agent: Agent,
}

impl Rig {
    fn start(test: &str) -> Self {
        require_root();
        let dir = scratch(test);
        let web = Sample::start(&dir);
        let scaler = Scaler::start(
            &dir,
            free_port(),
            &["--observe".into(), format!("web={}", web.addr)],
        );
        Self::with(web, scaler, &dir)
    }

    fn with(web: Sample, scaler: Scaler, dir: &Path) -> Self {
        let agent = Agent::start(dir, &scaler.grpc_url(), &[]);
        scaler.wait_for("web", "first report", |v| v["reported"] == true);
        Self { web, scaler, agent }
    }

    fn settled(&self) -> Value {
        self.scaler.wait_reports(3);
        self.scaler.service("web")
    }

    /// The mean of `field` over `n` readings `every` apart (each is one report interval's value).
    fn mean_of(&self, field: &str, n: usize, every: Duration) -> f64 {
        let mut sum = 0.0;
        for _ in 0..n {
            let v = self.scaler.service("web");
            sum += v[field].as_f64().unwrap_or_else(|| panic!("{field} in {v}"));
            std::thread::sleep(every);
        }
        sum / n as f64
    }
}

fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} in {v}"))
}

fn within(measured: f64, truth: f64, tolerance: f64) -> bool {
    (measured - truth).abs() <= tolerance * truth
}

#[test]
fn closed_loop_concurrency_is_the_number_of_clients() {
    // 100 ms per request: a client's own gap between an answer and its next request (well
    // under a millisecond) is then far below the 2 % tolerance.
    let rig = Rig::start("closed-loop");
    let clients = 8;
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run(&LoadSpec {
                workers: clients,
                path: "/sleep?ms=100".into(),
                ..LoadSpec::get(addr, clients * 35)
            })
        }
    });
    // Steady state from about 1 s in; the load lasts about 3.5 s.
    std::thread::sleep(Duration::from_millis(1000));
    let c = rig.mean_of("concurrency", 12, Duration::from_millis(150));
    let r = load.join().expect("load");
    assert_eq!(r.ok, clients * 35, "{:?}", &r.errors[..r.errors.len().min(3)]);
    eprintln!("closed loop: concurrency {c:.3}, clients {clients}");
    assert!(
        within(c, clients as f64, 0.02),
        "concurrency {c}, clients {clients}"
    );
    let v = rig.settled();
    assert_eq!(v["in_flight"], 0, "{v}");
}

#[test]
fn open_loop_concurrency_follows_littles_law() {
    let rig = Rig::start("open-loop");
    let (rate, delay) = (160.0, 0.05);
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run_open(&OpenLoop {
                addr,
                rate,
                duration: Duration::from_secs(4),
                path: "/sleep?ms=50".into(),
            })
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
    let c = rig.mean_of("concurrency", 14, Duration::from_millis(150));
    let (r, achieved) = load.join().expect("load");
    assert_eq!(r.failed, 0, "{:?}", &r.errors[..r.errors.len().min(3)]);
    assert!(
        within(achieved, rate, 0.05),
        "the generator kept its rate: {achieved}"
    );
    // L is the delay each request really had, as its client saw it (the server's 50 ms sleep
    // plus timer slack and scheduling on a busy machine), measured without the agent's help.
    let l = r.latencies.iter().map(Duration::as_secs_f64).sum::<f64>() / r.latencies.len() as f64;
    assert!(l >= delay && l < 2.0 * delay, "mean delay {l} s");
    let truth = rate * l;
    eprintln!("open loop: concurrency {c:.3}, λ·L = {rate} × {l:.4} = {truth:.3}");
    assert!(
        within(c, truth, 0.05),
        "concurrency {c}, λ·L = {rate} × {l} = {truth}"
    );
}

#[test]
fn median_latency_of_a_20ms_server_is_20ms() {
    let rig = Rig::start("latency");
    let load = std::thread::spawn({
        let addr = rig.web.addr;
        move || {
            run(&LoadSpec {
                workers: 4,
                path: "/sleep?ms=20".into(),
                ..LoadSpec::get(addr, 4 * 120)
            })
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    let mut p50s = Vec::new();
    while !load.is_finished() {
        let v = rig.scaler.service("web");
        if let Some(p) = v["latency"]["p50_ms"].as_f64() {
            p50s.push(p);
        }
        std::thread::sleep(Duration::from_millis(120));
    }
    assert_eq!(load.join().expect("load").ok, 480);
    assert!(p50s.len() >= 5, "latency readings: {p50s:?}");
    p50s.sort_by(f64::total_cmp);
    let p50 = p50s[p50s.len() / 2];
    eprintln!("latency: p50 {p50:.2} ms of a 20 ms server");
    assert!(within(p50, 20.0, 0.10), "p50 {p50} ms; readings {p50s:?}");
}

/// The cgroup v2 mount point, from /proc/mounts.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup2 mount")
}

/// A cgroup made for one test, removed on drop (after its processes are gone).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let p = cgroup2_root().join(format!("surge-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("mkdir cgroup");
        Self(p)
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }

    fn usage_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(self.0.join("cpu.stat")).expect("cpu.stat");
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .expect("usage_usec");
        usec as f64 / 1e6
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn cpu_agrees_with_the_cgroups_cpu_stat() {
    require_root();
    let dir = scratch("cpu");
    let cg = TestCgroup::new("cpu");
    let web = Sample::start(&dir);
    cg.adopt(web.proc.pid().expect("running"));
    let config = dir.join("surge.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: web\n    endpoints: [\"{}\"]\n    cgroups: [\"{}\"]\n",
            web.addr,
            cg.0.display()
        ),
    )
    .expect("config");
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &["--config".into(), config.display().to_string()],
    );
    let rig = Rig::with(web, scaler, &dir);
    let v0 = rig.settled();
    let (cpu0, usage0) = (v0["cpu_seconds_total"].as_f64().expect("cpu"), cg.usage_seconds());

    let r = run(&LoadSpec {
        workers: 2,
        path: "/burn?ms=250".into(),
        ..LoadSpec::get(rig.web.addr, 8)
    });
    assert_eq!(r.ok, 8);
    std::thread::sleep(Duration::from_millis(200));
    let v1 = rig.settled();
    let (cpu1, usage1) = (v1["cpu_seconds_total"].as_f64().expect("cpu"), cg.usage_seconds());
    let (reported, truth) = (cpu1 - cpu0, usage1 - usage0);
    assert!(truth > 1.9, "the server burned {truth} s");
    eprintln!("cpu: reported {reported:.4} s, cpu.stat {truth:.4} s");
    assert!(
        within(reported, truth, 0.05),
        "reported {reported} s, cpu.stat {truth} s"
    );
    assert!(count(&v1, "memory_bytes") > 1 << 20, "{v1}");
    drop(rig);
}

#[test]
fn active_connections_are_counted_open_and_closed() {
    let rig = Rig::start("connections");
    let mut conns: Vec<Connection> = (0..5)
        .map(|_| Connection::open(rig.web.addr).expect("connect"))
        .collect();
    for c in &mut conns {
        assert_eq!(c.request("GET", "/", &[], false).expect("answer").status, 200);
    }
    rig.scaler
        .wait_for("web", "5 active connections", |v| v["active_connections"] == 5);
    drop(conns);
    let v = rig
        .scaler
        .wait_for("web", "no active connection", |v| v["active_connections"] == 0);
    assert_eq!(count(&v, "connections_opened_total"), 5, "{v}");
    assert_eq!(count(&v, "requests_total"), 5, "{v}");
}

/// Writes `bytes` on a fresh connection, half-closes, and reads whatever comes back.
fn poke(addr: SocketAddr, bytes: &[u8], half_close: bool) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.read_to_end(&mut Vec::new());
}

#[test]
fn tls_and_half_open_connections_are_connections_not_requests() {
    let mut rig = Rig::start("tls");
    // A ClientHello's first bytes: a handshake record, TLS 1.0 record version, ClientHello.
    let hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03surge-fake-random-bytes-0123456789";
    poke(rig.web.addr, hello, true);
    // Half-open: a request line cut short, then the client's FIN; and a silent connection.
    poke(rig.web.addr, b"GET /sl", true);
    poke(rig.web.addr, b"", true);
    let v = rig.scaler.wait_for("web", "3 connections closed", |v| {
        v["connections_closed_total"].as_u64() >= Some(3)
    });
    assert_eq!(v["requests_available"], false, "{v}");
    assert!(v["requests_total"].is_null(), "{v}");
    assert_eq!(count(&v, "tls_connections_total"), 1, "{v}");
    assert_eq!(count(&v, "connections_opened_total"), 3, "{v}");
    assert_eq!(count(&v, "active_connections"), 0, "{v}");
    assert!(rig.agent.proc.is_running());
    // Plain requests beside it make requests available, counted exactly.
    let r = run(&LoadSpec::get(rig.web.addr, 10));
    assert_eq!(r.ok, 10);
    let v = rig.settled();
    assert_eq!(v["requests_available"], true, "{v}");
    assert_eq!(count(&v, "requests_total"), 10, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}

/// A chunked POST whose chunks carry text that looks like requests.
fn chunked_post() -> Vec<u8> {
    let mut r = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"hello", &[b'x'; 3000]] {
        r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        r.extend_from_slice(chunk);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

#[test]
fn chunked_request_bodies_count_once() {
    let rig = Rig::start("chunked");
    let body = chunked_post();
    let mut c = Connection::open(rig.web.addr).expect("connect");
    let n = 60;
    for i in 0..n {
        // Cut each request into a few writes, so it arrives in several segments.
        let cut = [10, 70, 90, 2000][i % 4];
        c.send_raw(&body[..cut]).expect("send");
        std::thread::sleep(Duration::from_millis(2));
        c.send_raw(&body[cut..]).expect("send");
        let r = c.read_response().expect("answer");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"3023\n"[..]));
    }
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), n as u64, "{v}");
    assert_eq!(count(&v, "responses_total"), n as u64, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}

/// Reads one answer per request of `order` (true: a HEAD request, whose answer has no body),
/// each a 200.
fn read_answers(c: &mut Connection, order: &[bool]) {
    for &is_head in order {
        let r = if is_head {
            c.read_head_response()
        } else {
            c.read_response()
        }
        .expect("answer");
        assert_eq!(r.status, 200);
    }
}

/// A HEAD response announces a body (Content-Length: 5000) that never comes: the framing must
/// not skip the next response as if it were that body.
#[test]
fn head_requests_answered_with_a_content_length_are_counted_exactly() {
    let rig = Rig::start("head");
    let (head, get) = (
        b"HEAD /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n".as_slice(),
        b"GET /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n".as_slice(),
    );
    let mut c = Connection::open(rig.web.addr).expect("connect");
    // One at a time, alternating.
    let rounds = 50;
    for _ in 0..rounds {
        c.send_raw(head).expect("send");
        assert_eq!(c.read_head_response().expect("HEAD answer").status, 200);
        c.send_raw(get).expect("send");
        let r = c.read_response().expect("GET answer");
        assert_eq!((r.status, r.body.len()), (200, 5000));
    }
    // Pipelined: HEAD, HEAD, GET, HEAD, GET in one write, answered in order.
    let order = [true, true, false, true, false];
    let batches = 20;
    for _ in 0..batches {
        let mut batch = Vec::new();
        for &is_head in &order {
            batch.extend_from_slice(if is_head { head } else { get });
        }
        c.send_raw(&batch).expect("send");
        read_answers(&mut c, &order);
    }
    // Counted while the connection is still open: a misframed response would leave a request
    // in flight until the connection closes.
    let total = (2 * rounds + order.len() * batches) as u64;
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), total, "{v}");
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    drop(c);
}

/// HEAD and GET requests pipelined on 8 connections while their answers flow back: each
/// connection's request side and response side then run at once on both CPUs. Both keep the
/// connection's queue of open requests (which are HEAD); if one side's update of it could undo
/// the other's, a HEAD answer would be framed as if its 5000-byte body followed, and the
/// answers after it would go uncounted.
#[test]
fn head_requests_pipelined_while_answers_flow_are_counted_exactly() {
    let rig = Rig::start("head-flow");
    let (head, get) = (
        b"HEAD /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n".as_slice(),
        b"GET /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n".as_slice(),
    );
    let order = [true, false, true];
    let batch: Vec<u8> = order
        .iter()
        .flat_map(|&h| if h { head } else { get })
        .copied()
        .collect();
    // Batches written ahead of the answers read: at most 12 requests open, all remembered.
    let (connections, batches, ahead) = (8, 400, 4);
    let handles: Vec<_> = (0..connections)
        .map(|_| {
            let (addr, batch) = (rig.web.addr, batch.clone());
            std::thread::spawn(move || {
                let mut c = Connection::open(addr).expect("connect");
                let mut w = c.writer().expect("writer");
                let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<()>(ahead);
                let writer = std::thread::spawn(move || {
                    for _ in 0..batches {
                        read_tx.send(()).expect("reader alive");
                        w.write_all(&batch).expect("send");
                    }
                });
                for _ in 0..batches {
                    read_answers(&mut c, &order);
                    read_rx.recv().expect("writer alive");
                }
                writer.join().expect("writer");
                c
            })
        })
        .collect();
    // Counted while the connections are still open: a misframed answer would leave requests
    // in flight until they close.
    let open: Vec<Connection> = handles.into_iter().map(|h| h.join().expect("client")).collect();
    let total = (connections * batches * order.len()) as u64;
    let v = rig.settled();
    assert_eq!(count(&v, "requests_total"), total, "{v}");
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    drop(open);
}

#[test]
fn pipelined_requests_are_counted_one_by_one() {
    let rig = Rig::start("pipelining");
    let mut batch = Vec::new();
    let per_batch = 40;
    for i in 0..per_batch {
        match i % 4 {
            0 => batch.extend_from_slice(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"),
            1 => batch.extend_from_slice(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            ),
            2 => batch.extend_from_slice(&chunked_post()),
            _ => batch.extend_from_slice(b"GET /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n"),
        }
    }
    let (connections, batches) = (3, 5);
    let start = Instant::now();
    let handles: Vec<_> = (0..connections)
        .map(|_| {
            let (addr, batch) = (rig.web.addr, batch.clone());
            std::thread::spawn(move || {
                let mut c = Connection::open(addr).expect("connect");
                for _ in 0..batches {
                    c.send_raw(&batch).expect("send");
                    for _ in 0..per_batch {
                        assert_eq!(c.read_response().expect("answer").status, 200);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("pipelining client");
    }
    let total = (connections * batches * per_batch) as u64;
    let v = rig.settled();
    assert_eq!(
        count(&v, "requests_total"),
        total,
        "{v} after {:?}",
        start.elapsed()
    );
    assert_eq!(count(&v, "responses_total"), total, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
}
