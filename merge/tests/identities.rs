//! Identities of the methods and the errors bad inputs get, through the
//! config runner on small checkpoints written in the test.

mod common;
use common::max_diff;

use std::path::Path;

use merge::run::{EmbedPolicy, RunOptions, run_file};
use merge::{Method, Params, TensorInputs, Value, merge_tensor};
use ndarray::{ArrayD, IxDyn};
use weights::{Checkpoint, StateDict, Tensor, TensorSource};

fn rng_tensor(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut r = weights::rng::Rng::new(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| r.normal() as f32)
}

fn model(seed: u64, vocab: usize) -> StateDict {
    let mut sd = StateDict::new();
    sd.insert(
        "model.embed_tokens.weight",
        Tensor::f32(rng_tensor(&[vocab, 8], seed)),
    );
    for l in 0..2 {
        sd.insert(
            format!("model.layers.{l}.mlp.up_proj.weight"),
            Tensor::f32(rng_tensor(&[12, 8], seed * 10 + l)),
        );
        sd.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            Tensor::f32(rng_tensor(&[8], seed * 20 + l)),
        );
    }
    sd
}

fn write(dir: &Path, name: &str, sd: &StateDict) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    sd.save_safetensors(dir.join(name).join("model.safetensors"))
        .unwrap();
}

fn run(dir: &Path, yaml: &str, opts: &RunOptions) -> merge::Result<StateDict> {
    let cfg = dir.join("merge.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    run_file(&cfg, &out, opts)?;
    Ok(Checkpoint::open(&out).unwrap().load_all().unwrap())
}

/// The error message of a config this crate must refuse (default options).
fn refusal(dir: &Path, yaml: &str) -> String {
    run(dir, yaml, &RunOptions::default())
        .unwrap_err()
        .to_string()
}

/// Every tensor of the checkpoint `name` under `dir`.
fn load_model(dir: &Path, name: &str) -> StateDict {
    Checkpoint::open(dir.join(name))
        .unwrap()
        .load_all()
        .unwrap()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, n) in ["base", "a", "b", "c"].iter().enumerate() {
        write(dir.path(), n, &model(i as u64 + 1, 20));
    }
    dir
}

#[test]
fn linear_merge_of_a_model_with_itself_is_the_model() {
    let dir = setup();
    // Two copies of one model (a model listed twice is a single input).
    write(dir.path(), "a2", &model(2, 20));
    let out = run(
        dir.path(),
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 0.3}}\n  - {model: a2, parameters: {weight: 0.9}}\n",
        &RunOptions::default(),
    )
    .unwrap();
    assert!(max_diff(&out, &model(2, 20)) < 1e-6);
}

/// Every registered method, fed only copies of one model (as base and as
/// inputs), returns that model: the property a merge must have whatever it does
/// with differences.
#[test]
fn every_method_merging_copies_of_one_model_returns_it() {
    let dir = setup();
    for n in ["a2", "a3"] {
        write(dir.path(), n, &model(2, 20));
    }
    let want = model(2, 20);
    // A Gram matrix for RegMean's up projections.
    let x = rng_tensor(&[16, 8], 9)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let mut grams = StateDict::new();
    grams.insert(
        "model.layers.0.mlp.up_proj.weight",
        Tensor::f32(x.t().dot(&x).into_dyn()),
    );
    grams
        .save_safetensors(dir.path().join("g.safetensors"))
        .unwrap();
    for name in Method::names() {
        // (models, base?, shared parameters, per-model parameters)
        let (models, base, shared, per): (&[&str], bool, &str, &str) = match name {
            "linear" | "multislerp" => (&["a2", "a3"], false, "", "weight: 0.4"),
            "karcher" => (&["a2", "a3"], false, "", ""),
            "regmean" => (&["a2", "a3"], false, "", "gram: g.safetensors"),
            "passthrough" => (&["a2"], false, "", ""),
            "slerp" => (&["a2"], true, "t: 0.3", ""),
            "nuslerp" => (&["a2", "a3"], true, "", "weight: 0.4"),
            "nearswap" => (&["a2"], true, "t: 0.01", ""),
            "arcee_fusion" => (&["a2"], true, "", ""),
            "model_stock" | "sce" | "ram" | "ramplus_tl" | "tsv_m" | "iso_c" | "iso_cts" => {
                (&["a2", "a3"], true, "", "")
            }
            // The task-vector presets.
            _ => (&["a2", "a3"], true, "", "weight: 0.4, density: 0.5"),
        };
        let mut yaml = format!("merge_method: {name}\n");
        if base {
            yaml += "base_model: a\n";
        }
        yaml += "models:\n";
        for m in models {
            yaml += &format!("  - {{model: {m}, parameters: {{{per}}}}}\n");
        }
        if !shared.is_empty() {
            yaml += &format!("parameters: {{{shared}}}\n");
        }
        let out = run(dir.path(), &yaml, &RunOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}\n{yaml}"));
        let d = max_diff(&out, &want);
        assert!(d < 1e-5, "{name}: max deviation {d} from the model\n{yaml}");
    }
}

#[test]
fn ties_at_density_one_with_equal_weights_is_normalised_task_arithmetic() {
    let dir = setup();
    let ties = run(
        dir.path(),
        "merge_method: ties\nbase_model: base\nmodels:\n  - {model: a}\n  - {model: b}\n  - {model: c}\nparameters: {weight: 1.0, density: 1.0}\n",
        &RunOptions::default(),
    )
    .unwrap();
    // With density 1 TIES still elects signs; equal to task arithmetic where
    // all task vectors agree. Compare against the formula on agreeing entries
    // and against normalised task arithmetic with consensus-free inputs: use
    // the same model three times, where every sign agrees.
    for n in ["a2", "a3"] {
        write(dir.path(), n, &model(2, 20));
    }
    let ties_same = run(
        dir.path(),
        "merge_method: ties\nbase_model: base\nmodels:\n  - {model: a}\n  - {model: a2}\n  - {model: a3}\nparameters: {weight: 1.0, density: 1.0}\n",
        &RunOptions::default(),
    )
    .unwrap();
    let ta = run(
        dir.path(),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: a}\n  - {model: a2}\n  - {model: a3}\nparameters: {weight: 1.0, normalize: true}\n",
        &RunOptions::default(),
    )
    .unwrap();
    assert!(max_diff(&ties_same, &ta) < 1e-6);
    // And the three-different-models TIES output equals the formula written out.
    let (base, a, b, c) = (model(1, 20), model(2, 20), model(3, 20), model(4, 20));
    for (name, t) in ties.iter() {
        let d: Vec<[f32; 3]> = (0..t.data.len())
            .map(|i| {
                let bv = base.get(name).unwrap().data.as_slice().unwrap()[i];
                [&a, &b, &c].map(|m| m.get(name).unwrap().data.as_slice().unwrap()[i] - bv)
            })
            .collect();
        for (i, v) in t.data.iter().enumerate() {
            let s: f32 = d[i].iter().sum();
            let elected: Vec<f32> = d[i]
                .iter()
                .copied()
                .filter(|x| (*x > 0.0) == (s >= 0.0) && *x != 0.0)
                .collect();
            let want = base.get(name).unwrap().data.as_slice().unwrap()[i]
                + if elected.is_empty() {
                    0.0
                } else {
                    elected.iter().sum::<f32>() / elected.len() as f32
                };
            assert!((v - want).abs() < 1e-5, "{name}[{i}]: {v} vs {want}");
        }
    }
}

#[test]
fn slerp_endpoints_are_the_models() {
    let dir = setup();
    for (t, want) in [(0.0, model(1, 20)), (1.0, model(2, 20))] {
        let out = run(
            dir.path(),
            &format!("merge_method: slerp\nbase_model: base\nmodels:\n  - {{model: base}}\n  - {{model: a}}\nparameters: {{t: {t}}}\n"),
            &RunOptions::default(),
        )
        .unwrap();
        assert!(max_diff(&out, &want) < 1e-5, "t = {t}");
    }
}

#[test]
fn dare_is_reproducible_per_seed_and_changes_with_it() {
    let dir = setup();
    let yaml = "merge_method: dare_ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 0.5, density: 0.5}}\n  - {model: b, parameters: {weight: 0.5, density: 0.5}}\n";
    let opts = |seed| RunOptions {
        seed,
        ..Default::default()
    };
    let x = run(dir.path(), yaml, &opts(1)).unwrap();
    let y = run(dir.path(), yaml, &opts(1)).unwrap();
    let z = run(dir.path(), yaml, &opts(2)).unwrap();
    assert_eq!(max_diff(&x, &y), 0.0);
    assert!(max_diff(&x, &z) > 0.0);
}

#[test]
fn golden_task_vector_values_through_the_registry() {
    // base 0; a = [2, -1], b = [-4, 3]; dare_linear with density 1 is weighted
    // task arithmetic: 0.5·a + 0.25·b = [0, 0.25].
    let base = [0f32, 0.0];
    let (a, b) = ([2f32, -1.0], [-4f32, 3.0]);
    let p = |w: f64| -> Params {
        [("weight".to_string(), Value::Num(w))]
            .into_iter()
            .collect()
    };
    let per = [p(0.5), p(0.25)];
    let shared = Params::new();
    let inputs = TensorInputs {
        name: "w",
        shape: &[2],
        base: Some(&base),
        models: vec![&a, &b],
        shared: &shared,
        per_model: &per,
        seed: 0,
        draws: Default::default(),
    };
    let r = merge_tensor(&Method::from_name("dare_linear").unwrap(), &inputs).unwrap();
    assert_eq!(r, vec![0.0, 0.25]);
    // della_linear at density 1 too.
    let r = merge_tensor(&Method::from_name("della_linear").unwrap(), &inputs).unwrap();
    assert_eq!(r, vec![0.0, 0.25]);
}

#[test]
fn bad_inputs_get_errors_naming_the_tensor_and_model() {
    let dir = setup();
    let msg = |yaml: &str, opts: &RunOptions| run(dir.path(), yaml, opts).unwrap_err().to_string();
    let d = RunOptions::default();
    // Mismatched shapes.
    let mut odd = model(5, 20);
    odd.insert(
        "model.layers.1.mlp.up_proj.weight",
        Tensor::f32(rng_tensor(&[12, 9], 1)),
    );
    write(dir.path(), "odd", &odd);
    let m = msg(
        "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: odd, parameters: {weight: 1}}]\n",
        &d,
    );
    assert!(
        m.contains("model.layers.1.mlp.up_proj.weight")
            && m.contains("odd")
            && m.contains("[12, 9]"),
        "{m}"
    );
    // A tensor missing from one model.
    let mut missing = model(6, 20);
    missing.remove("model.layers.0.input_layernorm.weight");
    write(dir.path(), "missing", &missing);
    let m = msg(
        "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: missing, parameters: {weight: 1}}]\n",
        &d,
    );
    assert!(
        m.contains("model.layers.0.input_layernorm.weight") && m.contains("missing"),
        "{m}"
    );
    // Vocabulary mismatch: an error naming the option, or the base's rows when asked.
    write(dir.path(), "bigvocab", &model(7, 23));
    let yaml = "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: bigvocab, parameters: {weight: 1}}]\n";
    let m = msg(yaml, &d);
    assert!(
        m.contains("model.embed_tokens.weight")
            && m.contains("23 vocabulary rows")
            && m.contains("base"),
        "{m}"
    );
    write(dir.path(), "smallvocab", &model(8, 17));
    let opts = RunOptions {
        embed: EmbedPolicy::BaseRows,
        ..Default::default()
    };
    let out = run(dir.path(), &yaml.replace("bigvocab", "smallvocab"), &opts).unwrap();
    let e = &out.get("model.embed_tokens.weight").unwrap().data;
    let (small, base) = (model(8, 17), model(1, 20));
    assert_eq!(e.shape(), &[20, 8]);
    // Rows the model has: its own (task vector of weight 1); rows it lacks: the base's.
    let own = small
        .get("model.embed_tokens.weight")
        .unwrap()
        .data
        .as_slice()
        .unwrap();
    for (x, y) in e.as_slice().unwrap()[..17 * 8].iter().zip(own) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    assert_eq!(
        e.as_slice().unwrap()[17 * 8..],
        base.get("model.embed_tokens.weight")
            .unwrap()
            .data
            .as_slice()
            .unwrap()[17 * 8..]
    );
    // NaN weights.
    let mut nan = model(9, 20);
    nan.get_mut("model.layers.0.mlp.up_proj.weight")
        .unwrap()
        .data[[3, 4]] = f32::NAN;
    write(dir.path(), "nan", &nan);
    let m = msg(
        "merge_method: linear\nmodels: [{model: nan, parameters: {weight: 1}}]\n",
        &d,
    );
    assert!(
        m.contains("model.layers.0.mlp.up_proj.weight") && m.contains("non-finite"),
        "{m}"
    );
    // Unknown method; both models and slices; a missing required parameter.
    assert!(
        msg("merge_method: soup\nmodels: [{model: a}]\n", &d)
            .contains("unknown merge method 'soup'")
    );
    assert!(
        msg("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n", &d)
            .contains("not both")
    );
    let m = msg("merge_method: linear\nmodels: [{model: a}]\n", &d);
    assert!(m.contains("'weight'") && m.contains("required"), "{m}");
    // A missing model folder names the path; no output is left behind.
    let m = msg(
        "merge_method: linear\nmodels: [{model: nowhere, parameters: {weight: 1}}]\n",
        &d,
    );
    assert!(m.contains("nowhere"), "{m}");
    assert!(
        !dir.path()
            .join("out")
            .join("model.safetensors.index.json")
            .exists()
    );
}

#[test]
fn subspace_merges_refuse_bad_parameters_naming_them() {
    let dir = setup();
    let msg = |yaml: &str| refusal(dir.path(), yaml);
    let head = "base_model: base\nmodels:\n  - {model: a}\n  - {model: b}\n";
    // Every matrix here has 8 columns: rank 9 is more than a layer has.
    let m = msg(&format!(
        "merge_method: tsv_m\n{head}parameters: {{rank: 9}}\n"
    ));
    assert!(
        m.contains("rank") && m.contains("1..=8") && m.contains("tensor 'model."),
        "{m}"
    );
    let m = msg(&format!(
        "merge_method: tsv_m\n{head}parameters: {{rank: 2.5}}\n"
    ));
    assert!(m.contains("rank") && m.contains("whole number"), "{m}");
    let m = msg(&format!(
        "merge_method: iso_cts\n{head}parameters: {{common_space_fraction: 1.5}}\n"
    ));
    assert!(
        m.contains("common_space_fraction") && m.contains("[0, 1]"),
        "{m}"
    );
    // Per-model weights are not part of these methods.
    let m = msg(
        "merge_method: iso_c\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1}}\n",
    );
    assert!(m.contains("weight") && m.contains("iso_c"), "{m}");
    // At a rank within every layer, it runs.
    run(
        dir.path(),
        &format!("merge_method: tsv_m\n{head}parameters: {{rank: 8}}\n"),
        &RunOptions::default(),
    )
    .unwrap();
}

#[test]
fn regmean_refuses_incomplete_or_misshapen_gram_files_naming_them() {
    let dir = setup();
    let gram = |n: usize, seed: u64, rank: usize| {
        // XᵀX of `rank` random inputs: singular when rank < n.
        let x = rng_tensor(&[rank, n], seed)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        Tensor::f32(x.t().dot(&x).into_dyn())
    };
    let save = |file: &str, entries: Vec<(&str, Tensor)>| {
        let mut sd = StateDict::new();
        for (n, t) in entries {
            sd.insert(n, t);
        }
        sd.save_safetensors(dir.path().join(file)).unwrap();
    };
    let up0 = "model.layers.0.mlp.up_proj.weight";
    let up1 = "model.layers.1.mlp.up_proj.weight";
    save(
        "ga.safetensors",
        vec![(up0, gram(8, 1, 32)), (up1, gram(8, 2, 32))],
    );
    save(
        "gb.safetensors",
        vec![(up0, gram(8, 3, 32)), (up1, gram(8, 4, 32))],
    );
    save("g_missing.safetensors", vec![(up0, gram(8, 5, 32))]);
    save(
        "g_shape.safetensors",
        vec![(up0, gram(7, 6, 32)), (up1, gram(8, 7, 32))],
    );
    save(
        "g_singular.safetensors",
        vec![(up0, gram(8, 8, 3)), (up1, gram(8, 9, 3))],
    );
    let yaml = |a: &str, b: &str, extra: &str| {
        format!(
            "merge_method: regmean\nmodels:\n  - {{model: a, parameters: {{gram: {a}}}}}\n  - {{model: b, parameters: {{gram: {b}}}}}\n{extra}"
        )
    };
    let d = RunOptions::default();
    let out = run(
        dir.path(),
        &yaml("ga.safetensors", "gb.safetensors", ""),
        &d,
    )
    .unwrap();
    // Tensors without Gram matrices are averaged.
    let (a, b) = (model(2, 20), model(3, 20));
    let n = "model.layers.0.input_layernorm.weight";
    for ((x, y), z) in out
        .get(n)
        .unwrap()
        .data
        .iter()
        .zip(a.get(n).unwrap().data.iter())
        .zip(b.get(n).unwrap().data.iter())
    {
        assert!((x - (y + z) / 2.0).abs() < 1e-6);
    }
    let msg = |y: String| run(dir.path(), &y, &d).unwrap_err().to_string();
    let m = msg(yaml("ga.safetensors", "g_missing.safetensors", ""));
    assert!(
        m.contains(up1) && m.contains("g_missing.safetensors") && m.contains("no Gram"),
        "{m}"
    );
    let m = msg(yaml("ga.safetensors", "g_shape.safetensors", ""));
    assert!(
        m.contains(up0) && m.contains("[7, 7]") && m.contains("8 × 8"),
        "{m}"
    );
    // Two rank-3 Gram matrices of 8 × 8 sum to a singular matrix: a ridge is needed.
    let m = msg(yaml("g_singular.safetensors", "g_singular.safetensors", ""));
    assert!(m.contains("up_proj") && m.contains("ridge"), "{m}");
    run(
        dir.path(),
        &yaml(
            "g_singular.safetensors",
            "g_singular.safetensors",
            "parameters: {ridge: 0.01}\n",
        ),
        &d,
    )
    .unwrap();
    let m = msg(yaml(
        "ga.safetensors",
        "gb.safetensors",
        "parameters: {alpha: 2}\n",
    ));
    assert!(m.contains("alpha") && m.contains("[0, 1]"), "{m}");
    let m = msg("merge_method: regmean\nmodels:\n  - {model: a, parameters: {gram: ga.safetensors}}\n  - {model: b}\n".into());
    assert!(m.contains("gram") && m.contains("input 2"), "{m}");
    let m = msg(yaml("ga.safetensors", "nowhere.safetensors", ""));
    assert!(m.contains("nowhere.safetensors"), "{m}");
}

#[test]
fn extract_lora_refuses_bad_input_naming_it() {
    use merge::extract::{ExtractOptions, extract_lora};
    let dir = setup();
    let base = Checkpoint::open(dir.path().join("base")).unwrap();
    let a = Checkpoint::open(dir.path().join("a")).unwrap();
    let opts = |f: fn(&mut ExtractOptions)| {
        let mut o = ExtractOptions::default();
        f(&mut o);
        o
    };
    let err = |o: ExtractOptions| extract_lora(&base, &a, &o).err().unwrap().to_string();
    let m = err(opts(|o| o.max_rank = 0));
    assert!(m.contains("max_rank"), "{m}");
    let m = err(opts(|o| o.exclude = vec!["(".into()]));
    assert!(m.contains("--exclude-regex") && m.contains("'('"), "{m}");
    let m = err(opts(|o| o.sv_relative = 1.5));
    assert!(m.contains("sv_relative"), "{m}");
    // A fine-tune with a weight the base lacks, or of another shape.
    let mut odd = model(2, 20);
    odd.insert(
        "model.layers.1.mlp.up_proj.weight",
        Tensor::f32(rng_tensor(&[12, 9], 1)),
    );
    write(dir.path(), "odd", &odd);
    let odd = Checkpoint::open(dir.path().join("odd")).unwrap();
    let m = extract_lora(&base, &odd, &ExtractOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(m.contains("up_proj") && m.contains("[12, 9]"), "{m}");
    // Rank 8 of 12 × 8 up projections is exact; norms and embeddings are full-rank.
    let ex = extract_lora(&base, &a, &ExtractOptions::default()).unwrap();
    let fused = ex.adapter.fuse(&base.load_all().unwrap(), 1.0).unwrap();
    assert!(max_diff(&fused, &model(2, 20)) < 1e-5);
    assert!(ex.report.iter().all(|t| t.relative_error < 1e-6));
    assert!(ex.adapter.full.contains_key("model.embed_tokens.weight"));
    // Unfusing cannot restore full-rank replacements.
    assert!(ex.adapter.fuse(&fused, -1.0).is_err());
}

/// The typed API lowers to what the YAML path resolves: the same settings give
/// bit-identical tensors through both (random ones included: same seed).
#[test]
fn typed_api_and_yaml_give_identical_tensors() {
    use merge::methods::NuslerpMode;
    use merge::subspace::SubspaceMethod;
    use merge::typed::{Merge, TaskVectorOptions, TaskVectorPreset};
    let dir = setup();
    let load = |n: &str| load_model(dir.path(), n);
    let (base, a, b, c) = (load("base"), load("a"), load("b"), load("c"));
    let three = [a.clone(), b.clone(), c.clone()];
    let opts = RunOptions {
        seed: 5,
        ..Default::default()
    };
    let cases: Vec<(Merge, &[StateDict], &str)> = vec![
        (
            Merge::Linear {
                weights: vec![0.5, 0.3, 0.2],
                normalize: true,
            },
            &three,
            "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 0.5}}\n  - {model: b, parameters: {weight: 0.3}}\n  - {model: c, parameters: {weight: 0.2}}\n",
        ),
        (
            Merge::TaskVectors(
                TaskVectorPreset::DareTies,
                TaskVectorOptions {
                    weights: vec![1.0, 0.6, 0.4],
                    densities: vec![0.5],
                    lambda: 0.8,
                    ..Default::default()
                },
            ),
            &three,
            "merge_method: dare_ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: 0.6}}\n  - {model: c, parameters: {weight: 0.4}}\nparameters: {density: 0.5, lambda: 0.8}\n",
        ),
        (
            Merge::TaskVectors(
                TaskVectorPreset::Breadcrumbs,
                TaskVectorOptions {
                    weights: vec![1.0],
                    densities: vec![0.6, 0.7, 0.8],
                    gamma: vec![0.05],
                    ..Default::default()
                },
            ),
            &three,
            "merge_method: breadcrumbs\nbase_model: base\nmodels:\n  - {model: a, parameters: {density: 0.6}}\n  - {model: b, parameters: {density: 0.7}}\n  - {model: c, parameters: {density: 0.8}}\nparameters: {weight: 1.0, gamma: 0.05}\n",
        ),
        (
            Merge::Nuslerp {
                weights: [0.7, 0.3],
                mode: NuslerpMode::FirstAxis,
            },
            &three[..2],
            "merge_method: nuslerp\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 0.7}}\n  - {model: b, parameters: {weight: 0.3}}\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        ),
        (
            Merge::Sce { select_topk: 0.3 },
            &three,
            "merge_method: sce\nbase_model: base\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {select_topk: 0.3}\n",
        ),
        (
            Merge::Subspace {
                method: SubspaceMethod::IsoCts {
                    common_space_fraction: 0.5,
                },
                lambda: 1.3,
            },
            &three,
            "merge_method: iso_cts\nbase_model: base\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {lambda: 1.3, common_space_fraction: 0.5}\n",
        ),
    ];
    for (typed, models, yaml) in cases {
        let ours = typed.merge(Some(&base), models, opts.seed).unwrap();
        let want = run(dir.path(), yaml, &opts).unwrap();
        assert_eq!(max_diff(&ours, &want), 0.0, "{typed:?}");
        assert!(!typed.reference(models.len()).unwrap().is_empty());
        // The YAML the typed value writes runs to the same tensors.
        let names = ["a", "b", "c"];
        let written = typed.to_yaml(Some("base"), &names[..models.len()]).unwrap();
        let back = run(dir.path(), &written, &opts).unwrap();
        assert_eq!(max_diff(&ours, &back), 0.0, "{typed:?}:\n{written}");
    }
    // Linear has no base role: its YAML leaves the base out, and runs.
    let lin = Merge::Linear {
        weights: vec![0.5, 0.3, 0.2],
        normalize: true,
    };
    let written = lin.to_yaml(Some("base"), &["a", "b", "c"]).unwrap();
    assert!(written.contains("merge_method: linear") && !written.contains("base_model"));
    assert_eq!(
        max_diff(
            &lin.merge(None, &three, 0).unwrap(),
            &run(dir.path(), &written, &opts).unwrap()
        ),
        0.0
    );
    // A misspelt parameter is an error in memory too, as in configs.
    let method = Method::from_name("ties").unwrap();
    let shared: Params = [("densty".to_string(), Value::Num(0.5))]
        .into_iter()
        .collect();
    let per = vec![Params::new(); 2];
    let e = merge::merge_state_dicts(&method, Some(&base), &three[..2], &shared, &per, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("densty") && e.contains("ties") && e.contains("density"),
        "{e}"
    );
    // A list of per-model values of the wrong length.
    let bad = Merge::Linear {
        weights: vec![1.0, 2.0],
        normalize: true,
    };
    assert!(
        bad.merge(None, &three, 0)
            .unwrap_err()
            .to_string()
            .contains("2 values for 3 models")
    );
}

/// A λ grid merged once and scaled ([`Merge::merge_lambdas`]) gives what
/// merging at each λ gives, bit for bit, for every method linear in λ (the
/// task-vector presets, random ones included, and the subspace merges), and
/// methods without a λ are merged as they are at every grid point.
#[test]
fn a_lambda_grid_merged_once_is_each_lambdas_merge_bit_for_bit() {
    use merge::subspace::SubspaceMethod;
    use merge::typed::{Merge, TaskVectorOptions, TaskVectorPreset};
    let dir = setup();
    let load = |n: &str| load_model(dir.path(), n);
    let base = load("base");
    let three = [load("a"), load("b"), load("c")];
    let bits = |sd: &StateDict| -> Vec<(String, Vec<u32>)> {
        sd.iter()
            .map(|(n, t)| (n.to_string(), t.data.iter().map(|v| v.to_bits()).collect()))
            .collect()
    };
    let tv = |preset, normalize| {
        Merge::TaskVectors(
            preset,
            TaskVectorOptions {
                weights: vec![1.0, 0.6, 0.4],
                densities: vec![0.5],
                normalize,
                ..Default::default()
            },
        )
    };
    let mut cases: Vec<Merge> = [
        TaskVectorPreset::TaskArithmetic,
        TaskVectorPreset::Ties,
        TaskVectorPreset::DareTies,
        TaskVectorPreset::DareLinear,
        TaskVectorPreset::Breadcrumbs,
        TaskVectorPreset::BreadcrumbsTies,
        TaskVectorPreset::Della,
        TaskVectorPreset::DellaLinear,
    ]
    .into_iter()
    .flat_map(|p| [tv(p, None), tv(p, Some(false))])
    .collect();
    for method in [
        SubspaceMethod::TsvM { rank: None },
        SubspaceMethod::IsoC,
        SubspaceMethod::IsoCts {
            common_space_fraction: 0.5,
        },
    ] {
        cases.push(Merge::Subspace {
            method,
            lambda: 1.0,
        });
    }
    cases.push(Merge::ModelStock { filter_wise: false });
    let lambdas = [0.3, 1.0, 1.7, -0.5];
    for m in &cases {
        let mut seen = Vec::new();
        m.merge_lambdas(Some(&base), &three, 7, &lambdas, |l, sd| {
            seen.push((l, sd));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), lambdas.len(), "{m:?}");
        for (l, sd) in &seen {
            let want = m.with_lambda(*l).merge(Some(&base), &three, 7).unwrap();
            assert!(bits(sd) == bits(&want), "{m:?} at λ = {l}");
        }
        // The grid's merges differ where λ matters.
        if m.lambda().is_some() {
            assert!(bits(&seen[0].1) != bits(&seen[2].1), "{m:?}");
        }
    }
    // Every λ is checked before any merge runs.
    let nan = tv(TaskVectorPreset::Ties, None);
    let mut calls = 0;
    let e = nan.merge_lambdas(Some(&base), &three, 0, &[0.5, f64::NAN], |_, _| {
        calls += 1;
        Ok(())
    });
    assert!(e.is_err() && calls == 0, "{e:?} after {calls} merges");
    // The update does not depend on the merge's own λ, even one that is not
    // a number: the grid's λ are what is applied.
    let mut odd = tv(TaskVectorPreset::Ties, None).with_lambda(f64::NAN);
    let mut grid = Vec::new();
    odd.merge_lambdas(Some(&base), &three, 0, &[0.5], |_, sd| {
        grid.push(sd);
        Ok(())
    })
    .unwrap();
    odd = odd.with_lambda(0.5);
    assert!(bits(&grid[0]) == bits(&odd.merge(Some(&base), &three, 0).unwrap()));
    // Updates applied to another base: an error naming the tensor.
    let updates = odd.updates(&base, &three, 0).unwrap().unwrap();
    let mut other = base.clone();
    other.insert(
        "model.layers.0.mlp.up_proj.weight",
        Tensor::f32(rng_tensor(&[3, 8], 9)),
    );
    let e = updates.apply(&other, 0.5).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj.weight"), "{e}");
    let mut missing = StateDict::new();
    missing.insert(
        "model.embed_tokens.weight",
        base.get("model.embed_tokens.weight").unwrap().clone(),
    );
    let e = updates.apply(&missing, 0.5).unwrap_err().to_string();
    assert!(e.contains("base"), "{e}");
}

#[test]
fn weights_summing_to_zero_and_densities_out_of_range_are_refused() {
    let dir = setup();
    let msg = |yaml: &str| refusal(dir.path(), yaml);
    let m = msg(
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: -1.0}}\n",
    );
    assert!(m.contains("weight") && m.contains("sum to zero"), "{m}");
    let m = msg(
        "merge_method: multislerp\nmodels:\n  - {model: a, parameters: {weight: 0.5}}\n  - {model: b, parameters: {weight: -0.5}}\n",
    );
    assert!(m.contains("weight") && m.contains("sum to zero"), "{m}");
    for d in ["1.5", "-0.2"] {
        let m = msg(&format!(
            "merge_method: ties\nbase_model: base\nmodels:\n  - {{model: a, parameters: {{weight: 1, density: {d}}}}}\n"
        ));
        assert!(
            m.contains("density") && m.contains("[0, 1]") && m.contains(d),
            "{m}"
        );
    }
    let m = msg(
        "merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1, density: high}}\n",
    );
    assert!(
        m.contains("density") && m.contains("expected a number"),
        "{m}"
    );
}

/// What mergekit 0.1.5 refuses (missing required parameters, a base a method
/// has no role for, methods that need a base, input-count contracts, unknown
/// parameters and methods), this crate refuses, and what it accepts this
/// crate accepts (`fixtures/refusals_reference.py` recorded its verdicts).
#[test]
fn refuses_what_mergekit_refuses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refusals");
    let verdicts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mergekit.json")).unwrap()).unwrap();
    let verdicts = verdicts.as_object().unwrap();
    assert!(verdicts.len() >= 20);
    let mut wrong = Vec::new();
    for (name, v) in verdicts {
        let out = tempfile::tempdir().unwrap();
        let ours = run_file(
            &dir.join(format!("{name}.yml")),
            &out.path().join("out"),
            &RunOptions::default(),
        );
        // Deliberately stricter: mergekit ignores a misspelt parameter (the
        // density then defaults to 1); an unknown parameter is an error here.
        let refused = v["refused"].as_bool().unwrap() || name == "ties_misspelt_density";
        if ours.is_err() != refused {
            wrong.push(format!(
                "{name}: mergekit {} ({}), ours {}",
                if refused { "refuses" } else { "accepts" },
                v["message"],
                match &ours {
                    Ok(_) => "accepts".to_string(),
                    Err(e) => format!("refuses: {e}"),
                }
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
