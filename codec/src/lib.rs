//! Feature codec: turns the head's bottleneck tensor into the bytes that cross the uplink, and
//! back.
//!
//! # Brief overview
//!
//! A frame is made in two steps. [`quantize`] maps an `f32` tensor to 8-bit symbols with an
//! affine map per tensor or per channel ([`Quantized`]); [`encode_frame`] wraps the symbols in
//! the versioned frame format ([`FrameHeader`], see `docs/frame-format.md`), compressing them
//! with a [`Codec`]. On the other side [`decode_frame`] checks and parses untrusted bytes into
//! a [`Quantized`] again, and [`Quantized::dequantize`] restores the tensor.
//!
//! This crate does no I/O and knows nothing of models or networks. Decoding never panics and
//! never allocates more than [`Limits`] allow, whatever the bytes claim: every malformed frame
//! is a typed [`FrameError`].
//!
//! ```
//! use cleave_codec::{BundleId, Codec, Granularity, Limits, decode_frame, encode_frame, quantize};
//!
//! let tensor: Vec<f32> = (0..2 * 3 * 3).map(|i| i as f32 * 0.5 - 2.0).collect();
//! let q = quantize(&tensor, &[2, 3, 3], Granularity::PerChannel).unwrap();
//! let bundle = BundleId::from_bytes([7; 32]);
//! let bytes = encode_frame(&bundle, &q, Codec::Zstd).unwrap();
//! let frame = decode_frame(&bytes, &Limits::default()).unwrap();
//! assert_eq!(frame.header.bundle_id, bundle);
//! let restored = frame.quantized.dequantize();
//! assert!(restored.iter().zip(&tensor).all(|(a, b)| (a - b).abs() < 0.01));
//! ```

mod bundle_id;
mod frame;
mod quantize;

pub use bundle_id::{BundleId, ParseBundleIdError};
pub use frame::{
    Codec, DecodedFrame, FORMAT_VERSION, FrameError, FrameHeader, Limits, MAGIC, decode_frame,
    encode_frame,
};
pub use quantize::{Granularity, QuantError, Quantized, quantize};
