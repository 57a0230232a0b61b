//! One replica's life, as a task: start the command in its cgroup, probe until ready, supervise
//! (a replica that dies or never becomes ready is restarted with backoff, and the reason is kept
//! for the API), and stop it when asked: drain, SIGTERM, SIGKILL.

use std::{net::SocketAddr, process::Stdio, sync::Arc, time::Duration};

use tokio::{process::Child, sync::watch};

use super::{
    config::command_for,
    netns::NetNs,
    os,
    probe::{probe, ProbeError},
    ReplicaState, Service, Stop, ROTATION_WAIT,
};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Probe period while starting: every 2 ms while nothing listens yet (a refused connect costs
/// next to nothing and reaches no one, and held clients wait on this), every 100 ms once
/// something answers but not yet successfully (each such probe is a request the replica
/// serves and the agent counts); and once ready.
const PROBE_NOT_LISTENING: Duration = Duration::from_millis(2);
const PROBE_STARTING: Duration = Duration::from_millis(100);
const PROBE_READY: Duration = Duration::from_secs(1);
/// Failed probes in a row that take a ready replica out of rotation.
const FAILURES_TO_UNREADY: u32 = 3;

/// A started replica and what was made for it.
struct Running {
    child: Child,
    addr: SocketAddr,
    cgroup: Option<std::path::PathBuf>,
    netns: Option<(NetNs, u32)>,
}

impl Running {
    /// Removes the replica's cgroup and namespace (after its process is gone).
    async fn clean_up(self, svc: &Service) {
        if let Some(dir) = self.cgroup {
            let _ = tokio::task::spawn_blocking(move || os::remove_cgroup(&dir)).await;
        }
        if let Some((ns, slot)) = self.netns {
            ns.remove().await;
            svc.free_slot(slot);
        }
    }
}

enum Outcome {
    Stop(Stop),
    Exited { status: String, was_ready: bool },
    NeverReady(String),
}

pub(super) async fn run(svc: Arc<Service>, id: u32, mut stop: watch::Receiver<Option<Stop>>) {
    let name = format!("{}-{id}", svc.name);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let failure = match start(&svc, id, &name).await {
            Err(e) => e,
            Ok(mut running) => {
                let (addr, child) = (running.addr, &mut running.child);
                let outcome = supervise(&svc, id, child, addr, &mut stop).await;
                let failure = match outcome {
                    Outcome::Stop(kind) => {
                        halt(&svc, id, child, addr, kind, &stop).await;
                        running.clean_up(&svc).await;
                        tracing::info!(service = %svc.name, replica = %name, "replica stopped");
                        svc.finished(id);
                        return;
                    }
                    Outcome::Exited { status, was_ready } => {
                        if was_ready {
                            backoff = FIRST_BACKOFF;
                            format!("exited with {status}")
                        } else {
                            format!("exited with {status} before becoming ready")
                        }
                    }
                    Outcome::NeverReady(err) => {
                        kill(child).await;
                        format!(
                            "not ready after {}: {err}",
                            humantime::format_duration(svc.spec.ready_timeout)
                        )
                    }
                };
                running.clean_up(&svc).await;
                failure
            }
        };
        tracing::warn!(service = %svc.name, replica = %name, error = %failure, retry_in = ?backoff, "replica failed; restarting after backoff");
        svc.update(id, |r| {
            r.state = ReplicaState::Backoff;
            r.pid = None;
            r.restarts += 1;
            r.last_error = Some(failure);
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| s.is_some()) => {
                svc.finished(id);
                return;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Starts the command on a free port, in a fresh cgroup.
async fn start(svc: &Arc<Service>, id: u32, name: &str) -> Result<Running, String> {
    let (addr, netns) = match svc.spec.netns_subnet {
        None => (
            os::free_addr(svc.spec.service_address).map_err(|e| format!("no free port: {e}"))?,
            None,
        ),
        Some(subnet) => {
            let slot = svc
                .alloc_slot(subnet.blocks())
                .ok_or_else(|| "no free address block in netns_subnet".to_string())?;
            match NetNs::create(&format!("surge-{name}"), &subnet, slot).await {
                Ok(ns) => (
                    SocketAddr::new(ns.replica_ip, svc.spec.service_address.port()),
                    Some((ns, slot)),
                ),
                Err(e) => {
                    svc.free_slot(slot);
                    return Err(format!("cannot make its network namespace: {e}"));
                }
            }
        }
    };
    let cgroup = svc.cgroup.as_ref().and_then(|(dir, rel)| {
        let d = dir.join(name);
        match std::fs::create_dir_all(&d) {
            Ok(()) => Some((d, format!("{rel}/{name}"))),
            Err(e) => {
                tracing::warn!(service = %svc.name, replica = %name, error = %e, "cannot create the replica's cgroup");
                None
            }
        }
    });
    let argv = command_for(&svc.spec, addr, name);
    let procs = cgroup.as_ref().and_then(|(d, _)| os::procs_path(d));
    let ns_fd = netns.as_ref().map(|(ns, _)| ns.fd());
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("SURGE_REPLICA", name)
        .env("SURGE_ADDR", addr.to_string())
        .env("SURGE_PORT", addr.port().to_string())
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure only makes async-signal-safe syscalls on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd {
                super::netns::enter(fd)?;
            }
            os::in_child(procs.as_ref())
        });
    }
    let rel = cgroup.as_ref().map(|(_, r)| r.clone());
    svc.update(id, |r| {
        r.state = ReplicaState::Starting;
        r.addr = Some(addr);
        r.cgroup = rel;
        r.starts += 1;
    });
    let dir = cgroup.map(|(d, _)| d);
    match cmd.spawn() {
        Ok(child) => {
            let pid = child.id();
            tracing::info!(service = %svc.name, replica = %name, addr = %addr, pid, "replica started");
            svc.update(id, |r| r.pid = pid);
            Ok(Running {
                child,
                addr,
                cgroup: dir,
                netns,
            })
        }
        Err(e) => {
            if let Some(d) = dir {
                let _ = std::fs::remove_dir(d);
            }
            if let Some((ns, slot)) = netns {
                ns.remove().await;
                svc.free_slot(slot);
            }
            Err(format!("cannot start {:?}: {e}", argv[0]))
        }
    }
}

/// Probes the replica and watches it until it exits, never becomes ready, or is asked to stop.
async fn supervise(
    svc: &Arc<Service>,
    id: u32,
    child: &mut Child,
    addr: SocketAddr,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Outcome {
    let clock = Arc::clone(&svc.shared.clock);
    let started = clock.now();
    let mut ready = false;
    let mut was_ready = false;
    let mut failures = 0;
    let mut listening = false;
    loop {
        if let Some(kind) = *stop.borrow() {
            return Outcome::Stop(kind);
        }
        let period = if ready {
            PROBE_READY
        } else if listening {
            PROBE_STARTING
        } else {
            PROBE_NOT_LISTENING
        };
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| format!("an unknown status ({e})"));
                return Outcome::Exited { status, was_ready };
            }
            _ = stop.changed() => continue,
            _ = tokio::time::sleep(period) => {}
        }
        if stop.borrow().is_some() {
            continue;
        }
        match probe(addr, &svc.spec.readiness).await {
            Ok(()) => {
                failures = 0;
                if !ready {
                    ready = true;
                    was_ready = true;
                    tracing::info!(service = %svc.name, replica = id, addr = %addr, "replica ready");
                    svc.update(id, |r| {
                        if r.state == ReplicaState::Starting {
                            r.state = ReplicaState::Ready;
                        }
                    });
                }
            }
            Err(e) => {
                listening = !matches!(e, ProbeError::NotListening { .. });
                let e = e.to_string();
                failures += 1;
                if ready && failures >= FAILURES_TO_UNREADY {
                    ready = false;
                    tracing::warn!(service = %svc.name, replica = id, error = %e, "replica failed its probe; out of rotation");
                    svc.update(id, |r| {
                        if r.state == ReplicaState::Ready {
                            r.state = ReplicaState::Starting;
                        }
                        r.last_error = Some(e.clone());
                    });
                }
                if !was_ready && clock.now().saturating_sub(started) > svc.spec.ready_timeout {
                    return Outcome::NeverReady(e);
                }
            }
        }
    }
}

/// Stops a replica: for a scale-down, waits until no agent has it in rotation and its
/// connections have finished (bounded by the drain timeout); then SIGTERM, and SIGKILL after
/// the grace period.
async fn halt(
    svc: &Arc<Service>,
    id: u32,
    child: &mut Child,
    addr: SocketAddr,
    kind: Stop,
    stop: &watch::Receiver<Option<Stop>>,
) {
    let clock = Arc::clone(&svc.shared.clock);
    // A scaler shutdown during a drain cuts the drain short.
    let now_asked = || *stop.borrow() == Some(Stop::Now);
    if kind == Stop::Drain {
        let start = clock.now();
        while !svc.shared.local.out_of_rotation(&svc.name, addr, clock.now())
            && clock.now().saturating_sub(start) < ROTATION_WAIT
            && !now_asked()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start = clock.now();
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) || now_asked() {
                break;
            }
            let Some(pid) = child.id() else { break };
            let open = os::established_now(pid, addr.port()).await;
            if open == 0 {
                break;
            }
            if clock.now().saturating_sub(start) >= svc.spec.drain_timeout {
                tracing::warn!(service = %svc.name, replica = id, connections = open, "drain timeout; stopping with connections open");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    svc.update(id, |r| r.state = ReplicaState::Stopping);
    let Some(pid) = child.id() else { return };
    os::signal_group(pid, libc::SIGTERM);
    if tokio::time::timeout(svc.spec.grace_period, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(service = %svc.name, replica = id, "no exit within the grace period; SIGKILL");
        kill(child).await;
    }
    // Anything the replica left in its process group goes too.
    os::signal_group(pid, libc::SIGKILL);
}

async fn kill(child: &mut Child) {
    if let Some(pid) = child.id() {
        os::signal_group(pid, libc::SIGKILL);
    }
    let _ = child.kill().await;
}
