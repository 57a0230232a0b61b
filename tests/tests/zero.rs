//! Scale from zero: connections to a service with no ready replica are held by the agent (the
//! kernel's connect hook sends them to its holder), the demand activates the service at once,
//! and every held client gets its answer when the replica is ready. Needs root (eBPF).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use surge_tests::{
    browser::{element, rendered_dom},
    echo::{echo_client::EchoClient, EchoRequest},
    harness::{cleanup_pins, free_port, require_root, scratch, Agent, LocalService, Scaler},
    http_client::{get_text, Connection},
};
use tonic::transport::Endpoint;

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

/// The scaler's flags for a service `name` at zero at `address`, whose replica (surge-sample with
/// `sample_args`) starts listening `startup` after it is started.
fn configure(
    dir: &Path,
    name: &str,
    address: SocketAddr,
    startup: &str,
    sample_args: &[&str],
) -> Vec<String> {
    let mut args = vec!["--startup-delay", startup];
    args.extend_from_slice(sample_args);
    LocalService {
        name,
        address,
        policy: ("zero", POLICY),
        replicas: 0,
        sample_args: &args,
        readiness: "{tcp: true}",
        local_extra: &["drain_timeout: 2s", "grace_period: 1s"],
    }
    .scaler_flags(dir)
}

/// A service at zero, its scaler, and an agent that has reported it.
struct AtZero {
    address: SocketAddr,
    scaler: Scaler,
    agent: Agent,
}

/// Starts the scaler for a service `name` at zero (see [`configure`]) and an agent with
/// `agent_args`, and waits for the agent's first report of the service.
fn at_zero(test: &str, name: &str, startup: &str, sample_args: &[&str], agent_args: &[String]) -> AtZero {
    let dir = scratch(test);
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &configure(&dir, name, address, startup, sample_args),
    );
    let agent = Agent::start(&dir, &scaler.grpc_url(), agent_args);
    scaler.wait_for(name, "the agent's first report at zero", |v| {
        v["reported"] == true && v["replicas"]["current"] == 0
    });
    AtZero {
        address,
        scaler,
        agent,
    }
}

/// Once no connection is held: the hold-duration histogram counted every held connection exactly
/// once, in the API and on /metrics, and every wait lasted at least the replica's 2 s start
/// (within a bucket's width). Returns the number of held connections.
fn hold_histogram_counts_every_hold(scaler: &Scaler, name: &str) -> u64 {
    let v = scaler.wait_for(name, "no connection held", |v| v["held_connections"] == 0);
    let held = v["held_total"].as_u64().expect("held_total");
    assert_eq!(v["hold_duration_count"], held, "{v}");
    let p50 = v["hold_duration"]["p50_ms"].as_f64().expect("hold p50");
    let p99 = v["hold_duration"]["p99_ms"].as_f64().expect("hold p99");
    assert!(p50 >= 1_900.0 && p99 >= p50, "{v}");
    let (status, text) = get_text(scaler.http, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let count = format!("surge_service_hold_duration_seconds_count{{service=\"{name}\"}} {held}");
    let inf = format!("surge_service_hold_duration_seconds_bucket{{le=\"+Inf\",service=\"{name}\"}} {held}");
    for line in [count, inf] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    held
}

#[test]
fn two_hundred_cold_clients_all_get_their_answer_and_warm_traffic_goes_direct() {
    require_root();
    let name = "cold-http";
    let AtZero {
        address,
        scaler,
        agent: _agent,
    } = at_zero("zero", name, "2s", &[], &[]);

    // 200 clients at once: half keep-alive clients that send a second request, half one request
    // each that ask to close. The answer to a held keep-alive request says `Connection: close`,
    // so the second request goes on a new connection, straight to the replica, which sees the
    // client itself: the held connection has left the agent's path.
    let started = Instant::now();
    let clients: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || -> Result<Vec<u16>, String> {
                let keep_alive = i % 2 == 0;
                let mut c = Connection::open(address).map_err(|e| e.to_string())?;
                let first = c
                    .request("GET", "/", &[], !keep_alive)
                    .map_err(|e| e.to_string())?;
                if !keep_alive {
                    return Ok(vec![first.status]);
                }
                if first.header("connection") != Some("close") {
                    return Err(format!(
                        "a held keep-alive answer without Connection: close: {first:?}"
                    ));
                }
                let mut c = Connection::open(address).map_err(|e| e.to_string())?;
                let me = c.local_addr().map_err(|e| e.to_string())?;
                let second = c
                    .request("GET", "/whoami", &[], true)
                    .map_err(|e| e.to_string())?;
                let seen = String::from_utf8_lossy(&second.body).trim().to_string();
                if seen != me.to_string() {
                    return Err(format!(
                        "the second request was relayed: the replica saw {seen}, not {me}"
                    ));
                }
                Ok(vec![first.status, second.status])
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
    let v = scaler.service(name);
    assert!(v["held_total"].as_u64() >= Some(200), "{v}");
    assert_eq!(v["hold_timeouts"], 0, "{v}");

    // Warm now: a new connection goes straight to the replica, which sees the client itself.
    scaler.wait_for(name, "the held connections are gone", |v| {
        v["held_connections"] == 0
    });
    let held = hold_histogram_counts_every_hold(&scaler, name);
    assert_eq!(
        held, 200,
        "a client answered and told to reconnect was not held again"
    );
    // Every held connection left the path after its answer: the keep-alive ones told to
    // reconnect, the others closing as they asked.
    scaler.wait_for(name, "every held connection out of the path", |v| {
        v["held_left_path"] == 200 && v["relayed_connections"] == 0
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
    let held_before = scaler.service(name)["held_total"].as_u64();
    let mut c = Connection::open(address).expect("connect");
    let _ = c.request("GET", "/", &[], true).expect("warm request");
    scaler.wait_reports(3);
    assert_eq!(
        scaler.service(name)["held_total"].as_u64(),
        held_before,
        "a warm connection is not held"
    );
}

#[test]
fn a_client_held_past_the_timeout_gets_503_with_retry_after_and_the_next_one_succeeds() {
    require_root();
    let name = "cold-timeout";
    let AtZero {
        address,
        scaler,
        agent: _agent,
    } = at_zero(
        "zero-timeout",
        name,
        "6s",
        &[],
        &["--hold-timeout".into(), "2s".into()],
    );

    let mut c = Connection::open(address).expect("connect");
    let reply = c.request("GET", "/", &[], false).expect("an answer, not a reset");
    assert_eq!(reply.status, 503);
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        "no replica became ready in time\n"
    );
    let v = scaler.wait_for(name, "the timeout counted", |v| v["hold_timeouts"] == 1);
    assert!(
        v["replicas"]["desired"].as_u64() >= Some(1),
        "the demand activated the service: {v}"
    );

    scaler.wait_for(name, "the replica ready", |v| v["replicas"]["ready"] == 1);
    let mut c = Connection::open(address).expect("connect");
    assert_eq!(c.request("GET", "/", &[], true).expect("answer").status, 200);
    // The timed-out wait is in the histogram; the connection after readiness was not held.
    assert_eq!(hold_histogram_counts_every_hold(&scaler, name), 1);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// What call `id` sends: distinct for every call, so a mixed-up answer cannot pass.
fn payload(id: u64) -> Vec<u8> {
    format!("call {id:03};").repeat(64).into_bytes()
}

/// Makes every call `(id, channel)` at once: each call's outcome, an error naming the call if it
/// failed or got another call's answer.
async fn echo_calls(
    calls: impl Iterator<Item = (u64, tonic::transport::Channel)>,
) -> Vec<Result<(), String>> {
    let tasks: Vec<_> = calls
        .map(|(id, channel)| {
            let mut client = EchoClient::new(channel);
            tokio::spawn(async move {
                let reply = client
                    .echo(EchoRequest {
                        id,
                        payload: payload(id),
                    })
                    .await
                    .map_err(|status| format!("call {id}: {status}"))?
                    .into_inner();
                if reply.id != id || reply.payload != payload(id) {
                    return Err(format!("call {id} got the answer of call {}", reply.id));
                }
                Ok(())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("call task"));
    }
    outcomes
}

#[test]
fn two_hundred_cold_grpc_calls_all_get_their_own_answer() {
    require_root();
    let name = "cold-grpc";
    let AtZero {
        address,
        scaler,
        agent: _agent,
    } = at_zero("zero-grpc", name, "2s", &["--grpc"], &[]);

    // 150 h2c connections made while the service is at zero; then 200 unary calls at once:
    // 100 connections carry one call, 50 carry two multiplexed streams. tonic never retries.
    let rt = runtime();
    let (channels, outcomes) = rt.block_on(async move {
        let mut channels = Vec::new();
        for _ in 0..150 {
            let endpoint = Endpoint::from_shared(format!("http://{address}")).expect("endpoint");
            channels.push(endpoint.connect().await.expect("connect to the service address"));
        }
        let calls = (0..200u64).map(|id| (id, channels[id as usize % 150].clone()));
        let outcomes = echo_calls(calls).await;
        (channels, outcomes)
    });
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 200 calls failed: {failed:?}",
        failed.len()
    );
    assert_eq!(outcomes.len(), 200);

    // Every connection was made while the replica was still starting: all 150 were held.
    let held = hold_histogram_counts_every_hold(&scaler, name);
    assert_eq!(held, 150);
    let v = scaler.service(name);
    assert_eq!(v["hold_timeouts"], 0, "{v}");

    // Once their calls were answered, the clients were told to go away (a graceful GOAWAY),
    // and every relayed connection closed.
    scaler.wait_for(name, "every held connection out of the path", |v| {
        v["held_left_path"] == 150 && v["relayed_connections"] == 0
    });
    // Each channel's next call opens a new connection, which the connect hook sends straight
    // to the replica: no call fails, and none is held.
    let again = rt.block_on(echo_calls(
        channels
            .into_iter()
            .enumerate()
            .map(|(i, channel)| (1_000 + i as u64, channel)),
    ));
    let failed: Vec<&String> = again.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 150 later calls failed: {failed:?}",
        failed.len()
    );
    let v = scaler.wait_for(name, "the later calls counted", |v| v["requests_total"] == 350);
    assert_eq!(v["held_total"], 150, "{v}");
    assert_eq!(v["relayed_connections"], 0, "{v}");
}

/// The gRPC client of `tests/scripts/grpc_core_calls.py` (gRPC core, the C library under the
/// Python, Ruby, PHP and C# clients) with `channels` channels to `address`: it makes one call per
/// channel, then waits for a line on its stdin and makes another round.
struct GrpcCoreClient {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl GrpcCoreClient {
    fn start(address: SocketAddr, channels: usize) -> Self {
        use std::{
            io::BufRead,
            process::{Command, Stdio},
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_core_calls.py");
        // Debian's python3, where python3-grpcio is (deploy/setup.sh installs it).
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(address.to_string())
            .arg(channels.to_string())
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("grpc_proxy")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the gRPC core client");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// The client's next line (60 s at most).
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a line from the gRPC core client")
    }

    fn next_round(&mut self) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("tell the client");
    }
}

impl Drop for GrpcCoreClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn grpc_core_clients_held_while_cold_leave_the_path_and_reconnect_by_themselves() {
    require_root();
    let name = "cold-grpc-core";
    let AtZero {
        address,
        scaler,
        agent: _agent,
    } = at_zero("zero-grpc-core", name, "2s", &["--grpc"], &[]);

    // 50 channels, each with one call, all made while the service is at zero.
    let mut client = GrpcCoreClient::start(address, 50);
    assert_eq!(client.next_line(), "round 1: 50 answered");
    let held = hold_histogram_counts_every_hold(&scaler, name);
    assert_eq!(held, 50);
    // gRPC core took the holder's GOAWAY as the server's: every connection left the path.
    scaler.wait_for(name, "every held connection out of the path", |v| {
        v["held_left_path"] == 50 && v["relayed_connections"] == 0
    });
    // The scaler's web page, in a real browser, says so.
    let dom = rendered_dom(
        &format!("http://{}/", scaler.http),
        &scratch("zero-grpc-core-page"),
        Duration::from_secs(3),
    );
    let row = element(&dom, "tr", &format!(r#"data-service="{name}""#))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{dom}"));
    assert!(
        row.contains(r#"<td data-field="held" data-value="[0,50,0]">0 / 50 / 0</td>"#),
        "{row}"
    );
    assert!(
        row.contains(r#"<td data-field="relayed" data-value="[0,50]">0 / 50</td>"#),
        "{row}"
    );
    // Each channel reconnects by itself for its next call, straight to the replica.
    client.next_round();
    assert_eq!(client.next_line(), "round 2: 50 answered");
    let v = scaler.wait_for(name, "the second round counted", |v| v["requests_total"] == 100);
    assert_eq!(v["held_total"], 50, "{v}");
    assert_eq!(v["hold_timeouts"], 0, "{v}");
}

#[test]
fn a_request_body_larger_than_the_hold_buffer_arrives_intact() {
    require_root();
    let name = "cold-body";
    // A 4 KiB buffer against a 6 MiB body: the holder stops reading after 4 KiB and the client
    // waits with the rest until the replica is ready.
    let AtZero {
        address,
        scaler,
        agent: _agent,
    } = at_zero(
        "zero-body",
        name,
        "2s",
        &[],
        &["--hold-buffer".into(), "4KiB".into()],
    );
    // Pseudo-random bytes (xorshift), so a dropped, repeated or reordered chunk shows.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let body: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut c = Connection::open(address).expect("connect");
    let reply = c.request("POST", "/mirror", &body, true).expect("mirrored");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    let first_difference = reply.body.iter().zip(&body).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the body changed on the way");
    // The holder relays until the client closes too.
    drop(c);
    assert_eq!(hold_histogram_counts_every_hold(&scaler, name), 1);
}

/// An agent stopped (SIGTERM) while it holds connections goes on until each is answered (bounded
/// by its drain timeout), then exits: a restarted agent answers its held clients rather than
/// resetting them.
#[test]
fn clients_held_while_the_agent_stops_still_get_their_answer() {
    require_root();
    let name = "cold-agent-stops";
    let AtZero {
        address,
        scaler,
        mut agent,
    } = at_zero("zero-agent-stops", name, "2s", &[], &[]);

    let clients = 20;
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = Connection::open(address).map_err(|e| format!("client {i}: {e}"))?;
                let sent = format!("held client {i}");
                let reply = c
                    .request("POST", "/mirror", sent.as_bytes(), true)
                    .map_err(|e| format!("client {i}: {e}"))?;
                if reply.status != 200 || reply.body != sent.as_bytes() {
                    return Err(format!("client {i}: status {}, {:?}", reply.status, reply.body));
                }
                Ok(())
            })
        })
        .collect();
    scaler.wait_for(name, "every client held", |v| v["held_connections"] == clients);
    let pid = agent.proc.pid().expect("the agent runs");
    // SAFETY: a signal to the agent this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);

    for t in threads {
        t.join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_tail()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.proc.is_running() {
        assert!(
            Instant::now() < deadline,
            "the agent never stopped:\n{}",
            agent.proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&agent.proc.log).expect("the agent's log");
    assert!(log.contains("every held connection answered"), "{log}");
}

/// The pinned connect hooks outlive a stopped agent, its holders do not. While no agent runs, a
/// connection to a service at zero goes to the service address itself (whatever serves it there:
/// kube-proxy, for a Kubernetes ClusterIP), not to a holder port nobody listens on any more.
#[test]
fn a_stopped_agent_sends_no_connect_to_its_holders() {
    require_root();
    let name = "cold-released";
    let AtZero {
        address,
        scaler,
        agent,
    } = at_zero("zero-released", name, "1s", &[], &[]);
    scaler.wait_reports(3);
    let pin_dir = agent.pin_dir.clone();
    agent.stop_keeping_pins(libc::SIGTERM);

    let listener = std::net::TcpListener::bind(address).expect("bind the service address");
    let c = std::net::TcpStream::connect(address).expect("a connection to the service address itself");
    let (_, from) = listener.accept().expect("accept");
    assert_eq!(from, c.local_addr().expect("local address"));
    let (code, _, err) = cleanup_pins(&pin_dir);
    assert_eq!(code, 0, "{err}");
}
