//! Streaming: merging three ~150 MB sharded checkpoints (HF LLaMA naming,
//! written tensor by tensor here) with the `merge` binary keeps its peak
//! resident memory under the `--max-memory` budget plus a fixed allowance,
//! far below the 464 MB of inputs; and the output equals the formula.

use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use weights::{Checkpoint, DType, ShardedWriter, TensorInfo, TensorSource};

const HIDDEN: usize = 768;
const FFN: usize = 2048;
const LAYERS: usize = 4;
const VOCAB: usize = 8000;

/// A 4-layer LLaMA of hidden 768 (12 heads), FFN 2048, vocabulary 8000, untied head.
fn shapes() -> Vec<(String, Vec<usize>)> {
    weights::LlamaConfig::tiny(VOCAB, HIDDEN, LAYERS, 12, 12, FFN).weight_shapes()
}

/// A cheap deterministic value of model `m` at flat position `i`.
fn value(m: usize, i: usize) -> f32 {
    let x = (i as u64)
        .wrapping_mul(2654435761)
        .wrapping_add(m as u64 * 97)
        % 10007;
    x as f32 / 10007.0 - 0.5 + m as f32 * 0.01
}

fn write_model(dir: &Path, m: usize) {
    let plan: Vec<TensorInfo> = shapes()
        .into_iter()
        .map(|(name, shape)| TensorInfo {
            name,
            dtype: DType::F32,
            shape,
        })
        .collect();
    let mut w = ShardedWriter::create(dir, &plan, &Default::default(), 64 << 20).unwrap();
    for info in &plan {
        let n = info.numel();
        let t = ArrayD::from_shape_vec(IxDyn(&info.shape), (0..n).map(|i| value(m, i)).collect())
            .unwrap();
        w.write(&info.name, t.view()).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), b"{\"model_type\": \"llama\"}").unwrap();
}

fn children_max_rss_bytes() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the zeroed struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss as u64 * 1024
}

#[test]
fn peak_memory_stays_bounded_while_merging_three_sharded_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b", "c"];
    for (m, n) in names.iter().enumerate() {
        write_model(&dir.path().join(n), m);
    }
    let input_bytes: u64 = shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
        .sum::<u64>()
        * 3;
    let cfg = dir.path().join("merge.yml");
    std::fs::write(
        &cfg,
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: 2.0}}\n  - {model: c, parameters: {weight: 1.0}}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let budget: u64 = 96 << 20;
    let status = Command::new(env!("CARGO_BIN_EXE_merge"))
        .args([
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
            "--shard-size",
            "100MB",
            "--max-memory",
            "96MB",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let rss = children_max_rss_bytes();
    // The stated bound: the budget plus 64 MB for the binary, allocator slack and the writer.
    let bound = budget + (64 << 20);
    eprintln!(
        "inputs {} MB, peak RSS {} MB, bound {} MB",
        input_bytes >> 20,
        rss >> 20,
        bound >> 20
    );
    assert!(rss < bound, "peak RSS {rss} B exceeds {bound} B");
    assert!(
        input_bytes > 2 * bound,
        "the inputs must dwarf the bound for this test to mean anything"
    );
    // Output: sharded with an index and the copied config, values (a + 2b + c)/4.
    assert!(
        out.join("model.safetensors.index.json").is_file() && out.join("config.json").is_file()
    );
    let merged = Checkpoint::open(&out).unwrap();
    for name in [
        "model.layers.3.mlp.down_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        let t = merged.load(name).unwrap();
        for (i, v) in t.data.iter().enumerate().step_by(997) {
            let want = (value(0, i) + 2.0 * value(1, i) + value(2, i)) / 4.0;
            assert!((v - want).abs() < 1e-6, "{name}: {v} vs {want}");
        }
    }
}
