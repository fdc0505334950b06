//! The knobs every connection of one emulator watches: up or down, the shaping of each
//! direction, and the byte counters.
//!
//! The link is down while an outage is set by hand ([`super::LinkEmulator::set_down`]) or a
//! scheduled one covers the time; the two inputs are kept apart so that ending one does not
//! end the other. Connections read the combined state from a `watch` channel, so a change
//! reaches every waiting task at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::profile::{Outage, OutageMode, Shaping};

/// State shared by the emulator handle, its schedule and its connections.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) mode: OutageMode,
    pub(crate) started: Instant,
    manual_down: AtomicBool,
    scheduled_down: AtomicBool,
    down: watch::Sender<bool>,
    pub(crate) up_shaping: watch::Sender<Shaping>,
    pub(crate) down_shaping: watch::Sender<Shaping>,
    /// When the up direction finishes what it has been given to transmit, over all
    /// connections: they share the link's rate.
    pub(crate) up_free_at: Mutex<Instant>,
    /// The same for the down direction.
    pub(crate) down_free_at: Mutex<Instant>,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    pub(crate) connections: AtomicU64,
}

impl Control {
    pub(crate) fn new(mode: OutageMode, up: Shaping, down: Shaping) -> Self {
        let started = Instant::now();
        Self {
            mode,
            started,
            manual_down: AtomicBool::new(false),
            scheduled_down: AtomicBool::new(false),
            down: watch::Sender::new(false),
            up_shaping: watch::Sender::new(up),
            down_shaping: watch::Sender::new(down),
            up_free_at: Mutex::new(started),
            down_free_at: Mutex::new(started),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// Sets the hand-made outage input.
    pub(crate) fn set_manual_down(&self, down: bool) {
        self.manual_down.store(down, Ordering::SeqCst);
        self.publish();
    }

    /// Sets the schedule's outage input.
    pub(crate) fn set_scheduled_down(&self, down: bool) {
        self.scheduled_down.store(down, Ordering::SeqCst);
        self.publish();
    }

    /// Recomputes the combined state. `send_if_modified` runs under the channel's lock, so
    /// of two concurrent updates the later one sees both inputs.
    fn publish(&self) {
        self.down.send_if_modified(|down| {
            let now = self.manual_down.load(Ordering::SeqCst)
                || self.scheduled_down.load(Ordering::SeqCst);
            let changed = *down != now;
            *down = now;
            changed
        });
    }

    /// Whether the link is down now.
    pub(crate) fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// A receiver of the combined up/down state (`true` = down).
    pub(crate) fn subscribe_down(&self) -> watch::Receiver<bool> {
        self.down.subscribe()
    }
}

/// Books the transmission of a segment that takes `tx_time` and may not start before
/// `not_before` on a direction whose link is free from `free_at`; returns when it is done.
pub(crate) fn book(free_at: &Mutex<Instant>, not_before: Instant, tx_time: Duration) -> Instant {
    // Nothing panics while the lock is held, but a poisoned instant is still an instant.
    let mut free_at = free_at.lock().unwrap_or_else(PoisonError::into_inner);
    let done = (*free_at).max(not_before) + tx_time;
    *free_at = done;
    done
}

/// Waits until the link is up; returns at once when it is. A closed channel (the emulator is
/// gone) counts as up, so nothing waits forever on a link that no longer exists.
pub(crate) async fn wait_up(down: &mut watch::Receiver<bool>) {
    let _ = down.wait_for(|down| !*down).await;
}

/// Waits until the link goes down; never returns if the emulator is gone.
pub(crate) async fn wait_down(down: &mut watch::Receiver<bool>) {
    if down.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drives the scheduled outages: at every start or end of one, sets the schedule's input to
/// whether any outage covers that moment. Runs until the last outage has ended.
pub(crate) async fn run_schedule(control: std::sync::Arc<Control>, outages: Vec<Outage>) {
    let mut edges: Vec<Duration> = outages
        .iter()
        .filter(|outage| !outage.duration.is_zero())
        .flat_map(|outage| [outage.start, outage.end()])
        .collect();
    edges.sort_unstable();
    edges.dedup();
    for edge in edges {
        let Some(at) = control.started.checked_add(edge) else {
            return;
        };
        tokio::time::sleep_until(at).await;
        let down = outages.iter().any(|outage| outage.covers(edge));
        tracing::debug!(at_s = edge.as_secs_f64(), down, "scheduled link state");
        control.set_scheduled_down(down);
    }
}
