//! What a power sensor is to the rest of the head, and how one is found under a sysfs root.
//!
//! Every sensor is seen as an energy counter: [`PowerSensor::read`] gives an opaque
//! [`EnergyCount`] and [`PowerSensor::joules_between`] the joules between two of them. RAPL is
//! such a counter already; the INA3221 reports power, which a small sampler integrates.
//! Detection looks, in order, for a board monitor (INA3221, JetPack 4 IIO then hwmon layout),
//! which sees the whole module's input, then for RAPL, which sees only the CPU package. It
//! records why each one was not taken, for the daemon's startup line.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ina3221::{Ina3221, SampledPower};
use super::rapl::Rapl;

/// A sensor that could not be found, opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SensorError {
    /// The sensor's files are not there.
    #[error("{what} absent ({path} missing)")]
    Absent {
        /// Which sensor.
        what: &'static str,
        /// What was looked for.
        path: String,
    },
    /// The file is there but this process may not read it.
    #[error("{path}: permission denied ({hint})")]
    PermissionDenied {
        /// The file.
        path: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// Reading failed for another reason.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds something that is not the number it should.
    #[error("{path}: {content:?} is not {expected}")]
    Parse {
        /// The file.
        path: String,
        /// What it held.
        content: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// The background sampler stopped on an error.
    #[error("power sampler stopped: {0}")]
    Stopped(String),
    /// Two counts that did not come from the same sensor.
    #[error("energy counts from different sensors ({0} vs {1} values)")]
    Mismatch(usize, usize),
}

/// An energy sensor, read at the start and at the end of what is measured.
pub trait PowerSensor: Send + Sync + fmt::Debug {
    /// A short name for reports: `ina3221:POM_5V_IN`, `rapl:package-0`.
    fn name(&self) -> String;
    /// One line for the startup log: what is measured, where, and what it leaves out.
    fn describe(&self) -> String;
    /// The counter now.
    fn read(&self) -> Result<EnergyCount, SensorError>;
    /// Joules consumed between two reads (`start` first), wraparound handled.
    fn joules_between(&self, start: &EnergyCount, end: &EnergyCount) -> Result<f64, SensorError>;
}

/// An opaque reading of a sensor's counter (microjoules, one value per zone or rail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnergyCount {
    pub(crate) microjoules: Vec<u64>,
}

/// Where to look for sensors and how to sample them.
#[derive(Debug, Clone)]
pub struct SensorOptions {
    /// The sysfs mount (`/sys`); tests point it at a fake tree.
    pub sysfs_root: PathBuf,
    /// How often a power-only sensor (INA3221) is sampled and integrated.
    pub sample_every: Duration,
}

impl Default for SensorOptions {
    fn default() -> SensorOptions {
        SensorOptions {
            sysfs_root: PathBuf::from("/sys"),
            sample_every: Duration::from_millis(10),
        }
    }
}

/// The outcome of looking for a sensor.
#[derive(Debug)]
pub struct Detection {
    /// The sensor taken, if any.
    pub sensor: Option<Box<dyn PowerSensor>>,
    /// Why each sensor looked at before it (or all of them) was not taken.
    pub passed_over: Vec<String>,
}

/// Looks for a readable sensor: INA3221 (IIO layout, then hwmon), then RAPL.
pub fn detect(options: &SensorOptions) -> Detection {
    detect_with(&SysfsReader::default(), options)
}

pub(crate) fn detect_with(reader: &SysfsReader, options: &SensorOptions) -> Detection {
    let mut passed_over = Vec::new();
    match Ina3221::detect(reader, &options.sysfs_root) {
        Ok(ina) => match SampledPower::start(ina, reader.clone(), options.sample_every) {
            Ok(sampled) => {
                return Detection {
                    sensor: Some(Box::new(sampled)),
                    passed_over,
                };
            }
            Err(e) => passed_over.push(format!("INA3221: {e}")),
        },
        Err(e) => passed_over.push(e.to_string()),
    }
    match Rapl::detect(reader, &options.sysfs_root) {
        Ok(rapl) => {
            return Detection {
                sensor: Some(Box::new(rapl)),
                passed_over,
            };
        }
        Err(e) => passed_over.push(e.to_string()),
    }
    Detection {
        sensor: None,
        passed_over,
    }
}

/// Reads sysfs files and turns their errors into [`SensorError`]s that name the file.
///
/// A seam for tests: a root process (as in CI) cannot be refused a read by `chmod`, so tests
/// mark files denied here to exercise the permission path.
#[derive(Debug, Clone, Default)]
pub(crate) struct SysfsReader {
    #[cfg(test)]
    pub(crate) denied: Vec<PathBuf>,
}

/// The advice attached to a refused read of a sensor file.
const PERMISSION_HINT: &str =
    "run as root, or grant read access with a udev rule or a tmpfiles.d chmod";

impl SysfsReader {
    /// The trimmed text of `path`.
    pub(crate) fn read(&self, path: &Path) -> Result<String, SensorError> {
        #[cfg(test)]
        if self.denied.iter().any(|d| d == path) {
            return Err(classify(path, ErrorKind::PermissionDenied.into()));
        }
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| classify(path, e))
    }

    /// `path` read as an unsigned integer.
    pub(crate) fn read_u64(&self, path: &Path, expected: &'static str) -> Result<u64, SensorError> {
        let text = self.read(path)?;
        text.parse().map_err(|_| SensorError::Parse {
            path: path.display().to_string(),
            content: text,
            expected,
        })
    }

    /// `path` read as a signed integer (hwmon currents may be negative).
    pub(crate) fn read_i64(&self, path: &Path, expected: &'static str) -> Result<i64, SensorError> {
        let text = self.read(path)?;
        text.parse().map_err(|_| SensorError::Parse {
            path: path.display().to_string(),
            content: text,
            expected,
        })
    }
}

fn classify(path: &Path, e: std::io::Error) -> SensorError {
    let shown = path.display().to_string();
    if e.kind() == ErrorKind::PermissionDenied {
        SensorError::PermissionDenied {
            path: shown,
            hint: PERMISSION_HINT,
        }
    } else {
        SensorError::Io {
            path: shown,
            source: e,
        }
    }
}

/// The entries of `dir` whose names start with `prefix`, sorted by name.
pub(crate) fn entries_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake sysfs tree in a temporary folder.

    use std::path::Path;

    /// Writes `content` at `root/relative`, making its folders.
    pub(crate) fn write(root: &Path, relative: &str, content: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    /// A Jetson Nano (JetPack 4) INA3221 under `root`, each rail at the given milliwatts.
    pub(crate) fn jetson_iio(root: &Path, rails: &[(&str, u64)]) {
        let dir = "bus/i2c/drivers/ina3221x/6-0040/iio:device0";
        for (n, (name, mw)) in rails.iter().enumerate() {
            write(root, &format!("{dir}/rail_name_{n}"), &format!("{name}\n"));
            write(
                root,
                &format!("{dir}/in_power{n}_input"),
                &format!("{mw}\n"),
            );
        }
    }

    /// A RAPL package zone under `root`.
    pub(crate) fn rapl_zone(root: &Path, zone: &str, name: &str, energy_uj: u64, max: u64) {
        let dir = format!("class/powercap/{zone}");
        write(root, &format!("{dir}/name"), &format!("{name}\n"));
        write(root, &format!("{dir}/energy_uj"), &format!("{energy_uj}\n"));
        write(
            root,
            &format!("{dir}/max_energy_range_uj"),
            &format!("{max}\n"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(root: &Path) -> SensorOptions {
        SensorOptions {
            sysfs_root: root.to_path_buf(),
            sample_every: Duration::from_millis(1),
        }
    }

    #[test]
    fn nothing_found_says_why_for_each_sensor() {
        let dir = tempfile::tempdir().unwrap();
        let d = detect(&options(dir.path()));
        assert!(d.sensor.is_none());
        assert_eq!(d.passed_over.len(), 2, "{:?}", d.passed_over);
        assert!(d.passed_over[0].contains("INA3221"), "{:?}", d.passed_over);
        assert!(d.passed_over[1].contains("RAPL") && d.passed_over[1].contains("powercap"));
    }

    #[test]
    fn board_monitor_comes_before_rapl() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(dir.path(), "intel-rapl:0", "package-0", 5, 1_000);
        let d = detect(&options(dir.path()));
        assert_eq!(
            d.sensor.as_ref().map(|s| s.name()).as_deref(),
            Some("rapl:package-0")
        );
        fake::jetson_iio(dir.path(), &[("POM_5V_IN", 1000)]);
        let d = detect(&options(dir.path()));
        assert_eq!(
            d.sensor.as_ref().map(|s| s.name()).as_deref(),
            Some("ina3221:POM_5V_IN")
        );
        assert!(d.passed_over.is_empty(), "{:?}", d.passed_over);
    }

    #[test]
    fn an_unreadable_rapl_is_passed_over_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(dir.path(), "intel-rapl:0", "package-0", 5, 1_000);
        let reader = SysfsReader {
            denied: vec![dir.path().join("class/powercap/intel-rapl:0/energy_uj")],
        };
        let d = detect_with(&reader, &options(dir.path()));
        assert!(d.sensor.is_none());
        let why = &d.passed_over[1];
        assert!(
            why.contains("permission denied") && why.contains("CVE-2020-8694"),
            "{why}"
        );
        assert!(why.contains("energy_uj"), "{why}");
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fake::write(dir.path(), "x", "12a\n");
        let reader = SysfsReader::default();
        let e = reader
            .read_u64(&dir.path().join("x"), "microjoules")
            .unwrap_err();
        assert!(matches!(e, SensorError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("\"12a\"") && e.to_string().contains("microjoules"));
        let e = reader.read(&dir.path().join("y")).unwrap_err();
        assert!(
            matches!(e, SensorError::Io { .. }) && e.to_string().contains("/y"),
            "{e}"
        );
        let e = classify(Path::new("/p"), ErrorKind::PermissionDenied.into());
        assert!(matches!(e, SensorError::PermissionDenied { .. }), "{e}");
    }
}
