//! A fine-tune turned into a LoRA adapter, as `mergekit-extract-lora` (0.1.5)
//! does it: per linear weight, the truncated SVD of `ΔW = W_ft − W_base`,
//! `ΔW ≈ B·A` with `A = √Σ_r Vᵣᵀ`, `B = U_r √Σ_r` (or `A = Σ_r Vᵣᵀ`, `B = U_r`
//! without `distribute_scale`), rank `r = min(max_rank, #σ)` lowered to the
//! number of singular values above `sv_epsilon` when that is set, `lora_alpha =
//! r` per module (scale 1; modules of another rank go to `rank_pattern` and
//! `alpha_pattern`). Embeddings and tensors that are not 2-D (norms) are saved
//! at full rank as `modules_to_save` (mergekit's default without
//! `--embed-lora`; dropped with `skip_undecomposable`). Include / exclude
//! regexes pick the modules as mergekit's do (`re.search` on module names).

use indexmap::IndexMap;
use ndarray::{Array2, Ix2};
use serde::Serialize;
use weights::TensorSource;

use crate::error::{MergeError, Result};
use crate::lora::{LoraAdapter, LoraConfig, LoraPair};

/// Options of [`extract_lora`] (mergekit-extract-lora's flags).
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Largest rank of a module (`--max-rank`, default 128).
    pub max_rank: usize,
    /// Singular values at or below this are dropped (`--sv-epsilon`, default 0: none).
    pub sv_epsilon: f64,
    /// Singular values below this fraction of a module's largest are dropped
    /// (0: none; not in mergekit).
    pub sv_relative: f64,
    /// Split `Σ` as `√Σ` between A and B (`--distribute-scale`, default on).
    pub distribute_scale: bool,
    /// Modules (names or last components) saved at full rank (`--save-module`).
    pub modules_to_save: Vec<String>,
    /// Only modules matching one of these regexes are extracted (`--include-regex`).
    pub include: Vec<String>,
    /// Modules matching one of these are left out (`--exclude-regex`).
    pub exclude: Vec<String>,
    /// Drop, instead of saving at full rank, tensors that cannot be
    /// decomposed (norms) (`--skip-undecomposable`).
    pub skip_undecomposable: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            max_rank: 128,
            sv_epsilon: 0.0,
            sv_relative: 0.0,
            distribute_scale: true,
            modules_to_save: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
            skip_undecomposable: false,
        }
    }
}

/// What happened to one tensor.
#[derive(Clone, Debug, Serialize)]
pub struct ExtractedTensor {
    /// The tensor's name.
    pub name: String,
    /// `"lora"`, `"full"` (modules_to_save) or `"skipped"`.
    pub kind: &'static str,
    /// Rank kept (LoRA modules).
    pub rank: usize,
    /// Singular values kept (LoRA modules).
    pub kept: Vec<f64>,
    /// `‖ΔW − B·A‖_F / ‖ΔW‖_F` (0 for an unchanged weight).
    pub relative_error: f64,
}

/// The adapter and a per-tensor report.
pub struct Extraction {
    /// The PEFT adapter.
    pub adapter: LoraAdapter,
    /// One row per tensor of the fine-tune, in file order.
    pub report: Vec<ExtractedTensor>,
}

fn compile(patterns: &[String], option: &str) -> Result<Vec<regex::Regex>> {
    patterns
        .iter()
        .map(|p| {
            regex::Regex::new(p).map_err(|e| MergeError::Config {
                path: option.into(),
                msg: format!("invalid regex '{p}': {e}"),
            })
        })
        .collect()
}

/// Extracts `finetuned − base` as a LoRA adapter (see the module docs).
pub fn extract_lora(
    base: &dyn TensorSource,
    finetuned: &dyn TensorSource,
    opts: &ExtractOptions,
) -> Result<Extraction> {
    if opts.max_rank == 0 {
        return Err(MergeError::param(
            "extract-lora",
            "max_rank",
            "must be at least 1",
        ));
    }
    if !(0.0..1.0).contains(&opts.sv_relative) {
        return Err(MergeError::param(
            "extract-lora",
            "sv_relative",
            format!("{} is outside [0, 1)", opts.sv_relative),
        ));
    }
    let include = compile(&opts.include, "--include-regex")?;
    let exclude = compile(&opts.exclude, "--exclude-regex")?;
    let base_shapes: IndexMap<String, Vec<usize>> = base
        .infos()
        .into_iter()
        .map(|i| (i.name, i.shape))
        .collect();
    let mut modules = IndexMap::new();
    let mut full = IndexMap::new();
    let mut report = Vec::new();
    let mut ranks: IndexMap<String, usize> = IndexMap::new();
    for info in finetuned.infos() {
        let name = info.name.clone();
        let module = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(&name)
            .to_string();
        let last = module.rsplit('.').next().unwrap_or(&module);
        let excluded = exclude.iter().any(|r| r.is_match(&module));
        let extractable =
            (include.is_empty() || include.iter().any(|r| r.is_match(&module))) && !excluded;
        let two_d = info.shape.len() == 2 && name.ends_with(".weight");
        let row = |kind, rank, kept, err| ExtractedTensor {
            name: name.clone(),
            kind,
            rank,
            kept,
            relative_error: err,
        };
        // Asked for at full rank, or an embedding not excluded (mergekit's
        // default without --embed-lora).
        let save = opts
            .modules_to_save
            .iter()
            .any(|k| k == &module || k == last)
            || (crate::run::is_embedding(&module) && !excluded);
        if save {
            full.insert(name.clone(), finetuned.load(&name)?);
            report.push(row("full", 0, Vec::new(), 0.0));
            continue;
        }
        if !extractable {
            report.push(row("skipped", 0, Vec::new(), 0.0));
            continue;
        }
        if name.ends_with(".bias")
            && base_shapes
                .get(&format!("{module}.weight"))
                .is_some_and(|s| s.len() == 2)
        {
            return Err(MergeError::LowRank {
                what: name,
                msg: "the bias of a linear layer would be a LoRA bias (lora_B.bias), which is not supported; \
                      exclude the layer (--exclude-regex) or save it at full rank (--save-module)"
                    .into(),
            });
        }
        if !two_d {
            if opts.skip_undecomposable {
                report.push(row("skipped", 0, Vec::new(), 0.0));
            } else {
                full.insert(name.clone(), finetuned.load(&name)?);
                report.push(row("full", 0, Vec::new(), 0.0));
            }
            continue;
        }
        match base_shapes.get(&name) {
            None => {
                return Err(MergeError::MissingTensor {
                    tensor: name,
                    model: "base".into(),
                });
            }
            Some(s) if *s != info.shape => {
                return Err(MergeError::ShapeMismatch {
                    tensor: name,
                    model: "fine-tuned".into(),
                    expected: s.clone(),
                    got: info.shape.clone(),
                });
            }
            Some(_) => {}
        }
        let (b, f) = (base.load(&name)?, finetuned.load(&name)?);
        MergeError::check_finite(&name, "base", b.data.iter())?;
        MergeError::check_finite(&name, "fine-tuned", f.data.iter())?;
        let delta: Array2<f32> = (&f.data - &b.data)
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        let (pair, kept, err) = decompose(&delta, opts, &name)?;
        ranks.insert(module.clone(), pair.a.nrows());
        report.push(row("lora", kept.len(), kept, err));
        modules.insert(name, pair);
    }
    let r = ranks.values().copied().max().unwrap_or(1).max(1);
    let mut targets: Vec<String> = Vec::new();
    for m in ranks.keys() {
        let last = m.rsplit('.').next().unwrap_or(m).to_string();
        if !targets.contains(&last) {
            targets.push(last);
        }
    }
    targets.sort();
    let target_refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let mut config = LoraConfig::new(r, r as f64, &target_refs);
    for (m, &k) in &ranks {
        if k != r {
            config.rank_pattern.insert(m.clone(), k);
            config.alpha_pattern.insert(m.clone(), k as f64);
        }
    }
    config.raw.insert("inference_mode".into(), true.into());
    config.raw.insert("fan_in_fan_out".into(), false.into());
    Ok(Extraction {
        adapter: LoraAdapter {
            config,
            modules,
            full,
        },
        report,
    })
}

/// The truncated SVD of one delta as LoRA factors, the singular values kept
/// and the relative reconstruction error.
fn decompose(
    delta: &Array2<f32>,
    opts: &ExtractOptions,
    name: &str,
) -> Result<(LoraPair, Vec<f64>, f64)> {
    let svd = spectra::linalg::thin_svd(delta.view(), name)?;
    let s: Vec<f64> = svd.s.iter().map(|&v| v as f64).collect();
    let mut rank = opts.max_rank.min(s.len());
    if opts.sv_epsilon > 0.0 {
        rank = rank.min(s.iter().filter(|&&v| v > opts.sv_epsilon).count());
    }
    if opts.sv_relative > 0.0 {
        let top = s.first().copied().unwrap_or(0.0);
        rank = rank.min(s.iter().filter(|&&v| v >= opts.sv_relative * top).count());
    }
    // A weight the fine-tune left unchanged (or all values cut) keeps one
    // zero-valued component, so the adapter stays loadable.
    let k = rank.max(1);
    let (m, n) = delta.dim();
    let mut a = Array2::<f32>::zeros((k, n));
    let mut b = Array2::<f32>::zeros((m, k));
    for j in 0..rank {
        let sv = svd.s[j];
        let (sa, sb) = if opts.distribute_scale {
            (sv.sqrt(), sv.sqrt())
        } else {
            (sv, 1.0)
        };
        a.row_mut(j).assign(&svd.vt.row(j).mapv(|v| v * sa));
        b.column_mut(j).assign(&svd.u.column(j).mapv(|v| v * sb));
    }
    let total: f64 = s.iter().map(|v| v * v).sum();
    let dropped: f64 = s[rank..].iter().map(|v| v * v).sum();
    let err = if total > 0.0 {
        (dropped / total).sqrt()
    } else {
        0.0
    };
    Ok((LoraPair { a, b }, s[..rank].to_vec(), err))
}

/// Writes the adapter and `extraction.json` (the report) into `dir`.
pub fn save_extraction(ex: &Extraction, dir: &std::path::Path) -> Result<()> {
    ex.adapter.save(dir)?;
    let text = serde_json::to_string_pretty(&ex.report).expect("JSON");
    weights::atomic::write_atomic(dir.join("extraction.json"), text.as_bytes())?;
    Ok(())
}
