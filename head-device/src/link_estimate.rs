//! Running estimates of the uplink: round-trip time and bandwidth, from what the head sees.
//!
//! The head cannot ask the network how fast it is; it can only time its own traffic. Two
//! kinds of samples feed the estimate:
//!
//! - **Round trips** of messages too small to be slowed by the link's rate: the negotiation
//!   at each connect, and probes (a negotiation on the open connection) now and then.
//! - **Transfers**: a frame of `bytes`, sent and answered after `net` (the time from send to
//!   answer, less the tail's own time). Its rate is `bytes / (net − rtt)`.
//!
//! The round trip is the **minimum** of the samples of the last ten seconds, as in BBR: a
//! probe that waits behind a frame in a slow link's queue measures the queue, not the path,
//! and an average of such samples would make every transfer look faster than it was (a
//! frame's `net` less a bloated round trip). A transfer whose `net` comes in under the
//! round trip is itself a sample. The rate is an exponentially weighted moving average (of
//! logarithms), so it follows a link that changes within a few frames. With frames
//! pipelined, `net` includes the wait behind the frames ahead; the estimate is then the
//! bandwidth a frame *gets*, which is what a latency prediction needs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a round-trip sample counts towards the minimum.
const RTT_WINDOW: Duration = Duration::from_secs(10);
/// How much one new rate sample moves the average (0 to 1).
const RATE_WEIGHT: f64 = 0.3;
/// Transfers smaller than this say more about latency than about rate.
const MIN_RATE_SAMPLE_BYTES: usize = 512;
/// The smallest transmission time a transfer is credited with: below it, timer and
/// scheduling noise dominate (loopback moves a 4 kB frame in microseconds).
const MIN_TRANSMISSION: Duration = Duration::from_micros(200);
/// Bounds on a rate sample, in bits per second.
const MIN_RATE: f64 = 1e3;
const MAX_RATE: f64 = 1e11;

/// What is known of the link now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkEstimate {
    /// Round-trip time of a small message.
    pub rtt: Option<Duration>,
    /// Bits per second a frame gets.
    pub bandwidth_bps: Option<f64>,
    /// Transfers the bandwidth is based on.
    pub transfers: u64,
}

impl LinkEstimate {
    /// Predicted time from sending `bytes` to the answer's arrival, less the tail's own
    /// time; `None` until both a round trip and a transfer have been seen (a round trip is
    /// enough for frames too small to measure a rate with).
    pub fn transfer_time(&self, bytes: usize) -> Option<Duration> {
        let rtt = self.rtt?;
        match self.bandwidth_bps {
            Some(rate) => Some(rtt + Duration::from_secs_f64(bytes as f64 * 8.0 / rate)),
            // Frames this small never make a rate sample: their time is the round trip.
            None if bytes < MIN_RATE_SAMPLE_BYTES => Some(rtt),
            None => None,
        }
    }

    /// Time to push `bytes` through the link at the estimated rate (the radio's busy time).
    pub fn transmission_time(&self, bytes: usize) -> Option<Duration> {
        Some(Duration::from_secs_f64(
            bytes as f64 * 8.0 / self.bandwidth_bps?,
        ))
    }
}

/// Keeps the running estimate up to date.
#[derive(Debug, Clone, Default)]
pub struct LinkEstimator {
    estimate: LinkEstimate,
    /// Round-trip samples of the last [`RTT_WINDOW`], oldest first.
    round_trips: VecDeque<(Instant, Duration)>,
}

impl LinkEstimator {
    /// An estimator that knows nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The estimate now.
    pub fn estimate(&self) -> LinkEstimate {
        self.estimate
    }

    /// A round trip of a small message.
    pub fn record_round_trip(&mut self, rtt: Duration) {
        let now = Instant::now();
        while self
            .round_trips
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RTT_WINDOW)
        {
            self.round_trips.pop_front();
        }
        // Samples no smaller than a later one can never be the minimum again.
        while self.round_trips.back().is_some_and(|(_, d)| *d >= rtt) {
            self.round_trips.pop_back();
        }
        self.round_trips.push_back((now, rtt));
        self.estimate.rtt = self.round_trips.front().map(|(_, d)| *d);
    }

    /// A frame of `bytes` that took `net` from send to answer, less the tail's time.
    pub fn record_transfer(&mut self, bytes: usize, net: Duration) {
        let Some(rtt) = self.estimate.rtt else {
            // Without a round trip the split between delay and rate is unknown; the
            // frame's own time bounds the round trip from above.
            self.record_round_trip(net);
            return;
        };
        if net < rtt {
            self.record_round_trip(net);
        }
        if bytes < MIN_RATE_SAMPLE_BYTES {
            return;
        }
        let transmission = net.saturating_sub(rtt).max(MIN_TRANSMISSION);
        let sample = (bytes as f64 * 8.0 / transmission.as_secs_f64()).clamp(MIN_RATE, MAX_RATE);
        // Rates are averaged in the log domain: a link that drops from 100 Mbit/s to
        // 1 Mbit/s should be believed within a few frames, not after dozens.
        let next = match self.estimate.bandwidth_bps {
            None => sample,
            Some(old) => ewma(old.ln(), sample.ln(), RATE_WEIGHT).exp(),
        };
        self.estimate.bandwidth_bps = Some(next);
        self.estimate.transfers += 1;
    }
}

fn ewma(old: f64, sample: f64, weight: f64) -> f64 {
    old + weight * (sample - old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn nothing_is_predicted_before_both_kinds_of_sample() {
        let mut link = LinkEstimator::new();
        assert_eq!(link.estimate().transfer_time(1000), None);
        link.record_round_trip(ms(20.0));
        assert_eq!(link.estimate().transfer_time(1000), None);
        // Small frames never make a rate: they cost the round trip.
        assert_eq!(link.estimate().transfer_time(300), Some(ms(20.0)));
        link.record_transfer(10_000, ms(100.0));
        assert!(link.estimate().transfer_time(1000).is_some());
    }

    #[test]
    fn a_steady_link_is_learned() {
        // 1 Mbit/s with 20 ms round trips: 10 kB takes 20 + 80 ms.
        let mut link = LinkEstimator::new();
        link.record_round_trip(ms(20.0));
        for _ in 0..20 {
            link.record_transfer(10_000, ms(100.0));
        }
        let e = link.estimate();
        let rate = e.bandwidth_bps.unwrap();
        assert!((rate - 1e6).abs() < 1e4, "{rate}");
        let predicted = e.transfer_time(2_500).unwrap().as_secs_f64() * 1e3;
        assert!((predicted - 40.0).abs() < 1.0, "{predicted}");
        assert!((e.transmission_time(2_500).unwrap().as_secs_f64() - 0.02).abs() < 1e-3);
    }

    #[test]
    fn a_link_that_slows_down_is_followed_within_a_few_frames() {
        let mut link = LinkEstimator::new();
        link.record_round_trip(ms(2.0));
        for _ in 0..20 {
            link.record_transfer(10_000, ms(2.8)); // 100 Mbit/s
        }
        for _ in 0..8 {
            link.record_transfer(10_000, ms(82.0)); // 1 Mbit/s
        }
        // Within a third of the new rate after eight frames (0.7^8 of the old log-rate left).
        let rate = link.estimate().bandwidth_bps.unwrap();
        assert!((1e6..1.35e6).contains(&rate), "{rate}");
    }

    #[test]
    fn a_probe_stuck_in_a_queue_does_not_inflate_the_round_trip() {
        let mut link = LinkEstimator::new();
        link.record_round_trip(ms(10.0));
        link.record_round_trip(ms(400.0)); // behind a 14 kB frame on a slow link
        assert_eq!(link.estimate().rtt, Some(ms(10.0)));
        link.record_transfer(14_000, ms(424.0));
        let rate = link.estimate().bandwidth_bps.unwrap();
        assert!((rate - 14_000.0 * 8.0 / 0.414).abs() < 1.0, "{rate}");
    }

    #[test]
    fn a_fast_transfer_lowers_the_round_trip() {
        let mut link = LinkEstimator::new();
        link.record_round_trip(ms(50.0));
        link.record_transfer(4_000, ms(5.0));
        assert!(link.estimate().rtt.unwrap() < ms(50.0));
        // Credited with the minimum transmission time, not a zero or negative one.
        let rate = link.estimate().bandwidth_bps.unwrap();
        assert!(
            rate.is_finite() && rate <= 4_000.0 * 8.0 / 200e-6 + 1.0,
            "{rate}"
        );
    }

    #[test]
    fn small_transfers_do_not_make_a_rate() {
        let mut link = LinkEstimator::new();
        link.record_round_trip(ms(10.0));
        link.record_transfer(100, ms(30.0));
        assert_eq!(link.estimate().bandwidth_bps, None);
        assert_eq!(link.estimate().transfers, 0);
    }

    #[test]
    fn the_first_transfer_without_a_round_trip_bounds_it() {
        let mut link = LinkEstimator::new();
        link.record_transfer(8_000, ms(30.0));
        assert_eq!(link.estimate().rtt, Some(ms(30.0)));
        assert_eq!(link.estimate().bandwidth_bps, None);
    }
}
