//! Transformer specs: function preservation with GQA and RoPE (a plain
//! ndarray LLaMA forward written here), planted permutations, BERT naming.

mod common;

use common::{linear, matrix, vector};

use ndarray::{Array2, ArrayD, Ix1, IxDyn, s};
use permute::builders::{bert, llama, llama_units};
use permute::orthogonal::{fold_rms_norms, residual_procrustes, rotate_residual};
use permute::spec::{Inner, apply};
use permute::{MatchOptions, weight_matching};
use weights::llama::names;
use weights::rng::Rng;
use weights::{LlamaConfig, StateDict, Tensor};

/// The test model's sizes (the spec gets them as a [`LlamaConfig`], [`config`]).
struct Dims {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
}

const DIMS: Dims = Dims {
    layers: 2,
    hidden: 16,
    heads: 4,
    kv_heads: 2,
    head_dim: 4,
    ffn: 24,
};
const VOCAB: usize = 11;

/// A wider GQA model: four query heads per key/value head, so the copy
/// orders are searched by alternating assignments rather than tried one by one.
const WIDE: Dims = Dims {
    layers: 2,
    hidden: 32,
    heads: 8,
    kv_heads: 2,
    head_dim: 4,
    ffn: 24,
};

fn config() -> LlamaConfig {
    config_of(&DIMS)
}

fn random_llama(seed: u64, tied: bool) -> StateDict {
    random_llama_of(&DIMS, seed, tied)
}

fn forward(sd: &StateDict, tokens: &[usize]) -> Array2<f32> {
    forward_of(&DIMS, sd, tokens)
}

fn config_of(dims: &Dims) -> LlamaConfig {
    let c = LlamaConfig::tiny(
        VOCAB,
        dims.hidden,
        dims.layers,
        dims.heads,
        dims.kv_heads,
        dims.ffn,
    );
    assert_eq!(c.head_dim, dims.head_dim);
    c
}

fn random_llama_of(dims: &Dims, seed: u64, tied: bool) -> StateDict {
    let mut rng = Rng::new(seed);
    let mut c = config_of(dims);
    c.tie_word_embeddings = tied;
    let mut sd = StateDict::new();
    for (name, shape) in c.weight_shapes() {
        // Norms near one, projections at scale 0.5, embedding and head at 1.
        let (scale, offset) = match shape.len() {
            1 => (0.1, 1.0),
            _ if name == names::EMBED || name == names::LM_HEAD => (1.0, 0.0),
            _ => (0.5, 0.0),
        };
        let data = ArrayD::from_shape_fn(IxDyn(&shape), |_| (offset + scale * rng.normal()) as f32);
        sd.insert(name, Tensor::f32(data));
    }
    sd
}

fn rms_norm(x: &Array2<f32>, w: &ArrayD<f32>) -> Array2<f32> {
    let w = w.view().into_dimensionality::<Ix1>().unwrap();
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + 1e-6).sqrt();
        row.zip_mut_with(&w, |v, g| *v = *v / rms * g);
    }
    out
}

/// Hugging Face rotate-half RoPE on the rows of one head, `x: [T, d]`.
fn rope(x: &Array2<f32>, theta: f32) -> Array2<f32> {
    let (t, d) = x.dim();
    let half = d / 2;
    let mut out = x.clone();
    for pos in 0..t {
        for i in 0..half {
            let freq = theta.powf(-((2 * i) as f32) / d as f32);
            let (c, s) = ((pos as f32 * freq).cos(), (pos as f32 * freq).sin());
            let (a, b) = (x[[pos, i]], x[[pos, i + half]]);
            out[[pos, i]] = a * c - b * s;
            out[[pos, i + half]] = b * c + a * s;
        }
    }
    out
}

fn forward_of(dims: &Dims, sd: &StateDict, tokens: &[usize]) -> Array2<f32> {
    let (d, t) = (dims.head_dim, tokens.len());
    let emb = matrix(sd, "model.embed_tokens.weight");
    let mut x = Array2::from_shape_fn((t, dims.hidden), |(i, j)| emb[[tokens[i], j]]);
    let n_rep = dims.heads / dims.kv_heads;
    for l in 0..dims.layers {
        let p = format!("model.layers.{l}");
        let hn = rms_norm(
            &x,
            &sd.get(&format!("{p}.input_layernorm.weight")).unwrap().data,
        );
        let q = hn.dot(&matrix(sd, &format!("{p}.self_attn.q_proj.weight")).t());
        let k = hn.dot(&matrix(sd, &format!("{p}.self_attn.k_proj.weight")).t());
        let v = hn.dot(&matrix(sd, &format!("{p}.self_attn.v_proj.weight")).t());
        let mut heads_out = Array2::<f32>::zeros((t, dims.heads * d));
        for h in 0..dims.heads {
            let g = h / n_rep;
            let qh = rope(&q.slice(s![.., h * d..(h + 1) * d]).to_owned(), 10000.0);
            let kh = rope(&k.slice(s![.., g * d..(g + 1) * d]).to_owned(), 10000.0);
            let vh = v.slice(s![.., g * d..(g + 1) * d]).to_owned();
            let mut scores = qh.dot(&kh.t()) / (d as f32).sqrt();
            for i in 0..t {
                for j in i + 1..t {
                    scores[[i, j]] = f32::NEG_INFINITY;
                }
                let m = scores
                    .row(i)
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut row = scores.row_mut(i);
                row.mapv_inplace(|s| (s - m).exp());
                let z = row.sum();
                row.mapv_inplace(|s| s / z);
            }
            heads_out
                .slice_mut(s![.., h * d..(h + 1) * d])
                .assign(&scores.dot(&vh));
        }
        x = x + heads_out.dot(&matrix(sd, &format!("{p}.self_attn.o_proj.weight")).t());
        let hn = rms_norm(
            &x,
            &sd.get(&format!("{p}.post_attention_layernorm.weight"))
                .unwrap()
                .data,
        );
        let gate = hn
            .dot(&matrix(sd, &format!("{p}.mlp.gate_proj.weight")).t())
            .mapv(|v| v / (1.0 + (-v).exp()));
        let up = hn.dot(&matrix(sd, &format!("{p}.mlp.up_proj.weight")).t());
        x = x + (gate * up).dot(&matrix(sd, &format!("{p}.mlp.down_proj.weight")).t());
    }
    let x = rms_norm(&x, &sd.get("model.norm.weight").unwrap().data);
    let head = if sd.contains("lm_head.weight") {
        matrix(sd, "lm_head.weight")
    } else {
        emb
    };
    x.dot(&head.t())
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    (a - b).iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn llama_spec_preserves_the_function_with_gqa_and_rope() {
    let tokens = [3usize, 1, 4, 1, 5, 9, 2];
    for tied in [false, true] {
        let sd = random_llama(1, tied);
        let spec = llama(&config(), &sd).unwrap();
        spec.validate(&sd, "llama").unwrap();
        let before = forward(&sd, &tokens);
        for seed in 0..3 {
            let p = spec.random(10 + seed);
            let permuted = apply(&spec, &p, &sd).unwrap();
            assert_ne!(permuted, sd);
            let d = max_diff(&before, &forward(&permuted, &tokens));
            assert!(
                d < 1e-4 * before.iter().fold(1f32, |m, v| m.max(v.abs())),
                "tied={tied} seed={seed}: {d}"
            );
        }
    }
}

/// A multi-head version of the test model (the unit-wise spec refuses GQA).
const MHA: Dims = Dims {
    layers: 2,
    hidden: 16,
    heads: 4,
    kv_heads: 4,
    head_dim: 4,
    ffn: 24,
};

#[test]
fn the_unit_wise_spec_changes_the_function_the_head_aware_one_keeps() {
    let sd = random_llama_of(&MHA, 8, false);
    let c = config_of(&MHA);
    let units = llama_units(&c, &sd).unwrap();
    units.validate(&sd, "llama").unwrap();
    // Residual and FFN groups as the head-aware spec; per block a q/k and a
    // v/o group of heads·head_dim plain units.
    let names: Vec<&str> = units.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "residual",
            "model.layers.0.ffn",
            "model.layers.0.qk",
            "model.layers.0.vo",
            "model.layers.1.ffn",
            "model.layers.1.qk",
            "model.layers.1.vo"
        ]
    );
    let qk = units.group("model.layers.0.qk").unwrap();
    assert_eq!((qk.blocks, qk.block_size), (16, 1));
    let members: Vec<(&str, usize)> = qk
        .members
        .iter()
        .map(|m| (m.weight.as_str(), m.axis))
        .collect();
    assert_eq!(
        members,
        [
            ("model.layers.0.self_attn.q_proj.weight", 0),
            ("model.layers.0.self_attn.k_proj.weight", 0)
        ]
    );
    let tokens = [3usize, 1, 4, 1, 5, 9, 2];
    let before = forward_of(&MHA, &sd, &tokens);
    let scale = before.iter().fold(1f32, |m, v| m.max(v.abs()));
    for seed in 0..3 {
        // Any value of the head-aware spec keeps the function ...
        let heads = llama(&c, &sd).unwrap();
        let kept = apply(&heads, &heads.random(20 + seed), &sd).unwrap();
        assert!(max_diff(&before, &forward_of(&MHA, &kept, &tokens)) < 1e-4 * scale);
        // ... a random value of the unit-wise one does not.
        let moved = apply(&units, &units.random(20 + seed), &sd).unwrap();
        let d = max_diff(&before, &forward_of(&MHA, &moved, &tokens));
        assert!(
            d > 1e-2 * scale,
            "seed {seed}: the unit-wise permutation kept the function ({d})"
        );
        // Weight matching over the unit-wise spec still recovers its own planted value.
        let res = weight_matching(&units, &sd, &moved, &MatchOptions::default()).unwrap();
        assert!(res.l2_after < 1e-4, "{} -> {}", res.l2_before, res.l2_after);
    }
    // Grouped-query attention is refused by name.
    let e = llama_units(&config(), &random_llama(1, false)).unwrap_err();
    assert!(e.to_string().contains("multi-head"), "{e}");
}

/// A random `n × n` orthogonal matrix (the polar factor of a Gaussian one).
fn random_orthogonal(n: usize, seed: u64) -> Array2<f64> {
    let mut rng = Rng::new(seed);
    let g = Array2::from_shape_fn((n, n), |_| rng.normal());
    let svd = spectra::linalg::full_svd(g.view(), "g").unwrap();
    svd.u.dot(&svd.vt)
}

#[test]
fn folded_norms_and_any_residual_rotation_keep_the_function() {
    let tokens = [3usize, 1, 4, 1, 5, 9, 2];
    let c = config();
    let sd = random_llama(4, false);
    let before = forward(&sd, &tokens);
    let scale = before.iter().fold(1f32, |m, v| m.max(v.abs()));
    let folded = fold_rms_norms(&c, &sd).unwrap();
    assert_ne!(folded, sd);
    assert!(
        folded
            .get("model.norm.weight")
            .unwrap()
            .data
            .iter()
            .all(|&g| g == 1.0)
    );
    assert!(max_diff(&before, &forward(&folded, &tokens)) < 1e-4 * scale);
    for seed in 0..3 {
        let q = random_orthogonal(DIMS.hidden, 30 + seed);
        let rotated = rotate_residual(&c, &folded, q.view()).unwrap();
        let d = max_diff(&before, &forward(&rotated, &tokens));
        assert!(d < 1e-4 * scale, "seed {seed}: {d}");
        // Procrustes finds the rotation back: Qᵀ, and B rotated equals A.
        let back = residual_procrustes(&c, &folded, &rotated).unwrap();
        let err = (&back - &q.t()).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(err < 1e-6, "seed {seed}: |Q̂ − Qᵀ| = {err}");
        let aligned = rotate_residual(&c, &rotated, back.view()).unwrap();
        assert!(permute::matching::l2_distance(&folded, &aligned) < 1e-4);
    }
    // Unfolded gains would not commute with the rotation: refused by name.
    let q = random_orthogonal(DIMS.hidden, 1);
    let e = rotate_residual(&c, &sd, q.view()).unwrap_err();
    assert!(e.to_string().contains("fold_rms_norms"), "{e}");
    // So are a non-orthogonal matrix, a wrong size, and tied embeddings.
    let e = rotate_residual(&c, &folded, (2.0 * &q).view()).unwrap_err();
    assert!(e.to_string().contains("not orthogonal"), "{e}");
    let e = rotate_residual(&c, &folded, Array2::<f64>::eye(3).view()).unwrap_err();
    assert!(
        e.to_string().contains("3 × 3") || e.to_string().contains("(3, 3)"),
        "{e}"
    );
    let e = fold_rms_norms(&c, &random_llama(4, true)).unwrap_err();
    assert!(e.to_string().contains("untied"), "{e}");
}

#[test]
fn a_residual_permutation_is_the_rotation_by_its_permutation_matrix() {
    let c = config();
    let folded = fold_rms_norms(&c, &random_llama(5, false)).unwrap();
    let spec = llama(&c, &folded).unwrap();
    let mut p = spec.identity();
    p["residual"] = spec.random(9)["residual"].clone();
    let permuted = apply(&spec, &p, &folded).unwrap();
    let outer = &p["residual"].outer;
    let q = Array2::from_shape_fn((DIMS.hidden, DIMS.hidden), |(i, j)| {
        f64::from(u8::from(outer[i] == j))
    });
    let rotated = rotate_residual(&c, &folded, q.view()).unwrap();
    assert!(permute::matching::l2_distance(&permuted, &rotated) < 1e-6);
}

#[test]
fn moving_rotary_pairs_inside_a_head_would_change_the_function() {
    // The same spec with a free q/k family (what a naive spec would allow).
    let sd = random_llama(2, false);
    let mut spec = llama(&config(), &sd).unwrap();
    for g in spec.groups.iter_mut().filter(|g| g.name.ends_with("heads")) {
        g.families[0] = Inner::Free;
    }
    let p = spec.random(5);
    let permuted = apply(&spec, &p, &sd).unwrap();
    let tokens = [1usize, 2, 3, 4, 5];
    assert!(max_diff(&forward(&sd, &tokens), &forward(&permuted, &tokens)) > 1e-2);
}

#[test]
fn weight_matching_recovers_planted_transformer_permutations() {
    // Every symmetry the spec claims is planted: residual and FFN channels,
    // key/value heads with their query groups, v/o units inside a head, and
    // the order of the query heads sharing a key/value head. Matching must
    // find the planted value itself (B aligned equals A), for two and for
    // four query heads per key/value head (tried exhaustively / alternated).
    for (dims, seed) in [(&DIMS, 3), (&WIDE, 4)] {
        let a = random_llama_of(dims, seed, false);
        let spec = llama(&config_of(dims), &a).unwrap();
        for plant in 0..3 {
            let p = spec.random(7 + plant);
            let moved = p
                .values()
                .filter(|g| g.copies.iter().any(|c| c.windows(2).any(|w| w[0] > w[1])))
                .count();
            assert!(moved > 0, "plant {plant} reorders no query heads");
            let b = apply(&spec, &p, &a).unwrap();
            let res = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
            assert!(res.l2_before > 1.0);
            assert!(
                res.l2_after < 1e-4,
                "heads {} / kv {}: plant {plant}: {} -> {}",
                dims.heads,
                dims.kv_heads,
                res.l2_before,
                res.l2_after
            );
            assert!(res.passes <= 6, "{} passes", res.passes);
            // The recovered value is the planted one's inverse, group by group.
            let inv = permute::spec::invert(&p);
            for (name, got) in &res.perm {
                let g = spec.group(name).unwrap();
                let (x, y) = (got.clone(), inv[name].clone());
                for m in &g.members {
                    assert_eq!(
                        x.flat(g, m),
                        y.flat(g, m),
                        "group {name}, member {}",
                        m.weight
                    );
                }
            }
        }
    }
}

#[test]
fn reordering_query_heads_inside_a_kv_group_keeps_the_function() {
    // Only the copy orders (query heads within each key/value group) move.
    for dims in [&DIMS, &WIDE] {
        let sd = random_llama_of(dims, 6, false);
        let spec = llama(&config_of(dims), &sd).unwrap();
        let mut p = spec.identity();
        let random = spec.random(3);
        for (name, v) in p.iter_mut() {
            if name.ends_with("heads") {
                v.copies = random[name].copies.clone();
                assert!(
                    v.copies
                        .iter()
                        .all(|c| c.len() == dims.heads / dims.kv_heads)
                );
            }
        }
        let permuted = apply(&spec, &p, &sd).unwrap();
        assert_ne!(permuted, sd);
        let tokens = [2usize, 7, 1, 8, 2, 8];
        let before = forward_of(dims, &sd, &tokens);
        let d = max_diff(&before, &forward_of(dims, &permuted, &tokens));
        assert!(
            d < 1e-4 * before.iter().fold(1f32, |m, v| m.max(v.abs())),
            "{d}"
        );
        // Reordering query heads without their o_proj columns is not a symmetry.
        let mut broken = permuted.clone();
        for l in 0..dims.layers {
            let o = format!("model.layers.{l}.self_attn.o_proj.weight");
            broken.insert(o.clone(), sd.get(&o).unwrap().clone());
        }
        assert!(max_diff(&before, &forward_of(dims, &broken, &tokens)) > 1e-2);
    }
}

fn layer_norm(x: &Array2<f32>, sd: &StateDict, p: &str) -> Array2<f32> {
    let (w, b) = (
        vector(sd, &format!("{p}.weight")),
        vector(sd, &format!("{p}.bias")),
    );
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let n = row.len() as f32;
        let m = row.sum() / n;
        let v = row.iter().map(|x| (x - m).powi(2)).sum::<f32>() / n;
        for (k, x) in row.iter_mut().enumerate() {
            *x = (*x - m) / (v + 1e-12).sqrt() * w[k] + b[k];
        }
    }
    out
}

/// A post-LayerNorm BERT encoder (no rotary embedding), returning the pooled output.
fn bert_forward(sd: &StateDict, tokens: &[usize], heads: usize) -> Array2<f32> {
    let t = tokens.len();
    let (we, pe, te) = (
        matrix(sd, "embeddings.word_embeddings.weight"),
        matrix(sd, "embeddings.position_embeddings.weight"),
        matrix(sd, "embeddings.token_type_embeddings.weight"),
    );
    let h = we.ncols();
    let x = Array2::from_shape_fn((t, h), |(i, j)| {
        we[[tokens[i], j]] + pe[[i, j]] + te[[0, j]]
    });
    let mut x = layer_norm(&x, sd, "embeddings.LayerNorm");
    let d = h / heads;
    let mut l = 0;
    while sd.contains(&format!("encoder.layer.{l}.attention.self.query.weight")) {
        let p = format!("encoder.layer.{l}");
        let q = linear(&x, sd, &format!("{p}.attention.self.query"));
        let k = linear(&x, sd, &format!("{p}.attention.self.key"));
        let v = linear(&x, sd, &format!("{p}.attention.self.value"));
        let mut ctx = Array2::<f32>::zeros((t, h));
        for hd in 0..heads {
            let r = hd * d..(hd + 1) * d;
            let mut sc = q
                .slice(s![.., r.clone()])
                .dot(&k.slice(s![.., r.clone()]).t())
                / (d as f32).sqrt();
            for mut row in sc.rows_mut() {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.mapv_inplace(|v| (v - m).exp());
                let z = row.sum();
                row.mapv_inplace(|v| v / z);
            }
            ctx.slice_mut(s![.., r.clone()])
                .assign(&sc.dot(&v.slice(s![.., r])));
        }
        x = layer_norm(
            &(x + linear(&ctx, sd, &format!("{p}.attention.output.dense"))),
            sd,
            &format!("{p}.attention.output.LayerNorm"),
        );
        let inter = linear(&x, sd, &format!("{p}.intermediate.dense"))
            .mapv(|v| 0.5 * v * (1.0 + (v * 0.797_884_6 * (1.0 + 0.044715 * v * v)).tanh()));
        x = layer_norm(
            &(x.clone() + linear(&inter, sd, &format!("{p}.output.dense"))),
            sd,
            &format!("{p}.output.LayerNorm"),
        );
        l += 1;
    }
    linear(&x, sd, "pooler.dense").mapv(f32::tanh)
}

#[test]
fn bert_spec_from_minilm_style_names() {
    let mut rng = Rng::new(4);
    let (h, f, heads) = (12usize, 20usize, 3usize);
    let mut sd = StateDict::new();
    let mut t = |name: &str, shape: &[usize]| {
        sd.insert(name, Tensor::f32(rng.normal_array(IxDyn(shape))));
    };
    t("embeddings.word_embeddings.weight", &[30, h]);
    t("embeddings.position_embeddings.weight", &[8, h]);
    t("embeddings.token_type_embeddings.weight", &[2, h]);
    t("embeddings.LayerNorm.weight", &[h]);
    t("embeddings.LayerNorm.bias", &[h]);
    for l in 0..2 {
        let p = format!("encoder.layer.{l}");
        for n in ["query", "key", "value"] {
            t(&format!("{p}.attention.self.{n}.weight"), &[h, h]);
            t(&format!("{p}.attention.self.{n}.bias"), &[h]);
        }
        t(&format!("{p}.attention.output.dense.weight"), &[h, h]);
        t(&format!("{p}.attention.output.dense.bias"), &[h]);
        t(&format!("{p}.attention.output.LayerNorm.weight"), &[h]);
        t(&format!("{p}.attention.output.LayerNorm.bias"), &[h]);
        t(&format!("{p}.intermediate.dense.weight"), &[f, h]);
        t(&format!("{p}.intermediate.dense.bias"), &[f]);
        t(&format!("{p}.output.dense.weight"), &[h, f]);
        t(&format!("{p}.output.dense.bias"), &[h]);
        t(&format!("{p}.output.LayerNorm.weight"), &[h]);
        t(&format!("{p}.output.LayerNorm.bias"), &[h]);
    }
    t("pooler.dense.weight", &[h, h]);
    t("pooler.dense.bias", &[h]);
    let spec = bert(&sd, heads).unwrap();
    spec.validate(&sd, "bert").unwrap();
    assert_eq!(spec.groups.len(), 1 + 2 * 2);
    // Every 2-D weight but the pooler output is touched on both axes.
    let by = spec.by_weight();
    assert_eq!(by["encoder.layer.1.attention.self.query.weight"].len(), 2);
    assert_eq!(by["pooler.dense.weight"].len(), 1);
    let p = spec.random(9);
    let b = apply(&spec, &p, &sd).unwrap();
    // Function preservation: heads move whole, with free within-head q/k and v/o orders.
    let tokens = [4usize, 7, 1, 0, 29];
    let (y0, y1) = (
        bert_forward(&sd, &tokens, heads),
        bert_forward(&b, &tokens, heads),
    );
    assert!(
        max_diff(&y0, &y1) < 1e-5,
        "BERT output changed by {}",
        max_diff(&y0, &y1)
    );
    let res = weight_matching(&spec, &sd, &b, &MatchOptions::default()).unwrap();
    assert!(res.l2_after < 1e-4, "{}", res.l2_after);
    assert!(bert(&sd, 5).is_err());
}

/// `infer_spec` (what the `permute` CLI calls): a LLaMA checkpoint's spec from
/// its tensor names and `config.json`, or from its shapes and a head count,
/// equals the builder's; what cannot be inferred is a named error.
#[test]
fn infer_spec_builds_the_llama_spec_from_names_config_or_shapes() {
    use permute::builders::{SpecHints, infer_spec};
    let sd = random_llama(5, false);
    let want = llama(&config(), &sd).unwrap();
    let config = r#"{"vocab_size": 11, "hidden_size": 16, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 24}"#;
    let (arch, spec) = infer_spec(
        &sd,
        &SpecHints {
            config_json: Some(config),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((arch.as_str(), &spec), ("llama", &want));
    // No config: sizes from the shapes, heads and kv heads from the hints.
    let (_, from_shapes) = infer_spec(
        &sd,
        &SpecHints {
            heads: Some(4),
            kv_heads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(from_shapes, want);
    let err = infer_spec(&sd, &SpecHints::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("head count"), "{err}");
    let err = infer_spec(
        &sd,
        &SpecHints {
            arch: Some("gpt9"),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("'gpt9'"), "{err}");
    let err = infer_spec(&StateDict::new(), &SpecHints::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot infer the architecture"), "{err}");
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn weight_matching_recovers_planted_permutations_of_smollm2() {
    // SmolLM2-135M (9 query heads on 3 key/value heads): a copy with every
    // symmetry of the spec planted (residual, FFN channels, key/value heads,
    // v/o units, query heads inside each group) is mapped back onto the
    // original exactly.
    let path =
        weights::testing::fetched_model("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let c = weights::GgufFile::open(&path)
        .unwrap()
        .config()
        .to_llama()
        .unwrap();
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (9, 3));
    let a = StateDict::load(&path).unwrap();
    let spec = llama(&c, &a).unwrap();
    let p = spec.random(11);
    let b = apply(&spec, &p, &a).unwrap();
    let t = std::time::Instant::now();
    let res = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    eprintln!(
        "SmolLM2 planted: l2 {:.1} -> {:.2e} in {} passes, {:.1} s",
        res.l2_before,
        res.l2_after,
        res.passes,
        t.elapsed().as_secs_f64()
    );
    assert!(res.l2_before > 100.0);
    assert!(res.l2_after < 1e-3, "{} -> {}", res.l2_before, res.l2_after);
    let inv = permute::spec::invert(&p);
    for g in &spec.groups {
        for m in &g.members {
            assert_eq!(
                res.perm[&g.name].flat(g, m),
                inv[&g.name].flat(g, m),
                "group {}, member {}",
                g.name,
                m.weight
            );
        }
    }
}

#[test]
fn copy_orders_are_checked_and_inverted() {
    let sd = random_llama_of(&WIDE, 8, false);
    let spec = llama(&config_of(&WIDE), &sd).unwrap();
    let p = spec.random(2);
    // Applying a value and then its inverse gives the model back.
    let there = apply(&spec, &p, &sd).unwrap();
    let back = apply(&spec, &permute::spec::invert(&p), &there).unwrap();
    assert_eq!(back, sd);
    let name = "model.layers.0.heads";
    let g = spec.group(name).unwrap();
    assert_eq!(g.copy_count(), 4);
    let err = |bad: &permute::spec::GroupPerm| bad.check(g).unwrap_err().to_string();
    let mut bad = p[name].clone();
    bad.copies[1] = vec![0, 1, 1, 3];
    assert!(err(&bad).contains("copy order"), "{}", err(&bad));
    bad.copies.pop();
    assert!(err(&bad).contains("copy orders"), "{}", err(&bad));
    // A spec whose repeated members disagree on their copy count is refused.
    let mut broken = spec.clone();
    let heads = broken.groups.iter_mut().find(|g| g.name == name).unwrap();
    heads.members[0].repeat = 2;
    let e = broken.check().unwrap_err().to_string();
    assert!(e.contains("permutes copies"), "{e}");
    // Fixed copies take no copy order.
    let mut fixed = spec.clone();
    let heads = fixed.groups.iter_mut().find(|g| g.name == name).unwrap();
    heads.copies = Inner::Identity;
    let e = p[name].check(heads).unwrap_err().to_string();
    assert!(e.contains("copies are fixed"), "{e}");
}

#[test]
fn zip_of_llamas_keeps_apart_heads_channels_and_stream_side_by_side() {
    use permute::zip::{GroupPlan, ZipOptions, lookup_tables, zip};
    let c = config();
    let a = random_llama(12, false);
    let spec = llama(&c, &a).unwrap();
    // B: A with every symmetry shuffled, aligned back by weight matching.
    let b = apply(&spec, &spec.random(13), &a).unwrap();
    let wm = weight_matching(&spec, &a, &b, &MatchOptions::default()).unwrap();
    let bp = apply(&spec, &wm.perm, &b).unwrap();
    let opts = ZipOptions {
        lookups: lookup_tables(&a),
        ..Default::default()
    };
    assert_eq!(opts.lookups, ["model.embed_tokens.weight"]);
    let plan = |apart: &dyn Fn(&str) -> bool| -> indexmap::IndexMap<String, GroupPlan> {
        spec.groups
            .iter()
            .map(|g| {
                let p = if apart(&g.name) {
                    GroupPlan {
                        pairs: vec![],
                        only_a: (0..g.blocks).collect(),
                        only_b: (0..g.blocks).collect(),
                    }
                } else {
                    GroupPlan::merged(g.blocks)
                };
                (g.name.clone(), p)
            })
            .collect()
    };
    let tokens = [3usize, 1, 4, 1, 5, 9, 2];
    let before = forward(&a, &tokens);
    let scale = before.iter().fold(1f32, |m, v| m.max(v.abs()));
    // Key/value heads (with their query heads) and FFN channels kept apart,
    // the residual stream merged: twice the heads and channels, each half
    // of the output; two copies of one model make the same function.
    let z = zip(&spec, &a, &bp, &plan(&|g| g != "residual"), &opts).unwrap();
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(
        z.get(k).unwrap().shape(),
        &[2 * DIMS.kv_heads * DIMS.head_dim, DIMS.hidden]
    );
    let wide = Dims {
        heads: 2 * DIMS.heads,
        kv_heads: 2 * DIMS.kv_heads,
        ffn: 2 * DIMS.ffn,
        ..DIMS
    };
    let d = max_diff(&before, &forward_of(&wide, &z, &tokens));
    assert!(d < 1e-4 * scale, "heads and channels apart: {d}");
    // The residual stream apart too (RMSNorm over two copies of a vector is
    // the norm of one): the embeddings' columns are their output.
    let z = zip(&spec, &a, &bp, &plan(&|_| true), &opts).unwrap();
    let wider = Dims {
        hidden: 2 * DIMS.hidden,
        ..wide
    };
    let d = max_diff(&before, &forward_of(&wider, &z, &tokens));
    assert!(d < 1e-4 * scale, "everything apart: {d}");
    // Two different models, everything merged: the mean of A and aligned B.
    let b2 = random_llama(14, false);
    let wm = weight_matching(&spec, &a, &b2, &MatchOptions::default()).unwrap();
    let bp2 = apply(&spec, &wm.perm, &b2).unwrap();
    let z = zip(&spec, &a, &bp2, &plan(&|_| false), &opts).unwrap();
    let mean = permute::many::mean(&[a.clone(), bp2]).unwrap();
    assert!(permute::matching::l2_distance(&mean, &z) < 1e-5);
}
