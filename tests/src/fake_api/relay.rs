//! A TCP relay to the fake API server from another network namespace: the server
//! listens on 127.0.0.1 of the test's namespace, which a lab node (its own
//! namespace) cannot reach, so the node gets a listener on its own 127.0.0.1 that
//! forwards every connection, and a kubeconfig naming it, as a node's kubeconfig
//! names the API server. An outage of the server reaches the node through it.
//!
//! The caller binds the listener inside the namespace (the socket keeps it); the
//! upstream connections are made from wherever the relay's threads run (the
//! test's namespace). Plain threads: it works without a tokio runtime.
//!
//! Must not: look at what it carries.
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::FakeApiServer;

/// A running relay; stops accepting (and removes its kubeconfig) on drop.
pub struct ApiRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    kubeconfig: Option<PathBuf>,
}

impl ApiRelay {
    /// Relays every connection `listener` accepts to `upstream`.
    pub fn start(listener: TcpListener, upstream: SocketAddr) -> Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let _ = inbound.set_nonblocking(false);
                        std::thread::spawn(move || relay(inbound, upstream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            kubeconfig: None,
        })
    }

    /// A relay listening on 127.0.0.1 inside `node`'s namespace (the listening
    /// socket keeps that namespace; upstream connections leave from the caller's),
    /// as a node's agent reaches the API server through it.
    pub fn in_node(node: &crate::topology::Node, upstream: SocketAddr) -> Result<Self> {
        let listener = node
            .netns
            .run(|| TcpListener::bind("127.0.0.1:0"))?
            .context("binding the API relay in the node namespace")?;
        Self::start(listener, upstream)
    }

    /// Where the relay listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig naming this relay (otherwise `server`'s, plain HTTP, no
    /// credentials) into `dir`; returns its path. Removed with the relay.
    pub fn write_kubeconfig(&mut self, server: &FakeApiServer, dir: &Path) -> Result<PathBuf> {
        let yaml = server
            .kubeconfig_yaml()
            .replace(&server.url(), &format!("http://{}", self.addr));
        let path = dir.join(format!(
            "rf-relay-{}-kubeconfig-{}",
            std::process::id(),
            self.addr.port()
        ));
        std::fs::write(&path, yaml)?;
        self.kubeconfig = Some(path.clone());
        Ok(path)
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(path) = &self.kubeconfig {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Copies both ways until either side closes, then closes the other.
fn relay(inbound: TcpStream, upstream: SocketAddr) {
    let Ok(outbound) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(mut in_r), Ok(mut out_w)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut in_r, &mut out_w);
        let _ = out_w.shutdown(Shutdown::Both);
    });
    let (mut out_r, mut in_w) = (outbound, inbound);
    let _ = std::io::copy(&mut out_r, &mut in_w);
    let _ = in_w.shutdown(Shutdown::Both);
    let _ = up.join();
}
