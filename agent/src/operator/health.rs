//! What the probes read: the process is alive (the reconcile loop turned within
//! [`STALL`]) and ready (the first full sync of every kind is programmed); and the
//! agent's [`Metrics`], which travel with it to everything that reports.
//!
//! Must not: decide readiness itself (the runtime says when) or know HTTP (the
//! server turns this into `/healthz` and `/readyz`).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::metrics::Metrics;

/// How long the loop may go without turning before `/healthz` fails.
pub const STALL: Duration = Duration::from_secs(30);

/// What the runtime reports for the probes.
pub struct Health {
    start: Instant,
    ready: AtomicBool,
    /// Milliseconds since `start` at the loop's last turn.
    last_turn_ms: AtomicU64,
    pub metrics: Metrics,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ready: AtomicBool::new(false),
            last_turn_ms: AtomicU64::new(0),
            metrics: Metrics::new(),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.metrics.became_ready();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The reconcile loop calls this on every turn.
    pub fn turned(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_turn_ms.load(Ordering::Acquire)) < STALL.as_millis() as u64
    }
}
