//! Feature codec: turns the head's bottleneck tensor into the bytes that cross the uplink, and
//! back, as small as the information in the features allows.
//!
//! # Brief overview
//!
//! A frame is made in three steps. A [`Quantizer`] maps the `f32` tensor to integer symbols:
//! affine at 2–8 bits with the bundle's calibrated clipping ranges, affine with ranges fitted
//! to the frame (for bundles never calibrated), or integer symbols around the medians of a
//! learned CompressAI `EntropyBottleneck`. A codec turns the symbols into a payload: [`ans`]
//! entropy codes them under the bundle's [`Prior`] (static per-channel histograms or the
//! learned CDFs), `zstd` and `raw` (bit-packed) are the fallbacks. The frame format wraps the
//! payload in a 23-byte header (plus a checksum) that names the bundle, the table and the codec
//! (`docs/frame-format.md`).
//!
//! [`CodingTables`] holds what head and tail share through the bundle (`docs/coding-tables.md`);
//! [`FrameEncoder`] makes frames with it, and picks the bit depth that fits a byte budget
//! ([`FrameEncoder::encode_within`]); [`FrameDecoder`] checks untrusted bytes and restores the
//! symbols.
//!
//! This crate does no I/O and knows nothing of models or networks. Decoding never panics and
//! never allocates more than [`Limits`] allow, whatever the bytes claim: every malformed frame
//! is a typed [`FrameError`].
//!
//! ```
//! use cleave_codec::{BundleId, Choice, Codec, FrameDecoder, FrameEncoder, Granularity, Limits};
//!
//! let tensor: Vec<f32> = (0..2 * 3 * 3).map(|i| i as f32 * 0.5 - 2.0).collect();
//! let bundle = BundleId::from_bytes([7; 32]);
//! let encoder = FrameEncoder::new(bundle.tag(), None);
//! let choice = Choice::Inline { bits: 8, granularity: Granularity::PerChannel, codec: Codec::Zstd };
//! let frame = encoder.encode(&tensor, &[2, 3, 3], choice).unwrap();
//! let decoded = FrameDecoder::new(None, Limits::default()).decode(&frame.bytes).unwrap();
//! assert_eq!(decoded.header.bundle_tag, bundle.tag());
//! let restored = decoded.dequantize().unwrap();
//! assert!(restored.iter().zip(&tensor).all(|(a, b)| (a - b).abs() < 0.01));
//! ```

pub mod ans;
mod bundle_id;
mod encoder;
mod frame;
pub mod offload;
mod pack;
mod prior;
mod quantize;
mod tables;

pub use bundle_id::{BundleId, BundleTag, ParseBundleIdError};
pub use encoder::{Choice, EncodedFrame, FrameEncoder};
pub use frame::{
    Codec, Coding, DecodedFrame, FORMAT_VERSION, FrameDecoder, FrameError, FrameHeader, Limits,
    MAGIC, peek_bundle_tag,
};
pub use prior::{BYPASS_BITS, MAX_CHANNELS, PRECISION, Prior, PriorError};
pub use quantize::{
    AffineRange, Granularity, INTEGER_SYMBOL_LIMIT, MAX_BITS, MIN_BITS, QuantError, Quantizer,
    max_symbol,
};
pub use tables::{CodingTables, Learned, Level, LevelRanges, TableError};
