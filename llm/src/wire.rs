//! Frames between the nodes of a cluster: persistent TCP, length-prefixed binary.
//!
//! ```text
//! u32 length (of what follows, little-endian)  u8 kind  body
//! ```
//!
//! A peer is untrusted: a length over the reader's limit is refused before anything is
//! allocated for it, and every body is checked against its declared sizes. A malformed frame
//! is a [`WireError`], never a panic.
//!
//! Kinds: the all-reduce's (a node's partial vector and the sum sent back); a step (the
//! master's residual stream for one position, to every worker); the pieces of a shard file
//! on its way to a worker; control messages (the handshake, resets: JSON, rare and small);
//! and an error. A partial sum travels as f64 (exact: the partials are on the grid of
//! [`crate::matmul::QMatrix::matvec_exact`], so the sum is the same in any order), as f32
//! (half the bytes, rounded), or as ggml Q8_0 blocks (34 bytes per 32 values, 7.5× fewer
//! than f64), as distributed-llama's Q80 buffers do. A step's vector is f32, exact.

use std::io::{Read, Write};

use crate::quant::{BLOCK, GgmlType, dequantize, quantize};

/// The largest frame a reader accepts unless told otherwise (a 64 Ki-wide f32 vector is
/// 256 KiB; a shard of weights comes in several frames).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

const KIND_PARTIAL: u8 = 1;
const KIND_SUM: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_CONTROL: u8 = 4;
const KIND_CHUNK: u8 = 5;
const KIND_STEP: u8 = 6;

/// The largest control message (JSON) a reader accepts.
pub const MAX_CONTROL: usize = 64 << 10;

const ENCODING_F32: u8 = 0;
const ENCODING_Q8_0: u8 = 1;
const ENCODING_F64: u8 = 2;

/// How partial sums travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// 8 bytes a value: exact, a cluster computes what one node computes, bit for bit.
    F64,
    /// 4 bytes a value: each partial and the sum rounded to f32.
    F32,
    /// ggml Q8_0 blocks: 34 bytes per 32 values; lengths must be whole blocks.
    Q8_0,
}

/// A vector on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Vector {
    /// Exact values (partial sums).
    F64(Vec<f64>),
    /// f32 values.
    F32(Vec<f32>),
    /// Q8_0 blocks of `len` values.
    Q8_0 {
        /// Values.
        len: usize,
        /// The blocks.
        blocks: Vec<u8>,
    },
}

impl Vector {
    /// `values` in `encoding` (Q8_0 falls back to f32 for a length of partial blocks).
    pub fn encode(values: &[f64], encoding: Encoding) -> Self {
        let f32s = || values.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        match encoding {
            Encoding::F64 => Self::F64(values.to_vec()),
            Encoding::Q8_0 if values.len().is_multiple_of(BLOCK) => {
                let mut blocks = Vec::with_capacity(values.len() / BLOCK * 34);
                // Whole blocks by the guard.
                let _ = quantize(GgmlType::Q8_0, &f32s(), &mut blocks);
                Self::Q8_0 {
                    len: values.len(),
                    blocks,
                }
            }
            _ => Self::F32(f32s()),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F64(values) => values.len(),
            Self::F32(values) => values.len(),
            Self::Q8_0 { len, .. } => *len,
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values into `out` (which must be `len()` long).
    ///
    /// # Errors
    ///
    /// [`WireError::Malformed`] if the lengths disagree.
    pub fn decode_into(&self, out: &mut [f64]) -> Result<(), WireError> {
        if out.len() != self.len() {
            return Err(WireError::Malformed(format!(
                "a vector of {} values where {} were expected",
                self.len(),
                out.len()
            )));
        }
        match self {
            Self::F64(values) => out.copy_from_slice(values),
            Self::F32(values) => out
                .iter_mut()
                .zip(values)
                .for_each(|(o, &v)| *o = f64::from(v)),
            Self::Q8_0 { blocks, .. } => {
                let mut values = Vec::with_capacity(out.len());
                dequantize(GgmlType::Q8_0, blocks, &mut values)
                    .map_err(|e| WireError::Malformed(e.to_string()))?;
                out.iter_mut()
                    .zip(values)
                    .for_each(|(o, v)| *o = f64::from(v));
            }
        }
        Ok(())
    }

    /// Bytes of the body.
    pub fn wire_bytes(&self) -> usize {
        1 + 4
            + match self {
                Self::F64(values) => 8 * values.len(),
                Self::F32(values) => 4 * values.len(),
                Self::Q8_0 { blocks, .. } => blocks.len(),
            }
    }
}

/// A frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A worker's partial output, for the master to sum.
    Partial(Vector),
    /// The sum of every node's partial output.
    Sum(Vector),
    /// The peer gave up: why.
    Error(String),
    /// A control message, JSON (at most [`MAX_CONTROL`] bytes).
    Control(String),
    /// The next bytes of a shard file.
    Chunk(Vec<u8>),
    /// Run the next position: the master's residual stream after the embedding.
    Step {
        /// The position (tokens already in the sequence), for the worker to check.
        position: u32,
        /// The vector, always exact (f32): every node must start from the same values.
        x: Vector,
    },
}

impl Frame {
    /// The kind's name, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Partial(_) => "partial",
            Self::Sum(_) => "sum",
            Self::Error(_) => "error",
            Self::Control(_) => "control",
            Self::Chunk(_) => "chunk",
            Self::Step { .. } => "step",
        }
    }

    /// Bytes on the wire, length prefix included.
    pub fn wire_bytes(&self) -> usize {
        4 + 1
            + match self {
                Self::Partial(v) | Self::Sum(v) => v.wire_bytes(),
                Self::Step { x, .. } => 4 + x.wire_bytes(),
                Self::Error(text) | Self::Control(text) => text.len(),
                Self::Chunk(bytes) => bytes.len(),
            }
    }
}

/// What went wrong on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The socket failed or timed out.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame is larger than this reader accepts.
    #[error("a frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Writes `frame` (one `write_all` of the whole frame, so a frame is one TCP send).
///
/// # Errors
///
/// The writer's.
pub fn write_frame(out: &mut impl Write, frame: &Frame) -> std::io::Result<()> {
    let mut body = Vec::new();
    match frame {
        Frame::Partial(v) | Frame::Sum(v) => {
            body.push(if matches!(frame, Frame::Partial(_)) {
                KIND_PARTIAL
            } else {
                KIND_SUM
            });
            put_vector(&mut body, v)?;
        }
        Frame::Step { position, x } => {
            body.push(KIND_STEP);
            body.extend(position.to_le_bytes());
            put_vector(&mut body, x)?;
        }
        Frame::Error(message) => {
            body.push(KIND_ERROR);
            body.extend(message.as_bytes());
        }
        Frame::Control(json) => {
            body.push(KIND_CONTROL);
            body.extend(json.as_bytes());
        }
        Frame::Chunk(bytes) => {
            body.push(KIND_CHUNK);
            body.extend_from_slice(bytes);
        }
    }
    let len = u32::try_from(body.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a frame of {} bytes is over the format's 4 GiB", body.len()),
        )
    })?;
    let mut framed = Vec::with_capacity(4 + body.len());
    framed.extend(len.to_le_bytes());
    framed.extend(body);
    out.write_all(&framed)?;
    out.flush()
}

/// Reads one frame of at most `max` bytes.
///
/// # Errors
///
/// [`WireError`].
pub fn read_frame(input: &mut impl Read, max: usize) -> Result<Frame, WireError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(WireError::Malformed("an empty frame".into()));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    parse(&body)
}

fn put_vector(body: &mut Vec<u8>, v: &Vector) -> std::io::Result<()> {
    let len = u32::try_from(v.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a vector over 4 Gi values",
        )
    })?;
    match v {
        Vector::F64(values) => {
            body.push(ENCODING_F64);
            body.extend(len.to_le_bytes());
            body.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        }
        Vector::F32(values) => {
            body.push(ENCODING_F32);
            body.extend(len.to_le_bytes());
            body.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        }
        Vector::Q8_0 { blocks, .. } => {
            body.push(ENCODING_Q8_0);
            body.extend(len.to_le_bytes());
            body.extend_from_slice(blocks);
        }
    }
    Ok(())
}

fn parse(body: &[u8]) -> Result<Frame, WireError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or_else(|| WireError::Malformed("an empty frame".into()))?;
    match kind {
        KIND_PARTIAL => Ok(Frame::Partial(vector(rest)?)),
        KIND_SUM => Ok(Frame::Sum(vector(rest)?)),
        KIND_ERROR => Ok(Frame::Error(String::from_utf8_lossy(rest).into_owned())),
        KIND_CONTROL => {
            if rest.len() > MAX_CONTROL {
                return Err(WireError::TooLarge {
                    len: rest.len(),
                    max: MAX_CONTROL,
                });
            }
            String::from_utf8(rest.to_vec())
                .map(Frame::Control)
                .map_err(|_| WireError::Malformed("a control message that is not UTF-8".into()))
        }
        KIND_CHUNK => Ok(Frame::Chunk(rest.to_vec())),
        KIND_STEP => {
            let [a, b, c, d, vector_body @ ..] = rest else {
                return Err(WireError::Malformed(format!(
                    "a step frame of {} bytes",
                    rest.len()
                )));
            };
            Ok(Frame::Step {
                position: u32::from_le_bytes([*a, *b, *c, *d]),
                x: vector(vector_body)?,
            })
        }
        other => Err(WireError::Malformed(format!("unknown frame kind {other}"))),
    }
}

fn vector(body: &[u8]) -> Result<Vector, WireError> {
    let malformed = |what: String| WireError::Malformed(what);
    let [encoding, a, b, c, d, data @ ..] = body else {
        return Err(malformed(format!("a vector frame of {} bytes", body.len())));
    };
    let len = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
    match *encoding {
        ENCODING_F32 => {
            if data.len() != len.saturating_mul(4) {
                return Err(malformed(format!(
                    "{len} f32 values in {} bytes",
                    data.len()
                )));
            }
            Ok(Vector::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ))
        }
        ENCODING_F64 => {
            if data.len() != len.saturating_mul(8) {
                return Err(malformed(format!(
                    "{len} f64 values in {} bytes",
                    data.len()
                )));
            }
            Ok(Vector::F64(
                data.chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            ))
        }
        ENCODING_Q8_0 => {
            if !len.is_multiple_of(BLOCK) || data.len() != len / BLOCK * 34 {
                return Err(malformed(format!(
                    "{len} Q8_0 values in {} bytes",
                    data.len()
                )));
            }
            Ok(Vector::Q8_0 {
                len,
                blocks: data.to_vec(),
            })
        }
        other => Err(malformed(format!("unknown vector encoding {other}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn round_trip(frame: &Frame) -> Frame {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, frame).unwrap();
        read_frame(&mut bytes.as_slice(), DEFAULT_MAX_FRAME).unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let values: Vec<f64> = (0..64).map(|i| f64::from(i) / 7.0 - 3.0).collect();
        let f32s: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        for frame in [
            Frame::Partial(Vector::encode(&values, Encoding::F64)),
            Frame::Partial(Vector::encode(&values, Encoding::F32)),
            Frame::Sum(Vector::encode(&values, Encoding::Q8_0)),
            Frame::Partial(Vector::encode(&values[..5], Encoding::Q8_0)),
            Frame::Error("worker out of memory".into()),
            Frame::Control(r#"{"type":"reset"}"#.into()),
            Frame::Chunk(vec![0, 1, 2, 255]),
            Frame::Step {
                position: 7,
                x: Vector::F32(f32s.clone()),
            },
        ] {
            assert_eq!(round_trip(&frame), frame);
        }
        let q8 = Vector::encode(&values, Encoding::Q8_0);
        assert_eq!(q8.wire_bytes(), 5 + 68);
        let mut back = vec![0.0; 64];
        q8.decode_into(&mut back).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= 3.0 / 127.0, "{a} vs {b}");
        }
        assert!(q8.decode_into(&mut [0.0; 3]).is_err());
        let exact = Vector::encode(&values, Encoding::F64);
        assert_eq!(exact.wire_bytes(), 5 + 512);
        exact.decode_into(&mut back).unwrap();
        assert_eq!(back, values);
    }

    #[test]
    fn hostile_frames_are_errors_not_allocations() {
        // A claimed length over the limit is refused before reading the body.
        let huge = [&u32::MAX.to_le_bytes()[..], &[KIND_SUM]].concat();
        assert!(matches!(
            read_frame(&mut huge.as_slice(), DEFAULT_MAX_FRAME),
            Err(WireError::TooLarge { .. })
        ));
        let cases: [&[u8]; 10] = [
            &[KIND_SUM, ENCODING_F64, 1, 0, 0, 0, 1, 2, 3, 4],
            &[],
            &[9],
            &[KIND_STEP, 1, 0, 0],
            &[KIND_STEP, 1, 0, 0, 0, ENCODING_F32, 1, 0, 0, 0],
            &[KIND_CONTROL, 0xff, 0xfe],
            &[KIND_SUM, ENCODING_F32, 2, 0, 0, 0, 1, 2, 3],
            &[KIND_SUM, ENCODING_Q8_0, 31, 0, 0, 0],
            &[KIND_PARTIAL, 7, 0, 0, 0, 0],
            &[KIND_PARTIAL, ENCODING_F32, 0xff, 0xff, 0xff, 0xff],
        ];
        for body in cases {
            let mut framed = (body.len() as u32).to_le_bytes().to_vec();
            framed.extend_from_slice(body);
            assert!(
                read_frame(&mut framed.as_slice(), DEFAULT_MAX_FRAME).is_err(),
                "{body:?}"
            );
        }
        // Every truncation of a valid frame.
        let mut good = Vec::new();
        write_frame(&mut good, &Frame::Sum(Vector::F32(vec![1.0; 8]))).unwrap();
        for cut in 0..good.len() {
            assert!(read_frame(&mut &good[..cut], DEFAULT_MAX_FRAME).is_err());
        }
    }
}
