//! A minimal HTTP/1 GET to the agent, over its local socket or TCP, reading the
//! answer whole or line by line (the flow stream).
use std::fmt;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Where a running agent answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddress {
    /// The agent's local socket (`--api-socket`).
    Socket(PathBuf),
    /// `http://host:port` (its `--metrics-addr`), with the bearer token to send.
    Http {
        authority: String,
        token: Option<String>,
    },
}

impl AgentAddress {
    pub fn http(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--agent {url:?}: expected http://HOST:PORT");
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("--agent {url:?}: expected http://HOST:PORT");
        }
        Ok(Self::Http {
            authority: authority.to_owned(),
            token,
        })
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(path) => write!(f, "agent socket {}", path.display()),
            Self::Http { authority, .. } => write!(f, "agent http://{authority}"),
        }
    }
}

/// A 200 answer's body.
pub struct Answer {
    body: Incoming,
    pending: BytesMut,
}

impl Answer {
    pub async fn text(mut self) -> anyhow::Result<String> {
        let mut all = std::mem::take(&mut self.pending);
        while let Some(chunk) = self.chunk().await? {
            all.extend_from_slice(&chunk);
        }
        String::from_utf8(all.to_vec()).context("the agent's answer is not UTF-8")
    }

    /// The next line, without its newline; `None` at the end.
    pub async fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
                let line = self.pending.split_to(at + 1);
                let text = String::from_utf8_lossy(&line[..at]).into_owned();
                return Ok(Some(text));
            }
            match self.chunk().await? {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None if self.pending.is_empty() => return Ok(None),
                None => {
                    let rest = self.pending.split();
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
            }
        }
    }

    async fn chunk(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    let frame = frame.context("reading the agent's answer")?;
                    if let Ok(mut data) = frame.into_data() {
                        return Ok(Some(data.copy_to_bytes(data.remaining())));
                    }
                }
            }
        }
    }
}

/// GET `path_and_query`; anything but 200 is an error carrying the agent's words.
pub async fn get(agent: &AgentAddress, path_and_query: &str) -> anyhow::Result<Answer> {
    let (authority, token) = match agent {
        AgentAddress::Socket(_) => ("localhost".to_owned(), None),
        AgentAddress::Http { authority, token } => (authority.clone(), token.clone()),
    };
    let mut request = hyper::Request::get(path_and_query).header(hyper::header::HOST, &authority);
    if let Some(token) = &token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = match agent {
        AgentAddress::Socket(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| {
                    format!("connecting to {agent} (is the agent running on this node? as root?)")
                })?;
            send(agent, stream, request).await?
        }
        AgentAddress::Http { authority, .. } => {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .with_context(|| format!("connecting to {agent}"))?;
            send(agent, stream, request).await?
        }
    };
    let status = response.status();
    let answer = Answer {
        body: response.into_body(),
        pending: BytesMut::new(),
    };
    if status != hyper::StatusCode::OK {
        let words = answer.text().await.unwrap_or_default();
        bail!("{agent} answered {status}: {}", words.trim());
    }
    Ok(answer)
}

async fn send<S>(
    agent: &AgentAddress,
    stream: S,
    request: hyper::Request<Empty<Bytes>>,
) -> anyhow::Result<hyper::Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("talking HTTP to {agent}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .with_context(|| format!("asking {agent}"))
}
