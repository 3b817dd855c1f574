//! The in-process API with typed options: one [`Merge`] value names a method
//! and its settings, so a misspelt option does not compile. It lowers to the
//! same [`Method`] + parameters the YAML path builds and runs the same
//! per-tensor code ([`crate::merge_tensor`]), so the two give bit-identical
//! tensors for the same settings (tested), and every range check (density in
//! [0, 1], ranks, weights that sum to zero) is shared.
//!
//! ```
//! use merge::typed::{Merge, TaskVectorOptions, TaskVectorPreset};
//! use weights::{Checkpoint, TensorSource};
//!
//! let load = |m: &str| Checkpoint::open(format!("tests/fixtures/tiny/{m}"))?.load_all();
//! let (base, a, b) = (load("base")?, load("a")?, load("b")?);
//! let ties = Merge::TaskVectors(
//!     TaskVectorPreset::Ties,
//!     TaskVectorOptions {
//!         weights: vec![1.0, 0.5],
//!         densities: vec![0.5, 0.3],
//!         ..Default::default()
//!     },
//! );
//! let merged = ties.merge(Some(&base), &[a, b], 0)?;
//! assert_eq!(merged.len(), base.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;

use weights::StateDict;

use crate::in_memory::{Updates, merge_state_dict_updates};
use crate::methods::NuslerpMode;
use crate::regmean::RegMeanOptions;
use crate::subspace::SubspaceMethod;
use crate::{Method, Params, Result, Value, merge_state_dicts};

/// The task-vector methods (one function with presets, see
/// [`crate::methods::TASK_VECTOR_PRESETS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskVectorPreset {
    /// Task arithmetic (Ilharco et al., ICLR 2023).
    TaskArithmetic,
    /// TIES (Yadav et al., NeurIPS 2023).
    Ties,
    /// DARE with TIES' sign election (Yu et al., ICML 2024).
    DareTies,
    /// DARE without election.
    DareLinear,
    /// Model Breadcrumbs (Davari & Belilovsky, 2023).
    Breadcrumbs,
    /// Model Breadcrumbs with TIES' election.
    BreadcrumbsTies,
    /// DELLA (Deep et al., 2024).
    Della,
    /// DELLA without election.
    DellaLinear,
}

impl TaskVectorPreset {
    /// Its `merge_method` name.
    pub fn name(&self) -> &'static str {
        match self {
            TaskVectorPreset::TaskArithmetic => "task_arithmetic",
            TaskVectorPreset::Ties => "ties",
            TaskVectorPreset::DareTies => "dare_ties",
            TaskVectorPreset::DareLinear => "dare_linear",
            TaskVectorPreset::Breadcrumbs => "breadcrumbs",
            TaskVectorPreset::BreadcrumbsTies => "breadcrumbs_ties",
            TaskVectorPreset::Della => "della",
            TaskVectorPreset::DellaLinear => "della_linear",
        }
    }
}

/// Options of the task-vector family. Per-model lists hold one value per
/// model, or one value for all; empty lists take the method's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskVectorOptions {
    /// Weight of each task vector.
    pub weights: Vec<f64>,
    /// Fraction kept by sparsification (default 1: all).
    pub densities: Vec<f64>,
    /// Breadcrumbs' fraction of outliers removed (default 0.01).
    pub gamma: Vec<f64>,
    /// DELLA's probability half-width (default 0.15).
    pub epsilon: Vec<f64>,
    /// Final scale λ.
    pub lambda: f64,
    /// Divide by the (elected) weight sum (`None`: the preset's default).
    pub normalize: Option<bool>,
    /// Rescale sparsified vectors to their L1 norm (`None`: the preset's default).
    pub rescale: Option<bool>,
}

impl Default for TaskVectorOptions {
    fn default() -> Self {
        TaskVectorOptions {
            weights: vec![1.0],
            densities: Vec::new(),
            gamma: Vec::new(),
            epsilon: Vec::new(),
            lambda: 1.0,
            normalize: None,
            rescale: None,
        }
    }
}

/// A merge method with its options.
#[derive(Clone, Debug, PartialEq)]
pub enum Merge {
    /// Weighted average (model soups).
    Linear {
        /// One weight per model.
        weights: Vec<f64>,
        /// Divide by the weight sum.
        normalize: bool,
    },
    /// SLERP from the base (t = 0) to the one model.
    Slerp {
        /// Interpolation position.
        t: f64,
    },
    /// NuSLERP of two models (of their task vectors with a base).
    Nuslerp {
        /// The two models' weights (`t = w₁/(w₀+w₁)`).
        weights: [f64; 2],
        /// Which vectors are interpolated.
        mode: NuslerpMode,
    },
    /// The task-vector family.
    TaskVectors(TaskVectorPreset, TaskVectorOptions),
    /// Model Stock.
    ModelStock {
        /// One interpolation ratio per row.
        filter_wise: bool,
    },
    /// Karcher mean on the sphere.
    Karcher {
        /// Fixed-point iterations.
        max_iter: usize,
        /// Convergence tolerance.
        tol: f64,
    },
    /// The one model, optionally scaled.
    Passthrough {
        /// Scale.
        scale: Option<f64>,
    },
    /// SCE.
    Sce {
        /// Fraction of elements of largest variance kept.
        select_topk: f64,
    },
    /// Multi-SLERP.
    Multislerp {
        /// One weight per model.
        weights: Vec<f64>,
        /// Divide the weights by their sum.
        normalize_weights: bool,
        /// Numerical guard.
        eps: f64,
    },
    /// NearSwap.
    Nearswap {
        /// Distance scale.
        t: f64,
    },
    /// Arcee Fusion.
    ArceeFusion,
    /// RAM.
    Ram {
        /// Changes at or below this count as none.
        epsilon: f64,
    },
    /// RAM+ (tensor-local).
    RamPlusTl {
        /// Strength of the unique-change boost.
        r: f64,
        /// Cap of the shared-to-unique ratio.
        alpha: f64,
        /// Changes at or below this count as none.
        epsilon: f64,
    },
    /// TSV-M, Iso-C or Iso-CTS.
    Subspace {
        /// Which, with its options.
        method: SubspaceMethod,
        /// Scale of the merged task vector.
        lambda: f64,
    },
    /// RegMean, with one Gram-matrix file per model.
    RegMean {
        /// `.safetensors` of `XᵀX` per weight, one per model.
        grams: Vec<PathBuf>,
        /// Off-diagonal scale and ridge.
        options: RegMeanOptions,
    },
}

fn num(v: f64) -> Value {
    Value::Num(v)
}

/// `values[i]`, or the one value for all, or none.
fn per(values: &[f64], i: usize) -> Option<f64> {
    match values.len() {
        0 => None,
        1 => Some(values[0]),
        _ => values.get(i).copied(),
    }
}

impl Merge {
    /// The registry method, shared parameters and per-model parameters for
    /// `models` inputs: exactly what the YAML path resolves.
    pub fn lower(&self, models: usize) -> Result<(Method, Params, Vec<Params>)> {
        let mut shared = Params::new();
        let mut each = vec![Params::new(); models];
        let mut per_model = |key: &str, values: &[f64]| -> Result<()> {
            if values.len() > 1 && values.len() != models {
                return Err(crate::MergeError::param(
                    "(all tensors)",
                    key,
                    format!("{} values for {models} models", values.len()),
                ));
            }
            for (i, p) in each.iter_mut().enumerate() {
                if let Some(v) = per(values, i) {
                    p.insert(key.to_string(), num(v));
                }
            }
            Ok(())
        };
        let name = match self {
            Merge::Linear { weights, normalize } => {
                per_model("weight", weights)?;
                shared.insert("normalize".into(), Value::Bool(*normalize));
                "linear"
            }
            Merge::Slerp { t } => {
                shared.insert("t".into(), num(*t));
                "slerp"
            }
            Merge::Nuslerp { weights, mode } => {
                per_model("weight", weights)?;
                let (flatten, rows) = match mode {
                    NuslerpMode::Flatten => (true, false),
                    NuslerpMode::LastAxis => (false, false),
                    NuslerpMode::FirstAxis => (false, true),
                };
                shared.insert("nuslerp_flatten".into(), Value::Bool(flatten));
                shared.insert("nuslerp_row_wise".into(), Value::Bool(rows));
                "nuslerp"
            }
            Merge::TaskVectors(preset, o) => {
                per_model("weight", &o.weights)?;
                per_model("density", &o.densities)?;
                per_model("gamma", &o.gamma)?;
                per_model("epsilon", &o.epsilon)?;
                shared.insert("lambda".into(), num(o.lambda));
                if let Some(n) = o.normalize {
                    shared.insert("normalize".into(), Value::Bool(n));
                }
                if let Some(r) = o.rescale {
                    shared.insert("rescale".into(), Value::Bool(r));
                }
                preset.name()
            }
            Merge::ModelStock { filter_wise } => {
                shared.insert("filter_wise".into(), Value::Bool(*filter_wise));
                "model_stock"
            }
            Merge::Karcher { max_iter, tol } => {
                shared.insert("max_iter".into(), num(*max_iter as f64));
                shared.insert("tol".into(), num(*tol));
                "karcher"
            }
            Merge::Passthrough { scale } => {
                if let Some(s) = scale {
                    per_model("scale", &[*s])?;
                }
                "passthrough"
            }
            Merge::Sce { select_topk } => {
                shared.insert("select_topk".into(), num(*select_topk));
                "sce"
            }
            Merge::Multislerp {
                weights,
                normalize_weights,
                eps,
            } => {
                per_model("weight", weights)?;
                shared.insert("normalize_weights".into(), Value::Bool(*normalize_weights));
                shared.insert("eps".into(), num(*eps));
                "multislerp"
            }
            Merge::Nearswap { t } => {
                shared.insert("t".into(), num(*t));
                "nearswap"
            }
            Merge::ArceeFusion => "arcee_fusion",
            Merge::Ram { epsilon } => {
                shared.insert("epsilon".into(), num(*epsilon));
                "ram"
            }
            Merge::RamPlusTl { r, alpha, epsilon } => {
                shared.insert("r".into(), num(*r));
                shared.insert("alpha".into(), num(*alpha));
                shared.insert("epsilon".into(), num(*epsilon));
                "ramplus_tl"
            }
            Merge::Subspace { method, lambda } => {
                shared.insert("lambda".into(), num(*lambda));
                match method {
                    SubspaceMethod::TsvM { rank: Some(r) } => {
                        shared.insert("rank".into(), num(*r as f64));
                    }
                    SubspaceMethod::IsoCts {
                        common_space_fraction,
                    } => {
                        shared.insert("common_space_fraction".into(), num(*common_space_fraction));
                    }
                    _ => {}
                }
                method.name()
            }
            Merge::RegMean { grams, options } => {
                if grams.len() != models {
                    return Err(crate::MergeError::param(
                        "(all tensors)",
                        "gram",
                        format!("{} Gram files for {models} models", grams.len()),
                    ));
                }
                for (p, g) in each.iter_mut().zip(grams) {
                    p.insert("gram".into(), Value::Str(g.to_string_lossy().into_owned()));
                }
                shared.insert("alpha".into(), num(options.alpha));
                shared.insert("ridge".into(), num(options.ridge));
                "regmean"
            }
        };
        Ok((Method::from_name(name)?, shared, each))
    }

    /// Merges `models` (and `base`, for methods with a base role) tensor by
    /// tensor; `seed` seeds random sparsification.
    pub fn merge(
        &self,
        base: Option<&StateDict>,
        models: &[StateDict],
        seed: u64,
    ) -> Result<StateDict> {
        let (method, shared, per_model) = self.lower(models.len())?;
        merge_state_dicts(&method, base, models, &shared, &per_model, seed)
    }

    /// Its final scale λ, for the merges that have one (the task-vector
    /// family and the subspace merges).
    pub fn lambda(&self) -> Option<f64> {
        match self {
            Merge::TaskVectors(_, o) => Some(o.lambda),
            Merge::Subspace { lambda, .. } => Some(*lambda),
            _ => None,
        }
    }

    /// The same merge at another λ (unchanged for merges without one).
    pub fn with_lambda(&self, lambda: f64) -> Merge {
        let mut m = self.clone();
        match &mut m {
            Merge::TaskVectors(_, o) => o.lambda = lambda,
            Merge::Subspace { lambda: l, .. } => *l = lambda,
            _ => {}
        }
        m
    }

    /// The λ-free updates of a merge linear in λ (those with a
    /// [`Merge::lambda`]): [`Updates::apply`] at λ gives
    /// `self.with_lambda(λ).merge(Some(base), models, seed)` bit for bit.
    /// `None` for merges without a λ.
    pub fn updates(
        &self,
        base: &StateDict,
        models: &[StateDict],
        seed: u64,
    ) -> Result<Option<Updates>> {
        if self.lambda().is_none() {
            return Ok(None);
        }
        // At λ = 1: the update does not depend on it.
        let (method, shared, per_model) = self.with_lambda(1.0).lower(models.len())?;
        merge_state_dict_updates(&method, base, models, &shared, &per_model, seed)
    }

    /// [`Merge::merge`] at each of `lambdas` ([`Merge::with_lambda`]), the
    /// merged models handed to `each` in turn. Merges linear in λ (those
    /// with a [`Merge::lambda`]) are merged once and scaled per λ
    /// ([`crate::in_memory::Updates`]), bit for bit what merging at each λ
    /// gives; the others are merged once per λ. Peak memory: the update
    /// (one model in f32, or f64 for the subspace merges) and one merged model.
    pub fn merge_lambdas(
        &self,
        base: Option<&StateDict>,
        models: &[StateDict],
        seed: u64,
        lambdas: &[f64],
        mut each: impl FnMut(f64, StateDict) -> Result<()>,
    ) -> Result<()> {
        // Every λ's settings are checked before any merge runs.
        if let Some(l) = lambdas.iter().find(|l| !l.is_finite()) {
            return Err(crate::MergeError::param(
                "(all tensors)",
                "lambda",
                format!("expected a number, got {l}"),
            ));
        }
        let lowered = lambdas
            .iter()
            .map(|&l| self.with_lambda(l).lower(models.len()))
            .collect::<Result<Vec<_>>>()?;
        let updates = match (base, lambdas.is_empty()) {
            (Some(b), false) => self.updates(b, models, seed)?.map(|u| (b, u)),
            _ => None,
        };
        for (&l, (method, shared, per_model)) in lambdas.iter().zip(&lowered) {
            let merged = match &updates {
                Some((b, u)) => u.apply(b, l)?,
                None => merge_state_dicts(method, base, models, shared, per_model, seed)?,
            };
            each(l, merged)?;
        }
        Ok(())
    }

    /// The mergekit YAML config that runs this merge on `models` (paths as
    /// they are to appear in the file) with `base`: what `merge CONFIG OUT`
    /// and `mergekit-yaml` read (`base` is left out for methods without a
    /// base role, which would merge it as one more input). Running it gives the tensors [`Merge::merge`]
    /// gives for the same inputs and seed (tested).
    pub fn to_yaml(&self, base: Option<&str>, models: &[&str]) -> Result<String> {
        use serde_yaml_ng::{Mapping, Value as Y};
        let (method, shared, each) = self.lower(models.len())?;
        let params = |p: &Params| -> Y {
            let mut m = Mapping::new();
            for (k, v) in p {
                let v = match v {
                    Value::Num(x) => Y::Number((*x).into()),
                    Value::Bool(b) => Y::Bool(*b),
                    Value::Str(s) => Y::String(s.clone()),
                };
                m.insert(Y::String(k.clone()), v);
            }
            Y::Mapping(m)
        };
        let mut cfg = Mapping::new();
        cfg.insert("merge_method".into(), method.name().into());
        // mergekit merges a base_model of a method without a base role as
        // one more input: such methods get none.
        if let Some(b) = base.filter(|_| method.base_policy() != crate::BasePolicy::Ignored) {
            cfg.insert("base_model".into(), b.into());
        }
        if !shared.is_empty() {
            cfg.insert("parameters".into(), params(&shared));
        }
        let list = models
            .iter()
            .zip(&each)
            .map(|(m, p)| {
                let mut e = Mapping::new();
                e.insert("model".into(), (*m).into());
                if !p.is_empty() {
                    e.insert("parameters".into(), params(p));
                }
                Y::Mapping(e)
            })
            .collect();
        cfg.insert("models".into(), Y::Sequence(list));
        cfg.insert("dtype".into(), "float32".into());
        serde_yaml_ng::to_string(&Y::Mapping(cfg)).map_err(|e| crate::MergeError::Inputs {
            method: method.name().into(),
            msg: format!("writing the YAML config: {e}"),
        })
    }

    /// Its paper or source, as the registry gives it.
    pub fn reference(&self, models: usize) -> Result<&'static str> {
        Ok(self.lower(models)?.0.reference())
    }
}
