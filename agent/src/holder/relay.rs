//! Relays a held connection and its replica connection both ways until both ends are done, and
//! ends it early where [`Exit`] says the connection may leave the holder's path. Each direction
//! has its own loop (a slow reader on one side never stalls the other), and their only shared
//! state is the `Exit`, locked for no longer than it takes to frame the bytes of one read. When
//! what the client sent calls for frames to the client (HTTP/2: the answer to its `PING`), the
//! client's loop wakes the server's.

use std::{borrow::Cow, sync::Mutex, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{watch, Notify},
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
    /// The client was told to reconnect (`Connection: close`, `GOAWAY`), and both connections
    /// were closed after what it was owed.
    LeftThePath,
}

/// Relays `client` ↔ `upstream`; `sent` is what the client sent while held (already written
/// to `upstream`). Once `stopping` turns true, the client is told to reconnect at the next
/// chance its protocol gives.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    sent: &[u8],
    mut stopping: watch::Receiver<bool>,
) -> std::io::Result<Ended> {
    let exit = Mutex::new(Exit::new(sent));
    let for_client = Notify::new();
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
            let (forward, wake) = {
                let mut e = exit.lock().map_err(|_| poisoned())?;
                (e.on_requests(&buf[..n]), e.has_for_client())
            };
            if wake {
                for_client.notify_one();
            }
            let Some(forward) = forward else { break };
            upstream_w.write_all(&forward).await?;
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
        let mut hurried = false;
        loop {
            let n = tokio::select! {
                n = upstream_r.read(&mut buf) => Some(n?),
                () = for_client.notified() => None,
                () = asked_to_stop(&mut stopping), if !hurried => {
                    hurried = true;
                    exit.lock().map_err(|_| poisoned())?.hurry();
                    None
                }
            };
            if n == Some(0) {
                client_w.shutdown().await?;
                return Ok::<_, std::io::Error>(false);
            }
            // What the exit passes on borrows the read buffer unless it changed something.
            let (out, done) = {
                let mut e = exit.lock().map_err(|_| poisoned())?;
                let out = match n {
                    Some(n) => e.on_responses(&buf[..n]),
                    None => e.take_for_client().map_or(Cow::Borrowed(&[][..]), Cow::Owned),
                };
                (out, e.done())
            };
            if !out.is_empty() {
                client_w.write_all(&out).await?;
            }
            if done {
                client_w.shutdown().await?;
                let _ = leaving_tx.send(true);
                return Ok(true);
            }
        }
    };
    // An error on either side ends both, as a reset connection leaves nothing to relay.
    let ended = tokio::try_join!(requests, responses);
    // A client told to go away may close its end before it reads the last frames, or reset it:
    // either way it left.
    let told = exit.lock().map(|e| e.told_to_leave()).unwrap_or(false);
    match ended {
        Ok(((), true)) => Ok(Ended::LeftThePath),
        _ if told => Ok(Ended::LeftThePath),
        Ok(((), false)) => Ok(Ended::Closed),
        Err(e) => Err(e),
    }
}

/// Returns once `stopping` is true; never, if its sender is gone first.
async fn asked_to_stop(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The exit's lock was poisoned by a panic: its view of the connection cannot be trusted, so
/// the relay ends rather than pass bytes it no longer follows.
fn poisoned() -> std::io::Error {
    std::io::Error::other("the relay's exit state was poisoned by a panic")
}
