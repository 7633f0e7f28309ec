// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Connection serving shared by the control socket and the metrics endpoint: a thread per
//! connection, a cap on how many run at once, and time bounds, so that no peer (idle, slow or
//! not reading its answers) can delay another or hold a thread for long.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most connections served at once, per listener; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest a single read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, however it trickles its bytes.
pub const SESSION_LIMIT: Duration = Duration::from_secs(30);

/// A connection's time budget.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn start() -> Deadline {
        Deadline(Instant::now() + SESSION_LIMIT)
    }

    /// The timeout for the next read or write: at most IO_TIMEOUT, never past the deadline;
    /// `None` once the deadline has passed.
    pub fn next_timeout(&self) -> Option<Duration> {
        let left = self.0.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.min(IO_TIMEOUT))
    }
}

/// Counts connections in service against [`MAX_CONNECTIONS`].
#[derive(Debug, Clone, Default)]
pub struct Slots(Arc<AtomicUsize>);

/// A connection's place; freed on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slots {
    pub fn take(&self) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.0.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `serve(conn)` on a thread of its own if a slot is free; otherwise the connection is
/// dropped (closed) and counted in `busy`.
pub fn dispatch<S: Send + 'static>(
    slots: &Slots,
    name: &str,
    conn: S,
    busy: &RateLimited,
    serve: impl FnOnce(S) + Send + 'static,
) {
    let Some(slot) = slots.take() else {
        busy.log(|n| {
            tracing::warn!("{name}: {MAX_CONNECTIONS} connections in service, closed {n} more")
        });
        return;
    };
    let r = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _slot = slot;
            serve(conn);
        });
    if let Err(e) = r {
        busy.log(|n| tracing::warn!("{name}: cannot start a connection thread ({n} times): {e}"));
    }
}

/// A log line at most once a second, saying how many events it stands for.
#[derive(Debug, Default)]
pub struct RateLimited {
    last_second: AtomicU64,
    count: AtomicU64,
}

impl RateLimited {
    pub fn log(&self, emit: impl FnOnce(u64)) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.fetch_sub(n, Ordering::Relaxed);
            emit(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_and_free() {
        let s = Slots::default();
        let held: Vec<_> = (0..MAX_CONNECTIONS).map(|_| s.take().unwrap()).collect();
        assert!(s.take().is_none());
        drop(held);
        assert!(s.take().is_some());
    }

    #[test]
    fn rate_limited_logs_once_per_second() {
        let r = RateLimited::default();
        let mut lines = Vec::new();
        for _ in 0..100 {
            r.log(|n| lines.push(n));
        }
        // The first event logs; the rest of the same second wait (at most one more if the
        // second turned over meanwhile).
        assert!(!lines.is_empty() && lines.len() <= 2, "{lines:?}");
    }
}
