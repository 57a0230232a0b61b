//! Sends a fixed number of HTTP requests and prints how many were answered.

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use surge_tests::load::{run, LoadSpec};

#[derive(Parser)]
struct Args {
    /// Where to send the requests.
    #[arg(long)]
    target: SocketAddr,
    /// How many requests in all.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
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
    let spec = LoadSpec {
        workers: a.workers,
        keep_alive: !a.new_connections,
        path: a.path,
        ..LoadSpec::get(a.target, a.requests)
    };
    let r = run(&spec);
    println!(
        "sent {} requests: {} answered, {} failed",
        a.requests, r.ok, r.failed
    );
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
