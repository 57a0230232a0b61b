//! A sample HTTP service for tests and the demo: answers `/` with a short text, `/sleep?ms=N`
//! after N ms, `/burn?ms=N` after N ms of CPU, `/bytes?n=N` with N bytes, and `POST /echo`
//! with the length of the body it read, `POST /mirror` with the body itself. With `--grpc` it
//! serves the gRPC echo service of `proto/echo.proto` (h2c) instead. Prints `listening on ADDR`
//! once bound; on SIGTERM it finishes the requests in flight and exits.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::ConnectInfo,
    extract::{DefaultBodyLimit, Query},
    routing::{get, post},
    Router,
};
use clap::Parser;
use serde::Deserialize;
use surge_tests::echo::{
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest,
};

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Wait this long before listening (a replica that is slow to start).
    #[arg(long, value_parser = humantime::parse_duration)]
    startup_delay: Option<Duration>,
    /// Serve the gRPC echo service (h2c) instead of HTTP/1.1.
    #[arg(long)]
    grpc: bool,
    /// Once listening, write `ADDR UNIX_NANOS` (the address and the wall-clock instant it began
    /// to listen) to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Bodies `/mirror` accepts (axum's default is 2 MB).
const BODY_LIMIT: usize = 256 << 20;

/// The gRPC echo service: answers each call with its own id and payload.
struct Sample;

#[tonic::async_trait]
impl Echo for Sample {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = request.into_inner();
        Ok(tonic::Response::new(EchoReply {
            id: r.id,
            payload: r.payload,
            peer,
        }))
    }
}

#[derive(Deserialize)]
struct Ms {
    ms: u64,
}

#[derive(Deserialize)]
struct N {
    n: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/", get(|| async { "hello from surge-sample\n" }))
        .route(
            "/whoami",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{peer}\n") }),
        )
        .route(
            "/sleep",
            get(|Query(q): Query<Ms>| async move {
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                "slept\n"
            }),
        )
        .route(
            "/burn",
            get(|Query(q): Query<Ms>| async move {
                let _ = tokio::task::spawn_blocking(move || burn(Duration::from_millis(q.ms))).await;
                "burned\n"
            }),
        )
        .route("/bytes", get(|Query(q): Query<N>| async move { vec![b'x'; q.n] }))
        .route(
            "/echo",
            post(|body: Bytes| async move { format!("{}\n", body.len()) }),
        )
        .route(
            "/mirror",
            post(|body: Bytes| async move { body }).layer(DefaultBodyLimit::max(BODY_LIMIT)),
        );
    if let Some(d) = args.startup_delay {
        tokio::time::sleep(d).await;
    }
    // A deep accept queue, as Go's net.Listen gives (somaxconn): a burst of a thousand
    // connections is not met with dropped SYNs and one-second retries.
    let socket = if args.listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, addr)?;
    }
    println!("listening on {addr}");
    if args.grpc {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Sample))
            .serve_with_incoming_shutdown(
                // As tonic's own listener does: small HTTP/2 frames go out at once, not after
                // the peer's delayed ACK.
                tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                }),
                shutdown(),
            )
            .await?;
        return Ok(());
    }
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

/// SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, then exit (what the local
/// actuator's drain expects of a replica).
async fn shutdown() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Records when the replica began to listen (for benchmarks that measure from that instant).
fn write_ready_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, format!("{addr} {nanos}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Spins on the CPU for `d` of thread CPU time.
fn burn(d: Duration) {
    let start = cpu_time();
    let mut x = 0u64;
    while cpu_time().saturating_sub(start) < d {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
