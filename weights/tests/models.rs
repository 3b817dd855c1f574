//! Real pretrained models fetched by `scripts/fetch-models.sh`: `#[ignore]`d
//! (see `weights::testing`); `cargo test -- --ignored` runs them, as CI does.

mod common;

use common::{fixture, model};
use weights::{Checkpoint, DType, StateDict, TensorSource};

fn check_summary(name: &str, data: &ndarray::ArrayD<f32>, reference: &serde_json::Value) {
    let shape: Vec<usize> = serde_json::from_value(reference["shape"].clone()).unwrap();
    assert_eq!(data.shape(), &shape[..], "{name}");
    let sum: f64 = data.iter().map(|&v| v as f64).sum();
    let sum_sq: f64 = data.iter().map(|&v| (v as f64).powi(2)).sum();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1.0);
    assert!(
        rel(sum, reference["sum"].as_f64().unwrap()) < 1e-9,
        "{name}: sum {sum} vs {}",
        reference["sum"]
    );
    assert!(
        rel(sum_sq, reference["sum_sq"].as_f64().unwrap()) < 1e-9,
        "{name}: sum_sq"
    );
    let rows = data.shape().first().copied().unwrap_or(1);
    let flat: Vec<f32> = data.iter().copied().collect();
    let cols = flat.len() / rows;
    let head: Vec<f32> = flat[..16.min(cols)].to_vec();
    let tail: Vec<f32> = flat[flat.len() - 16.min(cols)..].to_vec();
    let want = |k: &str| -> Vec<f32> {
        reference[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    assert_eq!(head, want("first_row_head"), "{name}: first values");
    assert_eq!(tail, want("last_row_tail"), "{name}: last values");
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn smollm2_gguf_loads_with_hf_names_shapes_and_reference_values() {
    let path = model("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let ckpt = Checkpoint::open(&path).unwrap();
    let Checkpoint::Gguf(g) = &ckpt else {
        panic!("not recognised as GGUF")
    };
    let cfg = g.config();
    assert_eq!(cfg.architecture, "llama");
    assert_eq!(
        (
            cfg.block_count,
            cfg.embedding_length,
            cfg.feed_forward_length
        ),
        (Some(30), Some(576), Some(1536))
    );
    assert_eq!(
        (cfg.head_count, cfg.head_count_kv, cfg.vocab_size),
        (Some(9), Some(3), Some(49152))
    );
    assert!(cfg.tie_word_embeddings);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_reference.json")).unwrap())
            .unwrap();
    let infos = ckpt.infos();
    assert_eq!(
        infos.len() as u64,
        reference["tensor_count"].as_u64().unwrap()
    );
    assert_eq!(infos.len(), 2 + 30 * 9);
    for l in 0..30 {
        for (suffix, shape) in [
            ("self_attn.q_proj.weight", [576, 576]),
            ("self_attn.k_proj.weight", [192, 576]),
            ("self_attn.v_proj.weight", [192, 576]),
            ("self_attn.o_proj.weight", [576, 576]),
            ("mlp.gate_proj.weight", [1536, 576]),
            ("mlp.up_proj.weight", [1536, 576]),
            ("mlp.down_proj.weight", [576, 1536]),
        ] {
            let name = format!("model.layers.{l}.{suffix}");
            assert_eq!(
                ckpt.info(&name).unwrap_or_else(|| panic!("{name}")).shape,
                shape,
                "{name}"
            );
        }
    }
    assert_eq!(
        ckpt.info("model.embed_tokens.weight").unwrap().dtype,
        DType::Q8_0
    );
    let mut params = 0;
    for info in &infos {
        let t = ckpt.load(&info.name).unwrap();
        assert!(
            t.data.iter().all(|v| v.is_finite()),
            "{} has non-finite values",
            info.name
        );
        params += t.data.len();
    }
    assert_eq!(params, 134_515_008);
    for (name, r) in reference["tensors"].as_object().unwrap() {
        check_summary(name, &ckpt.load(name).unwrap().data, r);
    }
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn minilm_safetensors_loads_with_reference_values() {
    let path = model("all-MiniLM-L6-v2/model.safetensors");
    let sd = StateDict::load(&path).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm_reference.json")).unwrap())
            .unwrap();
    assert_eq!(sd.len() as u64, reference["tensor_count"].as_u64().unwrap());
    assert_eq!(sd.numel() as u64, reference["parameters"].as_u64().unwrap());
    assert_eq!(
        sd.get("embeddings.word_embeddings.weight").unwrap().shape(),
        &[30522, 384]
    );
    assert_eq!(sd.get("embeddings.position_ids").unwrap().dtype, DType::I64);
    assert!(sd.iter().all(|(_, t)| t.data.iter().all(|v| v.is_finite())));
    for (name, r) in reference["tensors"].as_object().unwrap() {
        check_summary(name, &sd.get(name).unwrap().data, r);
    }
}
