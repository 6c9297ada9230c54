//! A plain HTTP/1.1 GET over TCP for the end-to-end tests (`Connection: close`,
//! whole answer read): what a scraper or `curl` does, with any header lines.
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// Status, header block and body of an answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` on `addr` with extra header lines (`"Authorization: Bearer x"`).
pub fn get(addr: SocketAddr, path: &str, headers: &[String], timeout: Duration) -> Result<Reply> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    )?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {out:?}"))?;
    Ok(Reply {
        code,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The header line of a bearer token.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}
