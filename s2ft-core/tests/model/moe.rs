//! The Burn mixture of experts against transformers' `MixtralForCausalLM`
//! on mergekit-moe's outputs (`merge/tests/fixtures/moe/`, written by
//! `moe_reference.py` with transformers 5.25): same logits and same expert
//! choices on a ChatML prompt and a plain one; and the hidden states that
//! mergekit's `hidden` gates are made of, from the dense base.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::{Cpu, Llama};
use serde_json::Value;
use weights::{Checkpoint, TensorSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../merge/tests/fixtures/moe")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn load(dir: &str) -> Llama<Cpu> {
    let dir = fixtures().join(dir);
    let cfg = s2ft_core::pretrained::read_hf_config(&dir.join("config.json")).unwrap();
    let mut sd = Checkpoint::open(&dir).unwrap().load_all().unwrap();
    weights::llama::unfuse_experts(&mut sd, &cfg).unwrap();
    Llama::from_state_dict(&cfg, &sd, false, &Default::default()).unwrap()
}

fn tokens(ids: &[u32]) -> Tensor<Cpu, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), &Default::default())
}

fn ids_of(prompt: &Value) -> Vec<u32> {
    floats(&prompt["ids"])
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

#[test]
fn mixtral_logits_and_routing_match_transformers() {
    for mode in ["hidden", "cheap_embed"] {
        let model = load(&format!("out_{mode}"));
        assert_eq!(model.config.moe.unwrap().num_local_experts, 3);
        let fx = json(&format!("logits_{mode}.json"));
        for p in fx["prompts"].as_array().unwrap() {
            let ids = ids_of(p);
            let got: Vec<f32> = model.forward(tokens(&ids)).into_data().into_vec().unwrap();
            let want = floats(&p["logits"]);
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{mode} {}: logits off by {worst}", p["name"]);
            // Per layer, the same experts for every token as transformers.
            let probs = model.router_probs(tokens(&ids));
            for (l, (pr, r)) in probs
                .into_iter()
                .zip(p["routing"].as_array().unwrap())
                .enumerate()
            {
                let v: Vec<f32> = pr.into_data().into_vec().unwrap();
                let picks = s2ft_core::model::top_k_experts(&v, 3, 2);
                let want: Vec<usize> = floats(&r["top_k_index"])
                    .into_iter()
                    .map(|x| x as usize)
                    .collect();
                assert_eq!(picks, want, "{mode} {} layer {l}", p["name"]);
            }
        }
    }
}

#[test]
fn hidden_states_entering_each_block_match_transformers() {
    let base = load("base");
    let fx = json("hidden_states.json");
    let mut worst = 0f32;
    for ex in fx["experts"].as_array().unwrap() {
        for key in ["positive", "negative"] {
            for p in ex[key].as_array().into_iter().flatten() {
                let ids = ids_of(p);
                let want = floats(&p["hidden_f32"]);
                let h = base.config.hidden_size;
                for (l, inputs) in base.linear_inputs(tokens(&ids)).into_iter().enumerate() {
                    let r: Vec<f32> = inputs.residual.into_data().into_vec().unwrap();
                    let last = &r[(ids.len() - 1) * h..];
                    for (a, b) in last.iter().zip(&want[l * h..(l + 1) * h]) {
                        worst = worst.max((a - b).abs());
                    }
                }
            }
        }
    }
    assert!(worst < 1e-5, "hidden states off by {worst}");
}
