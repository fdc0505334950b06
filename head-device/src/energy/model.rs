//! The energy model: what a frame costs, from the times it kept the device busy and a profile.
//!
//! One definition, used both to report a frame that ran and to predict the cost of a mode that
//! did not (`auto` compares split, local and offload with it):
//!
//! ```text
//! joules (above idle) = (compute_W − idle_W) · t_compute + radio_tx_W · t_tx + radio_rx_W · t_rx
//! total_joules        = joules + idle_W · t_wall
//! ```
//!
//! `joules` is the energy the frame adds to a board that would be on anyway: the number to
//! compare modes by. `total_joules` is what the board drew over the frame's wall time,
//! idle included. The model assumes compute and radio do not overlap in time; where they do,
//! their extras still add, which is the usual first-order assumption.
//! A profile without a radio figure cannot price radio time: the result then lists the part it
//! left out in `excludes` instead of counting the radio as free.

use std::time::Duration;

use serde::Serialize;

use super::profile::PowerProfile;

/// What a frame did on the device, in time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameActivity {
    /// Time the compute units were busy with this frame (preprocessing, head or full model,
    /// coding).
    pub compute: Duration,
    /// Time the radio was sending this frame's bytes (measured, or [`transfer_time`]).
    pub radio_tx: Duration,
    /// Time the radio was receiving this frame's answer.
    pub radio_rx: Duration,
    /// The frame's wall time, from capture to result.
    pub wall: Duration,
}

/// A part of the device the model could not price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Radio transmit time: the profile has no `radio_tx` figure.
    RadioTx,
    /// Radio receive time: the profile has no `radio_rx` figure.
    RadioRx,
}

/// The model's answer for one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelledEnergy {
    /// Energy above idle attributable to the frame, in joules.
    pub joules: f64,
    /// Energy over the frame's wall time, idle included, in joules.
    pub total_joules: f64,
    /// Parts that used time but have no figure in the profile, so are not counted.
    pub excludes: Vec<Component>,
}

/// Time to move `bytes` at `bits_per_second`; `None` if the rate is not a positive number.
///
/// For predicting radio time from an uplink bandwidth estimate.
pub fn transfer_time(bytes: u64, bits_per_second: f64) -> Option<Duration> {
    if !(bits_per_second.is_finite() && bits_per_second > 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(bytes as f64 * 8.0 / bits_per_second).ok()
}

impl PowerProfile {
    /// The energy of a frame that kept the device busy as `activity` says (module docs).
    pub fn model(&self, activity: &FrameActivity) -> ModelledEnergy {
        let mut excludes = Vec::new();
        let mut joules = (self.compute.watts - self.idle.watts) * activity.compute.as_secs_f64();
        for (figure, time, part) in [
            (&self.radio_tx, activity.radio_tx, Component::RadioTx),
            (&self.radio_rx, activity.radio_rx, Component::RadioRx),
        ] {
            match figure {
                Some(f) => joules += f.watts * time.as_secs_f64(),
                None if !time.is_zero() => excludes.push(part),
                None => {}
            }
        }
        ModelledEnergy {
            joules,
            total_joules: joules + self.idle.watts * activity.wall.as_secs_f64(),
            excludes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(radio: bool) -> PowerProfile {
        let radio = if radio {
            "[radio_tx]\nextra_watts = 1.5\nkind = \"estimate\"\nsource = \"s\"\n\
             [radio_rx]\nextra_watts = 0.5\nkind = \"estimate\"\nsource = \"s\"\n"
        } else {
            ""
        };
        PowerProfile::from_toml_str(&format!(
            "name = \"p\"\nboard = \"b\"\n\
             [idle]\nwatts = 2.0\nkind = \"vendor-spec\"\nsource = \"s\"\n\
             [compute]\nwatts = 6.0\nkind = \"vendor-spec\"\nsource = \"s\"\n{radio}"
        ))
        .unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn above_idle_and_total_follow_the_definition() {
        let activity = FrameActivity {
            compute: ms(100),
            radio_tx: ms(20),
            radio_rx: ms(10),
            wall: ms(250),
        };
        let e = profile(true).model(&activity);
        // (6 − 2)·0.1 + 1.5·0.02 + 0.5·0.01 = 0.4 + 0.03 + 0.005
        assert!(close(e.joules, 0.435), "{e:?}");
        // + 2·0.25
        assert!(close(e.total_joules, 0.935), "{e:?}");
        assert!(e.excludes.is_empty());
    }

    #[test]
    fn an_idle_frame_costs_only_idle() {
        let e = profile(true).model(&FrameActivity {
            wall: Duration::from_secs(2),
            ..FrameActivity::default()
        });
        assert!(close(e.joules, 0.0) && close(e.total_joules, 4.0), "{e:?}");
    }

    #[test]
    fn unknown_radio_is_excluded_not_free() {
        let activity = FrameActivity {
            compute: ms(100),
            radio_tx: ms(20),
            radio_rx: Duration::ZERO,
            wall: ms(200),
        };
        let e = profile(false).model(&activity);
        assert!(close(e.joules, 0.4), "{e:?}");
        assert_eq!(e.excludes, vec![Component::RadioTx]);
        // A frame that never used the radio excludes nothing.
        let local = profile(false).model(&FrameActivity {
            radio_tx: Duration::ZERO,
            ..activity
        });
        assert!(local.excludes.is_empty());
    }

    #[test]
    fn transfer_time_from_bandwidth() {
        assert_eq!(transfer_time(1_000, 8_000.0), Some(Duration::from_secs(1)));
        assert_eq!(transfer_time(2_500, 1e6), Some(ms(20)));
        assert_eq!(transfer_time(0, 1e6), Some(Duration::ZERO));
        assert_eq!(transfer_time(10, 0.0), None);
        assert_eq!(transfer_time(10, f64::NAN), None);
        assert_eq!(transfer_time(10, -5.0), None);
    }
}
