//! A closed-loop load generator: exactly N requests spread over C connections (or C workers that
//! open a connection per request), each answer checked. Used by the tests and the demo.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::http_client::Connection;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// Exactly this many requests are sent.
    pub requests: usize,
    /// Parallel workers.
    pub workers: usize,
    /// One connection per worker for all its requests, or a new connection per request.
    pub keep_alive: bool,
    pub method: String,
    pub path: String,
    /// Request body size in bytes (0: none).
    pub body: usize,
}

impl LoadSpec {
    pub fn get(addr: SocketAddr, requests: usize) -> Self {
        Self {
            addr,
            requests,
            workers: 1,
            keep_alive: true,
            method: "GET".into(),
            path: "/".into(),
            body: 0,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests answered with a 2xx status.
    pub ok: usize,
    /// Requests that failed or got another status.
    pub failed: usize,
    pub latencies: Vec<Duration>,
    pub errors: Vec<String>,
}

/// Sends the requests and waits for every answer.
pub fn run(spec: &LoadSpec) -> LoadReport {
    run_until(spec, Arc::new(AtomicBool::new(false)))
}

/// Like `run`, but every worker also stops (after its current request) once `stop` is set: a
/// closed loop for as long as the caller wants, with `requests` as a cap.
pub fn run_until(spec: &LoadSpec, stop: Arc<AtomicBool>) -> LoadReport {
    let next = Arc::new(AtomicUsize::new(0));
    let body: Arc<Vec<u8>> = Arc::new(vec![b'x'; spec.body]);
    let handles: Vec<_> = (0..spec.workers.max(1))
        .map(|_| {
            let (spec, next, body, stop) = (
                spec.clone(),
                Arc::clone(&next),
                Arc::clone(&body),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || worker(&spec, &next, &body, &stop))
        })
        .collect();
    let mut total = LoadReport::default();
    for h in handles {
        match h.join() {
            Ok(r) => {
                total.ok += r.ok;
                total.failed += r.failed;
                total.latencies.extend(r.latencies);
                total.errors.extend(r.errors);
            }
            Err(_) => total.errors.push("a load worker panicked".into()),
        }
    }
    total
}

fn worker(spec: &LoadSpec, next: &AtomicUsize, body: &[u8], stop: &AtomicBool) -> LoadReport {
    let mut report = LoadReport::default();
    let mut conn: Option<Connection> = None;
    while !stop.load(Ordering::Relaxed) && next.fetch_add(1, Ordering::Relaxed) < spec.requests {
        let start = Instant::now();
        let result = (|| {
            let c = match conn.take() {
                Some(c) => c,
                None => Connection::open(spec.addr)?,
            };
            let mut c = c;
            let r = c.request(&spec.method, &spec.path, body, !spec.keep_alive)?;
            // As HTTP clients do, a connection the server closes is not used again.
            let closing = r
                .header("connection")
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            if spec.keep_alive && !closing {
                conn = Some(c);
            }
            Ok::<_, crate::http_client::HttpError>(r)
        })();
        match result {
            Ok(r) if (200..300).contains(&r.status) => {
                report.ok += 1;
                report.latencies.push(start.elapsed());
            }
            Ok(r) => {
                report.failed += 1;
                report.errors.push(format!("status {}", r.status));
            }
            Err(e) => {
                report.failed += 1;
                report.errors.push(e.to_string());
            }
        }
    }
    report
}

/// An open-loop load: requests start at a fixed rate whatever the answers take, each on its own
/// connection (so a slow answer never delays the next start), for `duration`.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    pub addr: SocketAddr,
    /// Requests started per second.
    pub rate: f64,
    pub duration: Duration,
    pub path: String,
}

/// Runs an open loop; returns the report and the rate actually achieved (starts ÷ elapsed).
pub fn run_open(spec: &OpenLoop) -> (LoadReport, f64) {
    let start = Instant::now();
    let n = (spec.rate * spec.duration.as_secs_f64()).round() as usize;
    let mut handles = Vec::with_capacity(n);
    for k in 0..n {
        let at = start + Duration::from_secs_f64(k as f64 / spec.rate);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (addr, path) = (spec.addr, spec.path.clone());
        handles.push(std::thread::spawn(move || {
            // The latency is the request's own (the connection is opened first).
            let mut t = Instant::now();
            let r = Connection::open(addr).and_then(|mut c| {
                t = Instant::now();
                c.request("GET", &path, &[], true)
            });
            (r, t.elapsed())
        }));
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let mut report = LoadReport::default();
    for h in handles {
        match h.join() {
            Ok((Ok(r), d)) if (200..300).contains(&r.status) => {
                report.ok += 1;
                report.latencies.push(d);
            }
            Ok((Ok(r), _)) => {
                report.failed += 1;
                report.errors.push(format!("status {}", r.status));
            }
            Ok((Err(e), _)) => {
                report.failed += 1;
                report.errors.push(e.to_string());
            }
            Err(_) => report.errors.push("an open-loop request panicked".into()),
        }
    }
    (report, achieved)
}
