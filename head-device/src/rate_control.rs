//! Rate control against a latency target: per `split` frame, the highest calibrated bit
//! depth whose frame is predicted to be answered in time.
//!
//! More bits mean a closer match to the full model (the bundle's levels carry their
//! measured top-1 agreement) and more bytes. On a fast link every depth fits and the frame
//! gets the best; on a slow one the bytes dominate and the depth steps down. The
//! prediction is the one `auto` makes for `split` —
//! `head + round trip + bytes ÷ bandwidth + tail` — with the bytes of each depth taken from
//! the bundle's calibration (`payload_bytes` of its levels), scaled by how the frames sent so
//! far compared with it (a scene busier than the calibration photographs codes larger).
//!
//! Until the link has been measured there is no prediction, and frames use the bundle's
//! default depth. When no depth fits, the smallest is used: the frame is late either way,
//! and that is the least late.

use crate::LinkEstimate;

/// One calibrated depth and its expected frame size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    /// Bit depth.
    pub bits: u8,
    /// Mean coded payload bytes at this depth, from the bundle's calibration.
    pub bytes: f64,
}

/// The depth chosen for a frame, and what it was predicted to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Bit depth.
    pub bits: u8,
    /// Predicted time to the answer, ms (`None`: nothing measured yet, default depth).
    pub predicted_ms: Option<f64>,
}

/// Picks bit depths against a latency target.
#[derive(Debug, Clone)]
pub struct RateControl {
    target_ms: f64,
    /// Ascending by bits.
    levels: Vec<Level>,
    default_bits: u8,
    device_ms: Option<f64>,
    tail_ms: Option<f64>,
    /// Observed bytes ÷ calibrated bytes, averaged.
    scale: Option<f64>,
}

const WEIGHT: f64 = 0.3;

fn average(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| o + WEIGHT * (sample - o)))
}

impl RateControl {
    /// A controller for `target_ms` over the bundle's `levels`; `default_bits` until the
    /// link is known.
    pub fn new(target_ms: f64, mut levels: Vec<Level>, default_bits: u8) -> Self {
        levels.sort_by_key(|l| l.bits);
        Self {
            target_ms,
            levels,
            default_bits,
            device_ms: None,
            tail_ms: None,
            scale: None,
        }
    }

    /// The depth for the next frame.
    pub fn choose(&self, link: &LinkEstimate) -> Rate {
        let (Some(device), Some(tail)) = (self.device_ms, self.tail_ms) else {
            return self.default_rate();
        };
        let scale = self.scale.unwrap_or(1.0);
        let predict = |level: &Level| -> Option<f64> {
            let bytes = (level.bytes * scale).max(0.0) as usize;
            Some(device + tail + link.transfer_time(bytes)?.as_secs_f64() * 1e3)
        };
        let mut best = None;
        for level in &self.levels {
            let Some(predicted) = predict(level) else {
                return self.default_rate();
            };
            if best.is_none() || predicted <= self.target_ms {
                best = Some(Rate {
                    bits: level.bits,
                    predicted_ms: Some(predicted),
                });
            }
        }
        best.unwrap_or_else(|| self.default_rate())
    }

    fn default_rate(&self) -> Rate {
        Rate {
            bits: self.default_bits,
            predicted_ms: None,
        }
    }

    /// A `split` frame's head time, as coded at `bits`, and its answer's tail time.
    pub fn observe(&mut self, bits: u8, bytes: usize, device_ms: f64, tail_ms: f64) {
        self.device_ms = average(self.device_ms, device_ms);
        self.tail_ms = average(self.tail_ms, tail_ms);
        if let Some(level) = self.levels.iter().find(|l| l.bits == bits)
            && level.bytes > 0.0
        {
            self.scale = average(self.scale, bytes as f64 / level.bytes);
        }
    }

    /// One phrase for a frame's report.
    pub fn describe(&self, rate: &Rate) -> String {
        match rate.predicted_ms {
            Some(p) => format!(
                "rate: {}-bit, predicted {p:.0} ms for a {:.0} ms target",
                rate.bits, self.target_ms
            ),
            None => format!(
                "rate: {}-bit, the bundle's default until the link is measured",
                rate.bits
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn levels() -> Vec<Level> {
        [(2, 2000.0), (4, 4000.0), (6, 6000.0), (8, 8000.0)]
            .into_iter()
            .map(|(bits, bytes)| Level { bits, bytes })
            .collect()
    }

    fn link(rtt_ms: f64, mbit: f64) -> LinkEstimate {
        LinkEstimate {
            rtt: Some(Duration::from_secs_f64(rtt_ms / 1e3)),
            bandwidth_bps: Some(mbit * 1e6),
            transfers: 5,
        }
    }

    fn measured(target: f64) -> RateControl {
        let mut rc = RateControl::new(target, levels(), 5);
        rc.observe(4, 4000, 20.0, 10.0);
        rc
    }

    #[test]
    fn the_default_depth_until_something_is_measured() {
        let rc = RateControl::new(100.0, levels(), 5);
        let rate = rc.choose(&link(10.0, 1.0));
        assert_eq!((rate.bits, rate.predicted_ms), (5, None));
        let mut rc = measured(100.0);
        rc.observe(4, 4000, 20.0, 10.0);
        assert_eq!(rc.choose(&LinkEstimate::default()).bits, 5);
    }

    #[test]
    fn the_highest_depth_that_fits_the_target() {
        // 1 Mbit/s, 10 ms: 2-bit 56 ms, 4-bit 72, 6-bit 88, 8-bit 104 (20 + 10 + 10 + bytes).
        let rc = measured(90.0);
        let rate = rc.choose(&link(10.0, 1.0));
        assert_eq!(rate.bits, 6);
        assert!((rate.predicted_ms.unwrap() - 88.0).abs() < 1e-6);
        assert_eq!(measured(1000.0).choose(&link(10.0, 1.0)).bits, 8);
        // Nothing fits: the smallest, the least late.
        assert_eq!(measured(10.0).choose(&link(10.0, 1.0)).bits, 2);
        // A faster link allows more.
        assert_eq!(measured(60.0).choose(&link(10.0, 10.0)).bits, 8);
    }

    #[test]
    fn frames_larger_than_calibrated_lower_the_depth() {
        let mut rc = measured(90.0);
        for _ in 0..20 {
            rc.observe(4, 6000, 20.0, 10.0); // 1.5x the calibration
        }
        // 6-bit now ~9000 bytes: 112 ms; 4-bit 6000: 88 ms.
        assert_eq!(rc.choose(&link(10.0, 1.0)).bits, 4);
    }

    #[test]
    fn a_rate_describes_itself() {
        let rc = measured(90.0);
        let rate = rc.choose(&link(10.0, 1.0));
        assert_eq!(
            rc.describe(&rate),
            "rate: 6-bit, predicted 88 ms for a 90 ms target"
        );
    }
}
