//! The Burn decoder against a LLaMA forward written independently here in
//! plain ndarray (f64), with GQA, RoPE (rotate-half) and an untied and a tied
//! head; and the StateDict round trip.

use burn::prelude::*;
use burn::tensor::TensorData;
use ndarray::{Array2, s};
use s2ft_core::model::random_state_dict;
use s2ft_core::{Cpu, Llama, LlamaConfig};
use weights::StateDict;

fn w(sd: &StateDict, name: &str) -> Array2<f64> {
    let t = &sd.get(name).unwrap().data;
    let sh = t.shape().to_vec();
    Array2::from_shape_vec((sh[0], sh[1]), t.iter().map(|&v| v as f64).collect()).unwrap()
}

fn v(sd: &StateDict, name: &str) -> Vec<f64> {
    sd.get(name)
        .unwrap()
        .data
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn rms(x: &Array2<f64>, g: &[f64], eps: f64) -> Array2<f64> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let ms = row.iter().map(|a| a * a).sum::<f64>() / row.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(g).for_each(|(a, gi)| *a *= r * gi);
    }
    y
}

/// Logits `[t, vocab]` for one sequence.
fn reference(c: &LlamaConfig, sd: &StateDict, tokens: &[usize]) -> Array2<f64> {
    reference_with_inputs(c, sd, tokens).0
}

/// Logits, and per block the inputs of q/k/v, o_proj, gate/up and down_proj.
fn reference_with_inputs(
    c: &LlamaConfig,
    sd: &StateDict,
    tokens: &[usize],
) -> (Array2<f64>, Vec<[Array2<f64>; 4]>) {
    let mut inputs = Vec::new();
    let t = tokens.len();
    let (h, d, nh, nkv) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    let e = w(sd, "model.embed_tokens.weight");
    let mut x = Array2::<f64>::zeros((t, h));
    for (i, &tok) in tokens.iter().enumerate() {
        x.row_mut(i).assign(&e.row(tok));
    }
    let rope = |m: &mut Array2<f64>, heads: usize| {
        for p in 0..t {
            for hd in 0..heads {
                for i in 0..d / 2 {
                    let ang = p as f64 * c.rope_theta.powf(-2.0 * i as f64 / d as f64);
                    let (a, b) = (m[[p, hd * d + i]], m[[p, hd * d + i + d / 2]]);
                    m[[p, hd * d + i]] = a * ang.cos() - b * ang.sin();
                    m[[p, hd * d + i + d / 2]] = b * ang.cos() + a * ang.sin();
                }
            }
        }
    };
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let hn = rms(
            &x,
            &v(sd, &format!("{p}.input_layernorm.weight")),
            c.rms_norm_eps,
        );
        let mut q = hn.dot(&w(sd, &format!("{p}.self_attn.q_proj.weight")).t());
        let mut k = hn.dot(&w(sd, &format!("{p}.self_attn.k_proj.weight")).t());
        let vv = hn.dot(&w(sd, &format!("{p}.self_attn.v_proj.weight")).t());
        rope(&mut q, nh);
        rope(&mut k, nkv);
        let mut att = Array2::<f64>::zeros((t, nh * d));
        for hd in 0..nh {
            let kh = hd / (nh / nkv);
            let qh = q.slice(s![.., hd * d..(hd + 1) * d]);
            let khm = k.slice(s![.., kh * d..(kh + 1) * d]);
            let vh = vv.slice(s![.., kh * d..(kh + 1) * d]);
            let mut sc = qh.dot(&khm.t()) / (d as f64).sqrt();
            for i in 0..t {
                let mx = (0..=i)
                    .map(|j| sc[[i, j]])
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..=i).map(|j| (sc[[i, j]] - mx).exp()).sum();
                for j in 0..t {
                    sc[[i, j]] = if j <= i {
                        (sc[[i, j]] - mx).exp() / z
                    } else {
                        0.0
                    };
                }
            }
            att.slice_mut(s![.., hd * d..(hd + 1) * d])
                .assign(&sc.dot(&vh));
        }
        x = x + att.dot(&w(sd, &format!("{p}.self_attn.o_proj.weight")).t());
        let attn_in = hn;
        let hn = rms(
            &x,
            &v(sd, &format!("{p}.post_attention_layernorm.weight")),
            c.rms_norm_eps,
        );
        let swiglu = |gate: &str, up: &str, down: &str, xin: &Array2<f64>| {
            let g = xin.dot(&w(sd, gate).t());
            let u = xin.dot(&w(sd, up).t());
            let a = g.mapv(|z| z / (1.0 + (-z).exp())) * u;
            let y = a.dot(&w(sd, down).t());
            (a, y)
        };
        match c.moe {
            None => {
                let (a, y) = swiglu(
                    &format!("{p}.mlp.gate_proj.weight"),
                    &format!("{p}.mlp.up_proj.weight"),
                    &format!("{p}.mlp.down_proj.weight"),
                    &hn,
                );
                x = x + y;
                inputs.push([attn_in, att, hn, a]);
            }
            Some(m) => {
                // Mixtral: softmax router, top-k (ties to the lower index),
                // the k weights renormalised, experts summed.
                let logits = hn.dot(&w(sd, &format!("{p}.block_sparse_moe.gate.weight")).t());
                let mut y = Array2::<f64>::zeros((t, h));
                for i in 0..t {
                    let mx = logits.row(i).fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let p_: Vec<f64> = logits.row(i).iter().map(|z| (z - mx).exp()).collect();
                    let mut order: Vec<usize> = (0..m.num_local_experts).collect();
                    order.sort_by(|&a, &b| p_[b].total_cmp(&p_[a]).then(a.cmp(&b)));
                    let top = &order[..m.num_experts_per_tok];
                    let z: f64 = top.iter().map(|&e| p_[e]).sum();
                    let row = hn.slice(s![i..i + 1, ..]).to_owned();
                    for &e in top {
                        let name =
                            |wi: &str| format!("{p}.block_sparse_moe.experts.{e}.{wi}.weight");
                        let (_, ye) = swiglu(&name("w1"), &name("w3"), &name("w2"), &row);
                        y.row_mut(i).scaled_add(p_[e] / z, &ye.row(0));
                    }
                }
                x = x + y;
                inputs.push([attn_in, att, hn.clone(), hn]);
            }
        }
    }
    let xn = rms(&x, &v(sd, "model.norm.weight"), c.rms_norm_eps);
    let head = if c.tie_word_embeddings {
        e
    } else {
        w(sd, "lm_head.weight")
    };
    (xn.dot(&head.t()), inputs)
}

fn perturb_norms(sd: &mut StateDict) {
    // Non-trivial norm scales so the test sees them.
    for (name, t) in sd.iter_mut() {
        if name.contains("norm") {
            t.data
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = 0.5 + (i % 7) as f32 * 0.1);
        }
    }
}

/// Two sequences of 7 tokens (ids below 50) the forward tests feed.
const SEQS: [[usize; 7]; 2] = [[3, 17, 42, 8, 8, 0, 49], [1, 2, 3, 4, 5, 6, 7]];

/// The largest relative deviation of `model`'s logits on [`SEQS`] from the
/// ndarray reference's.
fn worst_against_reference(c: &LlamaConfig, sd: &StateDict, model: &Llama<Cpu>) -> f64 {
    let flat: Vec<i64> = SEQS.iter().flatten().map(|&x| x as i64).collect();
    let tokens =
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(flat, [2, 7]), &Default::default());
    let logits: Vec<f32> = model.forward(tokens).into_data().into_vec().unwrap();
    let mut worst = 0f64;
    for (b, seq) in SEQS.iter().enumerate() {
        let r = reference(c, sd, seq);
        for i in 0..7 {
            for j in 0..c.vocab_size {
                let got = logits[(b * 7 + i) * c.vocab_size + j] as f64;
                worst = worst.max((got - r[[i, j]]).abs() / (1.0 + r[[i, j]].abs()));
            }
        }
    }
    worst
}

#[test]
fn burn_forward_matches_an_independent_ndarray_llama() {
    let device = Default::default();
    for tied in [false, true] {
        let mut c = LlamaConfig::tiny(50, 32, 2, 4, 2, 48);
        c.tie_word_embeddings = tied;
        // Larger weights than the 0.02 init so attention is far from uniform.
        let mut sd = random_state_dict(&c, 3);
        for (_, t) in sd.iter_mut() {
            t.data.mapv_inplace(|x| x * 20.0);
        }
        perturb_norms(&mut sd);
        let model = Llama::<Cpu>::from_state_dict(&c, &sd, false, &device).unwrap();
        let worst = worst_against_reference(&c, &sd, &model);
        assert!(
            worst < 1e-4,
            "tied {tied}: worst relative deviation {worst}"
        );
        // Saved back under the same names, bit for bit.
        let back = model.to_state_dict();
        assert_eq!(back.len(), sd.len());
        for (name, t) in sd.iter() {
            assert_eq!(back.get(name).unwrap().data, t.data, "{name}");
        }
    }
}

/// A Mixtral-style mixture of experts (4 experts, top-2 and top-1) against
/// the ndarray reference, every weight read and written under Mixtral's names.
#[test]
fn burn_mixtral_matches_an_independent_ndarray_mixtral() {
    let device = Default::default();
    for top_k in [2, 1] {
        let c = LlamaConfig::tiny(50, 32, 2, 4, 2, 24).with_experts(4, top_k);
        let mut sd = random_state_dict(&c, 5);
        for (name, t) in sd.iter_mut() {
            // Sharp routers, so that no token sits near a tie.
            let scale = if name.contains("block_sparse_moe.gate") {
                200.0
            } else {
                20.0
            };
            t.data.mapv_inplace(|x| x * scale);
        }
        perturb_norms(&mut sd);
        assert!(sd.contains("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
        assert!(!sd.contains("model.layers.0.mlp.gate_proj.weight"));
        let model = Llama::<Cpu>::from_state_dict(&c, &sd, false, &device).unwrap();
        let worst = worst_against_reference(&c, &sd, &model);
        let tokens = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(SEQS.iter().flatten().map(|&x| x as i64).collect(), [2, 7]),
            &device,
        );
        assert!(
            worst < 1e-4,
            "top-{top_k}: worst relative deviation {worst}"
        );
        // Every expert is used by some token (the test would not see a dead one).
        let probs = model.router_probs(tokens);
        assert_eq!(probs.len(), 2);
        for p in probs {
            let v: Vec<f32> = p.into_data().into_vec().unwrap();
            let picks = s2ft_core::model::top_k_experts(&v, 4, top_k);
            if top_k == 2 {
                for e in 0..4 {
                    assert!(picks.contains(&e), "expert {e} never routed to");
                }
            }
        }
        let back = model.to_state_dict();
        assert_eq!(back.len(), sd.len());
        for (name, t) in sd.iter() {
            assert_eq!(back.get(name).unwrap().data, t.data, "{name}");
        }
    }
}

/// A mixture whose experts are all copies of one MLP is that dense model,
/// whatever its router says (the top-k weights are renormalised to one).
#[test]
fn a_mixture_of_identical_experts_is_the_dense_model() {
    let device = Default::default();
    let c = LlamaConfig::tiny(50, 32, 2, 4, 2, 24);
    let mut dense = random_state_dict(&c, 9);
    perturb_norms(&mut dense);
    let mc = c.clone().with_experts(3, 2);
    let mut sd = StateDict::new();
    let gates = random_state_dict(&mc, 4);
    for (name, t) in dense.iter() {
        match name.split_once(".mlp.") {
            None => {
                sd.insert(name, t.clone());
            }
            Some((p, rest)) => {
                let w = match rest {
                    "gate_proj.weight" => "w1",
                    "down_proj.weight" => "w2",
                    _ => "w3",
                };
                for e in 0..3 {
                    sd.insert(
                        format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
                        t.clone(),
                    );
                }
                let router = format!("{p}.block_sparse_moe.gate.weight");
                let mut g = gates.get(&router).unwrap().clone();
                g.data.mapv_inplace(|x| x * 100.0);
                sd.insert(router, g);
            }
        }
    }
    let a = Llama::<Cpu>::from_state_dict(&c, &dense, false, &device).unwrap();
    let b = Llama::<Cpu>::from_state_dict(&mc, &sd, false, &device).unwrap();
    let ids: Vec<i64> = vec![3, 17, 42, 8, 8, 0, 49, 1, 2, 3];
    let tokens = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [2, 5]), &device);
    let x: Vec<f32> = a.forward(tokens.clone()).into_data().into_vec().unwrap();
    let y: Vec<f32> = b.forward(tokens).into_data().into_vec().unwrap();
    let worst = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn top_k_routing_breaks_ties_to_the_lower_expert() {
    let picks = s2ft_core::model::top_k_experts(&[0.25, 0.25, 0.5, 0.1, 0.6, 0.3], 3, 2);
    assert_eq!(picks, vec![2, 0, 1, 2]);
}

#[test]
fn bad_checkpoints_name_the_weight() {
    let device = Default::default();
    let c = LlamaConfig::tiny(50, 32, 2, 4, 2, 48);
    let mut sd = random_state_dict(&c, 3);
    sd.remove("model.layers.1.mlp.up_proj.weight");
    let e = Llama::<Cpu>::from_state_dict(&c, &sd, false, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let mut sd = random_state_dict(&c, 3);
    sd.get_mut("model.layers.0.self_attn.k_proj.weight")
        .unwrap()
        .data[[0, 0]] = f32::NAN;
    let e = Llama::<Cpu>::from_state_dict(&c, &sd, false, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k_proj") && e.contains("non-finite"), "{e}");
    // A mixture of experts missing one expert's weight, or routing to more
    // experts than it has.
    let m = LlamaConfig::tiny(50, 32, 2, 4, 2, 24).with_experts(3, 2);
    let mut sd = random_state_dict(&m, 3);
    sd.remove("model.layers.1.block_sparse_moe.experts.2.w3.weight");
    let e = Llama::<Cpu>::from_state_dict(&m, &sd, false, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("experts.2.w3") && e.contains("missing"), "{e}");
    let e = Llama::<Cpu>::from_state_dict(
        &m.clone().with_experts(3, 4),
        &random_state_dict(&m, 3),
        false,
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("num_experts_per_tok 4"), "{e}");
    // Fine-tuning is refused on a mixture of experts, by name.
    let moe = Llama::<Cpu>::from_state_dict(&m, &random_state_dict(&m, 3), true, &device).unwrap();
    let e = s2ft_core::s2ft::apply_lora(moe, 2, 4.0, &["q_proj"], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA") && e.contains("3 experts"), "{e}");
    let bad = LlamaConfig::tiny(50, 32, 2, 4, 3, 48);
    assert!(
        Llama::<Cpu>::from_state_dict(&bad, &random_state_dict(&c, 3), false, &device)
            .unwrap_err()
            .to_string()
            .contains("multiple")
    );
}

/// RegMean's Gram matrices: per linear weight, `XᵀX` of its inputs summed
/// over the sequences, equal to the independent ndarray forward's.
#[test]
fn input_grams_match_the_reference_forward() {
    let c = LlamaConfig::tiny(40, 16, 2, 4, 2, 24);
    let mut sd = random_state_dict(&c, 11);
    perturb_norms(&mut sd);
    let m = Llama::<Cpu>::from_state_dict(&c, &sd, false, &Default::default()).unwrap();
    let seqs: Vec<Vec<u32>> = vec![vec![3, 9, 1, 27, 5], vec![8, 2, 39]];
    let grams = m.input_grams(&seqs);
    let mut want: Vec<[Array2<f64>; 4]> = Vec::new();
    for seq in &seqs {
        let ids: Vec<usize> = seq.iter().map(|&i| i as usize).collect();
        for (l, xs) in reference_with_inputs(&c, &sd, &ids)
            .1
            .into_iter()
            .enumerate()
        {
            let g = xs.map(|x| x.t().dot(&x));
            match want.get_mut(l) {
                Some(acc) => acc.iter_mut().zip(g).for_each(|(a, b)| *a += &b),
                None => want.push(g),
            }
        }
    }
    let names = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].as_slice(),
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    assert_eq!(grams.len(), c.num_hidden_layers * 7);
    for (l, ws) in want.iter().enumerate() {
        for (g, ns) in ws.iter().zip(names) {
            for n in ns {
                let name = format!("model.layers.{l}.{n}.weight");
                let got = w(&grams, &name);
                let inp = sd.get(&name).unwrap().shape()[1];
                assert_eq!(got.dim(), (inp, inp), "{name}");
                let scale = g.iter().fold(0f64, |a, b| a.max(b.abs()));
                let dev = (&got - g).iter().fold(0f64, |a, b| a.max(b.abs()));
                assert!(dev < 1e-4 * scale, "{name}: {dev} of {scale}");
            }
        }
    }
}
