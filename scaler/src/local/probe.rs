//! Readiness probes: a TCP connect, or an HTTP GET that must answer 2xx or 3xx.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::config::Readiness;

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a probe failed: nothing listens yet, or something answered wrongly (or not at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connect failed: the replica does not listen (yet). Cheap to try again soon, and
    /// nothing reached the replica, so no request was counted.
    #[error("TCP connect to {addr}: {reason}")]
    NotListening { addr: SocketAddr, reason: String },
    /// Connected, but the answer was not a success (or did not come).
    #[error("{0}")]
    Failed(String),
}

/// Probes `addr`; the error says what failed, for the replica's status.
pub async fn probe(addr: SocketAddr, how: &Readiness) -> Result<(), ProbeError> {
    timeout(PROBE_TIMEOUT, probe_inner(addr, how))
        .await
        .unwrap_or_else(|_| {
            Err(ProbeError::Failed(format!(
                "no answer within {}",
                humantime::format_duration(PROBE_TIMEOUT)
            )))
        })
}

async fn probe_inner(addr: SocketAddr, how: &Readiness) -> Result<(), ProbeError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeError::NotListening {
            addr,
            reason: e.to_string(),
        })?;
    http_get(&mut s, addr, how).await.map_err(ProbeError::Failed)
}

/// The HTTP part of a probe, on a connected stream (nothing to do for a TCP probe).
async fn http_get(s: &mut TcpStream, addr: SocketAddr, how: &Readiness) -> Result<(), String> {
    let Readiness::Http(path) = how else {
        return Ok(());
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: surge-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("HTTP GET {path}: {e}"))?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("HTTP GET {path}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = status_code(&buf).ok_or_else(|| format!("HTTP GET {path}: no HTTP status line"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP GET {path}: status {status}"))
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\r').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Busy\r\n"), Some(503));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
    }

    #[tokio::test]
    async fn a_closed_port_fails_with_the_reason() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let e = probe(addr, &Readiness::Tcp).await.unwrap_err();
        assert!(matches!(e, ProbeError::NotListening { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&format!("TCP connect to {addr}:")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "500 Oops"] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes()).await;
            }
        });
        assert_eq!(probe(addr, &Readiness::Http("/".into())).await, Ok(()));
        assert_eq!(
            probe(addr, &Readiness::Http("/health".into())).await,
            Err(ProbeError::Failed("HTTP GET /health: status 500".into()))
        );
    }
}
