//! What the fuzz targets and the seed writer share: the bundled model's real coding tables
//! and real bottleneck values, both compiled in so that a target needs no files at run time.

use cleave_codec::{CodingTables, LevelRanges};

/// The bundled model's manifest (calibrated clipping ranges per bit depth).
pub const MANIFEST: &str = include_str!("../../models/efficientnet-lite0-split/manifest.toml");
/// The bundled model's priors (static pmfs per bit depth, learned factorized CDFs).
pub const PRIORS: &str = include_str!("../../models/efficientnet-lite0-split/priors.json");
/// Real head outputs: 4 frames of [12, 16, 16] f32 little-endian (central crops of the
/// bundled head's bottleneck; the fourth is the first scaled far out of range).
pub const FEATURES: &[u8] = include_bytes!("../../codec/tests/data/compressai/features.f32");

/// Channels of the bundled bottleneck.
pub const CHANNELS: usize = 12;
/// Side of the crops in [`FEATURES`].
pub const CROP: usize = 16;
/// Frames in [`FEATURES`].
pub const FRAMES: usize = 4;

/// The calibrated levels the manifest lists.
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

/// The bundled model's coding tables, exactly as the engine builds them.
///
/// # Panics
///
/// If the bundled tables do not build (a build-time fixture, not input).
pub fn bundled_tables() -> CodingTables {
    let (channels, levels) = manifest_levels();
    assert_eq!(channels, CHANNELS, "the bundled bottleneck has 12 channels");
    CodingTables::new(channels, &levels, Some(PRIORS)).expect("bundled tables build")
}

/// Frame `frame` of [`FEATURES`]: a [12, 16, 16] tensor, row-major.
pub fn feature_frame(frame: usize) -> Vec<f32> {
    let len = CHANNELS * CROP * CROP;
    FEATURES[frame * len * 4..(frame + 1) * len * 4]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The central `side` × `side` window of every channel of a [12, 16, 16] frame.
pub fn center_crop(frame: &[f32], side: usize) -> Vec<f32> {
    let start = (CROP - side) / 2;
    let mut out = Vec::with_capacity(CHANNELS * side * side);
    for channel in frame.chunks_exact(CROP * CROP) {
        for row in channel.chunks_exact(CROP).skip(start).take(side) {
            out.extend_from_slice(&row[start..start + side]);
        }
    }
    out
}
