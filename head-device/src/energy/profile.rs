//! A device power profile (`deploy/profiles/*.toml`): the board's idle, compute and radio power,
//! each figure with the source it came from.
//!
//! The profile is what the energy model multiplies times by, on boards without a sensor, and
//! what `auto` uses to predict the energy of modes it is not running. Loading refuses a figure
//! without a source, an unknown key or a number that cannot be a power, and the error names the
//! file and the key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A profile that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The file could not be read.
    #[error("power profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML of the profile's shape (syntax, unknown or missing key, wrong type).
    #[error("power profile {path}: {message}")]
    Parse {
        /// The file, or `<string>` for text given directly.
        path: String,
        /// The TOML parser's message, which names the key and the line.
        message: String,
    },
    /// A key has a value that cannot be right.
    #[error("power profile {path}: `{key}` {reason}")]
    Invalid {
        /// The file, or `<string>` for text given directly.
        path: String,
        /// The key at fault, as written in the file (`idle.watts`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where a figure comes from, from most to least authoritative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// The vendor's own documentation or datasheet.
    VendorSpec,
    /// A measurement published by someone else, with its method.
    ThirdPartyMeasurement,
    /// A measurement by whoever deploys Cleave, on their own board.
    OwnMeasurement,
    /// An estimate: derived, not measured on this kind of board.
    Estimate,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::VendorSpec => "vendor-spec",
            SourceKind::ThirdPartyMeasurement => "third-party-measurement",
            SourceKind::OwnMeasurement => "own-measurement",
            SourceKind::Estimate => "estimate",
        })
    }
}

/// One power figure of a profile and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Watts. Absolute for idle and compute; above idle for the radio.
    pub watts: f64,
    /// What kind of source it is.
    pub kind: SourceKind,
    /// The source: URL, document, section.
    pub source: String,
    /// Conditions, conversions and caveats, if the file gives them.
    pub note: Option<String>,
}

/// A board's power profile, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerProfile {
    /// Short id, used in reports (`raspberry-pi-4`).
    pub name: String,
    /// The board, in words.
    pub board: String,
    /// Board input power when idle.
    pub idle: Figure,
    /// Board input power with the compute units busy (all CPU cores, or the GPU where the
    /// model runs there).
    pub compute: Figure,
    /// Power above idle while the radio transmits; `None` when not known.
    pub radio_tx: Option<Figure>,
    /// Power above idle while the radio receives; `None` when not known.
    pub radio_rx: Option<Figure>,
    /// The file it was loaded from, if any.
    pub path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    board: String,
    idle: RawAbsolute,
    compute: RawAbsolute,
    radio_tx: Option<RawExtra>,
    radio_rx: Option<RawExtra>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbsolute {
    watts: f64,
    kind: SourceKind,
    source: String,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtra {
    extra_watts: f64,
    kind: SourceKind,
    source: String,
    note: Option<String>,
}

/// No board this runtime targets draws more than this; a larger figure is a unit slip (mW).
const MAX_PLAUSIBLE_WATTS: f64 = 1000.0;

impl PowerProfile {
    /// Reads and validates the profile at `path`.
    pub fn load(path: &Path) -> Result<PowerProfile, ProfileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut profile = parse(&text, &shown)?;
        profile.path = Some(path.to_path_buf());
        Ok(profile)
    }

    /// Parses and validates a profile given as text (errors name it `<string>`).
    pub fn from_toml_str(text: &str) -> Result<PowerProfile, ProfileError> {
        parse(text, "<string>")
    }

    /// Whether the profile knows the radio's power in both directions (transmit and receive).
    pub fn knows_radio(&self) -> bool {
        self.radio_tx.is_some() && self.radio_rx.is_some()
    }
}

fn parse(text: &str, path: &str) -> Result<PowerProfile, ProfileError> {
    let raw: RawProfile = toml::from_str(text).map_err(|e| ProfileError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let invalid = |key: &str, reason: String| ProfileError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        reason,
    };
    if raw.name.trim().is_empty()
        || !raw
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            "name",
            format!("is {:?}: use letters, digits, '-', '_' or '.'", raw.name),
        ));
    }
    if raw.board.trim().is_empty() {
        return Err(invalid("board", "is empty".into()));
    }
    let idle = figure("idle", "watts", raw.idle.into(), &invalid)?;
    let compute = figure("compute", "watts", raw.compute.into(), &invalid)?;
    if compute.watts < idle.watts {
        return Err(invalid(
            "compute.watts",
            format!(
                "is {} W, below idle.watts ({} W): busy cannot draw less than idle",
                compute.watts, idle.watts
            ),
        ));
    }
    let radio_tx = match raw.radio_tx {
        Some(r) => Some(figure("radio_tx", "extra_watts", r.into(), &invalid)?),
        None => None,
    };
    let radio_rx = match raw.radio_rx {
        Some(r) => Some(figure("radio_rx", "extra_watts", r.into(), &invalid)?),
        None => None,
    };
    Ok(PowerProfile {
        name: raw.name,
        board: raw.board,
        idle,
        compute,
        radio_tx,
        radio_rx,
        path: None,
    })
}

impl From<RawAbsolute> for Figure {
    fn from(r: RawAbsolute) -> Figure {
        Figure {
            watts: r.watts,
            kind: r.kind,
            source: r.source,
            note: r.note,
        }
    }
}

impl From<RawExtra> for Figure {
    fn from(r: RawExtra) -> Figure {
        Figure {
            watts: r.extra_watts,
            kind: r.kind,
            source: r.source,
            note: r.note,
        }
    }
}

fn figure(
    table: &str,
    field: &str,
    f: Figure,
    invalid: &dyn Fn(&str, String) -> ProfileError,
) -> Result<Figure, ProfileError> {
    let key = format!("{table}.{field}");
    if !f.watts.is_finite() || f.watts < 0.0 {
        return Err(invalid(
            &key,
            format!("is {}: must be a finite number ≥ 0", f.watts),
        ));
    }
    if f.watts > MAX_PLAUSIBLE_WATTS {
        return Err(invalid(
            &key,
            format!(
                "is {} W: more than {MAX_PLAUSIBLE_WATTS} W (milliwatts given as watts?)",
                f.watts
            ),
        ));
    }
    if f.source.trim().is_empty() {
        return Err(invalid(
            &format!("{table}.source"),
            "is empty: every figure needs its source".into(),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "test-board"
board = "Test Board"
[idle]
watts = 2.0
kind = "vendor-spec"
source = "datasheet p. 3"
[compute]
watts = 5.0
kind = "third-party-measurement"
source = "someone's blog"
note = "stress --cpu 4"
[radio_tx]
extra_watts = 0.5
kind = "estimate"
source = "guess from chip datasheet"
"#;

    #[test]
    fn parses_a_profile_with_its_sources() {
        let p = PowerProfile::from_toml_str(GOOD).unwrap();
        assert_eq!(p.name, "test-board");
        assert_eq!(p.idle.watts, 2.0);
        assert_eq!(p.idle.kind, SourceKind::VendorSpec);
        assert_eq!(p.compute.watts, 5.0);
        assert_eq!(p.compute.note.as_deref(), Some("stress --cpu 4"));
        assert_eq!(p.radio_tx.as_ref().map(|f| f.watts), Some(0.5));
        assert_eq!(
            p.radio_tx.as_ref().map(|f| f.kind),
            Some(SourceKind::Estimate)
        );
        assert!(p.radio_rx.is_none());
        assert!(!p.knows_radio());
        assert!(p.path.is_none());
    }

    #[test]
    fn shipped_profiles_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/profiles");
        for name in ["raspberry-pi-4", "jetson-nano"] {
            let path = dir.join(format!("{name}.toml"));
            let p = PowerProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.name, name);
            assert_eq!(p.path.as_deref(), Some(path.as_path()));
            assert!(p.compute.watts > p.idle.watts);
        }
    }

    fn error_of(text: &str) -> String {
        PowerProfile::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn a_figure_without_a_source_is_refused() {
        let text = GOOD.replace("source = \"datasheet p. 3\"", "source = \"  \"");
        let e = error_of(&text);
        assert!(
            e.contains("`idle.source`") && e.contains("needs its source"),
            "{e}"
        );
        let text = GOOD.replace("source = \"datasheet p. 3\"\n", "");
        let e = error_of(&text);
        assert!(e.contains("source"), "{e}");
    }

    #[test]
    fn bad_numbers_name_their_key() {
        let e = error_of(&GOOD.replace("watts = 2.0", "watts = -1.0"));
        assert!(e.contains("`idle.watts`") && e.contains("≥ 0"), "{e}");
        let e = error_of(&GOOD.replace("watts = 2.0", "watts = nan"));
        assert!(e.contains("`idle.watts`"), "{e}");
        let e = error_of(&GOOD.replace("watts = 5.0", "watts = 5000.0"));
        assert!(
            e.contains("`compute.watts`") && e.contains("milliwatts"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("watts = 5.0", "watts = 1.0"));
        assert!(
            e.contains("`compute.watts`") && e.contains("below idle"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("extra_watts = 0.5", "extra_watts = -0.5"));
        assert!(e.contains("`radio_tx.extra_watts`"), "{e}");
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        let e = error_of(&GOOD.replace("[radio_tx]", "idle_w = 3.0\n[radio_tx]"));
        assert!(e.contains("idle_w") && e.contains("<string>"), "{e}");
        let e = error_of(&GOOD.replace("extra_watts = 0.5", "watts = 0.5"));
        assert!(e.contains("watts"), "{e}");
        let e = error_of(&GOOD.replace("kind = \"estimate\"", "kind = \"guess\""));
        assert!(e.contains("guess"), "{e}");
        let e = error_of(&GOOD.replace("name = \"test-board\"", "name = \"a b\""));
        assert!(e.contains("`name`"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, GOOD.replace("watts = 2.0", "watts = \"two\"")).unwrap();
        let e = PowerProfile::load(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("watts"), "{e}");
        let e = PowerProfile::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(e, ProfileError::Read { .. }), "{e}");
        assert!(e.to_string().contains("absent.toml"), "{e}");
    }
}
