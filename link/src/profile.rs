//! What a link is: the shaping of each direction, the outages and how they behave.
//!
//! Plain data with defaults (an unlimited link, no delay, no outage) and the parsers the
//! command line needs (`30+10` for an outage, `stall`/`reset` for its mode), so tests and
//! the CLI describe a link the same way.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::LinkError;

/// Bytes a direction buffers by default before its sender is held back (64 KiB).
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024;

/// How one direction of the link carries bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shaping {
    /// Bit rate in bits per second; `None` is unlimited. `Some(0)` carries nothing (bytes
    /// wait, as in a stall) until the shaping changes.
    pub rate_bits_per_s: Option<u64>,
    /// One-way propagation delay, added to every byte after its transmission.
    pub delay: Duration,
    /// Bytes waiting for transmission that the link buffers before the sender is held back
    /// through TCP, as a router's queue would. At least one segment is always admitted.
    pub queue_bytes: usize,
}

impl Default for Shaping {
    fn default() -> Self {
        Self {
            rate_bits_per_s: None,
            delay: Duration::ZERO,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

impl Shaping {
    /// Time to put `len` bytes on the wire at this rate; `None` when the rate is zero.
    pub(crate) fn transmission_time(&self, len: usize) -> Option<Duration> {
        match self.rate_bits_per_s {
            None => Some(Duration::ZERO),
            Some(0) => None,
            Some(rate) => {
                let nanos = (len as u128) * 8 * 1_000_000_000 / u128::from(rate);
                Some(Duration::from_nanos(
                    u64::try_from(nanos).unwrap_or(u64::MAX),
                ))
            }
        }
    }
}

/// What an outage does to the connections through the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutageMode {
    /// Nothing is delivered in either direction and bytes wait; new connections are
    /// accepted but stall too (the upstream is dialled only when the link is back). All
    /// resumes when the outage ends.
    #[default]
    Stall,
    /// Every open connection is reset at once (both sides see it end), and new connections
    /// are reset right after accept, until the outage ends.
    Reset,
}

impl FromStr for OutageMode {
    type Err = LinkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "stall" => Ok(Self::Stall),
            "reset" => Ok(Self::Reset),
            _ => Err(LinkError::BadOutageMode {
                text: text.to_string(),
            }),
        }
    }
}

impl fmt::Display for OutageMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stall => "stall",
            Self::Reset => "reset",
        })
    }
}

/// A scheduled outage, relative to the emulator's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the outage begins, after the emulator started.
    pub start: Duration,
    /// How long it lasts.
    pub duration: Duration,
}

impl Outage {
    /// When the outage ends, after the emulator started.
    pub fn end(&self) -> Duration {
        self.start.saturating_add(self.duration)
    }

    /// Whether the link is down at `at` (start inclusive, end exclusive).
    pub fn covers(&self, at: Duration) -> bool {
        self.start <= at && at < self.end()
    }
}

impl FromStr for Outage {
    type Err = LinkError;

    /// `START+DURATION` in seconds, fractions allowed: `30+10`, `0.5+1.5`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &'static str| LinkError::BadOutage {
            text: text.to_string(),
            reason,
        };
        let (start, duration) = text
            .split_once('+')
            .ok_or_else(|| bad("expected START+DURATION in seconds, e.g. 30+10"))?;
        let seconds = |part: &str| -> Result<Duration, LinkError> {
            let value: f64 = part
                .trim()
                .parse()
                .map_err(|_| bad("START and DURATION must be numbers of seconds"))?;
            Duration::try_from_secs_f64(value)
                .map_err(|_| bad("START and DURATION must be finite and not negative"))
        };
        Ok(Self {
            start: seconds(start)?,
            duration: seconds(duration)?,
        })
    }
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{}",
            self.start.as_secs_f64(),
            self.duration.as_secs_f64()
        )
    }
}

/// Everything about a link: each direction's shaping and the outages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkProfile {
    /// Client → upstream.
    pub up: Shaping,
    /// Upstream → client.
    pub down: Shaping,
    /// Scheduled outages (they may overlap; the link is down while any covers the time).
    pub outages: Vec<Outage>,
    /// What an outage does, scheduled or set with [`super::LinkEmulator::set_down`].
    pub outage_mode: OutageMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_parses_whole_and_fractional_seconds() {
        let outage: Outage = "30+10".parse().unwrap();
        assert_eq!(outage.start, Duration::from_secs(30));
        assert_eq!(outage.duration, Duration::from_secs(10));
        let outage: Outage = " 0.5 + 1.5 ".parse().unwrap();
        assert_eq!(outage.start, Duration::from_millis(500));
        assert_eq!(outage.duration, Duration::from_millis(1500));
        assert_eq!(outage.end(), Duration::from_secs(2));
        assert_eq!(outage.to_string(), "0.5+1.5");
    }

    #[test]
    fn outage_rejects_what_is_not_start_plus_duration() {
        for text in [
            "30", "a+1", "1+b", "-1+2", "1+-2", "inf+1", "1+NaN", "+", "",
        ] {
            let error = text.parse::<Outage>().unwrap_err();
            assert!(
                error.to_string().contains(&format!("`{text}`")),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn outage_covers_its_start_but_not_its_end() {
        let outage = Outage {
            start: Duration::from_secs(1),
            duration: Duration::from_secs(2),
        };
        assert!(!outage.covers(Duration::from_millis(999)));
        assert!(outage.covers(Duration::from_secs(1)));
        assert!(outage.covers(Duration::from_millis(2999)));
        assert!(!outage.covers(Duration::from_secs(3)));
    }

    #[test]
    fn outage_mode_parses_both_names() {
        assert_eq!("stall".parse::<OutageMode>().unwrap(), OutageMode::Stall);
        assert_eq!("Reset".parse::<OutageMode>().unwrap(), OutageMode::Reset);
        assert!("drop".parse::<OutageMode>().is_err());
    }

    #[test]
    fn transmission_time_follows_the_rate() {
        let mut shaping = Shaping::default();
        assert_eq!(shaping.transmission_time(1460), Some(Duration::ZERO));
        shaping.rate_bits_per_s = Some(8_000);
        assert_eq!(
            shaping.transmission_time(1000),
            Some(Duration::from_secs(1))
        );
        shaping.rate_bits_per_s = Some(0);
        assert_eq!(shaping.transmission_time(1), None);
    }
}
