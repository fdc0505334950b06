//! Writes GGUF (version 3): the synthetic models of the tests, and shard files.
//!
//! The writer takes metadata and tensors in the order they are to appear, lays the tensors
//! out aligned in the data section, and writes everything in one pass.

use std::io::Write;

use super::{DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, Value};
use crate::quant::GgmlType;

/// A GGUF file being put together in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

/// A tensor to write.
#[derive(Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
}

/// Why a tensor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor `{name}`: {reason}")]
pub struct BadTensor {
    /// The tensor.
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata pair (the alignment is always 32: `general.alignment` is ignored).
    pub fn metadata(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor: `dims` innermost first, `bytes` already in `ty`'s layout.
    ///
    /// # Errors
    ///
    /// [`BadTensor`] when `bytes` is not the size `dims` and `ty` make, or the dimensions
    /// are not 1 to 4 non-zero values whose rows are whole blocks.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<&mut Self, BadTensor> {
        let name = name.into();
        let bad = |reason: String| BadTensor {
            name: name.clone(),
            reason,
        };
        if dims.is_empty() || dims.len() > MAX_DIMS || dims.contains(&0) {
            return Err(bad(format!("dimensions {dims:?}")));
        }
        if !dims[0].is_multiple_of(ty.block_values() as u64) {
            return Err(bad(format!(
                "rows of {} values are not whole {ty} blocks",
                dims[0]
            )));
        }
        let expected = ty.row_bytes(dims.iter().product());
        if expected != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "{} bytes for {ty} {dims:?}, which takes {expected:?}",
                bytes.len()
            )));
        }
        self.tensors.push(Tensor {
            name,
            dims: dims.to_vec(),
            ty,
            bytes,
        });
        Ok(self)
    }

    /// Writes the file.
    ///
    /// # Errors
    ///
    /// The writer's.
    /// An array whose items differ in type (GGUF arrays have one element type) is an
    /// `InvalidInput` error, and nothing is written.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        if let Some((key, _)) = self.metadata.iter().find(|(_, v)| !homogeneous(v)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("metadata `{key}`: an array's items must all have one type"),
            ));
        }
        let mut header = Vec::new();
        header.extend(MAGIC);
        header.extend(3u32.to_le_bytes());
        header.extend((self.tensors.len() as u64).to_le_bytes());
        let metadata: Vec<_> = self
            .metadata
            .iter()
            .filter(|(key, _)| key != "general.alignment")
            .collect();
        header.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend(value.type_id().to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for Tensor {
            name,
            dims,
            ty,
            bytes,
        } in &self.tensors
        {
            put_string(&mut header, name);
            header.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                header.extend(d.to_le_bytes());
            }
            header.extend(ty.id().to_le_bytes());
            header.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        let padded = (header.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        header.resize(padded as usize, 0);
        out.write_all(&header)?;
        let mut written = 0u64;
        for (tensor, at) in self.tensors.iter().zip(offsets) {
            out.write_all(&vec![0; (at - written) as usize])?;
            out.write_all(&tensor.bytes)?;
            written = at + tensor.bytes.len() as u64;
        }
        out.flush()
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array's element type is not known; u8 is as good as any.
            let item = items.first().map_or(0, Value::type_id);
            out.extend(item.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for v in items {
                put_value(out, v);
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
}

/// Whether every array in `value` has items of one type (arrays of arrays may differ in
/// their items' types, as in GGUF).
fn homogeneous(value: &Value) -> bool {
    match value {
        Value::Array(items) => {
            items.windows(2).all(|w| w[0].type_id() == w[1].type_id())
                && items.iter().all(homogeneous)
        }
        _ => true,
    }
}
