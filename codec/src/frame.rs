//! The feature frame, version 1: a small checksummed header and one coded tensor.
//!
//! Layout (little-endian; `docs/frame-format.md` has the table and the reasons):
//!
//! ```text
//! magic "CLVF" | version u8 | flags u8 | codec u8 | bits u8 | table u8 | bundle tag [8]
//! | rank u8 | dims varint × rank | [inline: granularity u8, (min f32, step f32) × groups]
//! | payload length varint | payload | crc32 u32 (over every byte before it)
//! ```
//!
//! A frame coded with the bundle's tables carries no quantization parameters: the bundled
//! model's 12×28×28 frame has a 23-byte header and a 4-byte checksum.
//!
//! Decoding treats the bytes as hostile: every length and element count is checked against
//! [`Limits`] and against the bytes present before anything is sized from it.

use crate::ans;
use crate::pack;
use crate::quantize::{AffineRange, Granularity, MAX_BITS, MIN_BITS, Quantizer, max_symbol};
use crate::tables::CodingTables;
use crate::{BundleTag, QuantError};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"CLVF";
/// The frame format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Flag: the frame carries its own quantization ranges.
const FLAG_INLINE: u8 = 1;
/// Most axes a frame's tensor may have.
pub(crate) const MAX_RANK: usize = 4;

/// How the payload's symbols are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// Bit-packed at the frame's bit depth.
    Raw,
    /// One byte per symbol, compressed with zstd.
    Zstd,
    /// ANS entropy coding under the bundle's prior for the frame's table.
    Ans,
}

impl Codec {
    /// Every codec, in id order.
    pub const ALL: [Codec; 3] = [Codec::Raw, Codec::Zstd, Codec::Ans];

    fn id(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::Ans => 2,
        }
    }

    fn from_id(id: u8) -> Result<Self, FrameError> {
        Codec::ALL
            .into_iter()
            .find(|c| c.id() == id)
            .ok_or(FrameError::UnknownCodec(id))
    }

    /// The name used in manifests, flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::Ans => "ans",
        }
    }

    /// Parses a name (`raw`, `zstd`, `ans`).
    pub fn from_name(name: &str) -> Option<Self> {
        Codec::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Which quantizer and prior a frame was coded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    /// Affine at `bits`, ranges fitted to this frame and carried in it (no tables needed).
    Inline {
        /// Bit depth.
        bits: u8,
    },
    /// The bundle's calibrated level at `bits`: its clipping ranges and static prior.
    Calibrated {
        /// Bit depth.
        bits: u8,
    },
    /// The bundle's learned factorized prior (integer symbols).
    Learned,
}

impl Coding {
    fn table_id(self) -> u8 {
        match self {
            Coding::Inline { .. } => 0,
            Coding::Calibrated { .. } => 1,
            Coding::Learned => 2,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Coding::Inline { bits } | Coding::Calibrated { bits } => bits,
            Coding::Learned => 0,
        }
    }
}

impl std::fmt::Display for Coding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Coding::Inline { bits } => write!(f, "{bits}-bit inline"),
            Coding::Calibrated { bits } => write!(f, "{bits}-bit calibrated"),
            Coding::Learned => write!(f, "learned prior"),
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
    /// Quantizer and prior.
    pub coding: Coding,
    /// The bundle whose head produced the tensor.
    pub bundle_tag: BundleTag,
    /// Tensor shape.
    pub shape: Vec<usize>,
}

/// A decoded frame: its header, its symbols and the quantizer that restores them.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedFrame {
    /// The header fields.
    pub header: FrameHeader,
    /// One symbol per element, row-major.
    pub symbols: Vec<i32>,
    /// The quantizer the symbols were made with.
    pub quantizer: Quantizer,
}

impl DecodedFrame {
    /// Restores the tensor.
    ///
    /// # Errors
    ///
    /// [`QuantError::Channels`] only if the fields were changed after decoding so that the
    /// quantizer no longer fits the shape (the decoder checks that they fit).
    pub fn dequantize(&self) -> Result<Vec<f32>, QuantError> {
        self.quantizer.dequantize(&self.symbols, &self.header.shape)
    }
}

/// Why bytes are not a valid frame, or a tensor could not be made into one.
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
    /// Flag bits this decoder does not know.
    #[error("unknown frame flags {0:#04x} (known: 0x01 inline parameters)")]
    UnknownFlags(u8),
    /// A codec id this decoder does not know.
    #[error("unknown codec id {0} (known: 0 raw, 1 zstd, 2 ans)")]
    UnknownCodec(u8),
    /// A table id this decoder does not know.
    #[error("unknown coding table id {0} (known: 0 inline, 1 calibrated, 2 learned)")]
    UnknownTable(u8),
    /// Fields that contradict each other, or a codec that cannot code this kind of symbol.
    #[error("inconsistent header: {0}")]
    Inconsistent(String),
    /// The frame was coded for another bundle than the decoder's.
    #[error("frame coded for bundle {frame}…, this decoder's bundle is {expected}…")]
    BundleMismatch {
        /// The tag in the frame.
        frame: BundleTag,
        /// The decoder's bundle tag.
        expected: BundleTag,
    },
    /// A granularity id this decoder does not know.
    #[error("unknown quantization granularity {0} (known: 0 per tensor, 1 per channel)")]
    UnknownGranularity(u8),
    /// The frame needs a coding table this decoder's bundle does not have.
    #[error("frame is coded with the bundle's {0}, which this decoder's bundle does not have")]
    MissingTable(Coding),
    /// Rank 0, above the maximum, or a zero-length axis.
    #[error("bad tensor shape {0:?}")]
    BadShape(Vec<u64>),
    /// A length field is not a valid varint.
    #[error("bad varint at byte {0}")]
    BadVarint(usize),
    /// The declared tensor is larger than the decoder accepts.
    #[error("tensor of {declared} elements exceeds the limit of {limit}")]
    TooManyElements {
        /// Elements the shape declares.
        declared: u128,
        /// The limit.
        limit: usize,
    },
    /// The shape does not fit the coding table.
    #[error("shape {shape:?} does not fit the bundle's {coding}: {reason}")]
    TableShape {
        /// The frame's shape.
        shape: Vec<usize>,
        /// The table.
        coding: Coding,
        /// What does not fit.
        reason: String,
    },
    /// An inline range is NaN, infinite, or has a step that is not positive.
    #[error("bad quantization parameters for group {group}: min {min}, step {step}")]
    BadParams {
        /// Group index.
        group: usize,
        /// Declared minimum.
        min: f32,
        /// Declared step.
        step: f32,
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
    /// The payload does not decode to exactly the declared symbols.
    #[error("payload does not decode to {expected} symbols: {reason}")]
    Payload {
        /// Symbols expected.
        expected: usize,
        /// What went wrong.
        reason: String,
    },
    /// The tensor given to the encoder cannot be quantized.
    #[error("cannot quantize: {0}")]
    Quantize(#[from] QuantError),
    /// The tensor given to the encoder has a shape this format cannot carry.
    #[error("cannot encode a tensor of shape {0:?} (1 to {MAX_RANK} axes, each below 2^32)")]
    UnencodableShape(Vec<usize>),
    /// The coder refused the symbols (a symbol outside a table without escape, or an
    /// escape too large).
    #[error("cannot code the symbols: {0}")]
    Encode(String),
    /// Rate control was asked of a bundle without calibrated levels.
    #[error("a byte budget needs the bundle's calibrated levels; this bundle has none")]
    Uncalibrated,
    /// No calibrated level fits the byte budget.
    #[error("no bit depth fits {budget} bytes; the smallest frame is {smallest} bytes")]
    OverBudget {
        /// The budget.
        budget: usize,
        /// The smallest frame the tables allow.
        smallest: usize,
    },
}

/// What [`write_frame`] lays out.
pub(crate) struct FrameParts<'a> {
    pub(crate) codec: Codec,
    pub(crate) coding: Coding,
    pub(crate) tag: BundleTag,
    pub(crate) shape: &'a [usize],
    /// `Some` for inline coding: the granularity and its ranges.
    pub(crate) inline: Option<(Granularity, &'a [AffineRange])>,
    pub(crate) payload: &'a [u8],
}

/// Lays out a frame.
pub(crate) fn write_frame(parts: &FrameParts<'_>) -> Result<Vec<u8>, FrameError> {
    let rank = parts.shape.len();
    if rank == 0 || rank > MAX_RANK {
        return Err(FrameError::UnencodableShape(parts.shape.to_vec()));
    }
    let mut out = Vec::with_capacity(32 + parts.payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(if parts.inline.is_some() {
        FLAG_INLINE
    } else {
        0
    });
    out.push(parts.codec.id());
    out.push(parts.coding.bits());
    out.push(parts.coding.table_id());
    out.extend_from_slice(&parts.tag.0);
    out.push(rank as u8);
    for &dim in parts.shape {
        write_varint(&mut out, dim as u64);
    }
    if let Some((granularity, ranges)) = parts.inline {
        out.push(match granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel => 1,
        });
        for range in ranges {
            out.extend_from_slice(&range.min.to_le_bytes());
            out.extend_from_slice(&range.step.to_le_bytes());
        }
    }
    write_varint(&mut out, parts.payload.len() as u64);
    out.extend_from_slice(parts.payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
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

    fn f32(&mut self) -> Result<f32, FrameError> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    /// A LEB128 varint of at most 32 bits, in its shortest form.
    fn varint(&mut self) -> Result<u32, FrameError> {
        let start = self.at;
        let mut value: u64 = 0;
        for i in 0..5 {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                let overlong = i > 0 && byte == 0;
                return u32::try_from(value)
                    .ok()
                    .filter(|_| !overlong)
                    .ok_or(FrameError::BadVarint(start));
            }
        }
        Err(FrameError::BadVarint(start))
    }
}

/// The bundle tag of a frame, read from its header without decoding or checking anything
/// else: enough for a server to pick the bundle's decoder, which then checks everything.
///
/// # Errors
///
/// [`FrameError::Truncated`] or [`FrameError::BadMagic`] for bytes too short to hold a tag
/// or that are not a frame.
pub fn peek_bundle_tag(bytes: &[u8]) -> Result<BundleTag, FrameError> {
    // magic 4, version, flags, codec, bits, table: the tag starts at byte 9.
    const AT: usize = 9;
    let tag = bytes.get(AT..AT + 8).ok_or(FrameError::Truncated {
        needed: AT + 8,
        actual: bytes.len(),
    })?;
    let magic: [u8; 4] = bytes[..4].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(tag);
    Ok(BundleTag(out))
}

/// Decodes frames for one bundle: checks untrusted bytes and restores their symbols with the
/// bundle's coding tables (or the frame's own parameters).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    tables: Option<CodingTables>,
    limits: Limits,
    expected_tag: Option<BundleTag>,
}

impl FrameDecoder {
    /// A decoder with the bundle's tables (`None` for a bundle without calibration: only
    /// inline frames decode) and the given limits.
    pub fn new(tables: Option<CodingTables>, limits: Limits) -> Self {
        Self {
            tables,
            limits,
            expected_tag: None,
        }
    }

    /// Refuses frames whose bundle tag is not `tag`, right after the header and before any
    /// payload is decoded ([`FrameError::BundleMismatch`]).
    pub fn expecting(mut self, tag: BundleTag) -> Self {
        self.expected_tag = Some(tag);
        self
    }

    /// Decodes and checks a frame from untrusted bytes.
    ///
    /// # Errors
    ///
    /// A [`FrameError`] naming the first problem found; the checks run in the order of the
    /// layout, and the checksum is verified before the payload is decoded.
    pub fn decode(&self, bytes: &[u8]) -> Result<DecodedFrame, FrameError> {
        let limits = &self.limits;
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
        let flags = r.u8()?;
        if flags & !FLAG_INLINE != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let codec = Codec::from_id(r.u8()?)?;
        let bits = r.u8()?;
        let coding = header_coding(flags & FLAG_INLINE != 0, r.u8()?, bits, codec)?;
        let bundle_tag = BundleTag(r.array()?);
        if let Some(expected) = self.expected_tag.filter(|&t| t != bundle_tag) {
            return Err(FrameError::BundleMismatch {
                frame: bundle_tag,
                expected,
            });
        }
        let shape = read_shape(&mut r, limits)?;
        let elements: usize = shape.iter().product();
        let quantizer = match coding {
            Coding::Inline { bits } => read_inline(&mut r, bytes.len(), &shape, bits)?,
            _ => self.table_quantizer(coding, &shape)?,
        };
        let payload_len = r.varint()?;
        let rest = bytes.len() - r.at;
        if rest < 4 || u64::from(payload_len) != (rest - 4) as u64 {
            return Err(FrameError::PayloadLength {
                declared: u64::from(payload_len),
                actual: rest.saturating_sub(4),
            });
        }
        let payload = r.take(payload_len as usize)?;
        let stored = u32::from_le_bytes(r.array()?);
        let computed = crc32fast::hash(&bytes[..bytes.len() - 4]);
        if stored != computed {
            return Err(FrameError::Checksum { stored, computed });
        }
        let symbols = self.decode_payload(codec, coding, payload, elements)?;
        Ok(DecodedFrame {
            header: FrameHeader {
                version,
                codec,
                coding,
                bundle_tag,
                shape,
            },
            symbols,
            quantizer,
        })
    }

    fn table_quantizer(&self, coding: Coding, shape: &[usize]) -> Result<Quantizer, FrameError> {
        let (quantizer, _) = table(self.tables.as_ref(), coding, shape)?;
        Ok(quantizer.clone())
    }

    fn decode_payload(
        &self,
        codec: Codec,
        coding: Coding,
        payload: &[u8],
        elements: usize,
    ) -> Result<Vec<i32>, FrameError> {
        let payload_error = |reason: String| FrameError::Payload {
            expected: elements,
            reason,
        };
        let bits = coding.bits();
        let symbols = match codec {
            Codec::Raw => pack::unpack(payload, elements, bits).ok_or_else(|| {
                payload_error(format!(
                    "{} bytes is not {elements} symbols of {bits} bits",
                    payload.len()
                ))
            })?,
            Codec::Zstd => {
                let bytes = zstd::bulk::decompress(payload, elements)
                    .map_err(|e| payload_error(e.to_string()))?;
                if bytes.len() != elements {
                    return Err(payload_error(format!("got {} symbols", bytes.len())));
                }
                let top = max_symbol(bits);
                let symbols: Vec<i32> = bytes.into_iter().map(i32::from).collect();
                if let Some(bad) = symbols.iter().find(|&&s| s > top) {
                    return Err(payload_error(format!("symbol {bad} exceeds {bits} bits")));
                }
                symbols
            }
            Codec::Ans => {
                let (_, prior) = self
                    .tables
                    .as_ref()
                    .and_then(|t| t.table(coding))
                    .ok_or(FrameError::MissingTable(coding))?;
                ans::decode(prior, payload, elements).map_err(|e| payload_error(e.to_string()))?
            }
        };
        Ok(symbols)
    }
}

/// The coding a header's flags, table id, bit depth and codec describe, if they agree.
fn header_coding(inline: bool, table: u8, bits: u8, codec: Codec) -> Result<Coding, FrameError> {
    let inconsistent = |what: &str| Err(FrameError::Inconsistent(what.to_owned()));
    let coding = match table {
        0 if !inline => return inconsistent("table 0 (inline) without the inline flag"),
        0 => Coding::Inline { bits },
        _ if inline => return inconsistent("the inline flag with a bundle table"),
        1 => Coding::Calibrated { bits },
        2 if bits != 0 => return inconsistent("learned prior with a bit depth"),
        2 => Coding::Learned,
        other => return Err(FrameError::UnknownTable(other)),
    };
    check_combination(coding, codec)?;
    Ok(coding)
}

/// Whether `codec` can code `coding`'s symbols; the one place the rules live, for the encoder
/// and the decoder.
pub(crate) fn check_combination(coding: Coding, codec: Codec) -> Result<(), FrameError> {
    let inconsistent = |what: &str| Err(FrameError::Inconsistent(what.to_owned()));
    match coding {
        Coding::Learned if codec != Codec::Ans => {
            inconsistent("learned-prior symbols are coded only with ans")
        }
        Coding::Inline { .. } if codec == Codec::Ans => {
            inconsistent("ans needs the bundle's prior, an inline frame has none")
        }
        Coding::Inline { bits } | Coding::Calibrated { bits }
            if !(MIN_BITS..=MAX_BITS).contains(&bits) =>
        {
            inconsistent(&format!("bit depth {bits} outside {MIN_BITS}..={MAX_BITS}"))
        }
        _ => Ok(()),
    }
}

/// The quantizer and prior of a table coding, checked against the tensor's channels.
pub(crate) fn table<'t>(
    tables: Option<&'t CodingTables>,
    coding: Coding,
    shape: &[usize],
) -> Result<(&'t Quantizer, &'t crate::Prior), FrameError> {
    let tables = tables.ok_or(FrameError::MissingTable(coding))?;
    let found = tables
        .table(coding)
        .ok_or(FrameError::MissingTable(coding))?;
    if shape.first() != Some(&tables.channels()) {
        return Err(FrameError::TableShape {
            shape: shape.to_vec(),
            coding,
            reason: format!("the tables are for {} channels", tables.channels()),
        });
    }
    Ok(found)
}

fn read_shape(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<usize>, FrameError> {
    let rank = usize::from(r.u8()?);
    if rank == 0 || rank > MAX_RANK {
        return Err(FrameError::BadShape(vec![rank as u64]));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(u64::from(r.varint()?));
    }
    if dims.contains(&0) {
        return Err(FrameError::BadShape(dims));
    }
    let declared: u128 = dims.iter().map(|&d| u128::from(d)).product();
    if declared > limits.max_elements as u128 {
        return Err(FrameError::TooManyElements {
            declared,
            limit: limits.max_elements,
        });
    }
    Ok(dims.iter().map(|&d| d as usize).collect())
}

fn read_inline(
    r: &mut Reader<'_>,
    frame_len: usize,
    shape: &[usize],
    bits: u8,
) -> Result<Quantizer, FrameError> {
    let granularity = r.u8()?;
    let groups = match granularity {
        0 => 1,
        1 => shape[0],
        other => return Err(FrameError::UnknownGranularity(other)),
    };
    // Each group costs 8 bytes, so this bounds the allocation below by the frame's length.
    let needed = groups.saturating_mul(8);
    if needed > frame_len {
        return Err(FrameError::Truncated {
            needed,
            actual: frame_len,
        });
    }
    let mut ranges = Vec::with_capacity(groups);
    for group in 0..groups {
        let (min, step) = (r.f32()?, r.f32()?);
        // The largest symbol must dequantize to a finite value too.
        let top = min + max_symbol(bits) as f32 * step;
        if !min.is_finite() || !step.is_finite() || step <= 0.0 || !top.is_finite() {
            return Err(FrameError::BadParams { group, min, step });
        }
        ranges.push(AffineRange { min, step });
    }
    Ok(Quantizer::Affine { bits, ranges })
}
