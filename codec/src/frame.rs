//! The feature frame: a versioned, checksummed container for one quantized tensor.
//!
//! Layout (version 0, all integers little-endian; `docs/frame-format.md` has the table):
//!
//! ```text
//! magic "CLVF" | version u8 | codec u8 | granularity u8 | bits u8 | bundle id [32]
//! | rank u8 | reserved [3] | dims u32 × rank | (min f32, scale f32) × groups
//! | payload length u32 | payload | crc32 u32 (over every byte before it)
//! ```
//!
//! Decoding treats the bytes as hostile: lengths and element counts are checked against
//! [`Limits`] and against each other before any buffer is sized from them, and the payload is
//! decompressed into a buffer of exactly the declared element count, never more.

use crate::{BundleId, Granularity, Quantized};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"CLVF";
/// The frame format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 0;
/// Bytes before the dims: magic, version, codec, granularity, bits, bundle id, rank, reserved.
const FIXED_HEADER: usize = 4 + 4 + 32 + 4;
/// Most axes a frame's tensor may have.
const MAX_RANK: usize = 4;
/// Level used for zstd; chosen for speed on a weak CPU (see the benchmark in cleave-bench).
const ZSTD_LEVEL: i32 = 3;

/// How the payload's symbols are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// The symbols as they are, one byte each.
    Raw,
    /// The symbols compressed with zstd.
    Zstd,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }

    fn from_id(id: u8) -> Result<Self, FrameError> {
        match id {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            other => Err(FrameError::UnknownCodec(other)),
        }
    }

    /// The name used in manifests and reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
        }
    }

    /// Parses a manifest name (`raw`, `zstd`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(Codec::Raw),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Bounds a decoder enforces before trusting what a frame declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Largest tensor accepted, in elements.
    pub max_elements: usize,
}

impl Default for Limits {
    /// 16 MiB frames, 16 Mi elements: far above any bottleneck, far below an OOM.
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_elements: 16 << 20,
        }
    }
}

/// What a frame's header says.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameHeader {
    /// Format version.
    pub version: u8,
    /// Payload codec.
    pub codec: Codec,
    /// The bundle whose head produced the tensor.
    pub bundle_id: BundleId,
    /// Tensor shape.
    pub shape: Vec<usize>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedFrame {
    /// The header fields.
    pub header: FrameHeader,
    /// The tensor's symbols and quantization parameters.
    pub quantized: Quantized,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the header needs, or than the header declares.
    #[error("frame truncated: needs at least {needed} bytes, has {actual}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The frame is larger than the decoder accepts.
    #[error("frame of {actual} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Bytes present.
        actual: usize,
        /// The limit.
        limit: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("not a feature frame: magic {0:02x?}, expected \"CLVF\"")]
    BadMagic([u8; 4]),
    /// A version this decoder does not read.
    #[error("unsupported frame version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// A codec id this decoder does not know.
    #[error("unknown codec id {0} (known: 0 raw, 1 zstd)")]
    UnknownCodec(u8),
    /// A granularity id this decoder does not know.
    #[error("unknown quantization granularity {0} (known: 0 per tensor, 1 per channel)")]
    UnknownGranularity(u8),
    /// A bit depth this decoder does not read.
    #[error("unsupported bit depth {0} (version 0 carries 8-bit symbols)")]
    UnsupportedBits(u8),
    /// Rank 0, above the maximum, or a zero-length axis.
    #[error("bad tensor shape {0:?}")]
    BadShape(Vec<u64>),
    /// The declared tensor is larger than the decoder accepts.
    #[error("tensor of {declared} elements exceeds the limit of {limit}")]
    TooManyElements {
        /// Elements the shape declares.
        declared: u128,
        /// The limit.
        limit: usize,
    },
    /// A quantization parameter is NaN, infinite, or a scale is not positive.
    #[error("bad quantization parameters for group {group}: min {min}, scale {scale}")]
    BadParams {
        /// Group index.
        group: usize,
        /// Declared minimum.
        min: f32,
        /// Declared scale.
        scale: f32,
    },
    /// The declared payload length does not match the bytes present.
    #[error("payload length {declared} does not match the {actual} bytes in the frame")]
    PayloadLength {
        /// Declared length.
        declared: u64,
        /// Bytes actually between header and checksum.
        actual: usize,
    },
    /// The checksum does not match: the frame was damaged.
    #[error("checksum mismatch: frame says {stored:08x}, bytes give {computed:08x}")]
    Checksum {
        /// Checksum in the frame.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// The payload does not decompress to exactly the declared element count.
    #[error("payload does not decode to {expected} symbols: {reason}")]
    Payload {
        /// Symbols expected.
        expected: usize,
        /// What went wrong.
        reason: String,
    },
    /// The tensor given to the encoder has a rank this format cannot carry.
    #[error("cannot encode a tensor of rank {0} (1 to {MAX_RANK} axes)")]
    UnencodableRank(usize),
}

/// Encodes a quantized tensor as a frame for `bundle_id`.
///
/// # Errors
///
/// [`FrameError::UnencodableRank`] for a tensor of no or more than four axes, and
/// [`FrameError::Payload`] if the compressor fails.
pub fn encode_frame(
    bundle_id: &BundleId,
    quantized: &Quantized,
    codec: Codec,
) -> Result<Vec<u8>, FrameError> {
    let rank = quantized.shape.len();
    if rank == 0 || rank > MAX_RANK {
        return Err(FrameError::UnencodableRank(rank));
    }
    let payload = match codec {
        Codec::Raw => quantized.symbols.clone(),
        Codec::Zstd => zstd::bulk::compress(&quantized.symbols, ZSTD_LEVEL).map_err(|e| {
            FrameError::Payload {
                expected: quantized.symbols.len(),
                reason: e.to_string(),
            }
        })?,
    };
    let header_len = FIXED_HEADER + 4 * rank + 8 * quantized.params.len() + 4;
    let mut out = Vec::with_capacity(header_len + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(codec.id());
    out.push(match quantized.granularity {
        Granularity::PerTensor => 0,
        Granularity::PerChannel => 1,
    });
    out.push(8);
    out.extend_from_slice(bundle_id.as_bytes());
    out.push(rank as u8);
    out.extend_from_slice(&[0; 3]);
    for &dim in &quantized.shape {
        out.extend_from_slice(&(dim as u32).to_le_bytes());
    }
    for &(min, scale) in &quantized.params {
        out.extend_from_slice(&min.to_le_bytes());
        out.extend_from_slice(&scale.to_le_bytes());
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A cursor over untrusted bytes that reports truncation instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(FrameError::Truncated {
                needed: self.at.saturating_add(n),
                actual: self.bytes.len(),
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, FrameError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

/// Decodes and checks a frame from untrusted bytes.
///
/// # Errors
///
/// A [`FrameError`] naming the first problem found; the checks run in the order of the
/// layout, and the checksum is verified before the payload is decompressed.
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<DecodedFrame, FrameError> {
    if bytes.len() > limits.max_frame_bytes {
        return Err(FrameError::TooLarge {
            actual: bytes.len(),
            limit: limits.max_frame_bytes,
        });
    }
    let mut r = Reader { bytes, at: 0 };
    let magic = r.array::<4>()?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let codec = Codec::from_id(r.u8()?)?;
    let granularity = match r.u8()? {
        0 => Granularity::PerTensor,
        1 => Granularity::PerChannel,
        other => return Err(FrameError::UnknownGranularity(other)),
    };
    let bits = r.u8()?;
    if bits != 8 {
        return Err(FrameError::UnsupportedBits(bits));
    }
    let bundle_id = BundleId::from_bytes(r.array()?);
    let rank = usize::from(r.u8()?);
    r.take(3)?;
    if rank == 0 || rank > MAX_RANK {
        return Err(FrameError::BadShape(vec![rank as u64]));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(u64::from(r.u32()?));
    }
    let declared: u128 = dims.iter().map(|&d| u128::from(d)).product();
    if dims.contains(&0) {
        return Err(FrameError::BadShape(dims));
    }
    if declared > limits.max_elements as u128 {
        return Err(FrameError::TooManyElements {
            declared,
            limit: limits.max_elements,
        });
    }
    let elements = declared as usize;
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let groups = match granularity {
        Granularity::PerTensor => 1,
        Granularity::PerChannel => shape[0],
    };
    // Each group costs 8 header bytes, so this check bounds the allocation below by the
    // frame's own length.
    let params_len = groups.saturating_mul(8);
    if params_len > bytes.len() {
        return Err(FrameError::Truncated {
            needed: params_len,
            actual: bytes.len(),
        });
    }
    let mut params = Vec::with_capacity(groups);
    for group in 0..groups {
        let (min, scale) = (r.f32()?, r.f32()?);
        if !min.is_finite() || !scale.is_finite() || scale <= 0.0 {
            return Err(FrameError::BadParams { group, min, scale });
        }
        params.push((min, scale));
    }
    let payload_len = r.u32()?;
    let rest = bytes.len() - r.at;
    if rest < 4 || u64::from(payload_len) != (rest - 4) as u64 {
        return Err(FrameError::PayloadLength {
            declared: u64::from(payload_len),
            actual: rest.saturating_sub(4),
        });
    }
    let payload = r.take(payload_len as usize)?;
    let stored = r.u32()?;
    let computed = crc32fast::hash(&bytes[..bytes.len() - 4]);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    let symbols = match codec {
        Codec::Raw => payload.to_vec(),
        Codec::Zstd => decompress_exact(payload, elements)?,
    };
    if symbols.len() != elements {
        return Err(FrameError::Payload {
            expected: elements,
            reason: format!("got {} symbols", symbols.len()),
        });
    }
    Ok(DecodedFrame {
        header: FrameHeader {
            version,
            codec,
            bundle_id,
            shape: shape.clone(),
        },
        quantized: Quantized {
            shape,
            granularity,
            params,
            symbols,
        },
    })
}

/// Decompresses a zstd payload into at most `expected` bytes.
fn decompress_exact(payload: &[u8], expected: usize) -> Result<Vec<u8>, FrameError> {
    zstd::bulk::decompress(payload, expected).map_err(|e| FrameError::Payload {
        expected,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize;
    use proptest::prelude::*;

    fn sample(codec: Codec) -> Vec<u8> {
        let data: Vec<f32> = (0..4 * 5 * 5)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let q = quantize(&data, &[4, 5, 5], Granularity::PerChannel).unwrap();
        encode_frame(&BundleId::from_bytes([9; 32]), &q, codec).unwrap()
    }

    #[test]
    fn round_trip_both_codecs() {
        for codec in [Codec::Raw, Codec::Zstd] {
            let bytes = sample(codec);
            let frame = decode_frame(&bytes, &Limits::default()).unwrap();
            assert_eq!(frame.header.codec, codec);
            assert_eq!(frame.header.shape, vec![4, 5, 5]);
            assert_eq!(frame.quantized.symbols.len(), 100);
        }
    }

    #[test]
    fn every_flipped_bit_is_an_error() {
        let bytes = sample(Codec::Zstd);
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(
                decode_frame(&damaged, &Limits::default()).is_err(),
                "bit {i} not caught"
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample(Codec::Raw);
        for len in 0..bytes.len() {
            assert!(
                decode_frame(&bytes[..len], &Limits::default()).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn huge_declared_shape_is_refused_before_allocation() {
        // A short frame that claims 2^40 elements.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&[FORMAT_VERSION, 1, 0, 8]);
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&[2, 0, 0, 0]);
        bytes.extend_from_slice(&(1u32 << 20).to_le_bytes());
        bytes.extend_from_slice(&(1u32 << 20).to_le_bytes());
        assert!(matches!(
            decode_frame(&bytes, &Limits::default()),
            Err(FrameError::TooManyElements { declared, .. }) if declared == 1 << 40
        ));
    }

    #[test]
    fn many_channels_in_a_short_frame_are_refused() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&[FORMAT_VERSION, 0, 1, 8]);
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&(1u32 << 23).to_le_bytes());
        assert!(matches!(
            decode_frame(&bytes, &Limits::default()),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn limits_are_enforced() {
        let bytes = sample(Codec::Raw);
        let small = Limits {
            max_frame_bytes: 50,
            ..Limits::default()
        };
        assert!(matches!(
            decode_frame(&bytes, &small),
            Err(FrameError::TooLarge { .. })
        ));
        let few = Limits {
            max_elements: 99,
            ..Limits::default()
        };
        assert!(matches!(
            decode_frame(&bytes, &few),
            Err(FrameError::TooManyElements { .. })
        ));
    }

    #[test]
    fn unknown_version_and_codec_are_named() {
        let mut bytes = sample(Codec::Raw);
        bytes[4] = 9;
        assert_eq!(
            decode_frame(&bytes, &Limits::default()),
            Err(FrameError::UnsupportedVersion(9))
        );
        let mut bytes = sample(Codec::Raw);
        bytes[5] = 7;
        assert_eq!(
            decode_frame(&bytes, &Limits::default()),
            Err(FrameError::UnknownCodec(7))
        );
    }

    proptest! {
        #[test]
        fn round_trip_is_exact_at_symbol_level(
            shape in proptest::collection::vec(1usize..7, 1..=4),
            values in proptest::collection::vec(-50.0f32..50.0, 1..64),
            zstd in any::<bool>(),
            per_channel in any::<bool>(),
            id in any::<[u8; 32]>(),
        ) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = values.iter().cycle().take(n).copied().collect();
            let granularity = if per_channel { Granularity::PerChannel } else { Granularity::PerTensor };
            let q = quantize(&data, &shape, granularity).unwrap();
            let codec = if zstd { Codec::Zstd } else { Codec::Raw };
            let bytes = encode_frame(&BundleId::from_bytes(id), &q, codec).unwrap();
            let frame = decode_frame(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(frame.header.bundle_id, BundleId::from_bytes(id));
            prop_assert_eq!(frame.quantized, q);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, &Limits::default());
        }

        #[test]
        fn valid_header_with_garbage_after_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..256),
            cut in 0usize..200,
        ) {
            let mut bytes = sample(Codec::Zstd);
            bytes.truncate(cut.min(bytes.len()));
            bytes.extend_from_slice(&tail);
            let _ = decode_frame(&bytes, &Limits::default());
        }
    }
}
