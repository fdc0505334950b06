//! The quantized products at SmolLM2-135M's sizes, each block type, each kernel.
//!
//! `cargo bench -p cleave-llm --bench matmul` prints, per matrix and kernel, criterion's time
//! and the throughput in GB/s of weights read (the repacked bytes: a token reads each once);
//! a summary table of GB/s and the SIMD kernel's speed-up over the portable one follows.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use cleave_llm::matmul::{Kernel, QMatrix};
use cleave_llm::quant::{GgmlType, quantize};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// SmolLM2-135M: Wq and Wo (576 × 576), Wgate and Wup (1536 × 576), Wdown (576 × 1536),
/// the output head (49152 × 576).
const SHAPES: [(&str, usize, usize); 4] = [
    ("576x576", 576, 576),
    ("1536x576", 1536, 576),
    ("576x1536", 576, 1536),
    ("head 49152x576", 49152, 576),
];

const TYPES: [GgmlType; 3] = [GgmlType::Q4_1, GgmlType::Q4_0, GgmlType::Q8_0];

fn matrix(ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    let weights: Vec<f32> = (0..rows * cols)
        .map(|i| ((i.wrapping_mul(2_654_435_761) % 2001) as f32 / 1000.0 - 1.0) * 0.05)
        .collect();
    let mut bytes = Vec::new();
    quantize(ty, &weights, &mut bytes).unwrap();
    QMatrix::new(ty, rows, cols, bytes).unwrap()
}

fn input(cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|i| ((i * 7919) % 211) as f32 / 105.0 - 1.0)
        .collect()
}

fn products(c: &mut Criterion) {
    let kernels = Kernel::available();
    let mut summary = Vec::new();
    for ty in TYPES {
        let mut group = c.benchmark_group(format!("matvec {ty}"));
        for (name, rows, cols) in SHAPES {
            let m = matrix(ty, rows, cols);
            let x = input(cols);
            let mut out = vec![0.0f32; rows];
            let mut exact = vec![0.0f64; rows];
            group.throughput(Throughput::Bytes(m.size_bytes() as u64));
            for &kernel in &kernels {
                group.bench_function(format!("{name} {kernel}"), |b| {
                    b.iter(|| m.matvec_with(kernel, black_box(&x), black_box(&mut out)));
                });
                if rows <= 1536 {
                    group.bench_function(format!("{name} {kernel} exact"), |b| {
                        b.iter(|| {
                            m.matvec_exact_with(kernel, black_box(&x), black_box(&mut exact))
                        });
                    });
                }
                // Our own figure for the summary: the best of a few timed batches.
                let per = best_seconds(|| m.matvec_with(kernel, &x, &mut out));
                let per_exact = best_seconds(|| m.matvec_exact_with(kernel, &x, &mut exact));
                summary.push((ty, name, kernel, m.size_bytes(), per, per_exact));
            }
        }
        group.finish();
    }
    println!();
    println!(
        "{:<6} {:<16} {:<9} {:>10} {:>9} {:>9} {:>10} {:>9}",
        "type", "matrix", "kernel", "µs", "GB/s", "speed-up", "exact µs", "GB/s"
    );
    for &(ty, name, kernel, bytes, per, per_exact) in &summary {
        let portable = summary
            .iter()
            .find(|s| s.0 == ty && s.1 == name && s.2 == Kernel::Portable)
            .map_or(per, |s| s.4);
        println!(
            "{:<6} {:<16} {:<9} {:>10.1} {:>9.2} {:>8.2}× {:>10.1} {:>9.2}",
            ty.to_string(),
            name,
            kernel.name(),
            per * 1e6,
            bytes as f64 / per / 1e9,
            portable / per,
            per_exact * 1e6,
            bytes as f64 / per_exact / 1e9,
        );
    }
}

/// The fastest of 15 batches of runs of `f`, per run, in seconds.
fn best_seconds(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed().as_secs_f64() < 0.02 {
        f();
        runs += 1;
    }
    let batch = runs.max(1);
    (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(batch)
        })
        .fold(f64::INFINITY, f64::min)
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
        .sample_size(20);
    targets = products
}
criterion_main!(benches);
