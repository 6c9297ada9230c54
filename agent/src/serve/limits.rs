//! What one client may hold on the HTTP listeners: at most
//! [`Limits::max_connections`] connections at once in all and
//! [`Limits::max_per_source`] from one source address; a connection over either is
//! closed as soon as it is accepted (a reset, before any byte is read or a task is
//! spawned) and counted in `rayfence_http_connections_refused_total`. Also the
//! file-descriptor headroom ([`raise_nofile`], [`check_headroom`]): the listener's
//! connections must never take the descriptors the reconcile loop, netlink and bpf
//! need.
//!
//! Must not: read from a connection, block the accept loop, or put an address into
//! a metric label (labels are the listener's name and the reason).
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::operator::metrics::{ListenerMetrics, Metrics};

/// Descriptors kept for everything but the listeners' connections: netlink and
/// inotify sockets, bpf maps, programs and links, pod namespaces and cgroups opened
/// while attaching, the API client's connections, logs.
pub const FD_RESERVE: u64 = 1024;

/// Per-connection settings and caps of one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once on the listener, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
    /// A request head must arrive complete within this long of the connection
    /// opening or of the previous response; it also closes an idle kept-alive
    /// connection (hyper's header read timeout covers both).
    pub header_timeout: Duration,
    /// Largest request head (request line and headers), bytes: hyper's read
    /// buffer; a larger head is answered 431 and the connection closed.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// A response write that makes no progress for this long ends the connection
    /// (a client that stops reading).
    pub write_stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Prometheus keeps one connection per target, an operator a few: 256
            // is far above what scrapers need and, at the ~40 KiB a connection
            // costs at most, about 10 MiB.
            max_connections: 256,
            // One scraper, a few `rayfence flows --follow` from one host (or one
            // NAT address); a single pod cannot take more than this.
            max_per_source: 16,
            // A scraper sends its request in one segment: 5 s is generous on a
            // node network, and what a slowloris gets per connection.
            header_timeout: Duration::from_secs(5),
            // Node.js's default: a service account or OIDC token with groups
            // fits many times over (projected tokens are ~1 KiB).
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            write_stall: Duration::from_secs(30),
        }
    }
}

/// Why [`Limits`] could not be used as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("--metrics-max-connections must be at least 1")]
    NoConnections,
    #[error("--metrics-max-connections-per-source must be at least 1")]
    NoPerSource,
    #[error("--metrics-header-timeout must be more than 0")]
    NoTimeout,
    #[error(
        "--metrics-max-connections {asked}: the listeners may hold {total} connections, \
         but only {available} file descriptors are left after {reserve} kept for \
         enforcement (RLIMIT_NOFILE {limit}); lower the flag or raise the limit"
    )]
    Descriptors {
        asked: usize,
        total: u64,
        available: u64,
        reserve: u64,
        limit: u64,
    },
}

impl Limits {
    pub fn check(&self) -> Result<(), LimitsError> {
        if self.max_connections == 0 {
            return Err(LimitsError::NoConnections);
        }
        if self.max_per_source == 0 {
            return Err(LimitsError::NoPerSource);
        }
        if self.header_timeout.is_zero() {
            return Err(LimitsError::NoTimeout);
        }
        Ok(())
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does at start)
/// and returns the soft limit now in force. On failure, the current soft limit.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// Every listener's connections (`listeners` of them, each up to `limits`'
/// cap, +1 for the socket accepted and refused at once) must fit below `nofile`
/// with [`FD_RESERVE`] left over.
pub fn check_headroom(limits: &Limits, listeners: usize, nofile: u64) -> Result<(), LimitsError> {
    let total = (limits.max_connections as u64 + 1) * listeners as u64;
    let available = nofile.saturating_sub(FD_RESERVE);
    if total > available {
        return Err(LimitsError::Descriptors {
            asked: limits.max_connections,
            total,
            available,
            reserve: FD_RESERVE,
            limit: nofile,
        });
    }
    Ok(())
}

/// Why a connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`Limits::max_connections`] reached.
    Global,
    /// [`Limits::max_per_source`] reached for this source.
    PerSource,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Global => "global-limit",
            Refused::PerSource => "per-source-limit",
        }
    }
}

/// The open connections of one listener.
pub struct Admission {
    limits: Limits,
    open: Mutex<Open>,
    metrics: ListenerMetrics,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Admission {
    /// `listener` names it in metrics (`metrics`, `health`).
    pub fn new(limits: Limits, listener: &'static str, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new(Open::default()),
            metrics: metrics.listener(listener),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot for a connection from `source`, held until the permit drops; or why
    /// not (counted).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refused> {
        let source = source.to_canonical();
        let mut open = self.open();
        let from_source = open.per_source.get(&source).copied().unwrap_or(0);
        let refused = if open.total >= self.limits.max_connections {
            Some(Refused::Global)
        } else if from_source >= self.limits.max_per_source {
            Some(Refused::PerSource)
        } else {
            None
        };
        if let Some(reason) = refused {
            drop(open);
            self.metrics.connection_refused(reason.label());
            return Err(reason);
        }
        open.total += 1;
        *open.per_source.entry(source).or_insert(0) += 1;
        self.metrics.connections_open(open.total);
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }

    fn release(&self, source: IpAddr) {
        let mut open = self.open();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                // The map holds only sources with an open connection.
                open.per_source.remove(&source);
            }
        }
        self.metrics.connections_open(open.total);
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        // Counters only: nothing a panic could leave half-done.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.open().per_source.len()
    }
}

/// One admitted connection; frees its slot on drop.
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::exposition::Format;

    fn admission(max: usize, per_source: usize) -> (Arc<Admission>, Metrics) {
        let metrics = Metrics::new();
        let limits = Limits {
            max_connections: max,
            max_per_source: per_source,
            ..Limits::default()
        };
        (Admission::new(limits, "metrics", &metrics), metrics)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_over_its_cap_is_refused_and_others_are_not() {
        let (a, metrics) = admission(10, 2);
        let held: Vec<Permit> = (0..2).map(|_| a.admit(ip(1)).expect("under cap")).collect();
        assert_eq!(a.admit(ip(1)).err(), Some(Refused::PerSource));
        let _other = a.admit(ip(2)).expect("another source");
        drop(held);
        let _again = a.admit(ip(1)).expect("slots freed on drop");
        let text = metrics.encode(Format::OpenMetrics);
        assert!(
            text.contains(
                "rayfence_http_connections_refused_total{listener=\"metrics\",reason=\"per-source-limit\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_global_cap_holds_across_sources_and_the_map_forgets_closed_sources() {
        let (a, metrics) = admission(3, 2);
        let held: Vec<Permit> = (1..=3)
            .map(|i| a.admit(ip(i)).expect("under cap"))
            .collect();
        assert_eq!(a.admit(ip(4)).err(), Some(Refused::Global));
        assert!(
            metrics
                .encode(Format::OpenMetrics)
                .contains("rayfence_http_connections{listener=\"metrics\"} 3")
        );
        drop(held);
        assert_eq!(a.sources(), 0);
        assert!(
            metrics
                .encode(Format::OpenMetrics)
                .contains("rayfence_http_connections{listener=\"metrics\"} 0")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_sources_count_as_the_ipv4_address() {
        let (a, _m) = admission(10, 1);
        let _p = a.admit(ip(7)).expect("first");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("ip");
        assert_eq!(a.admit(mapped).err(), Some(Refused::PerSource));
    }

    #[test]
    fn headroom_keeps_the_reserve_for_enforcement() {
        let limits = Limits::default();
        assert!(check_headroom(&limits, 2, 1 << 20).is_ok());
        let error = check_headroom(&limits, 2, 1024).expect_err("no room");
        assert!(
            error.to_string().contains("--metrics-max-connections 256"),
            "{error}"
        );
        // Exactly fits.
        let tight = (limits.max_connections as u64 + 1) * 2 + FD_RESERVE;
        assert!(check_headroom(&limits, 2, tight).is_ok());
        assert!(check_headroom(&limits, 2, tight - 1).is_err());
    }

    #[test]
    fn raising_nofile_never_lowers_it() {
        let mut before = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into the struct.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) },
            0
        );
        assert!(raise_nofile() >= before.rlim_cur);
    }
}
