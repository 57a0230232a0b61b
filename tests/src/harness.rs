//! Starts the real programs (scaler, agent, sample service) as child processes on free loopback
//! ports, waits for them to be ready, reads the scaler's API, and stops them on drop.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::http_client::get_text;

/// The eBPF tests need root; in CI they run as root and are never skipped.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and need root: run them as root (CI does)"
    );
}

/// A loopback port nobody listens on right now, below the kernel's ephemeral range: between the
/// pick and its use, no connection of this machine can be given it as its own port (a port
/// from the ephemeral range could be, and then a server of the test fails to bind it). Each
/// pick of this process is a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FLOOR: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(FLOOR);
    // Test processes run one after another; this one starts somewhere of its own.
    let start = std::process::id().wrapping_mul(2_654_435_761) % span.max(1);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FLOOR + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A loopback port kept for as long as the value lives: bound and listening, with nothing that
/// accepts, so no other socket can bind it or be given it as its own (ephemeral) port. The
/// endpoint of a watched service that must see no traffic at all.
pub struct ReservedPort {
    _listener: TcpListener,
    pub addr: SocketAddr,
}

impl ReservedPort {
    pub fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let addr = listener.local_addr().expect("its address");
        Self {
            _listener: listener,
            addr,
        }
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// The workspace's target directory (CARGO_TARGET_DIR or ./target).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A program of the workspace built by `cargo build --release`.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release` first",
        p.display()
    );
    p
}

/// A loopback listener that accepts with `TCP_DEFER_ACCEPT` (nginx's `listen … deferred`): a
/// connection's handshake completes only with the client's first data, so the kernel filters
/// that data on the listening socket, before the connection's own socket exists.
pub fn deferred_accept_listener() -> std::net::TcpListener {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let seconds: libc::c_int = 5;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            &seconds as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_DEFER_ACCEPT: {}", std::io::Error::last_os_error());
    listener
}

/// A directory for this test's logs and files, removed at the end unless SURGE_KEEP_LOGS is set.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("surge-e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self {
            child: Some(child),
            log,
            name: name.to_string(),
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits (30 s at most) for a log line that contains every one of `parts`.
    pub fn wait_for_log_line(&self, parts: &[&str]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never logged a line with {parts:?}; log:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // A process that exited (and was reaped) is not signalled: its pid may be another's.
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            // SAFETY: kill on a pid we own, still running.
            unsafe { libc::kill(c.id() as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_listening(addr: SocketAddr, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            proc.is_running(),
            "{} exited early:\n{}",
            proc.name(),
            proc.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "{} never listened on {addr}:\n{}",
            proc.name(),
            proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The sample HTTP service.
pub struct Sample {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Sample {
    pub fn start(dir: &Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let mut proc = Proc::spawn(
            &format!("sample-{}", addr.port()),
            &bin("surge-sample"),
            &["--listen".into(), addr.to_string()],
            dir,
        );
        wait_listening(addr, &mut proc);
        Self { proc, addr }
    }
}

/// The scaler, with its API on a free port.
pub struct Scaler {
    pub proc: Proc,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Scaler {
    /// Starts a scaler; `extra` are further flags (e.g. `--observe web=127.0.0.1:8080`).
    pub fn start(dir: &Path, grpc_port: u16, extra: &[String]) -> Self {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let grpc: SocketAddr = format!("127.0.0.1:{grpc_port}").parse().expect("address");
        let mut args = vec![
            "--http-listen".into(),
            http.to_string(),
            "--grpc-listen".into(),
            grpc.to_string(),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(
            &format!("scaler-{}", http.port()),
            &bin("surge-scaler"),
            &args,
            dir,
        );
        wait_listening(http, &mut proc);
        wait_listening(grpc, &mut proc);
        Self { proc, http, grpc }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// GET /api/v1/services as JSON.
    pub fn services(&self) -> Value {
        let (status, body) = get_text(self.http, "/api/v1/services").expect("scaler API answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// One service's entry in /api/v1/services.
    pub fn service(&self, name: &str) -> Value {
        let all = self.services();
        all["services"]
            .as_array()
            .and_then(|s| s.iter().find(|v| v["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no service {name} in {all}"))
    }

    /// Reports received from all agents so far.
    pub fn reports(&self) -> u64 {
        self.services()["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|x| x["reports"].as_u64()).sum())
            .unwrap_or(0)
    }

    /// Waits until `pred` holds for the service, or fails with the last value seen.
    pub fn wait_for(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.service(name);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name}: {what}; last: {v}\n{}",
                self.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agents have sent `n` more reports than now: whatever was counted before
    /// this call has reached the scaler.
    pub fn wait_reports(&self, n: u64) {
        let start = self.reports();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.reports() < start + n {
            assert!(
                Instant::now() < deadline,
                "agents stopped reporting\n{}",
                self.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Where the test agents pin their load balancer: one directory per agent, named after the
/// test process, so tests running at once never share one and a later run can tell what an
/// earlier, killed run left.
pub const TEST_PIN_ROOT: &str = "/sys/fs/bpf/surge-tests";

/// The agent, reporting every 100 ms, with a pin directory of its own that is removed (with
/// `surge-agent --cleanup`) when it is dropped.
pub struct Agent {
    pub proc: Proc,
    pub pin_dir: PathBuf,
    cleanup_on_drop: bool,
}

impl Agent {
    pub fn start(dir: &Path, scaler_url: &str, extra: &[String]) -> Self {
        Self::start_pinned(dir, scaler_url, &Self::new_pin_dir(), extra)
    }

    /// An agent with a given pin directory: started after another one with the same directory,
    /// it takes over that agent's pinned load balancer.
    pub fn start_pinned(dir: &Path, scaler_url: &str, pin_dir: &Path, extra: &[String]) -> Self {
        let mut args = vec![
            "--scaler".into(),
            scaler_url.to_string(),
            "--report-interval".into(),
            "100ms".into(),
            "--bpf-pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        args.extend_from_slice(extra);
        let name = format!("agent-{}", free_port());
        Self {
            proc: Proc::spawn(&name, &bin("surge-agent"), &args, dir),
            pin_dir: pin_dir.to_path_buf(),
            cleanup_on_drop: true,
        }
    }

    /// A fresh pin directory for this test process; first removes the ones left by test
    /// processes that no longer run.
    pub fn new_pin_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if let Ok(entries) = std::fs::read_dir(TEST_PIN_ROOT) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let owner = name.split('-').next().unwrap_or_default();
                if !Path::new("/proc").join(owner).exists() {
                    let _ = cleanup_pins(&e.path());
                }
            }
        }
        Path::new(TEST_PIN_ROOT).join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Stops the process with `signal` and leaves its pins for the next agent to take over.
    pub fn stop_keeping_pins(mut self, signal: i32) {
        self.cleanup_on_drop = false;
        self.proc.stop_with(signal);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.stop_with(libc::SIGTERM);
        if self.cleanup_on_drop {
            let (code, _, err) = cleanup_pins(&self.pin_dir);
            if code != 0 {
                eprintln!("surge-agent --cleanup {}: {err}", self.pin_dir.display());
            }
        }
    }
}

/// `surge-agent --cleanup` for a pin directory: (exit code, stdout, stderr).
pub fn cleanup_pins(pin_dir: &Path) -> (i32, String, String) {
    let dir = pin_dir.display().to_string();
    run_to_end(&bin("surge-agent"), &["--cleanup", "--bpf-pin-dir", &dir])
}

/// Runs a program to completion and returns (exit code, stdout, stderr).
pub fn run_to_end(program: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One `actuator: local` service whose replicas are surge-sample, as the end-to-end tests
/// declare it: written with its policy into `dir` by [`LocalService::scaler_flags`].
pub struct LocalService<'a> {
    pub name: &'a str,
    /// Where clients connect (the connect hook's service address).
    pub address: SocketAddr,
    /// The policy's name and its YAML.
    pub policy: (&'a str, &'a str),
    /// Replicas at start.
    pub replicas: u32,
    /// surge-sample's flags after `--listen {addr}`.
    pub sample_args: &'a [&'a str],
    /// The `readiness:` value, e.g. `{tcp: true}`.
    pub readiness: &'a str,
    /// Further `local:` settings, one `key: value` per line.
    pub local_extra: &'a [&'a str],
}

impl LocalService<'_> {
    /// Writes the service's config file and policy directory; returns the scaler's flags for
    /// them (with a 200 ms tick).
    pub fn scaler_flags(&self, dir: &Path) -> Vec<String> {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).expect("mkdir");
        let (policy, yaml) = self.policy;
        std::fs::write(policies.join(format!("{policy}.yaml")), yaml).expect("policy");
        let sample = bin("surge-sample").display().to_string();
        let args: String = self.sample_args.iter().map(|a| format!(", {a:?}")).collect();
        let extra: String = self.local_extra.iter().map(|l| format!("      {l}\n")).collect();
        let config = dir.join("surge.yaml");
        std::fs::write(
            &config,
            format!(
                "services:
  - name: {name}
    actuator: local
    policy: {policy}
    replicas: {replicas}
    local:
      command: [{sample:?}, \"--listen\", \"{{addr}}\"{args}]
      service_address: \"{address}\"
      readiness: {readiness}
{extra}",
                name = self.name,
                replicas = self.replicas,
                address = self.address,
                readiness = self.readiness,
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
}
