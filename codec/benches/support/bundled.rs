//! The bundled model's coding tables, compiled in, for the codec benchmark and the fuzz
//! targets (`fuzz/src/lib.rs` includes this file by path). Built as the engine builds them:
//! the manifest's calibrated levels plus `priors.json`.

use cleave_codec::{BundleId, CodingTables, LevelRanges};

/// The bundled model's manifest (calibrated clipping ranges per bit depth, the bundle id).
pub const MANIFEST: &str = include_str!("../../../models/efficientnet-lite0-split/manifest.toml");
/// The bundled model's priors (static pmfs per bit depth, learned factorized CDFs).
pub const PRIORS: &str = include_str!("../../../models/efficientnet-lite0-split/priors.json");

/// The bottleneck's channel count and the calibrated levels the manifest lists.
///
/// # Panics
///
/// If the compiled-in manifest is not the documented TOML (a build-time fixture, not input).
pub fn manifest_levels() -> (usize, Vec<LevelRanges>) {
    let manifest: toml::Table = MANIFEST.parse().expect("bundled manifest is TOML");
    let bottleneck = &manifest["bottleneck"];
    let channels = bottleneck["shape"][0]
        .as_integer()
        .expect("bottleneck.shape[0] is an integer") as usize;
    let floats = |v: &toml::Value| -> Vec<f32> {
        v.as_array()
            .expect("a list of floats")
            .iter()
            .map(|x| x.as_float().expect("a float") as f32)
            .collect()
    };
    let levels = bottleneck["quantization"]["levels"]
        .as_array()
        .expect("bottleneck.quantization.levels is a list")
        .iter()
        .map(|level| LevelRanges {
            bits: level["bits"].as_integer().expect("bits is an integer") as u8,
            low: floats(&level["low"]),
            high: floats(&level["high"]),
        })
        .collect();
    (channels, levels)
}

/// The bundled model's coding tables.
///
/// # Panics
///
/// If the bundled tables do not build (a build-time fixture, not input).
pub fn bundled_tables() -> CodingTables {
    let (channels, levels) = manifest_levels();
    CodingTables::new(channels, &levels, Some(PRIORS)).expect("bundled tables build")
}

/// The bundle id the manifest states.
///
/// # Panics
///
/// If the manifest has no well-formed `id` line.
pub fn bundle_id() -> BundleId {
    MANIFEST
        .lines()
        .find_map(|l| l.strip_prefix("id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the manifest has an id line")
        .parse()
        .expect("the manifest id is 64 hex digits")
}
