//! What the fuzz targets and the seed writer share: the bundled model's real coding tables
//! and real bottleneck values, both compiled in so that a target needs no files at run time.

#[path = "../../codec/benches/support/bundled.rs"]
mod bundled;

pub use bundled::{MANIFEST, PRIORS, bundle_id, bundled_tables, manifest_levels};

/// Real head outputs: 4 frames of [12, 16, 16] f32 little-endian (central crops of the
/// bundled head's bottleneck; the fourth is the first scaled far out of range).
pub const FEATURES: &[u8] = include_bytes!("../../codec/tests/data/compressai/features.f32");

/// Channels of the bundled bottleneck.
pub const CHANNELS: usize = 12;
/// Side of the crops in [`FEATURES`].
pub const CROP: usize = 16;
/// Frames in [`FEATURES`].
pub const FRAMES: usize = 4;

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
