//! Reading what the datapath did: per-CPU counters summed over CPUs, the count of
//! flow events lost to the rate limit or a full ring, and the flow-event stream.
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use rayfence_common::{CounterKey, CounterValue, EventBudget, FlowEvent, map_names};

use super::{Datapath, DatapathError};

/// Counter rows, summed over CPUs.
pub type Counters = BTreeMap<CounterKey, CounterValue>;

impl Datapath {
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        const MAP: &str = map_names::COUNTERS;
        let map: PerCpuHashMap<_, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        let mut counters = Counters::new();
        for item in map.iter() {
            let (key, values) = item.map_err(|e| DatapathError::map(MAP, e))?;
            let total = counters.entry(key).or_default();
            for value in values.iter() {
                total.packets += value.packets;
                total.bytes += value.bytes;
            }
        }
        Ok(counters)
    }

    /// Removes the counter rows of an endpoint that is gone, so churn does not
    /// fill the map.
    pub(crate) fn forget_counters(&mut self, endpoint: u32) -> Result<(), DatapathError> {
        const MAP: &str = map_names::COUNTERS;
        let mut map: PerCpuHashMap<_, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        let keys: Vec<CounterKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.endpoint_id == endpoint)
            .collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Flow events not delivered (over the per-CPU budget or ring full), ever.
    pub fn lost_events(&self) -> Result<u64, DatapathError> {
        const MAP: &str = map_names::EVENT_BUDGET;
        let map: PerCpuArray<_, EventBudget> =
            PerCpuArray::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        let values = map.get(&0, 0).map_err(|e| DatapathError::map(MAP, e))?;
        Ok(values.iter().map(|budget| budget.lost).sum())
    }

    /// Takes the flow-event ring buffer out of the datapath (once).
    pub fn take_events(&mut self) -> Result<EventStream, DatapathError> {
        const MAP: &str = map_names::EVENTS;
        let map = self
            .ebpf_mut()
            .take_map(MAP)
            .ok_or(DatapathError::MissingMap { map: MAP })?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::map(MAP, e))?;
        Ok(EventStream { ring })
    }
}

/// Sampled drop and audit events. Poll the fd (epoll, tokio `AsyncFd`) for
/// readiness, then drain with [`EventStream::next_event`].
pub struct EventStream {
    ring: RingBuf<MapData>,
}

impl EventStream {
    /// The next available event, without blocking.
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: the datapath writes whole FlowEvents; read_unaligned copes with any
        // alignment of the ring's storage.
        Some(unsafe { item.as_ptr().cast::<FlowEvent>().read_unaligned() })
    }

    /// Everything available now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl EventStream {
    /// The same events for async code (tokio): waits on the ring buffer's fd.
    pub fn into_async(self) -> std::io::Result<AsyncEventStream> {
        // SAFETY: the ring buffer owns its fd and keeps it open, unchanged, for as
        // long as the AsyncFd owns the stream.
        let inner = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|error| error.into_parts().1)?;
        Ok(AsyncEventStream { inner })
    }
}

/// [`EventStream`] driven by the tokio reactor.
pub struct AsyncEventStream {
    inner: tokio::io::unix::AsyncFd<EventStream>,
}

impl AsyncEventStream {
    /// The next event, waiting until the datapath sends one.
    pub async fn next_event(&mut self) -> std::io::Result<FlowEvent> {
        loop {
            let mut guard = self.inner.readable_mut().await?;
            if let Some(event) = guard.get_inner_mut().next_event() {
                return Ok(event);
            }
            guard.clear_ready();
        }
    }
}

impl AsFd for EventStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for EventStream {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
