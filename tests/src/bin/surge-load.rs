//! Sends HTTP requests and prints how many were answered: a fixed number (`--requests`), or a
//! closed loop of `--workers` clients for `--duration`.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::Parser;
use surge_tests::load::{run_until, LoadSpec};

#[derive(Parser)]
struct Args {
    /// Where to send the requests.
    #[arg(long)]
    target: SocketAddr,
    /// How many requests in all (with --duration: at most).
    #[arg(long)]
    requests: Option<usize>,
    /// Send for this long (e.g. 15s) instead of a fixed number of requests.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Parallel workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Open a new connection for every request.
    #[arg(long)]
    new_connections: bool,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let requests = match (a.requests, a.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => usize::MAX,
        (None, None) => 1000,
    };
    let spec = LoadSpec {
        workers: a.workers,
        keep_alive: !a.new_connections,
        path: a.path,
        ..LoadSpec::get(a.target, requests)
    };
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(d) = a.duration {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let r = run_until(&spec, stop);
    println!(
        "sent {} requests: {} answered, {} failed",
        r.ok + r.failed,
        r.ok,
        r.failed
    );
    for e in r.errors.iter().take(3) {
        eprintln!("error: {e}");
    }
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
