//! `--on-link-down spool`: frames that cannot be sent wait on disk, and go out when a tail is
//! back — in this run or the next.
//!
//! The [`Spool`] is the disk format; this is the daemon's side of it:
//!
//! - **Store.** A remote frame whose delivery comes back `LinkDown` is written to the spool
//!   as it was coded (features or JPEG; one leading byte says which). Its report line is
//!   not written yet: the frame has not ended.
//! - **Drain.** While the link is up, one task sends the oldest spooled frame, waits for
//!   its answer, writes its line and only then deletes it (at least once: a crash between
//!   answer and delete sends it again). Frames from the spool carry ids from
//!   [`DRAIN_IDS`] up and a `note` saying how long they waited.
//! - **Loss, said out loud.** A frame evicted because the spool is full, an entry found
//!   corrupt, a frame coded for another bundle: each gets its own line, status `dropped`
//!   or `failed`, with the reason.
//!
//! At the end of a finite source the run drains what it can while the link is up; what is
//! left stays on disk for the next start.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::mode::Mode;
use crate::report::{FrameReport, Outcome, Status};
use crate::session::{Delivery, Session};
use crate::spool::{EntryId, Spool, SpoolError, SpoolLimits, SpooledFrame};
use crate::{HeadError, Payload};

/// The first frame id of frames sent from the spool, far above any source's.
pub const DRAIN_IDS: u64 = 1 << 48;

/// Where the spool lives and how much it may hold.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Its folder (created if missing; one daemon per folder).
    pub dir: PathBuf,
    /// Its bounds.
    pub limits: SpoolLimits,
}

/// A frame read back from the spool.
#[derive(Debug)]
pub(crate) struct Stored {
    pub id: EntryId,
    pub name: String,
    pub payload: Payload,
    /// Time since capture.
    pub age: Duration,
}

/// The spool, shared by the run's tasks; every call blocks (file I/O).
#[derive(Debug)]
pub struct Spooler {
    spool: Mutex<Spool>,
    bundle_id: String,
}

impl Spooler {
    /// Opens (or creates) the spool for `bundle_id`, and returns the lines of the frames a
    /// previous run left damaged.
    ///
    /// # Errors
    ///
    /// [`HeadError::Config`] if the folder cannot be opened or is in use by another daemon.
    pub fn open(
        config: &SpoolConfig,
        bundle_id: String,
    ) -> Result<(Self, Vec<FrameReport>), HeadError> {
        let (spool, discarded) = Spool::open(&config.dir, config.limits)
            .map_err(|e| HeadError::Config(format!("spool {}: {e}", config.dir.display())))?;
        let lost = discarded
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let source = d.name.unwrap_or_else(|| d.file.display().to_string());
                FrameReport::unanswered(
                    DRAIN_IDS - 1 - i as u64,
                    source,
                    Status::Failed,
                    "spool",
                    format!("lost from the spool ({}): {}", d.file.display(), d.reason),
                )
            })
            .collect();
        Ok((
            Self {
                spool: Mutex::new(spool),
                bundle_id,
            },
            lost,
        ))
    }

    /// Frames waiting on disk.
    pub fn len(&self) -> usize {
        self.spool.lock().map_or(0, |s| s.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes a frame; returns the names of the frames evicted to make room.
    pub(crate) fn store(&self, name: &str, payload: &Payload) -> Result<Vec<String>, String> {
        let (kind, bytes) = match payload {
            Payload::Features(bytes) => (0u8, bytes),
            Payload::Image(bytes) => (1u8, bytes),
        };
        let mut tagged = Vec::with_capacity(bytes.len() + 1);
        tagged.push(kind);
        tagged.extend_from_slice(bytes);
        let frame = SpooledFrame {
            name: name.to_string(),
            captured_unix_ms: now_unix_ms(),
            bundle_id: self.bundle_id.clone(),
            payload: tagged,
        };
        let mut spool = self
            .spool
            .lock()
            .map_err(|_| "the spool's lock is poisoned")?;
        match spool.push(&frame) {
            Ok(outcome) => Ok(outcome.evicted.into_iter().map(|e| e.name).collect()),
            Err(SpoolError::PushFailed {
                evicted, source, ..
            }) => Err(format!(
                "could not write it to the spool ({source}); {} older frame(s) were evicted \
                 first: {}",
                evicted.len(),
                evicted
                    .into_iter()
                    .map(|e| e.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(other) => Err(other.to_string()),
        }
    }

    /// The oldest frame, or `None`. Entries that are corrupt or of another bundle are
    /// removed and come back as lines in the second value.
    pub(crate) fn oldest(&self) -> (Option<Stored>, Vec<(String, String)>) {
        let mut lost = Vec::new();
        let Ok(mut spool) = self.spool.lock() else {
            return (None, lost);
        };
        loop {
            match spool.peek_oldest() {
                Ok(None) => return (None, lost),
                Ok(Some((id, frame))) => {
                    let payload = match frame.payload.split_first() {
                        Some((0, rest)) => Some(Payload::Features(rest.to_vec())),
                        Some((1, rest)) => Some(Payload::Image(rest.to_vec())),
                        _ => None,
                    };
                    let why = match (&payload, frame.bundle_id == self.bundle_id) {
                        (None, _) => Some("its payload kind is unknown".to_string()),
                        (_, false) => Some(format!(
                            "coded for bundle {}, this head runs {}",
                            frame.bundle_id, self.bundle_id
                        )),
                        _ => None,
                    };
                    if let (Some(payload), None) = (payload, &why) {
                        let age = now_unix_ms().saturating_sub(frame.captured_unix_ms);
                        return (
                            Some(Stored {
                                id,
                                name: frame.name,
                                payload,
                                age: Duration::from_millis(age),
                            }),
                            lost,
                        );
                    }
                    let _ = spool.remove(id);
                    lost.push((frame.name, why.unwrap_or_default()));
                }
                Err(SpoolError::Corrupt { name, error, .. }) => {
                    lost.push((name, format!("corrupt on disk: {error}")));
                }
                Err(other) => {
                    tracing::warn!(error = %other, "reading the spool");
                    return (None, lost);
                }
            }
        }
    }

    /// Deletes a frame once its answer is in.
    pub(crate) fn remove(&self, id: EntryId) {
        if let Ok(mut spool) = self.spool.lock()
            && let Err(error) = spool.remove(id)
        {
            tracing::warn!(%error, "removing an answered frame from the spool");
        }
    }
}

/// Sends the spool's frames, oldest first and one at a time, while the link is up; gives
/// each frame's line to `out`. Ends once `stop` is set and the spool is empty or the link
/// down (what is left waits for the next run), or when `out` closes.
pub(crate) async fn drain(
    spool: Arc<Spooler>,
    session: Session,
    deadline: Duration,
    stop: Arc<AtomicBool>,
    out: mpsc::UnboundedSender<FrameReport>,
) {
    let pause = Duration::from_millis(200);
    let mut next_id = DRAIN_IDS;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !session.is_up() {
            if stopping {
                return;
            }
            tokio::time::sleep(pause).await;
            continue;
        }
        let reader = spool.clone();
        let Ok((stored, lost)) = tokio::task::spawn_blocking(move || reader.oldest()).await else {
            return;
        };
        for (name, why) in lost {
            let line = FrameReport::unanswered(next_id, name, Status::Dropped, "spool", why);
            next_id += 1;
            if out.send(line).is_err() {
                return;
            }
        }
        let Some(stored) = stored else {
            if stopping {
                return;
            }
            tokio::time::sleep(pause).await;
            continue;
        };
        let frame_id = next_id;
        next_id += 1;
        let mode = match stored.payload {
            Payload::Features(_) => Mode::Split,
            Payload::Image(_) => Mode::Offload,
        };
        let bytes = stored.payload.len();
        let sent = Instant::now();
        let delivery = session
            .submit(
                frame_id,
                stored.payload,
                tokio::time::Instant::now() + deadline,
            )
            .await
            .await;
        let Ok(Delivery::Answered {
            result,
            server,
            sends,
            wire_bytes,
        }) = delivery
        else {
            // Still on disk; the next round tries again (the next run, if this one ends).
            if stopping {
                return;
            }
            tokio::time::sleep(pause).await;
            continue;
        };
        let remover = spool.clone();
        let id = stored.id;
        let _ = tokio::task::spawn_blocking(move || remover.remove(id)).await;
        let round_trip_ms = sent.elapsed().as_secs_f64() * 1e3;
        let status = match &result.outcome {
            Outcome::Classified { .. } | Outcome::Detected { .. } => Status::Answered,
            Outcome::Failed { error } if error.kind == "deadline_exceeded" => Status::Expired,
            _ => Status::Failed,
        };
        let mut line = FrameReport::blank(frame_id, stored.name, status, result.outcome);
        line.mode = mode.name();
        line.server = Some(server);
        line.sends = sends;
        line.note = Some(format!(
            "sent from the on-disk spool, {:.1} s after the link went down on it",
            stored.age.as_secs_f64()
        ));
        line.bytes_sent = bytes;
        line.wire_bytes = wire_bytes;
        line.tail_received_bytes = result.received_bytes;
        line.uplink_ms = (round_trip_ms - result.tail_ms).max(0.0);
        line.tail_ms = result.tail_ms;
        line.total_ms = round_trip_ms;
        if out.send(line).is_err() {
            return;
        }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooler(dir: &std::path::Path, bundle: &str) -> Spooler {
        let config = SpoolConfig {
            dir: dir.to_path_buf(),
            limits: SpoolLimits {
                max_bytes: 1 << 20,
                max_frames: 3,
            },
        };
        Spooler::open(&config, bundle.into()).unwrap().0
    }

    #[test]
    fn frames_come_back_in_order_with_their_kind_and_are_removed_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let s = spooler(dir.path(), "aa");
        assert!(
            s.store("a.jpg", &Payload::Features(vec![1, 2, 3]))
                .unwrap()
                .is_empty()
        );
        assert!(
            s.store("b.jpg", &Payload::Image(vec![9]))
                .unwrap()
                .is_empty()
        );
        let (first, lost) = s.oldest();
        let first = first.unwrap();
        assert!(lost.is_empty());
        assert_eq!(
            (first.name.as_str(), &first.payload),
            ("a.jpg", &Payload::Features(vec![1, 2, 3]))
        );
        // Not answered yet: still the oldest.
        assert_eq!(s.oldest().0.unwrap().name, "a.jpg");
        s.remove(first.id);
        let second = s.oldest().0.unwrap();
        assert_eq!(second.payload, Payload::Image(vec![9]));
        s.remove(second.id);
        assert!(s.oldest().0.is_none() && s.is_empty());
    }

    #[test]
    fn a_full_spool_names_what_it_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let s = spooler(dir.path(), "aa");
        for name in ["1", "2", "3"] {
            s.store(name, &Payload::Features(vec![0; 10])).unwrap();
        }
        assert_eq!(
            s.store("4", &Payload::Features(vec![0; 10])).unwrap(),
            vec!["1"]
        );
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn frames_of_another_bundle_are_dropped_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        spooler(dir.path(), "old")
            .store("x", &Payload::Features(vec![5]))
            .unwrap();
        let s = spooler(dir.path(), "new");
        let (next, lost) = s.oldest();
        assert!(next.is_none());
        assert_eq!(lost.len(), 1);
        assert!(lost[0].1.contains("bundle old"), "{lost:?}");
        assert!(s.is_empty());
    }
}
