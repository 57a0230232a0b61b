//! A sample HTTP service for tests and the demo: answers `/` with a short text, `/sleep?ms=N`
//! after N ms, `/burn?ms=N` after N ms of CPU, `/bytes?n=N` with N bytes, and `POST /echo`
//! with the length of the body it read. Prints `listening on ADDR` once bound; on SIGTERM it
//! finishes the requests in flight and exits.

use std::{net::SocketAddr, time::Duration};

use axum::{
    body::Bytes,
    extract::ConnectInfo,
    extract::Query,
    routing::{get, post},
    Router,
};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Wait this long before listening (a replica that is slow to start).
    #[arg(long, value_parser = humantime::parse_duration)]
    startup_delay: Option<Duration>,
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
        );
    if let Some(d) = args.startup_delay {
        tokio::time::sleep(d).await;
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    // SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, then exit (what the
    // local actuator's drain expects of a replica).
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
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
