//! Relays a held connection and its replica connection both ways until both ends are done, and
//! ends it early where [`Exit`] says the connection may leave the holder's path. Each direction
//! has its own loop (a slow reader on one side never stalls the other), and their only shared
//! state is the `Exit`, locked for no longer than it takes to frame the bytes of one read.

use std::{borrow::Cow, sync::Mutex, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

use super::exit::Exit;

const BUFFER: usize = 8 * 1024;
/// How long a connection leaving the path waits for its client to close.
const LINGER: Duration = Duration::from_secs(5);

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both ends closed.
    Closed,
    /// The client was told to reconnect (`Connection: close`), and both connections were
    /// closed after that response.
    LeftThePath,
}

/// Relays `client` ↔ `upstream`; `sent` is what the client sent while held (already written
/// to `upstream`).
pub async fn relay(mut client: TcpStream, mut upstream: TcpStream, sent: &[u8]) -> std::io::Result<Ended> {
    let exit = Mutex::new(Exit::new(sent));
    let (leaving_tx, leaving) = watch::channel(false);
    let (mut client_r, mut client_w) = client.split();
    let (mut upstream_r, mut upstream_w) = upstream.split();

    let requests = async {
        let mut buf = vec![0u8; BUFFER];
        let mut leaving = leaving.clone();
        loop {
            let n = tokio::select! {
                n = client_r.read(&mut buf) => n?,
                _ = leaving.wait_for(|l| *l) => break,
            };
            if n == 0 {
                upstream_w.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            if !exit.lock().map(|mut e| e.on_requests(&buf[..n])).unwrap_or(true) {
                break;
            }
            upstream_w.write_all(&buf[..n]).await?;
        }
        // Leaving the path: the replica gets an end, and what the client may still send is read
        // and dropped until it closes (a lingering close: closing on unread bytes would reset
        // the connection, which can destroy the response before the client has read it).
        upstream_w.shutdown().await?;
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(client_r.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        Ok(())
    };
    let responses = async {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = upstream_r.read(&mut buf).await?;
            if n == 0 {
                client_w.shutdown().await?;
                return Ok::<_, std::io::Error>(false);
            }
            // Only the marked response's head is rewritten; every other read goes out as read.
            let (marked, done) = match exit.lock() {
                Ok(mut e) => match e.on_responses(&buf[..n]) {
                    Cow::Owned(v) => (Some(v), e.done()),
                    Cow::Borrowed(_) => (None, e.done()),
                },
                Err(_) => (None, false),
            };
            client_w.write_all(marked.as_deref().unwrap_or(&buf[..n])).await?;
            if done {
                client_w.shutdown().await?;
                let _ = leaving_tx.send(true);
                return Ok(true);
            }
        }
    };
    // An error on either side ends both, as a reset connection leaves nothing to relay.
    let ((), left) = tokio::try_join!(requests, responses)?;
    Ok(if left { Ended::LeftThePath } else { Ended::Closed })
}
