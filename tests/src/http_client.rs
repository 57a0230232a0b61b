//! A minimal HTTP/1.1 client on blocking sockets, so tests control exactly what goes on the wire:
//! one request per connection or many over one, bodies of any size.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// A response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names and values, in order, as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One connection that sends requests one after another and reads each response.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(addr: SocketAddr) -> Result<Self, HttpError> {
        Self::from_stream(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    }

    /// A connection from a chosen local address and port (bound before connecting).
    pub fn open_from(local: SocketAddr, addr: SocketAddr) -> Result<Self, HttpError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let stream = runtime.block_on(async {
            let socket = match local {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(local)?;
            socket.connect(addr).await?.into_std()
        })?;
        stream.set_nonblocking(false)?;
        Self::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> Result<Self, HttpError> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// This end's address: what a server reached directly sees as its peer.
    pub fn local_addr(&self) -> Result<SocketAddr, HttpError> {
        Ok(self.reader.get_ref().local_addr()?)
    }

    /// Sends one request and reads its response. `close` asks the server to close afterwards.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        close: bool,
    ) -> Result<Response, HttpError> {
        let head = request_head(method, path, body, close);
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        self.read_response()
    }

    /// A second handle on the connection's socket, to write requests from another thread while
    /// this one reads the answers.
    pub fn writer(&self) -> Result<TcpStream, HttpError> {
        Ok(self.reader.get_ref().try_clone()?)
    }

    /// Writes raw bytes (pipelined or hand-framed requests); read the answers with
    /// [`Connection::read_response`].
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        self.reader.get_mut().write_all(bytes)?;
        Ok(())
    }

    /// Reads one response (with a Content-Length body).
    pub fn read_response(&mut self) -> Result<Response, HttpError> {
        self.read_response_to(false)
    }

    /// Reads the response to a HEAD request: headers (a Content-Length, maybe) and no body.
    pub fn read_head_response(&mut self) -> Result<Response, HttpError> {
        self.read_response_to(true)
    }

    fn read_response_to(&mut self, head: bool) -> Result<Response, HttpError> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HttpError::Malformed(format!("status line {line:?}")))?;
        let mut length = None;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(HttpError::Malformed("connection closed in headers".into()));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
                headers.push((k.to_string(), v.trim().to_string()));
            }
        }
        if head {
            return Ok(Response {
                status,
                headers,
                body: Vec::new(),
            });
        }
        let len = length.ok_or_else(|| HttpError::Malformed("no Content-Length".into()))?;
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// GET `path` on a fresh connection and return the body as text (for the scaler's API).
pub fn get_text(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    let r = Connection::open(addr)?.request("GET", path, &[], true)?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// The head `Connection::request` sends: what a server (and the agent) receives before the body.
pub fn request_head(method: &str, path: &str, body: &[u8], close: bool) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: surge-test\r\nUser-Agent: surge-tests\r\n");
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}
