//! Shard files: the part of a model one worker computes, as a GGUF file of its own.
//!
//! Workers hold no model file. At first contact the master cuts each worker's slices out of
//! its file — rows of Wq, Wk, Wv, Wgate and Wup, columns of Wo and Wdown, the layers' norms —
//! into a GGUF that names the part it holds (`cleave.shard.*`, see
//! [`crate::model::SHARD_KEYS`]), and sends it. It has no embedding, no output head and no
//! vocabulary: the prompt and the answer stay on the master. The worker keeps it on disk
//! under the SHA-256 of its bytes and, after a restart, reuses it when the master asks for
//! the same hash.
//!
//! The bytes are copied from the master's file as they are (no requantization), so a worker
//! computes with exactly the weights the master's file holds. Column slices must fall on
//! the quantization blocks, which the shard plan guarantees.

use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::gguf::writer::GgufWriter;
use crate::gguf::{Gguf, GgufError, TensorInfo, Value};
use crate::model::{Config, ModelError, SHARD_KEYS, stored_shard};
use crate::shard::NodeShard;

/// A shard file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    /// Where it is.
    pub path: PathBuf,
    /// SHA-256 of its bytes, lowercase hex (its name in a worker's cache).
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// Why a shard file could not be made or found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardFileError {
    /// The model could not be read or cut as asked.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
}

impl From<GgufError> for ShardFileError {
    fn from(error: GgufError) -> Self {
        Self::Model(error.into())
    }
}

/// Cuts `shard` out of the whole model `gguf` into a shard file in `dir` (named by its
/// hash; an existing file of that name is reused as it is).
///
/// # Errors
///
/// [`ShardFileError`]: a file that is itself a shard, a shard that cuts quantized blocks,
/// unreadable tensors, a directory that cannot be written.
pub fn write(gguf: &Gguf, shard: &NodeShard, dir: &Path) -> Result<ShardFile, ShardFileError> {
    let config = Config::from_gguf(gguf)?;
    let c = &config;
    let stored = stored_shard(gguf, c)?;
    if stored
        != (NodeShard {
            heads: 0..c.heads,
            kv_heads: 0..c.kv_heads,
            ffn: 0..c.ffn,
        })
    {
        return Err(ModelError::Unsupported(
            "this file is already a shard: cut shards from the whole model".into(),
        )
        .into());
    }
    let mut out = GgufWriter::new();
    out.metadata("general.architecture", Value::String("llama".into()));
    for (key, value) in gguf.metadata() {
        if key.starts_with("llama.") && key != "llama.vocab_size" {
            out.metadata(key.clone(), value.clone());
        }
    }
    if let Ok(name) = gguf.get_str("general.name") {
        out.metadata("general.name", Value::String(format!("{name} (shard)")));
    }
    out.metadata("llama.vocab_size", Value::U64(c.vocab as u64));
    let pair =
        |r: &Range<usize>| Value::Array(vec![Value::U64(r.start as u64), Value::U64(r.end as u64)]);
    out.metadata(SHARD_KEYS[0], pair(&shard.heads));
    out.metadata(SHARD_KEYS[1], pair(&shard.kv_heads));
    out.metadata(SHARD_KEYS[2], pair(&shard.ffn));
    let hd = c.head_dim;
    let q = shard.heads.start * hd..shard.heads.end * hd;
    let kv = shard.kv_heads.start * hd..shard.kv_heads.end * hd;
    for i in 0..c.layers {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        copy_whole(gguf, &mut out, &name("attn_norm"))?;
        copy_rows(gguf, &mut out, &name("attn_q"), &q)?;
        copy_rows(gguf, &mut out, &name("attn_k"), &kv)?;
        copy_rows(gguf, &mut out, &name("attn_v"), &kv)?;
        copy_cols(gguf, &mut out, &name("attn_output"), &q)?;
        copy_whole(gguf, &mut out, &name("ffn_norm"))?;
        copy_rows(gguf, &mut out, &name("ffn_gate"), &shard.ffn)?;
        copy_rows(gguf, &mut out, &name("ffn_up"), &shard.ffn)?;
        copy_cols(gguf, &mut out, &name("ffn_down"), &shard.ffn)?;
    }
    let mut bytes = Vec::new();
    out.write_to(&mut bytes)
        .map_err(|source| ShardFileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let sha256 = hex(&Sha256::digest(&bytes));
    let path = dir.join(format!("{sha256}.gguf"));
    if !path.exists() {
        write_atomically(&path, &bytes)?;
    }
    Ok(ShardFile {
        path,
        sha256,
        bytes: bytes.len() as u64,
    })
}

/// The SHA-256 of the file at `path`, lowercase hex.
///
/// # Errors
///
/// Reading it failed.
pub fn sha256_of(path: &Path) -> Result<String, ShardFileError> {
    let io = |source| ShardFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// Whether `text` is a SHA-256 in lowercase hex (and so a safe file name).
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed: a reader never sees half a file.
///
/// # Errors
///
/// The file system's.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ShardFileError> {
    let io = |source| ShardFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

fn tensor<'a>(gguf: &'a Gguf, name: &str) -> Result<(&'a TensorInfo, u64, u64), ShardFileError> {
    let info = gguf.tensor(name)?;
    let ty = info.ggml_type()?;
    let [cols, rows] = info.dims[..] else {
        return Err(ModelError::Shape {
            name: name.into(),
            reason: format!("dimensions {:?}, expected a matrix", info.dims),
        }
        .into());
    };
    let row_bytes = ty.row_bytes(cols).ok_or_else(|| ModelError::Shape {
        name: name.into(),
        reason: format!("rows of {cols} values are not whole {ty} blocks"),
    })?;
    Ok((info, rows, row_bytes))
}

fn copy_whole(gguf: &Gguf, out: &mut GgufWriter, name: &str) -> Result<(), ShardFileError> {
    let info = gguf.tensor(name)?;
    let bytes = gguf.read_bytes(info)?;
    add(out, name, &info.dims, info, bytes)
}

/// Rows `rows` of the matrix `name`: one contiguous read.
fn copy_rows(
    gguf: &Gguf,
    out: &mut GgufWriter,
    name: &str,
    rows: &Range<usize>,
) -> Result<(), ShardFileError> {
    let (info, total, row_bytes) = tensor(gguf, name)?;
    if rows.end as u64 > total || rows.is_empty() {
        return Err(shape(name, format!("rows {rows:?} of {total}")));
    }
    let bytes = gguf.read_slice(
        info,
        rows.start as u64 * row_bytes,
        rows.len() as u64 * row_bytes,
    )?;
    add(out, name, &[info.dims[0], rows.len() as u64], info, bytes)
}

/// Columns `cols` of the matrix `name`: the same block range of every row.
fn copy_cols(
    gguf: &Gguf,
    out: &mut GgufWriter,
    name: &str,
    cols: &Range<usize>,
) -> Result<(), ShardFileError> {
    let (info, rows, row_bytes) = tensor(gguf, name)?;
    let ty = info.ggml_type()?;
    let per_block = ty.block_values();
    if cols.end as u64 > info.dims[0]
        || cols.is_empty()
        || !cols.start.is_multiple_of(per_block)
        || !cols.end.is_multiple_of(per_block)
    {
        return Err(shape(
            name,
            format!(
                "columns {cols:?} of {} in blocks of {per_block}",
                info.dims[0]
            ),
        ));
    }
    let from = (cols.start / per_block * ty.block_bytes()) as u64;
    let len = (cols.len() / per_block * ty.block_bytes()) as u64;
    let whole = gguf.read_bytes(info)?;
    let mut bytes = Vec::with_capacity((rows * len) as usize);
    for row in whole.chunks_exact(row_bytes as usize) {
        bytes.extend_from_slice(&row[from as usize..(from + len) as usize]);
    }
    add(out, name, &[cols.len() as u64, rows], info, bytes)
}

fn add(
    out: &mut GgufWriter,
    name: &str,
    dims: &[u64],
    info: &TensorInfo,
    bytes: Vec<u8>,
) -> Result<(), ShardFileError> {
    out.tensor(name, dims, info.ggml_type()?, bytes)
        .map_err(|e| shape(name, e.reason))?;
    Ok(())
}

fn shape(name: &str, reason: String) -> ShardFileError {
    ModelError::Shape {
        name: name.into(),
        reason,
    }
    .into()
}
