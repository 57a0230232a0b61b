//! The surge-scaler binary: settings, then the gRPC server (agents, Subscribe, KEDA's external
//! scaler) and the HTTP server.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use surge_policy::{
    config::KpaConfig,
    env::{EnvConfig, ProcessEnv},
};
use surge_proto::{
    externalscaler::external_scaler_server::ExternalScalerServer,
    v1::{agent_link_server::AgentLinkServer, metrics_server::MetricsServer},
};
use surge_scaler::{
    catalog::Catalog,
    clock::SystemClock,
    config::{Args, Settings},
    control::Controller,
    grpc::AgentLinkService,
    http,
    keda::ExternalScalerService,
    local::LocalActuator,
    policies::PolicyDir,
    sources::{self, MetricSources},
    state::Shared,
    subscribe::MetricsService,
};

/// A node silent this long stops contributing rates.
const STALE_AFTER: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("surge-scaler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let file_text = match &args.config {
        Some(path) => Some(
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let settings = Settings::resolve(&args, file_text.as_deref())?;
    for s in &settings.services {
        tracing::info!(service = %s.name, endpoints = ?s.endpoints, mode = ?s.mode, "service declared");
    }
    let env = EnvConfig::from_env(&ProcessEnv, KpaConfig::default())?;
    let tick = settings.tick;
    let local_specs = settings.local.clone();
    let initial: std::collections::BTreeMap<String, u32> = settings
        .services
        .iter()
        .map(|s| (s.name.clone(), s.initial_replicas))
        .collect();
    let policy_dir = settings.policy_dir.clone();
    let shared = Arc::new(Shared::new(
        Catalog::new(settings.services),
        Arc::new(SystemClock::default()),
        STALE_AFTER,
    ));

    let grpc_listener = tokio::net::TcpListener::bind(settings.grpc_listen)
        .await
        .map_err(|e| anyhow::anyhow!("grpc_listen {}: {e}", settings.grpc_listen))?;
    let http_listener = tokio::net::TcpListener::bind(settings.http_listen)
        .await
        .map_err(|e| anyhow::anyhow!("http_listen {}: {e}", settings.http_listen))?;
    tracing::info!(grpc = %settings.grpc_listen, http = %settings.http_listen, "listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Replica cgroups live under this scaler's own directory: two scalers on one machine (each
    // with its own gRPC port) never share, or kill, each other's replicas.
    let instance = format!("grpc-{}", grpc_listener.local_addr()?.port());
    let grpc = tonic::transport::Server::builder()
        .add_service(AgentLinkServer::new(AgentLinkService::new(Arc::clone(&shared))))
        .add_service(MetricsServer::new(MetricsService::new(Arc::clone(&shared))))
        .add_service(ExternalScalerServer::new(ExternalScalerService::new(Arc::clone(
            &shared,
        ))))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            stopped(stop_rx.clone()),
        );
    let web = axum::serve(http_listener, http::router(Arc::clone(&shared)))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let prometheus = sources::Settings::from_env(&ProcessEnv, env.metric_provider, env.prometheus_endpoint)?;
    let local = Arc::new(LocalActuator::start(
        Arc::clone(&shared),
        local_specs,
        &initial,
        &instance,
    ));
    let kubernetes = surge_scaler::k8s::spawn_from_env(
        |k| std::env::var(k).ok(),
        Arc::clone(&shared),
        env.defaults.clone(),
        tick,
        stop_rx.clone(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let controller = Controller::new(Arc::clone(&shared), PolicyDir::new(policy_dir), env.defaults)
        .with_sources(MetricSources::start(prometheus).await?)
        .with_local(local.clone());
    let mut control = tokio::spawn(controller.run(tick, stop_rx.clone()));
    let grpc = tokio::spawn(grpc);
    let web = tokio::spawn(async move { web.await });
    shutdown_signal().await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    // The control loop stops first, so nothing scales while the replicas stop.
    let control_done = tokio::time::timeout(Duration::from_secs(2), &mut control)
        .await
        .is_ok();
    local.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = grpc.await;
        let _ = web.await;
        // A finished JoinHandle must not be polled again.
        if !control_done {
            let _ = control.await;
        }
        if let Some(k) = kubernetes {
            let _ = k.await;
        }
    })
    .await;
    Ok(())
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
