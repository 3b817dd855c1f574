//! The `weights` command line: inspect (text and JSON) and convert.

mod common;

use std::process::Command;

use common::{array, fixture};
use weights::{DType, StateDict, Tensor, TensorSource};

fn weights_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weights"))
}

#[test]
fn inspect_json_has_one_object_per_tensor_with_stats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut sd = StateDict::new();
    sd.insert(
        "w",
        Tensor::f32(
            ndarray::ArrayD::from_shape_vec(vec![2, 2], vec![1.0, 2.0, 3.0, f32::NAN]).unwrap(),
        ),
    );
    sd.insert("b", Tensor::new(array(&[3], 1), DType::BF16));
    sd.save_safetensors(&path).unwrap();
    let out = weights_cmd()
        .args(["inspect", path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    let w = rows.iter().find(|r| r["name"] == "w").unwrap();
    for key in ["name", "dtype", "shape", "min", "max", "mean", "std", "nan"] {
        assert!(w.get(key).is_some(), "missing key {key}");
    }
    assert_eq!(w["dtype"], "F32");
    assert_eq!(w["shape"], serde_json::json!([2, 2]));
    assert_eq!(
        (
            w["min"].as_f64(),
            w["max"].as_f64(),
            w["mean"].as_f64(),
            w["nan"].as_u64()
        ),
        (Some(1.0), Some(3.0), Some(2.0), Some(1))
    );
    assert!((w["std"].as_f64().unwrap() - (2.0f64 / 3.0).sqrt()).abs() < 1e-12);

    let text = weights_cmd()
        .args(["inspect", fixture("tiny_llama.gguf").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(text.status.success());
    let s = String::from_utf8(text.stdout).unwrap();
    assert!(
        s.contains("model.layers.0.self_attn.q_proj.weight") && s.contains("Q4_1"),
        "{s}"
    );
}

#[test]
fn convert_gguf_to_sharded_safetensors_with_config() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("hf");
    let st = weights_cmd()
        .args([
            "convert",
            fixture("tiny_llama.gguf").to_str().unwrap(),
            out_dir.to_str().unwrap(),
            "--shard-size",
            "20KB",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{stderr}");
    // This GGUF has no tokenizer metadata: the folder has none, and says why.
    assert!(
        stderr.contains("no tokenizer files written") && stderr.contains("tokenizer.ggml.model"),
        "{stderr}"
    );
    assert!(!out_dir.join("tokenizer.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(
        (
            cfg["hidden_size"].as_u64(),
            cfg["num_key_value_heads"].as_u64()
        ),
        (Some(64), Some(2))
    );
    let back = weights::ShardedCheckpoint::open(&out_dir).unwrap();
    assert!(back.shards().len() > 1);
    let expected = StateDict::load(fixture("tiny_llama_expected.safetensors")).unwrap();
    for (name, want) in expected.iter() {
        let got = back.load(name).unwrap();
        // Quantised tensors are written as F32, F16 stays F16.
        assert!(matches!(got.dtype, DType::F32 | DType::F16), "{name}");
        assert!(
            got.data
                .iter()
                .zip(want.data.iter())
                .all(|(a, b)| (a - b).abs() <= 1e-6),
            "{name}"
        );
    }
}

#[test]
fn convert_to_bf16_single_file_and_refuse_overwriting_input() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.safetensors");
    let mut sd = StateDict::new();
    sd.insert("w", Tensor::f32(array(&[4, 4], 3)));
    sd.insert(
        "ids",
        Tensor::new(
            ndarray::ArrayD::from_shape_vec(vec![2], vec![3.0, 4.0]).unwrap(),
            DType::I64,
        ),
    );
    sd.save_safetensors(&src).unwrap();
    let dst = dir.path().join("out.safetensors");
    let st = weights_cmd()
        .args([
            "convert",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--dtype",
            "bf16",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let back = StateDict::load(&dst).unwrap();
    assert_eq!(back.get("w").unwrap().dtype, DType::BF16);
    assert_eq!(
        back.get("ids").unwrap().dtype,
        DType::I64,
        "integers keep their dtype"
    );
    assert_eq!(
        back.get("w").unwrap().data,
        sd.get("w")
            .unwrap()
            .data
            .mapv(|v| half::bf16::from_f32(v).to_f32())
    );

    let before = std::fs::read(&src).unwrap();
    let out = weights_cmd()
        .args(["convert", src.to_str().unwrap(), src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("over its own input"));
    assert_eq!(std::fs::read(&src).unwrap(), before);
}

#[test]
fn bad_input_fails_with_a_message_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.safetensors");
    std::fs::write(&bad, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops").unwrap();
    let out = weights_cmd()
        .args(["inspect", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.safetensors") && err.contains("invalid header"),
        "{err}"
    );
    let out = weights_cmd()
        .args([
            "convert",
            bad.to_str().unwrap(),
            dir.path().join("o").to_str().unwrap(),
            "--dtype",
            "f8",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype 'f8'"));
    assert!(!dir.path().join("o").exists());
}

/// One error style: `error: …` on one line, each cause once, exit status 1,
/// no backtrace even with `RUST_BACKTRACE=1`; usage errors keep clap's 2.
#[test]
fn errors_are_one_line_with_each_cause_once() {
    let out = weights_cmd()
        .args(["inspect", "/nonexistent/model.safetensors"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("/nonexistent/model.safetensors"));
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(!err.contains("backtrace"), "{err}");
    let usage = weights_cmd().args(["inspekt"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
