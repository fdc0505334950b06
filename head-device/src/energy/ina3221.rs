//! The INA3221 power monitor of NVIDIA Jetson boards, read from sysfs and turned into an energy
//! counter by a small sampler thread.
//!
//! Two layouts exist:
//!
//! * JetPack 4 (L4T 32, the only JetPack for the Nano): NVIDIA's `ina3221x` IIO driver,
//!   `/sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<N>/`, with `rail_name_<n>` and
//!   `in_power<n>_input` in **milliwatts** (n = 0, 1, 2). On the Nano the rails are POM_5V_IN
//!   (the module's 5 V input, the total), POM_5V_GPU and POM_5V_CPU.
//! * JetPack 5 and later (Xavier, Orin): the upstream hwmon `ina3221` driver,
//!   `/sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<N>/`, with `in<n>_label`,
//!   `in<n>_input` (bus voltage, **mV**) and `curr<n>_input` (**mA**), n = 1, 2, 3
//!   (Linux Documentation/hwmon/ina3221.rst); power is mV × mA / 1000 in mW.
//!
//! The total input rail (POM_5V_IN, VDD_IN) is taken when present, since the other rails are
//! parts of it; otherwise all rails are summed. Channels labelled `NC` (not connected) are
//! skipped.
//!
//! The chip reports power, not energy. A thread samples it every `sample_every` (10 ms by
//! default) and integrates with the trapezoid rule into a running joule count, which makes it
//! a counter like RAPL: a frame's energy is the count at its end minus the count at its start.
//! The count advances only at samples, so each end of an interval is uncertain by up to one
//! period: for a 100 ms frame at 10 ms, about ±10 %. Sampling only at a frame's start and end
//! would be cheaper but would miss the compute in between, which is the part that matters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sensor::{EnergyCount, PowerSensor, SensorError, SysfsReader, entries_starting};

/// Rail labels that are a board's total input.
const TOTAL_RAILS: [&str; 2] = ["POM_5V_IN", "VDD_IN"];

/// An INA3221 found under a sysfs root, with the rails it will read.
#[derive(Debug)]
pub(crate) struct Ina3221 {
    channels: Vec<Channel>,
    /// Read only this channel (the total input rail), else sum all.
    total: Option<usize>,
    layout: &'static str,
    dirs: Vec<PathBuf>,
}

#[derive(Debug)]
struct Channel {
    label: String,
    files: ChannelFiles,
}

#[derive(Debug)]
enum ChannelFiles {
    /// IIO: power in milliwatts.
    PowerMw(PathBuf),
    /// hwmon: bus voltage in mV and current in mA.
    VoltsAmps { mv: PathBuf, ma: PathBuf },
}

impl Ina3221 {
    /// Finds the monitor under `sysfs_root`: the IIO layout first, then hwmon.
    pub(crate) fn detect(reader: &SysfsReader, sysfs_root: &Path) -> Result<Ina3221, SensorError> {
        let drivers = sysfs_root.join("bus/i2c/drivers");
        let iio = drivers.join("ina3221x");
        let hwmon = drivers.join("ina3221");
        let found = if iio.is_dir() {
            Self::iio(reader, &iio)?
        } else if hwmon.is_dir() {
            Self::hwmon(reader, &hwmon)?
        } else {
            return Err(SensorError::Absent {
                what: "INA3221",
                path: format!("{} and {}", iio.display(), hwmon.display()),
            });
        };
        found.power_watts(reader)?;
        Ok(found)
    }

    fn iio(reader: &SysfsReader, driver: &Path) -> Result<Ina3221, SensorError> {
        let mut channels = Vec::new();
        let mut dirs = Vec::new();
        for chip in entries_starting(driver, "") {
            for dev in entries_starting(&chip, "iio:device") {
                for n in 0..3 {
                    let (name, power) = (
                        dev.join(format!("rail_name_{n}")),
                        dev.join(format!("in_power{n}_input")),
                    );
                    if name.is_file() && power.is_file() {
                        let label = reader.read(&name)?;
                        channels.push(Channel {
                            label,
                            files: ChannelFiles::PowerMw(power),
                        });
                    }
                }
                dirs.push(dev);
            }
        }
        Self::build(channels, "IIO (JetPack 4)", dirs, driver)
    }

    fn hwmon(reader: &SysfsReader, driver: &Path) -> Result<Ina3221, SensorError> {
        let mut channels = Vec::new();
        let mut dirs = Vec::new();
        for chip in entries_starting(driver, "") {
            for dev in entries_starting(&chip.join("hwmon"), "hwmon") {
                for n in 1..=3 {
                    let (mv, ma) = (
                        dev.join(format!("in{n}_input")),
                        dev.join(format!("curr{n}_input")),
                    );
                    if !(mv.is_file() && ma.is_file()) {
                        continue;
                    }
                    let label_file = dev.join(format!("in{n}_label"));
                    let label = if label_file.is_file() {
                        reader.read(&label_file)?
                    } else {
                        format!("in{n}")
                    };
                    if label == "NC" {
                        continue;
                    }
                    channels.push(Channel {
                        label,
                        files: ChannelFiles::VoltsAmps { mv, ma },
                    });
                }
                dirs.push(dev);
            }
        }
        Self::build(channels, "hwmon", dirs, driver)
    }

    fn build(
        channels: Vec<Channel>,
        layout: &'static str,
        dirs: Vec<PathBuf>,
        driver: &Path,
    ) -> Result<Ina3221, SensorError> {
        if channels.is_empty() {
            return Err(SensorError::Absent {
                what: "INA3221 rails",
                path: format!("{}/*: no readable channel", driver.display()),
            });
        }
        let total = channels
            .iter()
            .position(|c| TOTAL_RAILS.contains(&c.label.as_str()));
        Ok(Ina3221 {
            channels,
            total,
            layout,
            dirs,
        })
    }

    /// The rail (or rails, `+`-joined) that is read.
    fn rails(&self) -> String {
        match self.total {
            Some(i) => self.channels[i].label.clone(),
            None => {
                let labels: Vec<&str> = self.channels.iter().map(|c| c.label.as_str()).collect();
                labels.join("+")
            }
        }
    }

    /// The power now, in watts: the total rail, or the sum of all rails.
    pub(crate) fn power_watts(&self, reader: &SysfsReader) -> Result<f64, SensorError> {
        let read = |c: &Channel| -> Result<f64, SensorError> {
            match &c.files {
                ChannelFiles::PowerMw(p) => Ok(reader.read_u64(p, "a power in mW")? as f64 / 1e3),
                ChannelFiles::VoltsAmps { mv, ma } => {
                    let mv = reader.read_i64(mv, "a voltage in mV")? as f64;
                    let ma = reader.read_i64(ma, "a current in mA")? as f64;
                    Ok(mv * ma / 1e6)
                }
            }
        };
        match self.total {
            Some(i) => read(&self.channels[i]),
            None => self.channels.iter().map(read).sum(),
        }
    }
}

/// Running trapezoid integral of power samples.
#[derive(Debug, Default)]
pub(crate) struct Trapezoid {
    last: Option<(Instant, f64)>,
    pub(crate) joules: f64,
    pub(crate) covered: Duration,
}

impl Trapezoid {
    /// Adds the sample `watts` taken at `at`; samples out of order are ignored.
    pub(crate) fn add(&mut self, at: Instant, watts: f64) {
        if let Some((t0, w0)) = self.last {
            let Some(dt) = at.checked_duration_since(t0) else {
                return;
            };
            self.joules += (w0 + watts) / 2.0 * dt.as_secs_f64();
            self.covered += dt;
        }
        self.last = Some((at, watts));
    }
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    state: Mutex<SamplerState>,
}

#[derive(Debug, Default)]
struct SamplerState {
    integral: Trapezoid,
    error: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SamplerState> {
        // A panic in the sampler cannot leave the sums half-written: take the state as is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An INA3221 with its sampler thread: a [`PowerSensor`] counting joules.
///
/// Dropping it stops the thread (within one sample period).
#[derive(Debug)]
pub(crate) struct SampledPower {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    name: String,
    description: String,
}

impl SampledPower {
    /// Takes a first sample (so an unreadable monitor fails here) and starts the thread.
    pub(crate) fn start(
        ina: Ina3221,
        reader: SysfsReader,
        every: Duration,
    ) -> Result<SampledPower, SensorError> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            state: Mutex::new(SamplerState::default()),
        });
        let first = ina.power_watts(&reader)?;
        shared.lock().integral.add(Instant::now(), first);
        let rails = ina.rails();
        let name = format!("ina3221:{rails}");
        let dirs: Vec<String> = ina.dirs.iter().map(|d| d.display().to_string()).collect();
        let what = if ina.total.is_some() {
            "the board's total input rail"
        } else {
            "sum of rails, no total input rail found"
        };
        let description = format!(
            "INA3221 {} {rails} ({what}) at {}, sampled every {} ms",
            ina.layout,
            dirs.join(", "),
            every.as_millis()
        );
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cleave-power".into())
            .spawn(move || sample(&ina, &reader, every, &theirs))
            .map_err(|e| SensorError::Stopped(format!("cannot start the sampler thread: {e}")))?;
        Ok(SampledPower {
            shared,
            thread: Some(thread),
            name,
            description,
        })
    }

    /// The joules counted and the time they cover, from one lock (for tests).
    #[cfg(test)]
    fn snapshot(&self) -> (f64, Duration) {
        let state = self.shared.lock();
        (state.integral.joules, state.integral.covered)
    }
}

fn sample(ina: &Ina3221, reader: &SysfsReader, every: Duration, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(every);
        match ina.power_watts(reader) {
            Ok(watts) => shared.lock().integral.add(Instant::now(), watts),
            Err(e) => {
                shared.lock().error = Some(e.to_string());
                return;
            }
        }
    }
}

impl Drop for SampledPower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread only sleeps and reads files; a panic there has nothing left to clean.
            let _ = thread.join();
        }
    }
}

impl PowerSensor for SampledPower {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn read(&self) -> Result<EnergyCount, SensorError> {
        let state = self.shared.lock();
        if let Some(e) = &state.error {
            return Err(SensorError::Stopped(e.clone()));
        }
        Ok(EnergyCount {
            microjoules: vec![(state.integral.joules * 1e6).round() as u64],
        })
    }

    fn joules_between(&self, start: &EnergyCount, end: &EnergyCount) -> Result<f64, SensorError> {
        match (start.microjoules.as_slice(), end.microjoules.as_slice()) {
            ([s], [e]) => Ok(e.saturating_sub(*s) as f64 / 1e6),
            (s, e) => Err(SensorError::Mismatch(s.len(), e.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::sensor::fake;
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn jetpack4_layout_takes_the_total_rail() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(
            dir.path(),
            &[
                ("POM_5V_IN", 4523),
                ("POM_5V_GPU", 1113),
                ("POM_5V_CPU", 538),
            ],
        );
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        assert_eq!(ina.rails(), "POM_5V_IN");
        assert!(close(ina.power_watts(&reader).unwrap(), 4.523));
    }

    #[test]
    fn jetpack4_layout_finds_the_total_by_name_not_position() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(
            dir.path(),
            &[
                ("POM_5V_GPU", 1000),
                ("POM_5V_IN", 3000),
                ("POM_5V_CPU", 500),
            ],
        );
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        assert!(close(ina.power_watts(&reader).unwrap(), 3.0));
    }

    #[test]
    fn without_a_total_rail_the_rails_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(dir.path(), &[("VDD_GPU", 1000), ("VDD_CPU", 500)]);
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        assert_eq!(ina.rails(), "VDD_GPU+VDD_CPU");
        assert!(close(ina.power_watts(&reader).unwrap(), 1.5));
    }

    fn hwmon_channel(root: &Path, n: u32, label: Option<&str>, mv: i64, ma: i64) {
        let dir = "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3";
        if let Some(label) = label {
            fake::write(root, &format!("{dir}/in{n}_label"), &format!("{label}\n"));
        }
        fake::write(root, &format!("{dir}/in{n}_input"), &format!("{mv}\n"));
        fake::write(root, &format!("{dir}/curr{n}_input"), &format!("{ma}\n"));
    }

    #[test]
    fn hwmon_layout_multiplies_volts_and_amps() {
        let dir = tempfile::tempdir().unwrap();
        hwmon_channel(dir.path(), 1, Some("VDD_IN"), 5000, 1200);
        hwmon_channel(dir.path(), 2, Some("VDD_CPU_GPU_CV"), 5000, 300);
        hwmon_channel(dir.path(), 3, Some("VDD_SOC"), 5000, 200);
        // The shunt-voltage sum channel is not a rail.
        fake::write(
            dir.path(),
            "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/in7_input",
            "99\n",
        );
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        assert_eq!(ina.layout, "hwmon");
        assert_eq!(ina.rails(), "VDD_IN");
        assert!(close(ina.power_watts(&reader).unwrap(), 6.0));
    }

    #[test]
    fn hwmon_skips_unconnected_channels_when_summing() {
        let dir = tempfile::tempdir().unwrap();
        hwmon_channel(dir.path(), 1, Some("VDD_CPU"), 5000, 100);
        hwmon_channel(dir.path(), 2, Some("NC"), 5000, 9999);
        hwmon_channel(dir.path(), 3, None, 1000, 1000);
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        assert_eq!(ina.rails(), "VDD_CPU+in3");
        assert!(close(ina.power_watts(&reader).unwrap(), 1.5));
    }

    #[test]
    fn absent_empty_and_unreadable_monitors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reader = SysfsReader::default();
        let e = Ina3221::detect(&reader, dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("ina3221x") && e.to_string().contains("ina3221 "),
            "{e}"
        );
        fake::write(dir.path(), "bus/i2c/drivers/ina3221x/uevent", "");
        let e = Ina3221::detect(&reader, dir.path()).unwrap_err();
        assert!(e.to_string().contains("no readable channel"), "{e}");
        fake::jetson_iio(dir.path(), &[("POM_5V_IN", 1000)]);
        let power = dir
            .path()
            .join("bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input");
        let denied = SysfsReader {
            denied: vec![power],
        };
        let e = Ina3221::detect(&denied, dir.path()).unwrap_err();
        assert!(matches!(e, SensorError::PermissionDenied { .. }), "{e}");
    }

    #[test]
    fn trapezoid_integrates_power_over_time() {
        let t0 = Instant::now();
        let mut t = Trapezoid::default();
        t.add(t0, 2.0);
        assert_eq!(t.joules, 0.0);
        t.add(t0 + Duration::from_millis(100), 4.0); // mean 3 W over 0.1 s
        t.add(t0 + Duration::from_millis(300), 4.0); // 4 W over 0.2 s
        assert!(close(t.joules, 0.3 + 0.8), "{t:?}");
        assert_eq!(t.covered, Duration::from_millis(300));
        t.add(t0 + Duration::from_millis(200), 100.0); // out of order: ignored
        assert!(close(t.joules, 1.1) && t.covered == Duration::from_millis(300));
    }

    #[test]
    fn the_sampler_counts_energy_at_the_rail_power() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(dir.path(), &[("POM_5V_IN", 2000)]);
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        let sampled = SampledPower::start(ina, reader, Duration::from_millis(1)).unwrap();
        assert_eq!(sampled.name(), "ina3221:POM_5V_IN");
        assert!(
            sampled.describe().contains("IIO (JetPack 4)"),
            "{}",
            sampled.describe()
        );
        let start = sampled.read().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while sampled.snapshot().1 < Duration::from_millis(20) {
            assert!(Instant::now() < deadline, "the sampler never sampled");
            std::thread::sleep(Duration::from_millis(2));
        }
        let end = sampled.read().unwrap();
        assert!(sampled.joules_between(&start, &end).unwrap() > 0.0);
        // Constant 2 W: the count is exactly 2 W times the time it covers.
        let (joules, covered) = sampled.snapshot();
        let covered = covered.as_secs_f64();
        assert!(
            (joules - 2.0 * covered).abs() < 1e-9,
            "{joules} J over {covered} s"
        );
    }

    #[test]
    fn a_sampler_that_loses_its_file_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        fake::jetson_iio(dir.path(), &[("POM_5V_IN", 2000)]);
        let reader = SysfsReader::default();
        let ina = Ina3221::detect(&reader, dir.path()).unwrap();
        let sampled = SampledPower::start(ina, reader, Duration::from_millis(1)).unwrap();
        std::fs::remove_dir_all(dir.path().join("bus")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match sampled.read() {
                Err(SensorError::Stopped(why)) => {
                    assert!(why.contains("in_power0_input"), "{why}");
                    break;
                }
                Ok(_) => assert!(Instant::now() < deadline, "the sampler never noticed"),
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
