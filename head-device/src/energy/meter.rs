//! The daemon's energy meter: a sensor when the board has a readable one, else the profile's
//! model, else nothing; and the tagged per-frame reading it reports.
//!
//! A reading is all measured or all modelled, never a mix, and says which (`how`) and by what
//! (`by`). Measured per-frame `joules` (above idle) needs an idle baseline that was measured
//! too ([`EnergyMeter::calibrate_idle`]); without one a measured reading has only
//! `total_joules`. Measured totals cover everything the board drew between a frame's start
//! and finish: with several frames in flight their intervals overlap, so per-frame measured
//! energies do not add up to the run's; a mark over the whole run does.

use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use super::model::{Component, FrameActivity, ModelledEnergy};
use super::profile::PowerProfile;
use super::sensor::{Detection, EnergyCount, PowerSensor, SensorError, SensorOptions};

/// How a reading was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// Read from a sensor on the board.
    Measured,
    /// Computed from a power profile and the frame's times.
    Modelled,
}

/// One frame's energy, for the per-frame JSON line:
/// `{"joules":0.41,"total_joules":0.93,"how":"modelled","by":"raspberry-pi-4"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyReading {
    /// Joules above idle attributable to the frame; absent when measured without a measured
    /// idle baseline.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "micro_opt")]
    pub joules: Option<f64>,
    /// Joules drawn over the frame's interval, idle included.
    #[serde(serialize_with = "micro")]
    pub total_joules: f64,
    /// Measured or modelled.
    pub how: How,
    /// The sensor (`ina3221:POM_5V_IN`) or the profile (`raspberry-pi-4`).
    pub by: String,
    /// Parts that used time but could not be priced (modelled only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<Component>,
    /// Why a reading is not what the meter usually gives (a sensor read failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Joules to the microjoule: the sensors resolve no finer.
fn round_micro(joules: f64) -> f64 {
    (joules * 1e6).round() / 1e6
}

fn micro<S: Serializer>(joules: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_micro(*joules))
}

fn micro_opt<S: Serializer>(joules: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match joules {
        Some(j) => s.serialize_some(&round_micro(*j)),
        None => s.serialize_none(),
    }
}

/// What [`EnergyMeter::start`] saw, to hand back to [`EnergyMeter::finish`].
#[derive(Debug)]
pub struct EnergyMark {
    at: Instant,
    count: Option<Result<EnergyCount, String>>,
}

/// The head's source of per-frame energy. Build it once at startup; share it by reference.
#[derive(Debug)]
pub struct EnergyMeter {
    sensor: Option<Box<dyn PowerSensor>>,
    profile: Option<PowerProfile>,
    idle_watts: Option<f64>,
    passed_over: Vec<String>,
}

impl EnergyMeter {
    /// Looks for a sensor (see [`super::detect`]) and keeps `profile` for the model and for
    /// predictions.
    pub fn new(options: &SensorOptions, profile: Option<PowerProfile>) -> EnergyMeter {
        EnergyMeter::from_detection(super::sensor::detect(options), profile)
    }

    /// A meter from a detection already made (or `Detection { sensor: None, .. }` to model
    /// only).
    pub fn from_detection(detection: Detection, profile: Option<PowerProfile>) -> EnergyMeter {
        EnergyMeter {
            sensor: detection.sensor,
            profile,
            idle_watts: None,
            passed_over: detection.passed_over,
        }
    }

    /// Whether readings come from a sensor.
    pub fn is_measured(&self) -> bool {
        self.sensor.is_some()
    }

    /// The profile, if one was given.
    pub fn profile(&self) -> Option<&PowerProfile> {
        self.profile.as_ref()
    }

    /// One line for the startup log: what the meter will report and why.
    pub fn describe(&self) -> String {
        let why_no_sensor = if self.passed_over.is_empty() {
            "no sensor found".to_owned()
        } else {
            format!("no sensor found: {}", self.passed_over.join("; "))
        };
        match (&self.sensor, &self.profile) {
            (Some(sensor), profile) => {
                let idle = match self.idle_watts {
                    Some(w) => format!("idle baseline {w:.3} W measured at start"),
                    None => "no measured idle baseline, so totals only".to_owned(),
                };
                let predictions = match profile {
                    Some(p) => format!("profile {} for predictions", p.name),
                    None => "no profile, so no predictions".to_owned(),
                };
                format!(
                    "energy: measured by {}; {idle}; {predictions}",
                    sensor.describe()
                )
            }
            (None, Some(p)) => {
                let from = match &p.path {
                    Some(path) => format!("{} ({})", p.name, path.display()),
                    None => p.name.clone(),
                };
                let radio = if p.knows_radio() {
                    ""
                } else {
                    "; radio power unknown, radio time not counted"
                };
                format!("energy: modelled from profile {from}{radio} ({why_no_sensor})")
            }
            (None, None) => {
                format!("energy: not reported ({why_no_sensor}; no power profile given)")
            }
        }
    }

    /// Measures the idle draw over `over` (blocking: call at startup, before frames arrive)
    /// and keeps it as the baseline for measured per-frame `joules`. Returns the watts.
    pub fn calibrate_idle(&mut self, over: Duration) -> Result<f64, SensorError> {
        let sensor = self.sensor.as_ref().ok_or(SensorError::Absent {
            what: "energy sensor",
            path: "(none detected)".into(),
        })?;
        let (t0, start) = (Instant::now(), sensor.read()?);
        std::thread::sleep(over);
        let (t1, end) = (Instant::now(), sensor.read()?);
        let seconds = t1.duration_since(t0).as_secs_f64();
        let watts = sensor.joules_between(&start, &end)? / seconds.max(f64::MIN_POSITIVE);
        self.idle_watts = Some(watts);
        Ok(watts)
    }

    /// Marks the start of a frame (reads the sensor, if any).
    pub fn start(&self) -> EnergyMark {
        EnergyMark {
            at: Instant::now(),
            count: self
                .sensor
                .as_ref()
                .map(|s| s.read().map_err(|e| e.to_string())),
        }
    }

    /// The frame's energy: measured since `mark` if there is a sensor, else modelled from
    /// `activity`. A failed sensor read falls back to the model (with a note) where there is
    /// a profile. `None` when the meter has neither.
    pub fn finish(&self, mark: &EnergyMark, activity: &FrameActivity) -> Option<EnergyReading> {
        let failure = match (&self.sensor, &mark.count) {
            (Some(sensor), Some(Ok(start))) => match self.measured(sensor.as_ref(), mark, start) {
                Ok(reading) => return Some(reading),
                Err(e) => Some(e.to_string()),
            },
            (Some(_), Some(Err(e))) => Some(e.clone()),
            _ => None,
        };
        let profile = self.profile.as_ref()?;
        let modelled = profile.model(activity);
        Some(EnergyReading {
            joules: Some(modelled.joules),
            total_joules: modelled.total_joules,
            how: How::Modelled,
            by: profile.name.clone(),
            excludes: modelled.excludes,
            note: failure.map(|e| format!("sensor read failed: {e}")),
        })
    }

    fn measured(
        &self,
        sensor: &dyn PowerSensor,
        mark: &EnergyMark,
        start: &EnergyCount,
    ) -> Result<EnergyReading, SensorError> {
        let end = sensor.read()?;
        let total = sensor.joules_between(start, &end)?;
        let seconds = mark.at.elapsed().as_secs_f64();
        Ok(EnergyReading {
            // Clamped: sensor noise can put a quiet frame a hair under the idle baseline.
            joules: self.idle_watts.map(|w| (total - w * seconds).max(0.0)),
            total_joules: total,
            how: How::Measured,
            by: sensor.name(),
            excludes: Vec::new(),
            note: None,
        })
    }

    /// The model's prediction for a frame that would keep the device busy as `activity` says
    /// (for `auto` to compare modes); `None` without a profile.
    pub fn predict(&self, activity: &FrameActivity) -> Option<ModelledEnergy> {
        self.profile.as_ref().map(|p| p.model(activity))
    }
}

#[cfg(test)]
mod tests {
    use super::super::sensor::{SensorOptions, fake};
    use super::*;

    const PROFILE: &str = "name = \"board-x\"\nboard = \"b\"\n\
        [idle]\nwatts = 2.0\nkind = \"vendor-spec\"\nsource = \"s\"\n\
        [compute]\nwatts = 6.0\nkind = \"vendor-spec\"\nsource = \"s\"\n";

    fn profile() -> PowerProfile {
        PowerProfile::from_toml_str(PROFILE).unwrap()
    }

    fn options(root: &std::path::Path) -> SensorOptions {
        SensorOptions {
            sysfs_root: root.to_path_buf(),
            sample_every: Duration::from_millis(1),
        }
    }

    fn activity() -> FrameActivity {
        FrameActivity {
            compute: Duration::from_millis(100),
            radio_tx: Duration::from_millis(20),
            radio_rx: Duration::ZERO,
            wall: Duration::from_millis(250),
        }
    }

    #[test]
    fn without_a_sensor_the_profile_models_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let meter = EnergyMeter::new(&options(dir.path()), Some(profile()));
        assert!(!meter.is_measured());
        let line = meter.describe();
        assert!(
            line.starts_with("energy: modelled from profile board-x"),
            "{line}"
        );
        assert!(line.contains("radio power unknown"), "{line}");
        assert!(
            line.contains("RAPL absent") && line.contains("powercap missing"),
            "{line}"
        );
        let reading = meter.finish(&meter.start(), &activity()).unwrap();
        assert_eq!(reading.how, How::Modelled);
        let json = serde_json::to_string(&reading).unwrap();
        assert_eq!(
            json,
            r#"{"joules":0.4,"total_joules":0.9,"how":"modelled","by":"board-x","excludes":["radio_tx"]}"#
        );
        assert_eq!(meter.predict(&activity()).map(|e| e.joules), reading.joules);
    }

    #[test]
    fn with_neither_nothing_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let meter = EnergyMeter::new(&options(dir.path()), None);
        assert!(
            meter
                .describe()
                .starts_with("energy: not reported (no sensor found: INA3221")
        );
        assert!(meter.describe().ends_with("no power profile given)"));
        assert!(meter.finish(&meter.start(), &activity()).is_none());
        assert!(meter.predict(&activity()).is_none());
    }

    #[test]
    fn a_sensor_is_preferred_and_readings_are_measured() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(
            dir.path(),
            "intel-rapl:0",
            "package-0",
            1_000_000,
            u64::MAX / 2,
        );
        let meter = EnergyMeter::new(&options(dir.path()), Some(profile()));
        assert!(meter.is_measured());
        let line = meter.describe();
        assert!(
            line.starts_with("energy: measured by RAPL rapl:package-0"),
            "{line}"
        );
        assert!(
            line.contains("totals only") && line.contains("profile board-x"),
            "{line}"
        );
        let mark = meter.start();
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "1250000",
        );
        let reading = meter.finish(&mark, &activity()).unwrap();
        assert_eq!(reading.how, How::Measured);
        assert_eq!(reading.by, "rapl:package-0");
        assert_eq!(reading.total_joules, 0.25);
        assert_eq!(reading.joules, None);
        let json = serde_json::to_string(&reading).unwrap();
        assert_eq!(
            json,
            r#"{"total_joules":0.25,"how":"measured","by":"rapl:package-0"}"#
        );
    }

    #[test]
    fn a_failed_sensor_read_falls_back_to_the_model_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(dir.path(), "intel-rapl:0", "package-0", 5, 1_000_000);
        let meter = EnergyMeter::new(&options(dir.path()), Some(profile()));
        let mark = meter.start();
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "garbage",
        );
        let reading = meter.finish(&mark, &activity()).unwrap();
        assert_eq!(reading.how, How::Modelled);
        let note = reading.note.unwrap_or_default();
        assert!(
            note.contains("sensor read failed") && note.contains("garbage"),
            "{note}"
        );
    }

    #[test]
    fn a_measured_idle_baseline_gives_measured_joules_above_idle() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(dir.path(), &[("POM_5V_IN", 2000)]);
        let mut meter = EnergyMeter::new(&options(dir.path()), None);
        let idle = meter.calibrate_idle(Duration::from_millis(200)).unwrap();
        // The count moves only at samples (2 W times the time between them), so over a
        // window it can fall short of 2 W, never pass it by more than one period's worth.
        assert!(idle > 0.0 && idle <= 2.0 * 201.0 / 200.0, "{idle} W");
        assert!(
            meter.describe().contains("measured at start"),
            "{}",
            meter.describe()
        );
        let reading = meter.finish(&meter.start(), &activity()).unwrap();
        assert_eq!(reading.how, How::Measured);
        assert_eq!(reading.by, "ina3221:POM_5V_IN");
        assert!(reading.joules.is_some_and(|j| j >= 0.0), "{reading:?}");
    }

    #[test]
    fn calibration_needs_a_sensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut meter = EnergyMeter::new(&options(dir.path()), Some(profile()));
        assert!(meter.calibrate_idle(Duration::from_millis(1)).is_err());
    }
}
