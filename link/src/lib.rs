//! A link emulator: a user-space TCP proxy that carries each connection through a slow,
//! delayed, sometimes broken link, for tests and for trying Cleave over edge-like networks
//! without netem or root.
//!
//! [`LinkEmulator::start`] listens, and for every accepted client dials the upstream and
//! carries both directions through a model of a link (`direction.rs`): a bounded queue that
//! holds the sender back through TCP when full, a transmitter at the link's rate, and a wire
//! that delivers each segment after the propagation delay. Outages, scheduled in the
//! [`LinkProfile`] or set by hand, either stall the link or reset its connections. The
//! emulator sits above TCP, so it cannot lose or reorder segments; see
//! `docs/link-emulator.md`.

mod connection;
mod control;
mod direction;
mod profile;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use profile::{DEFAULT_QUEUE_BYTES, LinkProfile, Outage, OutageMode, Shaping};

use control::Control;

/// What can go wrong starting a link or reading its description.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The bound listener could not tell its address.
    #[error("cannot read the address the link listens on: {0}")]
    LocalAddr(std::io::Error),
    /// An outage was not `START+DURATION` in seconds.
    #[error("bad outage `{text}`: {reason}")]
    BadOutage {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An outage mode was neither `stall` nor `reset`.
    #[error("bad outage mode `{text}`: expected `stall` or `reset`")]
    BadOutageMode {
        /// The text given.
        text: String,
    },
}

/// Bytes delivered through the link so far, and connections accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes delivered to the upstream (client → upstream).
    pub bytes_up: u64,
    /// Bytes delivered to clients (upstream → client).
    pub bytes_down: u64,
    /// Connections accepted, including those an outage closed at once.
    pub connections: u64,
}

/// A running link emulator. Dropping it stops it as [`LinkEmulator::shutdown`] does, but
/// without waiting for the connections to close.
#[derive(Debug)]
pub struct LinkEmulator {
    local_addr: SocketAddr,
    control: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    accepting: Option<JoinHandle<()>>,
    schedule: Option<JoinHandle<()>>,
}

impl LinkEmulator {
    /// Listens on `listen` (port 0 = ephemeral) and forwards each accepted connection to
    /// `upstream` through a link shaped by `profile`. Scheduled outages count from now.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: LinkProfile,
    ) -> Result<Self, LinkError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| LinkError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(LinkError::LocalAddr)?;
        let control = Arc::new(Control::new(profile.outage_mode, profile.up, profile.down));
        let (stop, stopped) = oneshot::channel();
        let accepting = tokio::spawn(accept(listener, upstream, control.clone(), stopped));
        let schedule = (!profile.outages.is_empty())
            .then(|| tokio::spawn(control::run_schedule(control.clone(), profile.outages)));
        tracing::debug!(%local_addr, %upstream, "link listening");
        Ok(Self {
            local_addr,
            control,
            stop: Some(stop),
            accepting: Some(accepting),
            schedule,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts (`true`) or ends (`false`) an outage now, in the profile's outage mode, on top
    /// of the schedule: the link is down while either says so.
    pub fn set_down(&self, down: bool) {
        self.control.set_manual_down(down);
    }

    /// Whether the link is down now (by hand or by the schedule).
    pub fn is_down(&self) -> bool {
        self.control.is_down()
    }

    /// A receiver that sees every change of the link between up (`false`) and down
    /// (`true`), by hand or by the schedule. Overlapping outages read as one.
    pub fn subscribe_down(&self) -> watch::Receiver<bool> {
        self.control.subscribe_down()
    }

    /// Replaces the shaping of both directions for bytes from now on, including bytes the
    /// link has queued but not yet begun to transmit (tests switch a link from fast to
    /// slow). A segment already on the wire keeps its delivery time.
    pub fn set_shaping(&self, up: Shaping, down: Shaping) {
        self.control.up_shaping.send_replace(up);
        self.control.down_shaping.send_replace(down);
    }

    /// Bytes delivered each way and connections accepted, so far.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            bytes_up: self.control.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.control.bytes_down.load(Ordering::Relaxed),
            connections: self.control.connections.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and closes every connection; returns once they are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(accepting) = self.accepting.take()
            && let Err(error) = accepting.await
        {
            tracing::debug!(%error, "link accept loop ended abnormally");
        }
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        // Dropping `stop` ends the accept loop, which closes the connections.
        if let Some(schedule) = self.schedule.take() {
            schedule.abort();
        }
    }
}

/// Accepts clients until told to stop (or the emulator is dropped), then closes every
/// connection and waits until they are gone.
async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    control: Arc<Control>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    control.connections.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(connection::serve(client, peer, upstream, control.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::debug!(%error, "link accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined {
                    tracing::debug!(%error, "link connection task ended abnormally");
                }
            }
        }
    }
    drop(listener);
    connections.shutdown().await;
}
