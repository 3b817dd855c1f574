//! Read throughput of safetensors (and GGUF when fetched).
//!
//! `cargo bench -p weights --bench read` measures opening a file and
//! converting every tensor to `f32`, reported in bytes/s of file data:
//! - a generated 90 MB F32 file (the size of all-MiniLM-L6-v2), in the OS
//!   page cache, so the figure is memory speed;
//! - the same tensors stored as BF16;
//! - all-MiniLM-L6-v2 and SmolLM2-135M (Q4_1 GGUF) when
//!   `scripts/fetch-models.sh` has put them under `models/`.

use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::ArrayD;
use weights::{Checkpoint, DType, StateDict, Tensor, TensorSource};

fn synthetic(dir: &Path, dtype: DType) -> PathBuf {
    // 90 MB of F32 in BERT-base-like shapes.
    let mut sd = StateDict::new();
    let mut seed = 1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for i in 0..15 {
        for (name, shape) in [
            ("a", vec![1536, 384]),
            ("b", vec![384, 1536]),
            ("c", vec![384, 384]),
        ] {
            let n: usize = shape.iter().product();
            let data = ArrayD::from_shape_vec(shape, (0..n).map(|_| next()).collect()).unwrap();
            sd.insert(format!("layer.{i}.{name}"), Tensor::new(data, dtype));
        }
    }
    let path = dir.join(format!("synthetic-{}.safetensors", dtype.name()));
    sd.save_safetensors(&path).unwrap();
    path
}

fn read_all(path: &Path) -> usize {
    let ckpt = Checkpoint::open(path).unwrap();
    let mut n = 0;
    for info in ckpt.infos() {
        n += ckpt.load(&info.name).unwrap().data.len();
    }
    n
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models");
    let mut files = vec![
        ("synthetic-f32-90MB", synthetic(tmp.path(), DType::F32)),
        ("synthetic-bf16-45MB", synthetic(tmp.path(), DType::BF16)),
    ];
    for (label, rel) in [
        ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2/model.safetensors"),
        (
            "SmolLM2-135M-Q4_1-gguf",
            "SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ] {
        let p = root.join(rel);
        if p.is_file() {
            files.push((label, p));
        } else {
            eprintln!(
                "skipping {label}: {} not found (run scripts/fetch-models.sh)",
                p.display()
            );
        }
    }
    let mut g = c.benchmark_group("read");
    g.sample_size(10);
    for (label, path) in &files {
        let bytes = std::fs::metadata(path).unwrap().len();
        read_all(path); // warm the page cache
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(*label, |b| b.iter(|| read_all(path)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
