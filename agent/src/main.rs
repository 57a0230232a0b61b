//! The surge-agent binary: settings, preflight checks, the kernel programs, the scaler link.

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use surge_agent::{
    clock::SystemClock,
    config::{Args, Settings},
    k8s,
    kernel::KernelProbe,
    link::{self, Instance},
    node::Node,
    pins::{self, PinDir},
    preflight,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("surge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let file_text = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let settings = Settings::resolve(&args, file_text.as_deref(), &hostname)?;
    if args.cleanup {
        let removed = pins::cleanup(&settings.pin_dir)?;
        tracing::info!(dir = %settings.pin_dir.display(), links = removed.links, maps = removed.maps, "removed the pinned connect hooks and maps");
        return Ok(());
    }
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let kubernetes = k8s::enabled(args.kubernetes.as_deref(), in_cluster)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A bad kubeconfig is reported before anything is loaded into the kernel.
    let client = if kubernetes {
        Some(runtime.block_on(k8s::client(args.kubeconfig.as_deref()))?)
    } else {
        None
    };
    match surge_agent::limits::raise_open_files() {
        Ok((before, after)) => tracing::debug!(before, after, "open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; held connections may run out of descriptors")
        }
    }
    let env = preflight::check(
        &args.btf,
        args.cgroup_root.as_deref(),
        &args.tracefs,
        &args.mounts_file,
    )?;
    preflight::ensure_bpffs(&args.mounts_file)?;
    let pins = PinDir::open(&settings.pin_dir)?;
    let probe = KernelProbe::load(&env.btf, &env.cgroup_root, pins, settings.node_ip)?;
    tracing::info!(cgroup = %env.cgroup_root.display(), node = %settings.node, pins = %settings.pin_dir.display(), "eBPF programs attached");
    let node = Arc::new(Mutex::new(Node::new(probe, env.cgroup_root.clone())));

    runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let local = client.map(|client| {
            let options = k8s::Options {
                node: settings.node.clone(),
                cgroup_root: args
                    .kube_cgroup_root
                    .clone()
                    .unwrap_or_else(|| env.cgroup_root.clone()),
            };
            k8s::spawn(client, options, stop_rx.clone())
        });
        let instance = Instance::new(settings.node.clone(), rand::random());
        let link = tokio::spawn(link::run(
            settings,
            Arc::clone(&node),
            Arc::new(SystemClock),
            instance,
            stop_rx,
            local,
        ));
        shutdown_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        let _ = link.await;
        // The holders end with this process: connects to a service at zero must not go on
        // reaching their ports while no agent runs.
        if let Ok(mut node) = node.lock() {
            match node.release_holders() {
                Ok(()) => {
                    tracing::info!("connects to services at zero are no longer sent to this agent's holders")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot release the holders in the pinned load balancer")
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
