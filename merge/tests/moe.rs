//! `merge::moe` against mergekit-moe 0.1.5 on a tiny LLaMA and three
//! fine-tunes (`tests/fixtures/moe/`, written by `moe_reference.py`): the
//! gate vectors of `cheap_embed` and `hidden` from the token ids and hidden
//! states mergekit used, and every tensor of the mixture mergekit wrote; its
//! refusals of bad configs; our own named errors.

use std::path::{Path, PathBuf};

use merge::moe::{GateMode, MoeConfig, MoeJob, cheap_embed_gate, hidden_gate, stack_gates};
use ndarray::{Array2, Array3};
use serde_json::Value;
use weights::{Checkpoint, LlamaConfig, StateDict, TensorSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Array2<f32> {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let (n, m) = (rows.len(), rows[0].len());
    Array2::from_shape_vec((n, m), rows.into_iter().flatten().collect()).unwrap()
}

fn ids(prompts: &Value) -> Vec<Vec<u32>> {
    prompts
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    p["ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i.as_u64().unwrap() as u32)
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn max_dev(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// mergekit's output in per-expert names (it writes transformers 5's fused layout).
fn mergekit_output(mode: &str) -> (StateDict, LlamaConfig) {
    let dir = fixtures().join(format!("out_{mode}"));
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = LlamaConfig::from_hf(&v).unwrap();
    let mut sd = Checkpoint::open(&dir).unwrap().load_all().unwrap();
    assert!(sd.contains("model.layers.0.mlp.experts.gate_up_proj"));
    weights::llama::unfuse_experts(&mut sd, &cfg).unwrap();
    (sd, cfg)
}

/// Builds `mode`'s config with `gates` into a temporary folder and checks
/// that every tensor equals mergekit's, and the config's shape.
fn build_and_compare(mode: &str, gates: &Array3<f32>) {
    let job = MoeJob::load(&fixtures().join(format!("{mode}.yml"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe");
    job.build(gates.view(), 0, &out, 5 << 30).unwrap();
    let ours = Checkpoint::open(&out).unwrap().load_all().unwrap();
    let (theirs, their_cfg) = mergekit_output(mode);
    let mut names: Vec<&str> = ours.keys().collect();
    let mut want: Vec<&str> = theirs.keys().collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want, "{mode}: tensor names");
    for (name, t) in theirs.iter() {
        let o = ours.get(name).unwrap();
        assert_eq!(o.shape(), t.shape(), "{mode}: {name}");
        assert_eq!(o.data, t.data, "{mode}: {name} differs from mergekit's");
    }
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(LlamaConfig::from_hf(&v).unwrap(), their_cfg);
    assert_eq!(v["architectures"][0], "MixtralForCausalLM");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "mergekit_moe_config.yml",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn cheap_embed_gates_and_every_tensor_equal_mergekits() {
    let fx = json("cheap_embed.json");
    let base = Checkpoint::open(fixtures().join("base")).unwrap();
    let embed = base.load("model.embed_tokens.weight").unwrap();
    let embed = embed.data.into_dimensionality::<ndarray::Ix2>().unwrap();
    let mut gates = Vec::new();
    for e in fx["experts"].as_array().unwrap() {
        let g =
            cheap_embed_gate(embed.view(), &ids(&e["positive"]), &ids(&e["negative"]), 2).unwrap();
        let want: Vec<f32> = e["gate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        for row in g.rows() {
            let dev = row
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(dev < 1e-6, "{}: gate off by {dev}", e["name"]);
        }
        gates.push(g);
    }
    let gates = stack_gates(&gates).unwrap();
    // Our gates equal mergekit's router weights to f32 rounding; the mixture
    // built from mergekit's own router rows equals its output bit for bit.
    let (theirs, _) = mergekit_output("cheap_embed");
    for l in 0..2 {
        let r = theirs
            .get(&format!("model.layers.{l}.block_sparse_moe.gate.weight"))
            .unwrap();
        let r = r
            .data
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        assert!(max_dev(&gates.index_axis(ndarray::Axis(0), l).to_owned(), &r) < 1e-6);
    }
    build_and_compare("cheap_embed", &router_rows(&theirs));
}

/// mergekit's router weights as `[layers, experts, hidden]`.
fn router_rows(sd: &StateDict) -> Array3<f32> {
    let rows: Vec<Array2<f32>> = (0..2)
        .map(|l| {
            sd.get(&format!("model.layers.{l}.block_sparse_moe.gate.weight"))
                .unwrap()
                .data
                .clone()
                .into_dimensionality::<ndarray::Ix2>()
                .unwrap()
        })
        .collect();
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    ndarray::stack(ndarray::Axis(0), &views).unwrap()
}

#[test]
fn hidden_gates_follow_mergekits_formula_and_every_tensor_equals_mergekits() {
    let fx = json("hidden_states.json");
    let (theirs, _) = mergekit_output("hidden");
    let stored = router_rows(&theirs);
    for (e, ex) in fx["experts"].as_array().unwrap().iter().enumerate() {
        let feats = |prompts: &Value| -> Vec<Array2<f32>> {
            prompts
                .as_array()
                .map(|a| a.iter().map(|p| matrix(&p["hidden_f32"])).collect())
                .unwrap_or_default()
        };
        let g = hidden_gate(&feats(&ex["positive"]), &feats(&ex["negative"])).unwrap();
        // The formula on mergekit's f32 inputs: mean of positives minus mean
        // of negatives, unit length per layer.
        assert!(max_dev(&g, &matrix(&ex["gate_f32"])) < 1e-6, "expert {e}");
        // On its bfloat16 inputs the same formula gives its stored gate to bf16 rounding.
        let bf = hidden_gate(
            &[matrix(&ex["positive_mean_bf16"])],
            &ex["negative_mean_bf16"]
                .as_array()
                .map(|_| vec![matrix(&ex["negative_mean_bf16"])])
                .unwrap_or_default(),
        )
        .unwrap();
        let s = stored.index_axis(ndarray::Axis(1), e).to_owned();
        assert!(max_dev(&bf, &s) < 8e-3, "expert {e}: {}", max_dev(&bf, &s));
        // f32 gates (ours) differ from mergekit's bf16 ones by its rounding only.
        assert!(max_dev(&g, &s) < 1e-2, "expert {e}: {}", max_dev(&g, &s));
    }
    build_and_compare("hidden", &stored);
}

#[test]
fn configs_mergekit_refuses_are_refused_with_its_message() {
    let fx = json("invalid.json");
    for (case, c) in fx.as_object().unwrap() {
        let yaml = serde_yaml_ng::to_string(&c["config"]).unwrap();
        let got = MoeConfig::parse(&yaml, Path::new("case.yml"));
        let rejected = c["rejected"].as_bool().unwrap();
        match (case.as_str(), rejected, got) {
            // Stricter than mergekit, on purpose: a misspelt key is an error.
            ("unknown_field_ignored", false, Err(e)) => {
                assert!(e.to_string().contains("unknown field"), "{e}")
            }
            (_, false, Ok(_)) => {}
            ("missing_base_model", true, Err(e)) => {
                assert!(e.to_string().contains("base_model"), "{e}")
            }
            (_, true, Err(e)) => {
                let msg = c["message"].as_str().unwrap();
                let first = msg.split(". ").next().unwrap().trim_end_matches('.');
                assert!(
                    e.to_string().contains(first),
                    "{case}: ours '{e}', mergekit's '{msg}'"
                );
            }
            (_, _, got) => panic!("{case}: mergekit rejected={rejected}, ours {got:?}"),
        }
    }
}

/// Copies the fixture's models into a scratch folder the test may change.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for m in ["base", "expert_code", "expert_math", "expert_story"] {
        std::fs::create_dir(dir.path().join(m)).unwrap();
        for f in std::fs::read_dir(fixtures().join(m)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(m).join(f.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn random_yaml(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("moe.yml");
    std::fs::write(
        &p,
        format!(
            "base_model: base\ngate_mode: random\nexperts:\n- source_model: expert_code\n\
             - source_model: expert_math\n  residual_scale: 0.5\n- source_model: expert_story\n{extra}"
        ),
    )
    .unwrap();
    p
}

#[test]
fn random_gates_build_a_mixture_and_bad_input_is_named() {
    let dir = scratch();
    let yml = random_yaml(dir.path(), "experts_per_token: 1\n");
    let job = MoeJob::load(&yml).unwrap();
    assert_eq!(job.config.gate_mode, GateMode::Random);
    let gates = merge::moe::random_gates(GateMode::Random, 2, 3, 16, 7).unwrap();
    let out = dir.path().join("out");
    let moe = job.build(gates.view(), 7, &out, 5 << 30).unwrap();
    assert_eq!(moe.config.moe.unwrap().num_experts_per_tok, 1);
    // residual_scale multiplies the expert's down_proj only.
    let ft = Checkpoint::open(dir.path().join("expert_math")).unwrap();
    let w2 = moe
        .weights
        .get("model.layers.1.block_sparse_moe.experts.1.w2.weight")
        .unwrap();
    let down = ft.load("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!(w2.data, down.data.mapv(|x| x * 0.5));
    let w1 = moe
        .weights
        .get("model.layers.1.block_sparse_moe.experts.1.w1.weight")
        .unwrap();
    assert_eq!(
        w1.data,
        ft.load("model.layers.1.mlp.gate_proj.weight").unwrap().data
    );
    // The output is never overwritten, and nothing temporary is left beside it.
    let e = job.build(gates.view(), 7, &out, 5 << 30).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    // Gates of the wrong shape or with NaN.
    let bad = Array3::<f32>::zeros((2, 2, 16));
    let e = job
        .build(bad.view(), 0, &dir.path().join("o2"), 5 << 30)
        .unwrap_err();
    assert!(
        e.to_string().contains("gates") && e.to_string().contains("[2, 3, 16]"),
        "{e}"
    );
    let mut nan = gates.clone();
    nan[[1, 2, 3]] = f32::NAN;
    let e = job
        .build(nan.view(), 0, &dir.path().join("o3"), 5 << 30)
        .unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    assert!(!dir.path().join("o2").exists() && !dir.path().join("o3").exists());
    // experts_per_token above the number of experts.
    let yml = random_yaml(dir.path(), "experts_per_token: 4\n");
    let e = MoeJob::load(&yml).unwrap_err().to_string();
    assert!(
        e.contains("experts_per_token 4") && e.contains("at least as many"),
        "{e}"
    );
    // Missing positive prompts for a prompt-based gate.
    let yml = dir.path().join("h.yml");
    std::fs::write(
        &yml,
        "base_model: base\ngate_mode: hidden\nexperts:\n- source_model: expert_code\n  \
         positive_prompts: [a]\n- source_model: expert_math\n",
    )
    .unwrap();
    let e = MoeJob::load(&yml).unwrap_err().to_string();
    assert!(
        e.contains("experts[1]") && e.contains("no positive prompts"),
        "{e}"
    );
    // Bad dtype, unknown gate mode, shared experts.
    for (extra, want) in [
        ("dtype: int8\n", "dtype 'int8'"),
        ("gate_mode: hiden\n", "unknown variant `hiden`"),
        ("shared_experts: []\n", "shared_experts"),
    ] {
        let p = dir.path().join("x.yml");
        let text = std::fs::read_to_string(random_yaml(dir.path(), ""))
            .unwrap()
            .replace("gate_mode: random\n", "")
            + extra
            + if extra.starts_with("gate_mode") {
                ""
            } else {
                "gate_mode: random\n"
            };
        std::fs::write(&p, text).unwrap();
        let e = MoeJob::load(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
    // An expert of another shape (a different base).
    let cfg_path = dir.path().join("expert_story/config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    v["vocab_size"] = 500.into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = MoeJob::load(&random_yaml(dir.path(), ""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("experts[2]") && e.contains("different base") && e.contains("vocabulary 500"),
        "{e}"
    );
    // A base that is already a mixture, or not a LLaMA.
    v["vocab_size"] = 384.into();
    v["model_type"] = "bert".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = MoeJob::load(&random_yaml(dir.path(), ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type 'bert'"), "{e}");
}

#[test]
fn gate_cosines_find_parallel_rows() {
    let mut g = Array3::<f32>::zeros((2, 3, 2));
    g[[0, 0, 0]] = 1.0;
    g[[0, 1, 0]] = 2.0; // parallel to row 0
    g[[0, 2, 1]] = 1.0; // orthogonal
    g[[1, 0, 0]] = 1.0;
    g[[1, 1, 0]] = -1.0;
    let c = merge::moe::gate_cosines(g.view());
    assert_eq!(
        c[0],
        ndarray::array![[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    );
    assert_eq!(c[1][[0, 1]], -1.0);
    assert_eq!(c[1][[0, 2]], 0.0, "a zero row");
}

#[test]
fn hidden_and_cheap_embed_gates_name_bad_input() {
    let e = hidden_gate(&[], &[]).unwrap_err().to_string();
    assert!(
        e.contains("positive prompts") && e.contains("no prompts"),
        "{e}"
    );
    let a = Array2::<f32>::ones((2, 4));
    let b = Array2::<f32>::ones((3, 4));
    let e = hidden_gate(&[a.clone(), b], &[]).unwrap_err().to_string();
    assert!(e.contains("prompt 1"), "{e}");
    // Unit length per layer; a zero difference stays zero (mergekit's 1e-8 floor).
    let g = hidden_gate(std::slice::from_ref(&a), &[]).unwrap();
    for row in g.rows() {
        assert!((row.dot(&row) - 1.0).abs() < 1e-6);
    }
    let z = hidden_gate(std::slice::from_ref(&a), std::slice::from_ref(&a)).unwrap();
    assert!(z.iter().all(|x| *x == 0.0));
    let embed = Array2::<f32>::eye(4);
    let e = cheap_embed_gate(embed.view(), &[vec![1, 9]], &[], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 9"), "{e}");
    // By hand: tokens 0, 1, 1 → (1, 2, 0, 0)/√5; minus token 3 → unit(v − e₃).
    let g = cheap_embed_gate(embed.view(), &[vec![0, 1], vec![1]], &[], 3).unwrap();
    let s5 = 5f32.sqrt();
    assert_eq!(g.dim(), (3, 4));
    assert!(
        max_dev(
            &g.slice(ndarray::s![..1, ..]).to_owned(),
            &ndarray::array![[1.0 / s5, 2.0 / s5, 0.0, 0.0]]
        ) < 1e-7
    );
    let g = cheap_embed_gate(embed.view(), &[vec![0, 1], vec![1]], &[vec![3]], 1).unwrap();
    let n = (1.0 / 5.0 + 4.0 / 5.0 + 1.0f32).sqrt();
    let want = ndarray::array![[1.0 / s5 / n, 2.0 / s5 / n, 0.0, -1.0 / n]];
    assert!(max_dev(&g, &want) < 1e-6);
}
