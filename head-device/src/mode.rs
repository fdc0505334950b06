//! Where a frame is computed, and how `auto` picks it per frame.
//!
//! Three ways to answer a frame:
//!
//! - `split`: the head model here, a few kilobytes up, the tail on the server;
//! - `local`: the whole model here, nothing sent;
//! - `offload`: a JPEG of the model input up, the whole model on the server.
//!
//! Which is fastest depends on the link and on how the device compares with the server,
//! and both change. [`ModeChooser`] predicts each mode's latency (or energy) from what it
//! has measured — compute times here, bytes each mode sends, the tail's times, and the
//! link's round trip and bandwidth ([`LinkEstimate`]) — and picks the cheapest, with three
//! guards:
//!
//! - **Exploration.** A mode with nothing measured yet has no prediction; it is tried once
//!   (one frame) as soon as it is usable.
//! - **Probes.** Every `probe_every` frames, a mode not in use gets one frame, so its
//!   prediction follows a link that got better (the only way to see that while local).
//! - **Hysteresis.** The current mode is kept unless another is predicted cheaper by more
//!   than `hysteresis` (a fraction), and not before `min_dwell` frames in it: a link near a
//!   break-even point does not make the head flap.
//!
//! When the link is down the only usable mode is `local`.

use std::fmt;
use std::time::Duration;

use crate::LinkEstimate;

/// Where a frame is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Head here, tail on the server.
    Split,
    /// The full model here.
    Local,
    /// The full model on the server, fed a JPEG of the input.
    Offload,
}

impl Mode {
    /// Every mode, in the order they are listed in reports.
    pub const ALL: [Mode; 3] = [Mode::Split, Mode::Local, Mode::Offload];

    /// The name in reports, flags and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Split => "split",
            Mode::Local => "local",
            Mode::Offload => "offload",
        }
    }

    fn index(self) -> usize {
        match self {
            Mode::Split => 0,
            Mode::Local => 1,
            Mode::Offload => 2,
        }
    }

    fn is_remote(self) -> bool {
        self != Mode::Local
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The device's power draw in each state, for predicting energy above idle (the
/// definition of [`crate::energy`]: waiting for an answer costs nothing beyond idle).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerDraw {
    /// Watts while idle.
    pub idle_w: f64,
    /// Watts while computing (all cores busy).
    pub compute_w: f64,
    /// Watts above idle while the radio transmits.
    pub radio_w: f64,
}

/// What `auto` minimizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Time from frame to answer.
    Latency,
    /// Device energy per frame, predicted from these power figures.
    Energy(PowerDraw),
}

/// A set of modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes(u8);

impl Modes {
    /// All three.
    pub const ALL: Modes = Modes(0b111);

    /// The set of `modes`.
    pub fn of(modes: &[Mode]) -> Self {
        Self(modes.iter().fold(0, |set, m| set | 1 << m.index()))
    }

    /// Whether `mode` is in the set.
    pub fn contains(self, mode: Mode) -> bool {
        self.0 & 1 << mode.index() != 0
    }
}

/// How `auto` behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoConfig {
    /// The modes it may choose (`local` also needs the full model loaded).
    pub modes: Modes,
    /// What to minimize.
    pub objective: Objective,
    /// Another mode must be predicted cheaper by more than this fraction to take over.
    pub hysteresis: f64,
    /// Frames in a mode before it may be left for a cheaper one.
    pub min_dwell: u32,
    /// Frames between probes of a mode not in use (0: never probe).
    pub probe_every: u32,
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            modes: Modes::ALL,
            objective: Objective::Latency,
            hysteresis: 0.2,
            min_dwell: 4,
            probe_every: 20,
        }
    }
}

/// Which modes a frame may take now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usable {
    /// A stream to a tail is open.
    pub link: bool,
    /// That tail runs the full model (takes offloaded images).
    pub offload: bool,
    /// The full model is loaded here.
    pub local: bool,
    /// The link as measured so far.
    pub estimate: LinkEstimate,
}

/// One mode's predicted cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The mode.
    pub mode: Mode,
    /// Predicted time to the answer, ms.
    pub latency_ms: f64,
    /// Predicted device energy, joules (with [`Objective::Energy`]).
    pub energy_j: Option<f64>,
}

/// Why `auto` chose what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The cheapest predicted (or the current one, within the hysteresis).
    Cheapest,
    /// Kept: another is cheaper, but not by enough, or too soon after a switch.
    Holding,
    /// Nothing measured for it yet.
    Exploring,
    /// Not used for a while; one frame to refresh its prediction.
    Probe,
    /// The only usable mode.
    OnlyChoice,
    /// No allowed mode is usable now (the link is down and `local` is not allowed): the
    /// frame takes an allowed remote mode and the link-down policy decides.
    NoneUsable,
}

/// One frame's mode, with the predictions behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The mode.
    pub mode: Mode,
    /// Why.
    pub reason: Reason,
    /// Every usable mode's prediction, where one exists.
    pub predictions: Vec<Prediction>,
}

impl Decision {
    /// One line for the frame's report: `auto: split, cheapest (split 12.1 ms, local 30.2 ms)`.
    pub fn describe(&self) -> String {
        let why = match self.reason {
            Reason::Cheapest => "cheapest",
            Reason::Holding => "held by hysteresis",
            Reason::Exploring => "not measured yet",
            Reason::Probe => "probe",
            Reason::OnlyChoice => "only usable mode",
            Reason::NoneUsable => "no allowed mode usable now",
        };
        let predicted: Vec<String> = self
            .predictions
            .iter()
            .map(|p| match p.energy_j {
                Some(j) => format!("{} {:.1} ms {:.3} J", p.mode, p.latency_ms, j),
                None => format!("{} {:.1} ms", p.mode, p.latency_ms),
            })
            .collect();
        if predicted.is_empty() {
            format!("auto: {}, {why}", self.mode)
        } else {
            format!("auto: {}, {why} ({})", self.mode, predicted.join(", "))
        }
    }
}

/// A moving average that starts empty.
#[derive(Debug, Clone, Copy, Default)]
struct Average(Option<f64>);

impl Average {
    const WEIGHT: f64 = 0.3;

    fn record(&mut self, sample: f64) {
        self.0 = Some(match self.0 {
            None => sample,
            Some(old) => old + Self::WEIGHT * (sample - old),
        });
    }
}

/// What has been measured of one mode.
#[derive(Debug, Clone, Copy, Default)]
struct Costs {
    /// Compute here: the head and coding (split), the JPEG (offload), the model (local).
    device_ms: Average,
    /// Bytes sent per frame.
    bytes: Average,
    /// The tail's time per frame.
    tail_ms: Average,
    /// Frames sent in this mode and not yet answered (or lost).
    in_flight: u32,
    /// Frames chosen since this mode was last chosen.
    unused_for: u32,
}

/// Picks a mode per frame; see the module doc.
#[derive(Debug, Clone)]
pub struct ModeChooser {
    config: AutoConfig,
    costs: [Costs; 3],
    current: Option<Mode>,
    dwell: u32,
}

impl ModeChooser {
    /// A chooser that has measured nothing.
    pub fn new(config: AutoConfig) -> Self {
        Self {
            config,
            costs: [Costs::default(); 3],
            current: None,
            dwell: 0,
        }
    }

    /// The mode for the next frame.
    pub fn choose(&mut self, usable: &Usable) -> Decision {
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|&m| self.config.modes.contains(m))
            .filter(|m| match m {
                Mode::Split => usable.link,
                Mode::Offload => usable.link && usable.offload,
                Mode::Local => usable.local,
            })
            .collect();
        let predictions: Vec<Prediction> = modes
            .iter()
            .filter_map(|&m| self.predict(m, &usable.estimate))
            .collect();
        let (mode, reason) = self.pick(&modes, &predictions);
        if reason == Reason::NoneUsable {
            return Decision {
                mode,
                reason,
                predictions,
            };
        }
        for m in Mode::ALL {
            let costs = &mut self.costs[m.index()];
            costs.unused_for = if m == mode {
                0
            } else {
                costs.unused_for.saturating_add(1)
            };
        }
        if !matches!(reason, Reason::Exploring | Reason::Probe) {
            if self.current == Some(mode) {
                self.dwell = self.dwell.saturating_add(1);
            } else {
                self.current = Some(mode);
                self.dwell = 1;
            }
        }
        Decision {
            mode,
            reason,
            predictions,
        }
    }

    fn pick(&self, modes: &[Mode], predictions: &[Prediction]) -> (Mode, Reason) {
        match modes {
            [] => {
                // Nothing usable: the first allowed remote mode, for the link-down policy.
                let fallback = [Mode::Split, Mode::Offload, Mode::Local]
                    .into_iter()
                    .find(|&m| self.config.modes.contains(m))
                    .unwrap_or(Mode::Split);
                return (fallback, Reason::NoneUsable);
            }
            [only] => return (*only, Reason::OnlyChoice),
            _ => {}
        }
        let predicted = |m: Mode| predictions.iter().find(|p| p.mode == m);
        // A mode never measured is tried once, one frame at a time.
        if let Some(&m) = modes
            .iter()
            .find(|&&m| predicted(m).is_none() && self.costs[m.index()].in_flight == 0)
        {
            return (m, Reason::Exploring);
        }
        let cost = |p: &Prediction| p.energy_j.unwrap_or(p.latency_ms);
        let Some(best) = predictions
            .iter()
            .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        else {
            return (modes[0], Reason::Exploring);
        };
        let held = self.current.and_then(predicted);
        let choice = match held {
            None => (best.mode, Reason::Cheapest),
            Some(current) if current.mode == best.mode => (best.mode, Reason::Cheapest),
            Some(current)
                if self.dwell >= self.config.min_dwell
                    && cost(best) < (1.0 - self.config.hysteresis) * cost(current) =>
            {
                (best.mode, Reason::Cheapest)
            }
            Some(current) => (current.mode, Reason::Holding),
        };
        // Now and then, one frame in a mode not in use keeps its prediction fresh.
        if self.config.probe_every > 0
            && let Some(&m) = modes.iter().find(|&&m| {
                m != choice.0
                    && self.costs[m.index()].unused_for >= self.config.probe_every
                    && self.costs[m.index()].in_flight == 0
            })
        {
            return (m, Reason::Probe);
        }
        choice
    }

    /// The predicted cost of `mode`, if enough of it has been measured.
    pub fn predict(&self, mode: Mode, link: &LinkEstimate) -> Option<Prediction> {
        let costs = &self.costs[mode.index()];
        let device_ms = costs.device_ms.0?;
        let (latency_ms, transmit_ms) = if mode.is_remote() {
            let bytes = costs.bytes.0? as usize;
            let transfer = link.transfer_time(bytes)?.as_secs_f64() * 1e3;
            let transmit = link
                .transmission_time(bytes)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
                * 1e3;
            (device_ms + transfer + costs.tail_ms.0?, transmit)
        } else {
            (device_ms, 0.0)
        };
        let energy_j = match self.config.objective {
            Objective::Latency => None,
            Objective::Energy(power) => Some(
                ((power.compute_w - power.idle_w).max(0.0) * device_ms
                    + power.radio_w * transmit_ms)
                    / 1e3,
            ),
        };
        Some(Prediction {
            mode,
            latency_ms,
            energy_j,
        })
    }

    /// A frame of `mode` handed to the uplink: it counts as in flight until its answer or
    /// its loss is observed.
    pub fn sent(&mut self, mode: Mode) {
        self.costs[mode.index()].in_flight += 1;
    }

    /// The device's compute time for a frame in `mode`.
    pub fn observe_device(&mut self, mode: Mode, device_ms: f64) {
        if device_ms.is_finite() && device_ms >= 0.0 {
            self.costs[mode.index()].device_ms.record(device_ms);
        }
    }

    /// A remote frame's answer: what it sent and the tail's time (a time the tail reports
    /// that is not a finite, non-negative number is ignored).
    pub fn observe_answer(&mut self, mode: Mode, bytes: usize, tail_ms: f64) {
        let costs = &mut self.costs[mode.index()];
        costs.bytes.record(bytes as f64);
        if tail_ms.is_finite() && tail_ms >= 0.0 {
            costs.tail_ms.record(tail_ms);
        }
        costs.in_flight = costs.in_flight.saturating_sub(1);
    }

    /// A remote frame that got no answer (link lost, expired, failed, or never sent).
    pub fn observe_lost(&mut self, mode: Mode) {
        let costs = &mut self.costs[mode.index()];
        costs.in_flight = costs.in_flight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chooses, and hands a remote frame to the (imagined) uplink as `run` does.
    fn take(c: &mut ModeChooser, u: &Usable) -> Decision {
        let d = c.choose(u);
        if d.mode.is_remote() && d.reason != Reason::NoneUsable {
            c.sent(d.mode);
        }
        d
    }

    fn link(rtt_ms: f64, mbit: f64) -> LinkEstimate {
        LinkEstimate {
            rtt: Some(Duration::from_secs_f64(rtt_ms / 1e3)),
            bandwidth_bps: Some(mbit * 1e6),
            transfers: 10,
        }
    }

    fn usable(estimate: LinkEstimate) -> Usable {
        Usable {
            link: true,
            offload: true,
            local: true,
            estimate,
        }
    }

    /// A Pi-like device: local 120 ms, head 15 ms for 3 kB, JPEG 3 ms for 20 kB; a fast
    /// server: tail 4 ms, full model 5 ms.
    fn measured(config: AutoConfig) -> ModeChooser {
        let mut c = ModeChooser::new(config);
        c.observe_device(Mode::Local, 120.0);
        c.observe_device(Mode::Split, 15.0);
        c.observe_device(Mode::Offload, 3.0);
        c.observe_answer(Mode::Split, 3_000, 4.0);
        c.observe_answer(Mode::Offload, 20_000, 5.0);
        c
    }

    fn steady(c: &mut ModeChooser, u: &Usable, frames: usize) -> Mode {
        let mut last = Mode::Split;
        for _ in 0..frames {
            let d = take(c, u);
            if d.mode.is_remote() {
                c.observe_answer(
                    d.mode,
                    c.costs[d.mode.index()].bytes.0.unwrap() as usize,
                    c.costs[d.mode.index()].tail_ms.0.unwrap(),
                );
            }
            if !matches!(d.reason, Reason::Probe | Reason::Exploring) {
                last = d.mode;
            }
        }
        last
    }

    #[test]
    fn fast_link_offloads_slow_link_splits_no_link_runs_locally() {
        let config = AutoConfig {
            probe_every: 0,
            ..AutoConfig::default()
        };
        // 100 Mbit/s, 2 ms: offload 3 + 2 + 1.6 + 5 = 11.6 ms beats split 15 + 2.2 + 4.
        let mut c = measured(config);
        assert_eq!(steady(&mut c, &usable(link(2.0, 100.0)), 10), Mode::Offload);
        // 2 Mbit/s, 20 ms: split 15 + 32 + 4 = 51 ms; offload 3 + 100 + 5; local 120.
        let mut c = measured(config);
        assert_eq!(steady(&mut c, &usable(link(20.0, 2.0)), 10), Mode::Split);
        // No link: local, whatever was measured.
        let mut c = measured(config);
        let gone = Usable {
            link: false,
            ..usable(link(2.0, 100.0))
        };
        let d = take(&mut c, &gone);
        assert_eq!((d.mode, d.reason), (Mode::Local, Reason::OnlyChoice));
    }

    #[test]
    fn unmeasured_modes_are_explored_one_frame_at_a_time() {
        let mut c = ModeChooser::new(AutoConfig::default());
        c.observe_device(Mode::Local, 100.0);
        let u = usable(link(5.0, 10.0));
        let first = take(&mut c, &u);
        assert_eq!((first.mode, first.reason), (Mode::Split, Reason::Exploring));
        let second = take(&mut c, &u);
        assert_eq!(
            (second.mode, second.reason),
            (Mode::Offload, Reason::Exploring)
        );
        // Both in flight: nothing else to explore; local is the only prediction.
        let third = take(&mut c, &u);
        assert_eq!(third.mode, Mode::Local);
        // A lost exploration frame is tried again.
        c.observe_lost(Mode::Split);
        assert_eq!(take(&mut c, &u).mode, Mode::Split);
    }

    #[test]
    fn hysteresis_keeps_a_mode_that_is_only_slightly_worse() {
        let config = AutoConfig {
            probe_every: 0,
            ..AutoConfig::default()
        };
        let mut c = measured(config);
        let slow = usable(link(20.0, 2.0));
        assert_eq!(steady(&mut c, &slow, 10), Mode::Split);
        // Split now 10 % worse than local: held.
        c.observe_device(Mode::Local, 40.0);
        for _ in 0..10 {
            c.observe_device(Mode::Local, 40.0);
        }
        let split = c.predict(Mode::Split, &slow.estimate).unwrap().latency_ms;
        let local = c.predict(Mode::Local, &slow.estimate).unwrap().latency_ms;
        assert!(local < split && local > 0.8 * split, "{local} {split}");
        let d = take(&mut c, &slow);
        assert_eq!((d.mode, d.reason), (Mode::Split, Reason::Holding));
        // Much better: it switches.
        for _ in 0..10 {
            c.observe_device(Mode::Local, 10.0);
        }
        assert_eq!(take(&mut c, &slow).mode, Mode::Local);
    }

    #[test]
    fn min_dwell_delays_a_switch() {
        let config = AutoConfig {
            probe_every: 0,
            min_dwell: 5,
            ..AutoConfig::default()
        };
        let mut c = measured(config);
        let fast = usable(link(2.0, 100.0));
        let slow = usable(link(20.0, 2.0));
        assert_eq!(take(&mut c, &slow).mode, Mode::Split);
        // The link gets fast right after the switch: split is held for min_dwell frames.
        let modes: Vec<Mode> = (0..6)
            .map(|_| {
                let d = take(&mut c, &fast);
                c.observe_lost(d.mode);
                d.mode
            })
            .collect();
        assert_eq!(&modes[..4], &[Mode::Split; 4]);
        assert_eq!(modes[4], Mode::Offload);
    }

    #[test]
    fn probes_visit_unused_modes() {
        let config = AutoConfig {
            probe_every: 5,
            ..AutoConfig::default()
        };
        let mut c = measured(config);
        let gone_slow = usable(link(400.0, 0.1));
        let mut probes = Vec::new();
        for _ in 0..12 {
            let d = take(&mut c, &gone_slow);
            if d.reason == Reason::Probe {
                probes.push(d.mode);
            }
            c.observe_lost(d.mode);
        }
        assert!(probes.contains(&Mode::Split), "{probes:?}");
        assert!(probes.contains(&Mode::Offload), "{probes:?}");
    }

    #[test]
    fn energy_objective_weighs_power_not_time() {
        // A radio that costs far more than compute: local wins on energy although
        // offload is faster.
        let power = PowerDraw {
            idle_w: 1.0,
            compute_w: 2.0,
            radio_w: 50.0,
        };
        let config = AutoConfig {
            objective: Objective::Energy(power),
            probe_every: 0,
            ..AutoConfig::default()
        };
        let mut c = measured(config);
        let u = usable(link(2.0, 1.0));
        let offload = c.predict(Mode::Offload, &u.estimate).unwrap();
        let local = c.predict(Mode::Local, &u.estimate).unwrap();
        // 20 kB at 1 Mbit/s: 160 ms of radio; compute priced above idle (1 W).
        assert!((offload.energy_j.unwrap() - (1.0 * 0.003 + 50.0 * 0.16)).abs() < 1e-9);
        assert!((local.energy_j.unwrap() - 0.12).abs() < 1e-9);
        assert_eq!(steady(&mut c, &u, 5), Mode::Local);
    }

    #[test]
    fn only_the_allowed_modes_are_chosen() {
        let config = AutoConfig {
            modes: Modes::of(&[Mode::Split, Mode::Offload]),
            probe_every: 3,
            ..AutoConfig::default()
        };
        let mut c = measured(config);
        for _ in 0..10 {
            let d = take(&mut c, &usable(link(400.0, 0.1)));
            assert_ne!(d.mode, Mode::Local, "{d:?}");
            c.observe_lost(d.mode);
        }
        assert!(Modes::ALL.contains(Mode::Local));
        assert!(!Modes::of(&[Mode::Split]).contains(Mode::Offload));
    }

    #[test]
    fn nothing_usable_falls_back_to_an_allowed_remote_mode_and_counts_nothing() {
        let mut c = ModeChooser::new(AutoConfig {
            modes: Modes::of(&[Mode::Offload]),
            ..AutoConfig::default()
        });
        let down = Usable {
            link: false,
            offload: false,
            local: true,
            estimate: LinkEstimate::default(),
        };
        let d = c.choose(&down);
        assert_eq!((d.mode, d.reason), (Mode::Offload, Reason::NoneUsable));
        // Once the link is up, offload is explored at once: nothing was left in flight.
        let up = usable(link(2.0, 10.0));
        let d = c.choose(&up);
        assert_eq!((d.mode, d.reason), (Mode::Offload, Reason::OnlyChoice));
    }

    #[test]
    fn nonsense_times_from_a_tail_are_ignored() {
        let mut c = measured(AutoConfig::default());
        c.observe_answer(Mode::Split, 3_000, f64::NAN);
        c.observe_answer(Mode::Split, 3_000, -5.0);
        c.observe_device(Mode::Local, f64::INFINITY);
        let e = link(2.0, 100.0);
        assert!(c.predict(Mode::Split, &e).unwrap().latency_ms.is_finite());
        assert!(c.predict(Mode::Local, &e).unwrap().latency_ms.is_finite());
    }

    #[test]
    fn a_decision_describes_itself() {
        let d = Decision {
            mode: Mode::Split,
            reason: Reason::Cheapest,
            predictions: vec![Prediction {
                mode: Mode::Split,
                latency_ms: 12.06,
                energy_j: None,
            }],
        };
        assert_eq!(d.describe(), "auto: split, cheapest (split 12.1 ms)");
    }
}
