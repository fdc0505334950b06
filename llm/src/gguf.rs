//! GGUF files (versions 2 and 3): metadata, tensor directory, and tensor bytes on demand.
//!
//! Layout (ggml `docs/gguf.md`), all little-endian:
//!
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 kv_count
//! kv_count ×     { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, u64 dims[n_dims] (innermost first),
//!                  u32 ggml_type, u64 offset (from the data section, aligned) }
//! padding to `general.alignment` (default 32), then the data section
//! ```
//!
//! A string is a u64 length and that many UTF-8 bytes; an array is a u32 element type, a u64
//! count and the elements.
//!
//! The file is untrusted: every count and length is checked against the bytes left in the
//! file before anything is allocated for it, every tensor must lie inside the file, and a
//! malformed file is a [`GgufError`] naming what is wrong and where, never a panic. Only the
//! header is read at open; tensor bytes are read when asked for, with positioned reads
//! (`pread`), so several threads (a weight loader and the compute) can share one file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::quant::{GgmlType, UnsupportedType};

pub mod writer;

#[cfg(test)]
mod tests;

/// The file's first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays in metadata that is read (GGUF allows arrays of arrays).
const MAX_ARRAY_DEPTH: usize = 3;
/// Most items of one metadata array. Each item takes a [`Value`] (32 bytes) in memory, up
/// to 32 times what it took in the file; the largest real arrays (vocabularies and merges)
/// hold a few hundred thousand. A shard file comes from the network, so its claims are
/// bounded here, not only by its size.
pub const MAX_ARRAY_ITEMS: usize = 1 << 22;

/// What went wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not GGUF, or a version this crate does not read.
    #[error("{path}: {reason}")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The header is malformed.
    #[error("{path}: malformed GGUF at byte {at}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Byte offset where the problem was found.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// A metadata key the caller needs is absent.
    #[error("metadata key `{key}` is missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata value has another type than the caller needs.
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What it holds.
        found: &'static str,
        /// What was needed.
        expected: &'static str,
    },
    /// A tensor the caller asked for is not in the file.
    #[error("no tensor named `{0}` in the file")]
    NoTensor(String),
    /// A tensor's type is one this crate does not read.
    #[error("tensor `{name}`: {source}")]
    Unsupported {
        /// The tensor.
        name: String,
        /// Its type.
        source: UnsupportedType,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// f32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f64.
    F64(f64),
}

impl Value {
    /// GGUF's type id of the value.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// The type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer that fits, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits, as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float (f32 or f64) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml orders them: a weight of `out`
    /// rows of `in` values is `[in, out]`.
    pub dims: Vec<u64>,
    /// Its type's ggml id (see [`TensorInfo::ggml_type`]).
    pub type_id: u32,
    /// Offset of its bytes from the start of the data section.
    pub offset: u64,
    /// Its size in bytes, when its type is one this crate reads.
    pub bytes: Option<u64>,
}

impl TensorInfo {
    /// Its type.
    ///
    /// # Errors
    ///
    /// [`GgufError::Unsupported`] for a type this crate does not read.
    pub fn ggml_type(&self) -> Result<GgmlType, GgufError> {
        GgmlType::from_id(self.type_id).map_err(|source| GgufError::Unsupported {
            name: self.name.clone(),
            source,
        })
    }

    /// Number of values.
    pub fn values(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: its header read and checked, tensor bytes read on demand.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    file: File,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl Gguf {
    /// Opens `path` and reads its header.
    ///
    /// # Errors
    ///
    /// [`GgufError::Io`], [`GgufError::NotGguf`] or [`GgufError::Malformed`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let header = {
            let mut reader = Reader {
                inner: BufReader::with_capacity(1 << 16, &file),
                at: 0,
                len,
                path: &path,
            };
            reader.header()?
        };
        let Header {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        } = header;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            file,
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Every metadata pair, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The tensors, in the order of the file's directory.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    ///
    /// # Errors
    ///
    /// [`GgufError::NoTensor`].
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::NoTensor(name.to_string()))
    }

    /// The value of `key`.
    ///
    /// # Errors
    ///
    /// [`GgufError::MissingKey`].
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// An integer value of `key` as u64.
    ///
    /// # Errors
    ///
    /// [`GgufError::MissingKey`], or [`GgufError::WrongType`] for a value that is not a
    /// non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let value = self.get(key)?;
        value
            .as_u64()
            .ok_or_else(|| wrong_type(key, value, "a non-negative integer"))
    }

    /// A float value of `key`.
    ///
    /// # Errors
    ///
    /// As [`Gguf::get_u64`], for a value that is not a float.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let value = self.get(key)?;
        value
            .as_f64()
            .ok_or_else(|| wrong_type(key, value, "a float"))
    }

    /// A string value of `key`.
    ///
    /// # Errors
    ///
    /// As [`Gguf::get_u64`], for a value that is not a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(wrong_type(key, other, "a string")),
        }
    }

    /// An array value of `key`.
    ///
    /// # Errors
    ///
    /// As [`Gguf::get_u64`], for a value that is not an array.
    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            other => Err(wrong_type(key, other, "an array")),
        }
    }

    /// The raw bytes of `tensor` (one of [`Gguf::tensors`]).
    ///
    /// # Errors
    ///
    /// [`GgufError::Unsupported`] for a type of unknown size, [`GgufError::Io`].
    pub fn read_bytes(&self, tensor: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let len = tensor.bytes.ok_or_else(|| GgufError::Unsupported {
            name: tensor.name.clone(),
            source: UnsupportedType(tensor.type_id),
        })?;
        // The header check put every tensor inside the file, so `len` is at most its size.
        self.read_range(self.data_start + tensor.offset, len)
    }

    /// `len` bytes of a tensor's data from `start` bytes into it: a row slice of a weight
    /// matrix, for one node's shard.
    ///
    /// # Errors
    ///
    /// [`GgufError::Malformed`] if the range is not inside the tensor; as
    /// [`Gguf::read_bytes`].
    pub fn read_slice(
        &self,
        tensor: &TensorInfo,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, GgufError> {
        let total = tensor.bytes.ok_or_else(|| GgufError::Unsupported {
            name: tensor.name.clone(),
            source: UnsupportedType(tensor.type_id),
        })?;
        if start.checked_add(len).is_none_or(|end| end > total) {
            return Err(GgufError::Malformed {
                path: self.path.clone(),
                at: self.data_start + tensor.offset,
                reason: format!(
                    "bytes {start}..+{len} are outside tensor `{}` ({total} bytes)",
                    tensor.name
                ),
            });
        }
        self.read_range(self.data_start + tensor.offset + start, len)
    }

    /// The values of the tensor named `name`, dequantized to f32.
    ///
    /// # Errors
    ///
    /// [`GgufError::NoTensor`], as [`Gguf::read_bytes`].
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let tensor = self.tensor(name)?;
        let ty = tensor.ggml_type()?;
        let bytes = self.read_bytes(tensor)?;
        let mut out = Vec::new();
        crate::quant::dequantize(ty, &bytes, &mut out).map_err(|e| GgufError::Malformed {
            path: self.path.clone(),
            at: self.data_start + tensor.offset,
            reason: e.to_string(),
        })?;
        Ok(out)
    }

    fn read_range(&self, at: u64, len: u64) -> Result<Vec<u8>, GgufError> {
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let len = usize::try_from(len).map_err(|_| {
            io(std::io::Error::other(
                "a tensor larger than this machine's address space",
            ))
        })?;
        let mut bytes = vec![0; len];
        self.file.read_exact_at(&mut bytes, at).map_err(io)?;
        Ok(bytes)
    }
}

fn wrong_type(key: &str, value: &Value, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        found: value.type_name(),
        expected,
    }
}

/// What the header holds.
struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

/// Reads the header, knowing where it is and how much of the file is left.
struct Reader<'a, R> {
    inner: R,
    at: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Reader<'_, R> {
    fn malformed(&self, reason: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            at: self.at,
            reason: reason.into(),
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.at)
    }

    /// Fills `buf` from the file, which must have that many bytes left.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        if self.left() < buf.len() as u64 {
            return Err(self.malformed("the file ends inside the header"));
        }
        self.inner.read_exact(buf).map_err(|source| GgufError::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.at += buf.len() as u64;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        self.bytes().map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_item` bytes each, checked against the bytes left.
    fn count(&mut self, what: &str, min_item: u64) -> Result<usize, GgufError> {
        let n = self.u64()?;
        if n.saturating_mul(min_item) > self.left() {
            return Err(self.malformed(format!(
                "{what} claims {n} items, more than the {} bytes left can hold",
                self.left()
            )));
        }
        usize::try_from(n).map_err(|_| self.malformed(format!("{what}: {n} items")))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(what, 1)?;
        let start = self.at;
        let mut buf = vec![0; n];
        self.fill(&mut buf)?;
        String::from_utf8(buf).map_err(|e| GgufError::Malformed {
            path: self.path.to_path_buf(),
            at: start,
            reason: format!("{what} is not UTF-8: {e}"),
        })
    }

    fn header(&mut self) -> Result<Header, GgufError> {
        let magic: [u8; 4] = self.bytes().map_err(|_| GgufError::NotGguf {
            path: self.path.to_path_buf(),
            reason: "shorter than a GGUF header".into(),
        })?;
        if magic != MAGIC {
            return Err(GgufError::NotGguf {
                path: self.path.to_path_buf(),
                reason: format!("starts with {magic:02x?}, not the GGUF magic \"GGUF\""),
            });
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::NotGguf {
                path: self.path.to_path_buf(),
                reason: format!("GGUF version {version}; cleave-llm reads versions 2 and 3"),
            });
        }
        // The smallest directory entry: an empty name (8), one dim (4 + 8), type and
        // offset (4 + 8); the smallest pair: an empty key (8), a type (4) and a u8.
        let n_tensors = self.count("the tensor count", 32)?;
        let n_kv = self.count("the metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let at = self.at;
            let key = self.string("a metadata key")?;
            let ty = self.u32()?;
            let value = self.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Malformed {
                    path: self.path.to_path_buf(),
                    at,
                    reason: format!("metadata key `{key}` appears twice"),
                });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => value
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| {
                    self.malformed(format!(
                        "general.alignment is {value:?}, not a power of two"
                    ))
                })?,
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n_tensors {
            let tensor = self.tensor_info(alignment)?;
            if !seen.insert(tensor.name.clone()) {
                return Err(self.malformed(format!("tensor `{}` appears twice", tensor.name)));
            }
            tensors.push(tensor);
        }
        let data_start = self.at.next_multiple_of(alignment);
        for tensor in &tensors {
            let end = tensor
                .bytes
                .and_then(|b| data_start.checked_add(tensor.offset)?.checked_add(b));
            match end {
                Some(end) if end <= self.len => {}
                Some(end) => {
                    return Err(self.malformed(format!(
                        "tensor `{}` ends at byte {end}, past the end of the file ({} bytes)",
                        tensor.name, self.len
                    )));
                }
                // A type of unknown size: checked when (if) it is read.
                None if data_start.saturating_add(tensor.offset) <= self.len => {}
                None => {
                    return Err(self.malformed(format!(
                        "tensor `{}` starts past the end of the file",
                        tensor.name
                    )));
                }
            }
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("a tensor name")?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let values = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let Some(values) = values.filter(|&v| v > 0) else {
            return Err(self.malformed(format!(
                "tensor `{name}` has dimensions {dims:?}: empty or too large"
            )));
        };
        let type_id = self.u32()?;
        let offset = self.u64()?;
        if !offset.is_multiple_of(alignment) {
            return Err(self.malformed(format!(
                "tensor `{name}` is at offset {offset}, not a multiple of the alignment \
                 {alignment}"
            )));
        }
        let bytes = match GgmlType::from_id(type_id) {
            // ggml quantizes row by row: each row (the innermost dimension) is whole blocks.
            Ok(ty) if !dims[0].is_multiple_of(ty.block_values() as u64) => {
                return Err(self.malformed(format!(
                    "tensor `{name}` ({ty}): rows of {} values are not whole blocks of {}",
                    dims[0],
                    ty.block_values()
                )));
            }
            Ok(ty) => Some(ty.row_bytes(values).ok_or_else(|| {
                self.malformed(format!("tensor `{name}` ({ty}, {dims:?}) is too large"))
            })?),
            Err(_) => None,
        };
        Ok(TensorInfo {
            name,
            dims,
            type_id,
            offset,
            bytes,
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.malformed(format!("a bool of value {other}"))),
            },
            8 => Value::String(self.string("a string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed("arrays nested too deep"));
                }
                let item = self.u32()?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.malformed(format!("an array of type {other}"))),
                };
                let n = self.count("an array", min)?;
                if n > MAX_ARRAY_ITEMS {
                    return Err(self.malformed(format!(
                        "an array of {n} items (at most {MAX_ARRAY_ITEMS} are read)"
                    )));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.malformed(format!("a metadata value of type {other}"))),
        })
    }
}
