//! Work a test runs on a thread of its own until told to stop, such as a prober
//! knocking on a pod while the agent is edited, killed or restarted, and what that
//! work counted.
//!
//! Must not: outlive the test. Dropped without [`Background::finish`] (a failed
//! assertion), it is stopped and joined all the same.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

pub struct Background<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Default + Send + 'static> Background<T> {
    /// Runs `work` with a flag that turns true once the test is done with it; `work`
    /// checks it between rounds and returns what it counted.
    pub fn start(work: impl FnOnce(&AtomicBool) -> T + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || work(&flag));
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the work and returns what it counted (the default if it panicked).
    pub fn finish(mut self) -> T {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
