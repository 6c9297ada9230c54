//! Flow events: the datapath's sampled drop and audit events, named (pods,
//! namespaces, RayCluster, CIDR) from the engine, rate-limited per local pod with a
//! count of what was left out, logged as one line each (target
//! [`crate::logging::FLOW_TARGET`], in the agent's log format, flat fields), and kept
//! for `/v1/flows` ([`FlowHub`]: the recent ones, and a live feed). The reconcile
//! loop hands each event in ([`FlowEvents::handle`]) and counts what became of it;
//! the server reads the hub.
//!
//! Two limits, on purpose: the datapath's per-CPU budget bounds what crosses the ring
//! buffer (its losses are `rayfence_flow_events_lost_total`); the per-pod limit here
//! keeps one noisy pod from drowning the others in the log.
//!
//! The limiter is a token bucket per pod, by hand rather than `governor`'s keyed
//! limiter: what rayfence needs is the count of what each pod had suppressed,
//! handed on with its next event and forgotten with its bucket, which `governor`
//! does not keep; it would be a second map beside the limiter's.
//!
//! Must not: block the reconcile loop (publishing never waits on a reader), or let
//! a slow `rayfence flows --follow` reader hold events (it skips, and is told).
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rayfence_common::{Direction, FlowEvent, Reason, Verdict};
use tokio::sync::broadcast;

use super::explain::{describe, endpoint_labels, protocol_name};
use super::wire::{FlowFilter, FlowRecord, FlowVerdict};
use crate::policy::Engine;
use crate::tables::{EndpointId, protocol};

/// Recent events kept for `rayfence flows` without `--follow`.
const RECENT: usize = 1024;
/// Events a `--follow` reader may fall behind by before it skips.
const FEED: usize = 1024;
/// A pod's limiter is forgotten after this long without events.
const IDLE: Duration = Duration::from_secs(300);

/// The recent events and the live feed, shared by the runtime (writer) and the
/// HTTP and socket handlers (readers).
pub struct FlowHub {
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    feed: broadcast::Sender<Arc<FlowRecord>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            feed: broadcast::channel(FEED).0,
        }
    }
}

impl FlowHub {
    pub fn publish(&self, record: FlowRecord) {
        let record = Arc::new(record);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(record.clone());
        }
        // No reader is not an error.
        let _ = self.feed.send(record);
    }

    /// The recent events that match, oldest first, at most `limit`.
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> Vec<Arc<FlowRecord>> {
        let Ok(recent) = self.recent.lock() else {
            return Vec::new();
        };
        let matching: Vec<Arc<FlowRecord>> = recent
            .iter()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).collect()
    }

    /// Every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.feed.subscribe()
    }
}

/// Where flow events go besides the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowLog {
    /// In the agent's log (stdout), one line each.
    Stdout,
    Off,
}

#[derive(Clone, Copy, Debug)]
pub struct FlowConfig {
    pub log: FlowLog,
    /// Events each local pod may log per second (and burst); the rest are counted.
    pub per_pod_per_second: u32,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            log: FlowLog::Stdout,
            per_pod_per_second: 10,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// Names, limits and hands on flow events. Owned by the reconcile loop, which has
/// the engine.
pub struct FlowEvents {
    config: FlowConfig,
    hub: Arc<FlowHub>,
    buckets: BTreeMap<EndpointId, Bucket>,
    last_prune: Instant,
}

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Published(FlowVerdict),
    Suppressed,
    /// Not a drop or audit event (or unreadable): ignored.
    Ignored,
}

impl FlowEvents {
    pub fn new(config: FlowConfig, hub: Arc<FlowHub>) -> Self {
        Self {
            config,
            hub,
            buckets: BTreeMap::new(),
            last_prune: Instant::now(),
        }
    }

    pub fn handle(&mut self, engine: &Engine, event: &FlowEvent) -> Handled {
        let now = Instant::now();
        self.prune(now);
        let verdict = match Verdict::from_u8(event.verdict) {
            Some(Verdict::Drop) => FlowVerdict::Dropped,
            Some(Verdict::Audit) => FlowVerdict::Audit,
            _ => return Handled::Ignored,
        };
        let Some(suppressed) = self.take_token(event.endpoint_id, now) else {
            return Handled::Suppressed;
        };
        let record = record(engine, event, verdict, suppressed);
        if self.config.log == FlowLog::Stdout {
            log(&record);
        }
        self.hub.publish(record);
        Handled::Published(verdict)
    }

    /// A token for the endpoint: `Some(events suppressed since its last one)`.
    fn take_token(&mut self, endpoint: EndpointId, now: Instant) -> Option<u64> {
        let rate = f64::from(self.config.per_pod_per_second.max(1));
        let bucket = self.buckets.entry(endpoint).or_insert(Bucket {
            tokens: rate,
            last: now,
            suppressed: 0,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(rate);
        bucket.last = now;
        if bucket.tokens < 1.0 {
            bucket.suppressed += 1;
            return None;
        }
        bucket.tokens -= 1.0;
        Some(std::mem::take(&mut bucket.suppressed))
    }

    fn prune(&mut self, now: Instant) {
        if now.duration_since(self.last_prune) < IDLE {
            return;
        }
        self.last_prune = now;
        // A pod gone quiet (or gone) loses its limiter; what it had suppressed is
        // in `rayfence_flow_events_suppressed_total` already.
        self.buckets
            .retain(|_, b| now.duration_since(b.last) < IDLE);
    }
}

/// One log line for the event: the ends' fields prefixed `src_` and `dst_`, the
/// rest as [`FlowRecord`] names them; the line's own `timestamp` stands for `time`.
pub fn log(record: &FlowRecord) {
    let (src, dst) = (&record.source, &record.destination);
    fn opt(value: &Option<String>) -> Option<tracing::field::DisplayValue<&str>> {
        value.as_deref().map(tracing::field::display)
    }
    tracing::info!(
        target: crate::logging::FLOW_TARGET,
        verdict = %record.verdict.as_str(),
        direction = %record.direction,
        reason = %record.reason,
        protocol = %record.protocol,
        src_ip = %src.ip,
        src_port = src.port,
        src_kind = %src.kind,
        src_namespace = opt(&src.namespace),
        src_name = opt(&src.name),
        src_raycluster = opt(&src.raycluster),
        src_cidr = opt(&src.cidr),
        dst_ip = %dst.ip,
        dst_port = dst.port,
        dst_kind = %dst.kind,
        dst_namespace = opt(&dst.namespace),
        dst_name = opt(&dst.name),
        dst_raycluster = opt(&dst.raycluster),
        dst_cidr = opt(&dst.cidr),
        namespace = %record.namespace,
        pod = %record.pod,
        raycluster = opt(&record.raycluster),
        role = opt(&record.role),
        bytes = record.bytes,
        suppressed = record.suppressed,
        "flow {}",
        record.verdict.as_str()
    );
}

/// The event, named from the engine's current state.
fn record(engine: &Engine, event: &FlowEvent, verdict: FlowVerdict, suppressed: u64) -> FlowRecord {
    let local_ip = ip(event.local);
    let peer_ip = ip(event.peer);
    // ICMP has no ports; the datapath keys echo flows by their identifier instead.
    let icmp = matches!(event.protocol, protocol::ICMP | protocol::ICMPV6);
    let port = |p: u16| if icmp { 0 } else { p };
    let local = describe(engine, local_ip, port(event.local_port));
    let peer = describe(engine, peer_ip, port(event.peer_port));
    let meta = engine.endpoint_meta(event.endpoint_id);
    let (raycluster, role) = endpoint_labels(engine, event.endpoint_id);
    let ingress = Direction::from_u8(event.direction) == Some(Direction::Ingress);
    let (source, destination) = if ingress {
        (peer, local)
    } else {
        (local, peer)
    };
    FlowRecord {
        time: wall_clock(event.timestamp_ns),
        verdict,
        direction: if ingress { "ingress" } else { "egress" }.into(),
        reason: Reason::from_u8(event.reason)
            .map(Reason::as_str)
            .unwrap_or("unknown")
            .into(),
        protocol: protocol_name(event.protocol),
        source,
        destination,
        namespace: meta
            .as_ref()
            .map(|m| m.namespace.clone())
            .unwrap_or_default(),
        pod: meta.map(|m| m.pod).unwrap_or_default(),
        raycluster,
        role,
        bytes: event.packet_len,
        suppressed,
    }
}

fn ip(addr: rayfence_common::Addr) -> IpAddr {
    Ipv6Addr::from(addr).to_canonical()
}

/// The datapath stamps events with CLOCK_MONOTONIC (`bpf_ktime_get_ns`); RFC 3339 UTC.
fn wall_clock(monotonic_ns: u64) -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0;
    let now_ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    let age = if ok {
        Duration::from_nanos(now_ns.saturating_sub(monotonic_ns))
    } else {
        Duration::ZERO
    };
    let at = SystemTime::now()
        .checked_sub(age)
        .unwrap_or_else(SystemTime::now);
    jiff::Timestamp::try_from(at)
        .map(|t| t.round(jiff::Unit::Millisecond).unwrap_or(t).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(v4: [u8; 4]) -> rayfence_common::Addr {
        std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets()
    }

    fn events(rate: u32) -> FlowEvents {
        FlowEvents::new(
            FlowConfig {
                log: FlowLog::Off,
                per_pod_per_second: rate,
            },
            Arc::new(FlowHub::default()),
        )
    }

    #[test]
    fn a_pod_over_its_rate_is_suppressed_and_the_next_event_carries_the_count() {
        let mut flows = events(3);
        let t0 = Instant::now();
        let got: Vec<Option<u64>> = (0..5).map(|_| flows.take_token(7, t0)).collect();
        assert_eq!(got, [Some(0), Some(0), Some(0), None, None]);
        // Another pod has its own budget.
        assert_eq!(flows.take_token(8, t0), Some(0));
        // A second later the bucket is full again; the first event says 2 were left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(flows.take_token(7, t1), Some(2));
        assert_eq!(flows.take_token(7, t1), Some(0));
    }

    #[test]
    fn limiters_of_pods_gone_quiet_are_forgotten_so_churn_does_not_grow_them() {
        let mut flows = events(1);
        let t0 = Instant::now();
        for endpoint in 0..1000 {
            flows.take_token(endpoint, t0);
            flows.take_token(endpoint, t0); // suppressed
        }
        flows.take_token(5000, t0 + IDLE);
        flows.prune(t0 + IDLE + Duration::from_secs(1));
        assert_eq!(flows.buckets.keys().copied().collect::<Vec<_>>(), [5000]);
    }

    #[test]
    fn the_hub_keeps_the_recent_matching_events_and_feeds_subscribers() {
        let hub = FlowHub::default();
        let mut feed = hub.subscribe();
        let engine = Engine::new(crate::policy::Settings::new("n", Vec::new()));
        for (i, verdict) in [
            FlowVerdict::Dropped,
            FlowVerdict::Audit,
            FlowVerdict::Dropped,
        ]
        .into_iter()
        .enumerate()
        {
            let event = FlowEvent {
                endpoint_id: 1,
                verdict: if verdict == FlowVerdict::Audit { 2 } else { 1 },
                reason: Reason::NoPolicy as u8,
                protocol: 6,
                local: mapped([10, 0, 0, 1]),
                peer: mapped([10, 0, 0, 2]),
                local_port: 80,
                peer_port: 1000 + i as u16,
                ..FlowEvent::default()
            };
            hub.publish(record(&engine, &event, verdict, 0));
        }
        let dropped = FlowFilter {
            verdict: Some(FlowVerdict::Dropped),
            ..FlowFilter::default()
        };
        let recent = hub.recent(&dropped, 10);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[1].source.port, 1002);
        assert_eq!(recent[1].source.ip.to_string(), "10.0.0.2");
        assert_eq!(hub.recent(&dropped, 1)[0].source.port, 1002);
        assert_eq!(feed.try_recv().map(|r| r.source.port).ok(), Some(1000));
    }
}
