//! A real Prometheus (Debian's package) for the tests, started on loopback: it scrapes one
//! target every second and is ready to answer queries when [`start`] returns.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    harness::{wait_listening, Proc},
    http_client::get_text,
};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Starts Prometheus at `addr`, scraping `target` every second as job `job`, with its data in
/// `dir`. With `tls` (certificate, key) it serves HTTPS, and readiness is only waited for as a
/// listening port (the caller's client speaks TLS).
pub fn start(
    dir: &Path,
    addr: SocketAddr,
    job: &str,
    target: SocketAddr,
    tls: Option<(&Path, &Path)>,
) -> Proc {
    let prometheus = Path::new(PROMETHEUS);
    assert!(
        prometheus.exists(),
        "{PROMETHEUS} is missing: deploy/setup.sh installs Debian's prometheus"
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("prometheus.yml");
    let mut args = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
        format!("--web.listen-address={addr}"),
    ];
    if let Some((cert, key)) = tls {
        let web = dir.join("web.yml");
        std::fs::write(
            &web,
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                cert.display(),
                key.display()
            ),
        )
        .expect("web.yml");
        args.push(format!("--web.config.file={}", web.display()));
    }
    let mut proc = Proc::spawn(&format!("prometheus-{}", addr.port()), prometheus, &args, dir);
    wait_listening(addr, &mut proc);
    if tls.is_none() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(get_text(addr, "/-/ready"), Ok((200, _))) {
            assert!(proc.is_running(), "prometheus exited:\n{}", proc.log_tail());
            assert!(
                Instant::now() < deadline,
                "prometheus never got ready:\n{}",
                proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    proc
}
