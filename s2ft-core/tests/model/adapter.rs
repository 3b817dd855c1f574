//! S²FT adapters: extract/save/load, bit-exact fuse/unfuse, switching,
//! several adapters, dense ΔW, bad adapters; LoRA exported as PEFT.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::adapter::{S2ftAdapter, save_lora_peft, unfuse};
use s2ft_core::model::random_state_dict;
use s2ft_core::s2ft::{S2ftConfig, Selection, apply_lora, apply_s2ft};
use s2ft_core::{Cpu, Llama, LlamaConfig};
use weights::StateDict;

fn cfg() -> LlamaConfig {
    LlamaConfig::tiny(40, 32, 2, 4, 2, 48)
}

/// A model with S²FT deltas on `sel`, filled with seeded values (as if trained).
fn adapted(sd: &StateDict, sel: &Selection, seed: u64, train_v: bool) -> Llama<Cpu> {
    let c = cfg();
    let sc = S2ftConfig {
        train_v,
        train_up: train_v,
        ..Default::default()
    };
    let mut m = apply_s2ft(
        Llama::<Cpu>::from_state_dict(&c, sd, false, &Default::default()).unwrap(),
        sel,
        &sc,
    )
    .unwrap();
    let mut x = seed;
    for blk in m.layers.iter_mut() {
        for name in s2ft_core::model::PROJ_NAMES {
            let p = blk.proj_mut(name);
            if let Some(d) = &p.delta {
                let dims = d.val().dims();
                let v: Vec<f32> = (0..dims[0] * dims[1])
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                    })
                    .collect();
                p.delta = Some(Param::from_tensor(Tensor::from_data(
                    TensorData::new(v, dims),
                    &Default::default(),
                )));
            }
        }
    }
    m
}

fn bits_equal(a: &StateDict, b: &StateDict) -> bool {
    a.iter().all(|(n, t)| {
        t.data
            .iter()
            .zip(b.get(n).unwrap().data.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
    })
}

fn sel(h0: Vec<usize>, h1: Vec<usize>, c0: Vec<usize>, c1: Vec<usize>) -> Selection {
    Selection {
        heads: vec![h0, h1],
        channels: vec![c0, c1],
    }
}

#[test]
fn save_load_fuse_unfuse_and_switch_are_exact() {
    let base = random_state_dict(&cfg(), 1);
    let model = adapted(
        &base,
        &sel(vec![1], vec![0, 3], vec![2, 7], vec![40]),
        9,
        true,
    );
    let ad = S2ftAdapter::extract(&model).unwrap();
    assert_eq!(ad.entries.len(), 8, "o, v, down, up in two layers");
    let dir = tempfile::tempdir().unwrap();
    ad.save(dir.path()).unwrap();
    let back = S2ftAdapter::load(dir.path()).unwrap();
    assert_eq!(back, ad);
    // Fusing into the base gives what the model computes with (its merged weights).
    let mut sd = base.clone();
    let undo = back.fuse(&mut sd).unwrap();
    assert!(bits_equal(&sd, &model.to_state_dict()));
    // ... and equals base + the dense ΔW.
    let dense = back.dense();
    for (w, d) in &dense {
        let b = &base.get(w).unwrap().data;
        let f = &sd.get(w).unwrap().data;
        for ((x, y), z) in f.iter().zip(b.iter()).zip(d.iter()) {
            assert_eq!(*x, y + z, "{w}");
        }
    }
    unfuse(&mut sd, undo).unwrap();
    assert!(
        bits_equal(&sd, &base),
        "unfuse restores the base bit for bit"
    );
    // Switching: fuse A, unfuse, fuse B = fusing B alone.
    let other = S2ftAdapter::extract(&adapted(
        &base,
        &sel(vec![2], vec![2], vec![0], vec![1]),
        4,
        false,
    ))
    .unwrap();
    let mut sw = base.clone();
    let u = ad.fuse(&mut sw).unwrap();
    unfuse(&mut sw, u).unwrap();
    other.fuse(&mut sw).unwrap();
    let mut direct = base.clone();
    other.fuse(&mut direct).unwrap();
    assert!(bits_equal(&sw, &direct));
}

#[test]
fn two_adapters_fused_together() {
    let base = random_state_dict(&cfg(), 2);
    let a = S2ftAdapter::extract(&adapted(
        &base,
        &sel(vec![0], vec![1], vec![3], vec![5]),
        1,
        false,
    ))
    .unwrap();
    let b = S2ftAdapter::extract(&adapted(
        &base,
        &sel(vec![2], vec![3], vec![4], vec![6]),
        2,
        false,
    ))
    .unwrap();
    // Non-overlapping: fusing both equals one model carrying both deltas.
    let both = adapted(
        &base,
        &sel(vec![0, 2], vec![1, 3], vec![3, 4], vec![5, 6]),
        0,
        false,
    );
    let mut both_model = both;
    for (l, blk) in both_model.layers.iter_mut().enumerate() {
        for name in ["self_attn.o_proj", "mlp.down_proj"] {
            let w = format!("model.layers.{l}.{name}.weight");
            let p = blk.proj_mut(name);
            let (ea, eb) = (
                a.entries.iter().find(|e| e.weight == w).unwrap(),
                b.entries.iter().find(|e| e.weight == w).unwrap(),
            );
            let (da, db) = (&a.deltas[&w], &b.deltas[&w]);
            // Columns of the union in sorted order: a's come first when smaller.
            let mut cols: Vec<(usize, Vec<f32>)> = Vec::new();
            for (e, d) in [(ea, da), (eb, db)] {
                for (k, &i) in e.indices.iter().enumerate() {
                    cols.push((i, d.column(k).to_vec()));
                }
            }
            cols.sort_by_key(|x| x.0);
            let rows = da.nrows();
            let mut v = vec![0f32; rows * cols.len()];
            for (j, (_, col)) in cols.iter().enumerate() {
                for r in 0..rows {
                    v[r * cols.len() + j] = col[r];
                }
            }
            p.delta_idx = cols.iter().map(|x| x.0).collect();
            p.delta = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(v, [rows, cols.len()]),
                &Default::default(),
            )));
        }
    }
    let mut sd = base.clone();
    let ua = a.fuse(&mut sd).unwrap();
    let ub = b.fuse(&mut sd).unwrap();
    assert!(bits_equal(&sd, &both_model.to_state_dict()));
    // Overlapping with itself: base + 2·ΔA (to rounding), and undo in reverse restores the base.
    let ua2 = a.fuse(&mut sd).unwrap();
    unfuse(&mut sd, ua2).unwrap();
    unfuse(&mut sd, ub).unwrap();
    unfuse(&mut sd, ua).unwrap();
    assert!(bits_equal(&sd, &base));
}

#[test]
fn adapters_that_do_not_fit_are_refused() {
    let base = random_state_dict(&cfg(), 3);
    let ad = S2ftAdapter::extract(&adapted(
        &base,
        &sel(vec![1], vec![1], vec![1], vec![1]),
        1,
        false,
    ))
    .unwrap();
    // Another architecture (wider FFN).
    let other = random_state_dict(&LlamaConfig::tiny(40, 32, 2, 4, 2, 64), 3);
    let e = ad.fuse(&mut other.clone()).unwrap_err().to_string();
    assert!(e.contains("down_proj") && e.contains("shape"), "{e}");
    let mut missing = base.clone();
    missing.remove("model.layers.1.self_attn.o_proj.weight");
    assert!(
        ad.fuse(&mut missing)
            .unwrap_err()
            .to_string()
            .contains("model.layers.1.self_attn.o_proj.weight")
    );
    // An index out of range in the saved config.
    let dir = tempfile::tempdir().unwrap();
    ad.save(dir.path()).unwrap();
    let p = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replacen(
        "\"indices\": [\n        1\n      ]",
        "\"indices\": [\n        99\n      ]",
        1,
    );
    std::fs::write(&p, text).unwrap();
    let e = S2ftAdapter::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("99") || e.contains("shape"), "{e}");
    // A model with no deltas has no adapter.
    let plain = Llama::<Cpu>::from_state_dict(&cfg(), &base, false, &Default::default()).unwrap();
    assert!(S2ftAdapter::extract(&plain).is_err());
}

#[test]
fn lora_exports_as_peft_and_fuses_to_the_same_weights() {
    let c = cfg();
    let base = random_state_dict(&c, 4);
    let m = Llama::<Cpu>::from_state_dict(&c, &base, false, &Default::default()).unwrap();
    let mut m = apply_lora(m, 4, 8.0, &["q_proj", "v_proj", "down_proj"], 1).unwrap();
    // Non-zero B, as after training.
    for blk in m.layers.iter_mut() {
        for name in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
            let p = blk.proj_mut(name);
            let b = p.lora_b.as_ref().unwrap().val();
            let dims = b.dims();
            let v: Vec<f32> = (0..dims[0] * dims[1])
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01)
                .collect();
            p.lora_b = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(v, dims),
                &Default::default(),
            )));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    save_lora_peft(&m, dir.path()).unwrap();
    let peft = merge::lora::LoraAdapter::load(dir.path()).unwrap();
    assert_eq!(peft.config.r, 4);
    assert_eq!(peft.modules.len(), 6);
    let fused = peft.fuse(&base, 1.0).unwrap();
    let ours = m.to_state_dict();
    for (n, t) in ours.iter() {
        let f = &fused.get(n).unwrap().data;
        let dev = t
            .data
            .iter()
            .zip(f.iter())
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(dev < 1e-6, "{n}: {dev}");
    }
}
