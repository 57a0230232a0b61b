//! An agent restart changes nothing for warm clients: the load balancer's maps and connect hooks
//! stay pinned in bpffs, so connections to the service address keep reaching the replicas while
//! no agent runs, and a new agent takes over without a gap. Under continuous load (several
//! clients, a new connection per request) the agent is killed (SIGKILL), stopped (SIGTERM),
//! replaced by one started before the old one stops (a rolling update with surge), and replaced
//! by ones that cannot reuse the pinned maps (another layout version, a mismatched layout), and
//! every request is answered; `surge-agent --cleanup` then leaves nothing pinned. Needs root (eBPF).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use surge_tests::{
    harness::{cleanup_pins, free_port, require_root, scratch, Agent, LocalService, Scaler},
    http_client::{get_text, Connection},
};

const POLICY: &str = "policy:
  name: fixed
  algorithm: hpa
  minReplicaCount: 2
  maxReplicaCount: 2
  pollingInterval: 1
  triggers:
    - {metric: concurrency, metricType: AverageValue, threshold: 100}
";

fn configure(dir: &Path, service: &str, address: SocketAddr) -> Vec<String> {
    LocalService {
        name: service,
        address,
        policy: ("fixed", POLICY),
        replicas: 2,
        sample_args: &[],
        readiness: "{http: \"/\"}",
        local_extra: &[],
    }
    .scaler_flags(dir)
}

/// Waits until the service has two ready replicas and the node's kernel map holds exactly them.
fn balanced(scaler: &Scaler, service: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) =
            get_text(scaler.http, &format!("/api/v1/services/{service}/replicas")).expect("API");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        let ready: BTreeSet<String> = v["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "ready")
            .filter_map(|r| r["addr"].as_str().map(str::to_string))
            .collect();
        let kernel: Vec<BTreeSet<String>> = v["kernel_backends"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, b)| {
                b.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .collect();
        if ready.len() == 2 && kernel.len() == 1 && kernel[0] == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} never had 2 ready replicas in the kernel map: {v}\n{}",
            scaler.proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Closed-loop clients, each opening a new connection per request (so every request passes the
/// connect hook), counting what they send and what is answered with 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(address: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..clients)
            .map(|_| {
                let (stop, sent, answered, errors) = (
                    Arc::clone(&stop),
                    Arc::clone(&sent),
                    Arc::clone(&answered),
                    Arc::clone(&errors),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::SeqCst);
                        let result = Connection::open(address)
                            .and_then(|mut c| c.request("GET", "/sleep?ms=2", &[], true));
                        match result {
                            Ok(r) if r.status == 200 => {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => errors.lock().expect("lock").push(format!("status {}", r.status)),
                            Err(e) => errors.lock().expect("lock").push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            answered,
            errors,
            workers,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests than now have been answered; fails early on an error.
    fn wait_more(&self, n: usize, phase: &str) {
        let target = self.answered() + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() < target {
            let errors = self.errors.lock().expect("lock").clone();
            assert!(
                errors.is_empty(),
                "{phase}: {} failed: {:?}",
                errors.len(),
                &errors[..errors.len().min(5)]
            );
            assert!(
                Instant::now() < deadline,
                "{phase}: the load stalled at {}",
                self.answered()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients; returns (sent, answered, errors).
    fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().expect("client thread");
        }
        let errors = self.errors.lock().expect("lock").clone();
        let answered = self.answered.load(Ordering::SeqCst);
        (self.sent.load(Ordering::SeqCst), answered, errors)
    }
}

/// The link pins in the pin directory, sorted.
fn hooks(pin_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin_dir.join("links"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until only generation `generation`'s hooks are pinned: the agent has applied its
/// watch set and detached the previous agent's hooks.
fn handed_over(pin_dir: &Path, generation: u32, agent: &mut Agent) {
    let want = vec![format!("connect4-{generation}"), format!("connect6-{generation}")];
    let deadline = Instant::now() + Duration::from_secs(30);
    while hooks(pin_dir) != want {
        assert!(
            agent.proc.is_running(),
            "the agent exited:\n{}",
            agent.proc.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "never handed over to generation {generation}: {:?}\n{}",
            hooks(pin_dir),
            agent.proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_of(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.proc.log).unwrap_or_default()
}

#[test]
fn warm_clients_never_notice_an_agent_restart_killed_stopped_surged_or_upgraded() {
    require_root();
    let dir = scratch("restart");
    let service = format!("rs{}", std::process::id());
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let scaler = Scaler::start(&dir, free_port(), &configure(&dir, &service, address));
    let pin_dir: PathBuf = Agent::new_pin_dir();
    let url = scaler.grpc_url();
    let mut agent = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    balanced(&scaler, &service);
    handed_over(&pin_dir, 1, &mut agent);
    assert!(
        pin_dir.join("lb-v1/SERVICE_ADDRS").exists() && pin_dir.join("lb-v1/BACKENDS").exists(),
        "the load balancer's maps are pinned"
    );

    let load = Load::start(address, 8);
    load.wait_more(300, "with the first agent");
    let mut phases = vec![("first agent", load.answered())];

    // 1. SIGKILL: the hooks stay pinned and keep routing with no agent at all.
    agent.stop_keeping_pins(libc::SIGKILL);
    load.wait_more(300, "with no agent after SIGKILL");
    phases.push(("no agent after SIGKILL", load.answered()));
    let mut agent = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    handed_over(&pin_dir, 2, &mut agent);
    load.wait_more(300, "after the takeover from a killed agent");
    phases.push(("second agent", load.answered()));
    assert!(
        log_of(&agent).contains("maps=Reused"),
        "the maps were reused:\n{}",
        agent.proc.log_tail()
    );

    // 2. SIGTERM (a rolling update): the same, the pins are left for the next agent.
    agent.stop_keeping_pins(libc::SIGTERM);
    load.wait_more(300, "with no agent after SIGTERM");
    phases.push(("no agent after SIGTERM", load.answered()));
    let mut agent = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    handed_over(&pin_dir, 3, &mut agent);
    load.wait_more(300, "after the takeover from a stopped agent");
    phases.push(("third agent", load.answered()));

    // 3. A rolling update that starts the new agent before it stops the old one: the new one
    //    waits for the directory's lock, then takes over.
    let mut next = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_of(&next).contains("another surge-agent holds the pin directory; waiting for it to exit") {
        assert!(next.proc.is_running(), "{}", next.proc.log_tail());
        assert!(Instant::now() < deadline, "{}", next.proc.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    load.wait_more(300, "with the next agent waiting");
    assert_eq!(
        hooks(&pin_dir),
        ["connect4-3", "connect6-3"],
        "the waiting agent changed nothing"
    );
    agent.stop_keeping_pins(libc::SIGTERM);
    handed_over(&pin_dir, 4, &mut next);
    let agent = next;
    load.wait_more(300, "after a start-first rolling update");
    phases.push(("fourth agent, started first", load.answered()));

    // 4. A new agent whose map layout differs (the pinned maps look like another version's): it
    //    starts with new maps, and the old hooks keep routing with the old ones until its watch
    //    set is in.
    agent.stop_keeping_pins(libc::SIGKILL);
    std::fs::rename(pin_dir.join("lb-v1"), pin_dir.join("lb-v0")).expect("rename on bpffs");
    load.wait_more(300, "with no agent and maps of another version");
    let mut agent = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    handed_over(&pin_dir, 5, &mut agent);
    load.wait_more(300, "after the takeover with new maps");
    phases.push(("fifth agent, new maps", load.answered()));
    let log = log_of(&agent);
    assert!(
        log.contains("maps=Fresh") && log.contains("another layout version"),
        "the new maps were logged:\n{}",
        agent.proc.log_tail()
    );
    assert!(
        !pin_dir.join("lb-v0").exists(),
        "the other version's maps are unpinned"
    );

    // 5. Maps of this version whose layout does not match (as if the version had not been
    //    bumped): refused with the reason, and replaced the same way.
    agent.stop_keeping_pins(libc::SIGKILL);
    let maps = pin_dir.join("lb-v1");
    std::fs::remove_file(maps.join("SERVICE_ADDRS")).expect("unpin");
    std::fs::rename(maps.join("BACKENDS"), maps.join("SERVICE_ADDRS")).expect("rename on bpffs");
    load.wait_more(300, "with no agent and mismatched maps");
    let mut agent = Agent::start_pinned(&dir, &url, &pin_dir, &[]);
    handed_over(&pin_dir, 6, &mut agent);
    load.wait_more(300, "after the takeover from mismatched maps");
    phases.push(("sixth agent, mismatched maps", load.answered()));
    let log = log_of(&agent);
    assert!(
        log.contains("the pinned load-balancer maps cannot be reused")
            && log.contains("SERVICE_ADDRS: pinned Array map, key 4 B, value 20 B")
            && log.contains("maps=Fresh"),
        "the mismatch was named:\n{}",
        agent.proc.log_tail()
    );
    balanced(&scaler, &service);

    let (sent, answered, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} of {sent} failed: {:?}; answered after each phase: {phases:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(sent, answered, "every request answered; phases: {phases:?}");
    eprintln!("restart: {answered} requests, all answered; answered after each phase: {phases:?}");

    // Uninstall: --cleanup refuses while an agent runs, then detaches and removes everything.
    let (code, _, err) = cleanup_pins(&pin_dir);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "surge-agent: another surge-agent is running with --bpf-pin-dir {}: stop it first \
             (every agent on a machine needs its own directory)",
            pin_dir.display()
        )
    );
    agent.stop_keeping_pins(libc::SIGTERM);
    // With the agent gone the pinned hooks still route.
    let mut c = Connection::open(address).expect("routed by the pinned hooks");
    assert_eq!(c.request("GET", "/", &[], true).expect("answer").status, 200);
    let (code, _, err) = cleanup_pins(&pin_dir);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("links=2 maps=2"),
        "two hooks and two maps removed: {err}"
    );
    assert!(!pin_dir.exists(), "nothing stays pinned: {}", pin_dir.display());
    // Nothing rewrites the service address any more: nobody listens there.
    let refused = TcpStream::connect_timeout(&address, Duration::from_secs(2));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connect to the service address after the cleanup: {refused:?}"
    );
    // A second cleanup has nothing to do.
    let (code, _, err) = cleanup_pins(&pin_dir);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
