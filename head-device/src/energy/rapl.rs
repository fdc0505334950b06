//! Intel/AMD RAPL through the powercap sysfs class: an energy counter on x86 machines.
//!
//! `/sys/class/powercap/intel-rapl:N/energy_uj` counts microjoules and wraps to zero past
//! `max_energy_range_uj` (Documentation/ABI/testing/sysfs-class-powercap; the wrap is the
//! hardware counter's mask, `get_max_energy_counter()` in drivers/powercap/intel_rapl_common.c).
//! A delta across one wrap is `(max − start) + end`; two reads must be less than one wrap apart,
//! which at the counter's range (hundreds of kJ on current parts) is minutes even at full load.
//!
//! Which zones: `psys` (the whole platform, on laptops that have it) if present, else the sum of
//! the `package-N` zones. RAPL sees the CPU package (and, with psys, the platform), never the
//! board's input: the description says so.
//!
//! Since CVE-2020-8694 (kernel commit 949dd0104c49, Nov 2020, backported to stable kernels)
//! `energy_uj` is readable only by root; `max_energy_range_uj` stays world-readable. Detection
//! therefore reads `energy_uj` once, and a refusal becomes a clear reason to fall back.

use std::path::{Path, PathBuf};

use super::sensor::{EnergyCount, PowerSensor, SensorError, SysfsReader, entries_starting};

/// Why `energy_uj` is refused, and what to do.
const RAPL_PERMISSION_HINT: &str = "energy_uj is readable only by root since CVE-2020-8694 \
     (Platypus): run as root, or grant read access with a udev rule or a tmpfiles.d chmod";

/// The RAPL zones taken, read together.
#[derive(Debug)]
pub(crate) struct Rapl {
    zones: Vec<Zone>,
    reader: SysfsReader,
}

#[derive(Debug)]
struct Zone {
    dir: PathBuf,
    name: String,
    max_range_uj: u64,
}

impl Rapl {
    /// Finds the zones under `sysfs_root/class/powercap` and checks that they can be read.
    pub(crate) fn detect(reader: &SysfsReader, sysfs_root: &Path) -> Result<Rapl, SensorError> {
        let base = sysfs_root.join("class/powercap");
        let absent = |path: &Path| SensorError::Absent {
            what: "RAPL",
            path: path.display().to_string(),
        };
        if !base.is_dir() {
            return Err(absent(&base));
        }
        // Top-level zones only (`intel-rapl:0`, not the subzones `intel-rapl:0:0`).
        let mut named = Vec::new();
        for dir in entries_starting(&base, "intel-rapl:") {
            let file = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            if file.is_some_and(|f| f.matches(':').count() == 1) {
                let name = reader.read(&dir.join("name"))?;
                named.push((dir, name));
            }
        }
        let chosen: Vec<(PathBuf, String)> = match named.iter().find(|(_, n)| n == "psys") {
            Some(psys) => vec![psys.clone()],
            None => named
                .into_iter()
                .filter(|(_, n)| n.starts_with("package-"))
                .collect(),
        };
        if chosen.is_empty() {
            return Err(absent(&base.join("intel-rapl:*/name = package-N or psys")));
        }
        let mut zones = Vec::new();
        for (dir, name) in chosen {
            let max_range_uj =
                reader.read_u64(&dir.join("max_energy_range_uj"), "a range in microjoules")?;
            if max_range_uj == 0 {
                return Err(SensorError::Parse {
                    path: dir.join("max_energy_range_uj").display().to_string(),
                    content: "0".into(),
                    expected: "a positive range in microjoules",
                });
            }
            zones.push(Zone {
                dir,
                name,
                max_range_uj,
            });
        }
        let rapl = Rapl {
            zones,
            reader: reader.clone(),
        };
        rapl.read().map_err(|e| match e {
            SensorError::PermissionDenied { path, .. } => SensorError::PermissionDenied {
                path,
                hint: RAPL_PERMISSION_HINT,
            },
            other => other,
        })?;
        Ok(rapl)
    }
}

/// Microjoules from `start` to `end` on a counter that wraps to zero past `max`.
fn delta_uj(start: u64, end: u64, max: u64) -> u64 {
    if end >= start {
        end - start
    } else {
        max.saturating_sub(start).saturating_add(end)
    }
}

impl PowerSensor for Rapl {
    fn name(&self) -> String {
        let names: Vec<&str> = self.zones.iter().map(|z| z.name.as_str()).collect();
        format!("rapl:{}", names.join("+"))
    }

    fn describe(&self) -> String {
        let dirs: Vec<String> = self
            .zones
            .iter()
            .map(|z| z.dir.display().to_string())
            .collect();
        let what = if self.zones.iter().any(|z| z.name == "psys") {
            "the platform (psys)"
        } else {
            "the CPU package only, not the whole machine"
        };
        format!("RAPL {} ({}): {what}", self.name(), dirs.join(", "))
    }

    fn read(&self) -> Result<EnergyCount, SensorError> {
        let microjoules = self
            .zones
            .iter()
            .map(|z| {
                self.reader
                    .read_u64(&z.dir.join("energy_uj"), "an energy count in microjoules")
            })
            .collect::<Result<Vec<u64>, SensorError>>()?;
        Ok(EnergyCount { microjoules })
    }

    fn joules_between(&self, start: &EnergyCount, end: &EnergyCount) -> Result<f64, SensorError> {
        let (a, b) = (&start.microjoules, &end.microjoules);
        if a.len() != self.zones.len() || b.len() != self.zones.len() {
            return Err(SensorError::Mismatch(a.len(), b.len()));
        }
        let total: u64 = self
            .zones
            .iter()
            .zip(a.iter().zip(b))
            .map(|(z, (&s, &e))| delta_uj(s, e, z.max_range_uj))
            .sum();
        Ok(total as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::super::sensor::fake;
    use super::*;

    #[test]
    fn reads_a_package_counter() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(
            dir.path(),
            "intel-rapl:0",
            "package-0",
            1_000_000,
            262_143_328_850,
        );
        fake::rapl_zone(dir.path(), "intel-rapl:0:0", "core", 7, 262_143_328_850);
        let rapl = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap();
        assert_eq!(rapl.name(), "rapl:package-0");
        assert!(
            rapl.describe().contains("CPU package only"),
            "{}",
            rapl.describe()
        );
        let start = rapl.read().unwrap();
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "3500000\n",
        );
        let end = rapl.read().unwrap();
        assert_eq!(rapl.joules_between(&start, &end).unwrap(), 2.5);
    }

    #[test]
    fn wraparound_is_counted_once() {
        assert_eq!(delta_uj(900, 100, 1_000), 200);
        assert_eq!(delta_uj(100, 900, 1_000), 800);
        assert_eq!(delta_uj(5, 5, 1_000), 0);
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(
            dir.path(),
            "intel-rapl:0",
            "package-0",
            9_000_000,
            10_000_000,
        );
        let rapl = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap();
        let start = rapl.read().unwrap();
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "500000\n",
        );
        let end = rapl.read().unwrap();
        assert_eq!(rapl.joules_between(&start, &end).unwrap(), 1.5);
    }

    #[test]
    fn packages_are_summed_and_psys_preferred() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(dir.path(), "intel-rapl:0", "package-0", 0, 1_000_000_000);
        fake::rapl_zone(dir.path(), "intel-rapl:1", "package-1", 0, 1_000_000_000);
        let rapl = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap();
        assert_eq!(rapl.name(), "rapl:package-0+package-1");
        let start = rapl.read().unwrap();
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:0/energy_uj",
            "1000000",
        );
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:1/energy_uj",
            "2000000",
        );
        let end = rapl.read().unwrap();
        assert_eq!(rapl.joules_between(&start, &end).unwrap(), 3.0);
        assert!(matches!(
            rapl.joules_between(
                &start,
                &EnergyCount {
                    microjoules: vec![1]
                }
            ),
            Err(SensorError::Mismatch(2, 1))
        ));

        fake::rapl_zone(dir.path(), "intel-rapl:2", "psys", 0, 1_000_000_000);
        let rapl = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap();
        assert_eq!(rapl.name(), "rapl:psys");
    }

    #[test]
    fn permission_denied_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        fake::rapl_zone(dir.path(), "intel-rapl:0", "package-0", 0, 1_000);
        let energy = dir.path().join("class/powercap/intel-rapl:0/energy_uj");
        let reader = SysfsReader {
            denied: vec![energy.clone()],
        };
        let e = Rapl::detect(&reader, dir.path()).unwrap_err();
        assert!(matches!(e, SensorError::PermissionDenied { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&energy.display().to_string()) && text.contains("root"),
            "{text}"
        );
    }

    #[test]
    fn absent_or_odd_trees_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("class/powercap missing"), "{e}");
        fake::rapl_zone(dir.path(), "intel-rapl:0", "dram", 0, 1_000);
        let e = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap_err();
        assert!(matches!(e, SensorError::Absent { .. }), "{e}");
        fake::rapl_zone(dir.path(), "intel-rapl:1", "package-0", 0, 0);
        let e = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("max_energy_range_uj"), "{e}");
        fake::write(
            dir.path(),
            "class/powercap/intel-rapl:1/max_energy_range_uj",
            "100",
        );
        fake::write(dir.path(), "class/powercap/intel-rapl:1/energy_uj", "lots");
        let e = Rapl::detect(&SysfsReader::default(), dir.path()).unwrap_err();
        assert!(matches!(e, SensorError::Parse { .. }) && e.to_string().contains("lots"));
    }
}
