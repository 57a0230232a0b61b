//! What the benchmark commands share: running `wrk` and reading its figures, a `haproxy`
//! configuration in front of one server (the proxy in the path they compare against), medians.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum WrkError {
    #[error("running {program}: {source}")]
    Run { program: String, source: std::io::Error },
    #[error("wrk failed: {0}")]
    Failed(String),
    #[error("wrk saw errors: {0}")]
    Errors(String),
    #[error("unreadable wrk output ({what}): {text}")]
    Output { what: String, text: String },
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrkResult {
    pub rps: f64,
    pub p99_ms: f64,
    pub requests: u64,
}

/// How wrk is run.
#[derive(Debug, Clone)]
pub struct WrkSpec<'a> {
    pub wrk: &'a Path,
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    pub path: &'a str,
}

/// Runs wrk against `addr`; any non-2xx answer or socket error is an error.
pub fn run_wrk(spec: &WrkSpec, addr: SocketAddr) -> Result<WrkResult, WrkError> {
    let out = Command::new(spec.wrk)
        .args([
            format!("-t{}", spec.threads),
            format!("-c{}", spec.connections),
            format!("-d{}s", spec.duration.as_secs().max(1)),
            "--latency".into(),
            format!("http://{addr}{}", spec.path),
        ])
        .output()
        .map_err(|source| WrkError::Run {
            program: spec.wrk.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(WrkError::Failed(format!(
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bad = |what: &str| WrkError::Output {
        what: what.to_string(),
        text: text.clone(),
    };
    let mut r = WrkResult::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().map_err(|_| bad("Requests/sec"))?,
            ["99%", v] => r.p99_ms = millis(v).ok_or_else(|| bad("99%"))?,
            [n, "requests", "in", ..] => r.requests = n.parse().map_err(|_| bad("requests"))?,
            _ => {}
        }
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(WrkError::Errors(text));
    }
    if r.rps == 0.0 {
        return Err(bad("no throughput"));
    }
    Ok(r)
}

/// wrk's latency figures: `812.00us`, `1.21ms`, `2.00s`.
pub fn millis(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * scale)
}

/// haproxy in HTTP mode with keep-alive, from `listen` to `backend`.
pub fn haproxy_config(listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  \
         timeout client 60s\n  timeout server 60s\n\nfrontend bench\n  bind {listen}\n  default_backend sample\n\n\
         backend sample\n  server s1 {backend}\n"
    )
}

/// The median (the upper one for an even count); 0 for nothing.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latencies_are_read_in_milliseconds() {
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(near(millis("812.00us"), 0.812));
        assert!(near(millis("1.21ms"), 1.21));
        assert_eq!(millis("2.00s"), Some(2000.0));
        assert_eq!(millis("fast"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
        assert_eq!(median(vec![]), 0.0);
    }
}
