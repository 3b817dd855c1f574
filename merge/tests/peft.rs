//! Adapters written by Hugging Face PEFT itself (`fixtures/peft_reference.py`):
//! reading them and fusing into the base gives PEFT's `merge_and_unload`
//! weights, for plain and rsLoRA scaling; what we write reads back the same.

use std::path::Path;

use merge::lora::LoraAdapter;
use weights::{Checkpoint, StateDict, TensorSource};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn fusing_peft_adapters_matches_merge_and_unload() {
    let base: StateDict = Checkpoint::open(fixtures().join("tiny/base"))
        .unwrap()
        .load_all()
        .unwrap();
    for name in ["plain", "rslora"] {
        let dir = fixtures().join("peft").join(name);
        let ad = LoraAdapter::load(&dir).unwrap();
        assert_eq!(ad.config.r, 4);
        assert_eq!(ad.modules.len(), 9, "3 layers x q/v/down");
        assert!(
            ad.modules
                .contains_key("model.layers.2.mlp.down_proj.weight")
        );
        assert_eq!(ad.config.use_rslora, name == "rslora");
        let fused = ad.fuse(&base, 1.0).unwrap();
        let want = Checkpoint::open(dir.join("fused_reference.safetensors")).unwrap();
        for w in want.names() {
            let (a, b) = (&fused.get(&w).unwrap().data, want.load(&w).unwrap().data);
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dev = a
                .iter()
                .zip(b.iter())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            assert!(dev < 1e-6, "{name} {w}: {dev}");
        }
        // Saved by us, read back identically.
        let tmp = tempfile::tempdir().unwrap();
        ad.save(tmp.path()).unwrap();
        let back = LoraAdapter::load(tmp.path()).unwrap();
        assert_eq!(back.modules, ad.modules);
        assert_eq!(back.config.scale(), ad.config.scale());
    }
}

#[test]
fn peft_options_that_change_the_meaning_are_refused() {
    let src = fixtures().join("peft/plain");
    for (key, value, says) in [
        // Per-module ranks are read; factors of another rank are an error.
        ("rank_pattern", r#"{"q_proj": 8}"#, "r = 8"),
        ("alpha_pattern", r#"{"q_proj": -1}"#, "alpha_pattern"),
        ("fan_in_fan_out", "true", "fan_in_fan_out"),
        ("modules_to_save", r#""lm_head""#, "modules_to_save"),
        ("bias", r#""all""#, "bias"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            tmp.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = LoraAdapter::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
}

#[test]
fn low_rank_merges_work_on_peft_adapters() {
    use merge::lora::{lora_lego, rmm_fit};
    let (a, b) = (
        LoraAdapter::load(fixtures().join("peft/plain")).unwrap(),
        LoraAdapter::load(fixtures().join("peft/rslora")).unwrap(),
    );
    // LoRA-LEGO at the total rank (4 + 4) is the sum of the two deltas.
    let lego = lora_lego(&[a.clone(), b.clone()], 8, 1, true).unwrap();
    for w in a.modules.keys() {
        let want = a.delta(w).unwrap() + b.delta(w).unwrap();
        let got = lego.delta(w).unwrap();
        let dev = got
            .iter()
            .zip(want.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(dev < 1e-5, "{w}: {dev}");
    }
    // RMM of the two tasks at p = 1 (= n - 1) rebuilds both exactly.
    let tasks = [a.deltas(), b.deltas()];
    let rmm = rmm_fit(&tasks, 1).unwrap();
    assert!(rmm.errors(&tasks).unwrap().iter().all(|e| *e < 1e-5));
    // A dense merge back to a LoRA: rank 8 holds the sum exactly, and it saves as PEFT.
    let sum: indexmap::IndexMap<String, ndarray::Array2<f32>> = a
        .modules
        .keys()
        .map(|w| (w.clone(), a.delta(w).unwrap() + b.delta(w).unwrap()))
        .collect();
    let back = LoraAdapter::from_deltas(&sum, 8, &["q_proj", "v_proj", "down_proj"]).unwrap();
    for (w, d) in &sum {
        let got = back.delta(w).unwrap();
        let dev = got
            .iter()
            .zip(d.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(dev < 1e-5, "{w}: {dev}");
    }
    let tmp = tempfile::tempdir().unwrap();
    back.save(tmp.path()).unwrap();
    assert_eq!(LoraAdapter::load(tmp.path()).unwrap().config.r, 8);
}
