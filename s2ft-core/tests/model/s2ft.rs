//! S²FT's partial back-propagation against full autodiff, frozen weights,
//! parameter counts, the full-selection equivalence, and a toy task learned.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::model::{Proj, random_state_dict};
use s2ft_core::s2ft::*;
use s2ft_core::train::{TrainConfig, lm_loss, train};
use s2ft_core::{CpuTrain, Llama, LlamaConfig, S2ftError};

type B = CpuTrain;

fn cfg() -> LlamaConfig {
    LlamaConfig::tiny(40, 32, 2, 4, 2, 48)
}

fn batch(seed: u64, b: usize, t: usize, vocab: usize) -> Tensor<B, 2, Int> {
    let mut x = seed;
    let v: Vec<i64> = (0..b * t)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [b, t]), &Default::default())
}

fn vals<const D: usize>(
    t: Tensor<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, D>,
) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn partial_gradients_equal_slices_of_the_full_gradient() {
    let c = cfg();
    let sd = random_state_dict(&c, 1);
    let device = Default::default();
    let tokens = batch(5, 3, 9, c.vocab_size);
    let full = Llama::<B>::from_state_dict(&c, &sd, true, &device).unwrap();
    let full_grads = lm_loss(&full, tokens.clone()).backward();
    let sc = S2ftConfig {
        heads_ratio: 0.5,
        channels_ratio: 0.25,
        train_v: true,
        train_up: true,
        seed: 3,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let model = apply_s2ft(
        Llama::<B>::from_state_dict(&c, &sd, false, &device).unwrap(),
        &sel,
        &sc,
    )
    .unwrap();
    let grads = lm_loss(&model, tokens).backward();
    for (l, (blk, fblk)) in model.layers.iter().zip(&full.layers).enumerate() {
        for (name, axis) in [
            ("self_attn.o_proj", 1),
            ("self_attn.v_proj", 0),
            ("mlp.down_proj", 1),
            ("mlp.up_proj", 0),
        ] {
            let p: &Proj<B> = blk.proj(name);
            let idx: Vec<i64> = p.delta_idx.iter().map(|&i| i as i64).collect();
            assert!(!idx.is_empty(), "layer {l} {name} has a delta");
            let g = vals(p.delta.as_ref().unwrap().val().grad(&grads).unwrap());
            // The gradient of Wᵀ, transposed back to W's [out, in].
            let fg = fblk
                .proj(name)
                .weight_t
                .val()
                .grad(&full_grads)
                .unwrap()
                .transpose();
            let n = idx.len();
            let sel_idx = Tensor::from_data(TensorData::new(idx, [n]), &Default::default());
            let want = vals(fg.select(axis, sel_idx));
            let dev = max_rel(&g, &want);
            assert!(dev < 1e-5, "layer {l} {name}: {dev}");
            // The frozen weight itself gets no gradient.
            assert!(
                p.weight_t.val().grad(&grads).is_none(),
                "layer {l} {name} weight is frozen"
            );
        }
        assert!(blk.self_attn.q_proj.weight_t.val().grad(&grads).is_none());
    }
}

#[test]
fn frozen_weights_stay_bit_identical_and_the_loss_falls() {
    let c = cfg();
    let device = Default::default();
    let base = Llama::<B>::random(&c, 2, &device).unwrap();
    let before = base.to_state_dict();
    let sc = S2ftConfig {
        heads_ratio: 0.25,
        channels_ratio: 0.25,
        seed: 1,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let model = apply_s2ft(base, &sel, &sc).unwrap();
    let tokens = batch(9, 4, 12, c.vocab_size);
    let out = train(
        model,
        |_| tokens.clone(),
        &TrainConfig {
            lr: 1e-2,
            steps: 15,
            weight_decay: 0.01,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    assert!(out.stopped.is_none());
    assert!(
        out.losses.last().unwrap() < &(out.losses[0] - 0.05),
        "{:?}",
        out.losses
    );
    // Every step is timed; the median leaves out the warm-up step.
    assert_eq!(out.step_seconds.len(), 15);
    let median = out.median_step_ms();
    assert!(median > 0.0 && median <= 1e3 * out.step_seconds.iter().fold(0f64, |a, &b| a.max(b)));
    for (l, blk) in out.model.layers.iter().enumerate() {
        for name in s2ft_core::model::PROJ_NAMES {
            let w = s2ft_core::model::to_weights(blk.proj(name).weight());
            let orig = before
                .get(&format!("model.layers.{l}.{name}.weight"))
                .unwrap();
            // Bit-identical: compare the raw bits.
            assert!(
                w.data
                    .iter()
                    .zip(orig.data.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "layer {l} {name}"
            );
        }
    }
}

#[test]
fn trainable_parameter_counts_match_the_formulas() {
    let c = cfg();
    let device = Default::default();
    for (train_v, train_up) in [(false, false), (true, true)] {
        let sc = S2ftConfig {
            heads_ratio: 0.5,
            channels_ratio: 0.1,
            train_v,
            train_up,
            seed: 4,
            ..Default::default()
        };
        let sel = select(&c, &sc, None).unwrap();
        assert!(
            sel.heads.iter().all(|h| h.len() == 2) && sel.channels.iter().all(|ch| ch.len() == 5)
        );
        let m = apply_s2ft(Llama::<B>::random(&c, 1, &device).unwrap(), &sel, &sc).unwrap();
        // Written out: per block 32·(2·8) + 32·5, plus v rows (heads 2 of 4, kv group 2 → 1 or 2 kv heads) and up rows.
        let formula = s2ft_param_count(&c, &sel, &sc);
        assert_eq!(trainable_params(&m), formula);
        if !train_v {
            assert_eq!(formula, 2 * (32 * 16 + 32 * 5));
        }
    }
    let targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];
    let m = apply_lora(
        Llama::<B>::random(&c, 1, &device).unwrap(),
        4,
        8.0,
        &targets,
        0,
    )
    .unwrap();
    // q: 4·(32+32), k, v: 4·(32+16), up: 4·(32+48), down: 4·(48+32); two blocks.
    assert_eq!(
        lora_param_count(&c, 4, &targets),
        2 * 4 * (64 + 48 + 48 + 80 + 80)
    );
    assert_eq!(trainable_params(&m), lora_param_count(&c, 4, &targets));
    let full = Llama::<B>::random(&c, 1, &device).unwrap();
    assert_eq!(trainable_params(&full), random_state_dict(&c, 1).numel());
}

#[test]
fn selecting_everything_equals_full_fine_tuning_of_those_weights() {
    let c = cfg();
    let sd = random_state_dict(&c, 6);
    let device = Default::default();
    let sc = S2ftConfig {
        heads_ratio: 1.0,
        channels_ratio: 1.0,
        seed: 0,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let s2 = apply_s2ft(
        Llama::<B>::from_state_dict(&c, &sd, false, &device).unwrap(),
        &sel,
        &sc,
    )
    .unwrap();
    // Full fine-tuning restricted to o_proj and down_proj.
    let mut full = Llama::<B>::from_state_dict(&c, &sd, false, &device).unwrap();
    for blk in full.layers.iter_mut() {
        for name in ["self_attn.o_proj", "mlp.down_proj"] {
            let p = blk.proj_mut(name);
            p.weight_t = Param::from_tensor(p.weight_t.val()).set_require_grad(true);
        }
    }
    let tokens = batch(3, 2, 10, c.vocab_size);
    let tc = TrainConfig {
        lr: 5e-3,
        steps: 5,
        weight_decay: 0.0,
        schedule: s2ft_core::train::LrSchedule::Constant,
    };
    let a = train(s2, |_| tokens.clone(), &tc).model.to_state_dict();
    let b = train(full, |_| tokens.clone(), &tc).model.to_state_dict();
    for (name, t) in b.iter() {
        let x: Vec<f32> = a.get(name).unwrap().data.iter().copied().collect();
        let y: Vec<f32> = t.data.iter().copied().collect();
        assert!(max_rel(&x, &y) < 1e-5, "{name}: {}", max_rel(&x, &y));
    }
}

#[test]
fn selection_strategies_and_bad_budgets() {
    let c = cfg();
    let device = Default::default();
    let m = Llama::<B>::random(&c, 1, &device).unwrap();
    let tokens = batch(1, 2, 8, c.vocab_size);
    let sc = S2ftConfig {
        heads_ratio: 0.25,
        channels_ratio: 0.25,
        strategy: Strategy::WeightNorm,
        order: Order::Largest,
        ..Default::default()
    };
    let ws = weight_scores(&m);
    let sel = select(&c, &sc, Some(&ws)).unwrap();
    for l in 0..2 {
        let best = (0..4)
            .max_by(|&a, &b| ws.heads[l][a].total_cmp(&ws.heads[l][b]))
            .unwrap();
        assert_eq!(sel.heads[l], vec![best]);
    }
    let smallest = S2ftConfig {
        order: Order::Smallest,
        strategy: Strategy::ActivationNorm,
        ..sc.clone()
    };
    let acts = activation_scores(&m, tokens.clone());
    let sel = select(&c, &smallest, Some(&acts)).unwrap();
    for l in 0..2 {
        let worst = (0..48)
            .min_by(|&a, &b| acts.channels[l][a].total_cmp(&acts.channels[l][b]))
            .unwrap();
        assert!(sel.channels[l].contains(&worst));
    }
    let g = gradient_scores(&m, tokens.clone());
    assert!(g.heads.iter().flatten().all(|v| v.is_finite() && *v > 0.0));
    let wa = weight_activation_scores(&m, tokens);
    assert!((wa.heads[0][1] - ws.heads[0][1] * acts.heads[0][1]).abs() < 1e-9);
    // Global random allocation spends the whole budget.
    let global = S2ftConfig {
        allocation: Allocation::Global,
        heads_ratio: 0.25,
        ..Default::default()
    };
    let sel = select(&c, &global, None).unwrap();
    assert_eq!(sel.heads.iter().map(Vec::len).sum::<usize>(), 2);
    // Bad input.
    let too_many = S2ftConfig {
        heads_ratio: 1.5,
        ..Default::default()
    };
    assert!(
        select(&c, &too_many, None)
            .unwrap_err()
            .to_string()
            .contains("1.5")
    );
    let needs = S2ftConfig {
        strategy: Strategy::ActivationNorm,
        ..Default::default()
    };
    assert!(
        select(&c, &needs, None)
            .unwrap_err()
            .to_string()
            .contains("scores")
    );
    let bad = Selection {
        heads: vec![vec![7], vec![]],
        channels: vec![vec![], vec![]],
    };
    let e = apply_s2ft(m, &bad, &S2ftConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("head 7 out of range"), "{e}");
}

#[test]
fn a_tiny_model_learns_a_toy_task_with_s2ft() {
    // Next token = (previous + 3) mod 16, from a random frozen 2-layer d=64 model.
    let c = LlamaConfig::tiny(16, 64, 2, 4, 4, 128);
    let device = Default::default();
    let base = Llama::<B>::random(&c, 11, &device).unwrap();
    let sc = S2ftConfig {
        heads_ratio: 0.5,
        channels_ratio: 1.0,
        train_up: true,
        seed: 2,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let model = apply_s2ft(base, &sel, &sc).unwrap();
    let seq = |seed: u64| {
        let starts = batch(seed, 8, 1, 16);
        let s: Vec<i64> = starts.into_data().convert::<i64>().into_vec().unwrap();
        let v: Vec<i64> = s
            .iter()
            .flat_map(|&x| (0..12).map(move |i| (x + 3 * i) % 16))
            .collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [8, 12]), &Default::default())
    };
    let out = train(
        model,
        |step| seq(step as u64),
        &TrainConfig {
            lr: 1e-2,
            steps: 120,
            weight_decay: 0.0,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    assert!(out.stopped.is_none());
    let test = seq(10_000);
    let logits = out.model.forward(test.clone().narrow(1, 0, 11));
    let pred: Vec<i64> = logits
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let want: Vec<i64> = test
        .narrow(1, 1, 11)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    let acc = pred.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
    assert!(
        acc >= 0.9,
        "accuracy {acc}, losses {:?}",
        &out.losses[out.losses.len() - 5..]
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_model() {
    let c = cfg();
    let device = Default::default();
    let sc = S2ftConfig {
        heads_ratio: 0.5,
        channels_ratio: 0.5,
        seed: 1,
        ..Default::default()
    };
    let sel = select(&c, &sc, None).unwrap();
    let model = apply_s2ft(Llama::<B>::random(&c, 3, &device).unwrap(), &sel, &sc).unwrap();
    let tokens = batch(2, 2, 8, c.vocab_size);
    // An absurd learning rate overflows the deltas within a few steps.
    let out = train(
        model,
        |_| tokens.clone(),
        &TrainConfig {
            lr: 1e38,
            steps: 20,
            weight_decay: 0.0,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    let err = out.stopped.expect("the run must stop").to_string();
    assert!(
        err.contains("training stopped at step") && err.contains("loss is"),
        "{err}"
    );
    let last = lm_loss(&out.model, tokens).into_scalar().elem::<f32>();
    assert!(
        last.is_finite(),
        "the returned model has a finite loss, got {last}"
    );
    assert!(out.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn budgets_can_match_a_lora_parameter_count() {
    let c = LlamaConfig::tiny(40, 64, 2, 8, 4, 256);
    let targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];
    let lora = lora_param_count(&c, 2, &targets);
    let (hr, cr) = ratios_for_budget(&c, lora, 0.5);
    let sc = S2ftConfig {
        heads_ratio: hr,
        channels_ratio: cr,
        seed: 0,
        ..Default::default()
    };
    let n = s2ft_param_count(&c, &select(&c, &sc, None).unwrap(), &sc);
    // Within one head's worth of parameters of the LoRA budget, never above by more.
    let per_head = c.hidden_size * c.head_dim * c.num_hidden_layers;
    assert!(
        n <= lora + per_head && n + per_head >= lora,
        "S2FT {n} vs LoRA {lora}"
    );
}

#[test]
fn co_permutation_keeps_the_function_and_makes_the_selection_contiguous() {
    let device = Default::default();
    for (kv, heads) in [
        (4usize, vec![vec![3, 1], vec![2]]),
        (2, vec![vec![2, 3], vec![1]]),
    ] {
        let c = LlamaConfig::tiny(40, 32, 2, 4, kv, 48);
        let sd = random_state_dict(&c, 8);
        let sel = Selection {
            heads: heads.clone(),
            channels: vec![vec![40, 3, 17], vec![0, 47]],
        };
        let (psd, psel) = co_permute(&c, &sd, &sel).unwrap();
        // A checkpoint without a weight the reordering moves: named, typed.
        let mut partial = sd.clone();
        partial.remove("model.layers.1.mlp.down_proj.weight");
        match co_permute(&c, &partial, &sel) {
            Err(S2ftError::Weight { name, .. }) => {
                assert_eq!(name, "model.layers.1.mlp.down_proj.weight")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        let tokens = batch(4, 2, 9, c.vocab_size);
        let a = Llama::<B>::from_state_dict(&c, &sd, false, &device)
            .unwrap()
            .forward(tokens.clone());
        let b = Llama::<B>::from_state_dict(&c, &psd, false, &device)
            .unwrap()
            .forward(tokens);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.into_data().into_vec().unwrap(),
            b.into_data().into_vec().unwrap(),
        );
        assert!(max_rel(&a, &b) < 1e-5, "kv {kv}: {}", max_rel(&a, &b));
        assert_eq!(psel.channels, vec![vec![0, 1, 2], vec![0, 1]]);
        // Whole groups selected (or one head per group): heads first and contiguous.
        for (l, h) in psel.heads.iter().enumerate() {
            assert_eq!(h.len(), heads[l].len());
            assert_eq!(*h, (0..h.len()).collect::<Vec<_>>(), "kv {kv} layer {l}");
        }
    }
}

#[test]
fn lora_dropout_acts_only_while_training() {
    use burn::module::AutodiffModule;
    let c = cfg();
    let device = Default::default();
    let m = apply_lora_with_dropout(
        Llama::<B>::random(&c, 1, &device).unwrap(),
        4,
        8.0,
        0.5,
        &["q_proj", "up_proj"],
        0,
    )
    .unwrap();
    // Non-zero B so the adapter path matters.
    let mut m = m;
    for blk in m.layers.iter_mut() {
        for name in ["self_attn.q_proj", "mlp.up_proj"] {
            let p = blk.proj_mut(name);
            let dims = p.lora_b.as_ref().unwrap().val().dims();
            p.lora_b = Some(Param::from_tensor(
                Tensor::ones(dims, &device).mul_scalar(0.1),
            ));
        }
    }
    let tokens = batch(1, 2, 6, c.vocab_size);
    let a: Vec<f32> = m.forward(tokens.clone()).into_data().into_vec().unwrap();
    let b: Vec<f32> = m.forward(tokens.clone()).into_data().into_vec().unwrap();
    assert!(
        max_rel(&a, &b) > 1e-4,
        "training forwards draw different dropout masks"
    );
    let eval = m.valid();
    let t = Tensor::<s2ft_core::Cpu, 2, Int>::from_data(tokens.into_data(), &Default::default());
    let x: Vec<f32> = eval.forward(t.clone()).into_data().into_vec().unwrap();
    let y: Vec<f32> = eval.forward(t).into_data().into_vec().unwrap();
    assert_eq!(x, y, "no dropout without autodiff");
    assert!(
        apply_lora_with_dropout(
            Llama::<B>::random(&c, 1, &device).unwrap(),
            4,
            8.0,
            1.0,
            &["q_proj"],
            0
        )
        .is_err()
    );
}

/// LoRA `B` of every adapted projection after a few dropout-LoRA steps from `seed`.
fn lora_after_training(seed: u64, steps: usize) -> Vec<f32> {
    let c = cfg();
    let device = Default::default();
    let m = apply_lora_with_dropout(
        Llama::<B>::random(&c, 1, &device).unwrap(),
        4,
        8.0,
        0.3,
        &["q_proj", "v_proj", "down_proj"],
        seed,
    )
    .unwrap();
    let out = train(
        m,
        |step| batch(100 + step as u64, 4, 8, c.vocab_size),
        &TrainConfig {
            lr: 1e-2,
            steps,
            weight_decay: 0.0,
            schedule: s2ft_core::train::LrSchedule::Constant,
        },
    );
    assert!(out.stopped.is_none());
    out.model
        .layers
        .iter()
        .flat_map(|blk| {
            ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
                .into_iter()
                .flat_map(|n| {
                    let p = blk.proj(n);
                    vals(p.lora_b.as_ref().unwrap().val().inner())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn lora_dropout_masks_depend_only_on_the_run_seed() {
    // Alone, then beside another fine-tune and a thread drawing from Burn's
    // process-global generator: the same seed trains the same adapters.
    let alone = lora_after_training(5, 6);
    let (beside, other) = std::thread::scope(|s| {
        let a = s.spawn(|| lora_after_training(5, 6));
        let b = s.spawn(|| lora_after_training(6, 6));
        s.spawn(|| {
            let device = Default::default();
            for i in 0..200 {
                B::seed(&device, i);
                let _ =
                    Tensor::<B, 2>::random([64, 64], burn::tensor::Distribution::Default, &device);
            }
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(alone, beside, "one seed, one set of adapters");
    // (Another seed also initialises A differently: this only shows the
    // runs are not all alike; the masks' own seeding is tested below.)
    assert!(
        max_rel(&alone, &other) > 1e-3,
        "another seed, other adapters"
    );
}

#[test]
fn dropout_streams_keep_one_minus_p_and_follow_their_seed() {
    use s2ft_core::model::DropoutStream;
    let p = 0.25;
    let kept = |s: &DropoutStream, shape: [usize; 2]| -> Vec<bool> {
        s.kept(shape, p).into_vec().unwrap()
    };
    let mask = kept(&DropoutStream::new(3), [200, 500]);
    let rate = mask.iter().filter(|&&k| k).count() as f64 / mask.len() as f64;
    // 100,000 Bernoulli(0.75) draws: standard error 0.0014.
    assert!((rate - 0.75).abs() < 0.007, "kept {rate}");
    // The stream moves on: a second mask differs; a new stream of the same
    // seed repeats the first; another seed draws another.
    let s = DropoutStream::new(3);
    let first = kept(&s, [7, 9]);
    assert_ne!(first, kept(&s, [7, 9]));
    assert_eq!(first, kept(&DropoutStream::new(3), [7, 9]));
    assert_ne!(first, kept(&DropoutStream::new(4), [7, 9]));
}

#[test]
fn masked_loss_counts_only_the_marked_positions() {
    use burn::tensor::activation::log_softmax;
    use s2ft_core::train::lm_loss_masked;
    let c = cfg();
    let device = Default::default();
    let model = Llama::<B>::random(&c, 4, &device).unwrap();
    let tokens = batch(9, 2, 6, c.vocab_size);
    // All ones: the plain loss.
    let ones = Tensor::<B, 2>::ones([2, 5], &device);
    let plain = lm_loss(&model, tokens.clone()).into_scalar().elem::<f32>();
    let all = lm_loss_masked(&model, tokens.clone(), ones)
        .into_scalar()
        .elem::<f32>();
    assert!((plain - all).abs() < 1e-6, "{plain} vs {all}");
    // Two marked positions: the mean of their NLLs, read off the logits by hand.
    let mut m = vec![0f32; 10];
    m[1] = 1.0; // row 0, predicting token 2
    m[8] = 1.0; // row 1, predicting token 4
    let mask = Tensor::<B, 2>::from_data(TensorData::new(m, [2, 5]), &device);
    let got = lm_loss_masked(&model, tokens.clone(), mask)
        .into_scalar()
        .elem::<f32>();
    let logp = vals(log_softmax(model.forward(tokens.clone()), 2).inner());
    let ids: Vec<i64> = tokens.into_data().convert::<i64>().into_vec().unwrap();
    let v = c.vocab_size;
    let nll = |row: usize, pos: usize| -logp[(row * 6 + pos) * v + ids[row * 6 + pos + 1] as usize];
    let want = (nll(0, 1) + nll(1, 3)) / 2.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // No marked position: zero, not NaN.
    let zeros = Tensor::<B, 2>::zeros([2, 5], &device);
    let none = lm_loss_masked(&model, batch(9, 2, 6, c.vocab_size), zeros)
        .into_scalar()
        .elem::<f32>();
    assert_eq!(none, 0.0);
}

/// The schedule reaches the optimiser: Adam's first step moves a weight by
/// about the step's rate (`lr · g / (|g| + ε)`), so a linear schedule at its
/// first warm-up step (factor 0) leaves every weight as it was, and one
/// without warm-up (factor 1) moves the largest by the full rate.
#[test]
fn the_learning_rate_schedule_sets_each_steps_rate() {
    use s2ft_core::train::LrSchedule;
    let c = cfg();
    let sd = random_state_dict(&c, 8);
    let device = Default::default();
    let tokens = batch(5, 2, 10, c.vocab_size);
    let largest_move = |schedule: LrSchedule| {
        let model = Llama::<B>::from_state_dict(&c, &sd, true, &device).unwrap();
        let tc = TrainConfig {
            lr: 1e-3,
            steps: 1,
            weight_decay: 0.0,
            schedule,
        };
        let after = train(model, |_| tokens.clone(), &tc).model.to_state_dict();
        after.iter().fold(0f32, |m, (name, t)| {
            let before = sd.get(name).unwrap();
            t.data
                .iter()
                .zip(before.data.iter())
                .fold(m, |m, (a, b)| m.max((a - b).abs()))
        })
    };
    assert_eq!(largest_move(LrSchedule::Linear { warmup: 1 }), 0.0);
    let full = largest_move(LrSchedule::Linear { warmup: 0 });
    assert!((0.9e-3..=1.0001e-3).contains(&full), "{full}");
    assert_eq!(full, largest_move(LrSchedule::Constant));
}
