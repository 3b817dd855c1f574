//! Model merging with mergekit's definitions, faster and in bounded memory.
//!
//! - [`methods`]: the merge methods over one tensor (linear, slerp, nuslerp,
//!   the task-vector family as one function with presets, model stock,
//!   Karcher mean, passthrough); [`sparsify`]: TIES/DARE/breadcrumbs/DELLA
//!   sparsification.
//! - [`Method`] and [`merge_tensor`]: the registry mapping mergekit's
//!   `merge_method` names and parameters to those functions.
//! - [`config`]: mergekit's YAML format (gradients, filters, slices).
//! - [`run`]: streaming execution of a config over lazily read checkpoints into
//!   sharded safetensors.

#![warn(missing_docs)]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod aligned;
pub mod config;
pub mod error;
pub mod extract;
pub mod in_memory;
pub mod lora;
pub mod methods;
pub mod moe;
pub mod regmean;
pub mod run;
pub mod rws;
pub mod sparsify;
pub mod submoe;
pub mod subspace;
pub mod typed;
mod vmath;

use indexmap::IndexMap;
use serde::Serialize;
use weights::TensorSource;

pub use error::{MergeError, Result};
pub use in_memory::merge_state_dicts;
use methods::{NuslerpMode, TASK_VECTOR_PRESETS, TaskInput, TaskVectorMethod, TaskVectorOptions};
use sparsify::{Sparsification, SparsifyParams};
use subspace::SubspaceMethod;

/// A resolved parameter value.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A number (YAML int or float).
    Num(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

/// Parameter values of one tensor (shared, or of one input model).
pub type Params = IndexMap<String, Value>;

/// A merge method, by mergekit's name.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Method {
    /// Weighted average.
    Linear,
    /// Spherical interpolation of a base and one model.
    Slerp,
    /// Spherical interpolation of two models (or their task vectors).
    Nuslerp,
    /// A task-vector preset.
    TaskVector(&'static str, TaskVectorMethod),
    /// Model Stock.
    ModelStock,
    /// Karcher mean.
    Karcher,
    /// One input copied (optionally scaled).
    Passthrough,
    /// SCE: variance-selected, energy-weighted, sign-elected task vectors.
    Sce,
    /// Barycentric spherical interpolation of any number of models.
    Multislerp,
    /// The other model's values where they are near the base's.
    Nearswap,
    /// The fine-tune's changes where their KL-weighted importance is an outlier.
    ArceeFusion,
    /// Reinforced Agent Merging: unique changes kept, shared ones averaged.
    Ram,
    /// RAM+ (tensor-local): RAM with unique changes rescaled by overlap.
    RamPlusTl,
    /// Task Singular Vectors merging (TSV-M), see [`subspace`].
    TsvM,
    /// Isotropic merging in the common subspace (Iso-C), see [`subspace`].
    IsoC,
    /// Isotropic merging in common and task-specific subspaces (Iso-CTS).
    IsoCts,
    /// RegMean: per linear layer, the least-squares fit to every model's
    /// outputs on its inputs' Gram matrices, see [`regmean`].
    RegMean,
}

/// Parameters that name files: a relative path resolves like a model path
/// (working directory, else the config's folder).
pub const FILE_PARAMETERS: &[&str] = &["gram"];

/// Whether a method uses the config's `base_model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is an input like the others only if `models` lists it.
    Ignored,
    /// The method needs a base.
    Required,
    /// The method uses a base when given.
    Optional,
}

impl Method {
    /// The methods other than the task-vector presets (those are
    /// [`TASK_VECTOR_PRESETS`]); their names come from [`Method::name`].
    const OTHERS: &'static [Method] = &[
        Method::Linear,
        Method::Slerp,
        Method::Nuslerp,
        Method::ModelStock,
        Method::Karcher,
        Method::Passthrough,
        Method::Sce,
        Method::Multislerp,
        Method::Nearswap,
        Method::ArceeFusion,
        Method::Ram,
        Method::RamPlusTl,
        Method::TsvM,
        Method::IsoC,
        Method::IsoCts,
        Method::RegMean,
    ];

    /// Every method name, as `merge_method` spells it.
    pub fn names() -> Vec<&'static str> {
        Method::OTHERS
            .iter()
            .map(Method::name)
            .chain(TASK_VECTOR_PRESETS.iter().map(|(n, _)| *n))
            .collect()
    }

    /// The method called `name`.
    pub fn from_name(name: &str) -> Result<Method> {
        if let Some(m) = Method::OTHERS.iter().find(|m| m.name() == name) {
            return Ok(*m);
        }
        match TASK_VECTOR_PRESETS.iter().find(|(n, _)| *n == name) {
            Some((n, m)) => Ok(Method::TaskVector(n, *m)),
            None => Err(MergeError::UnknownMethod {
                name: name.to_string(),
                known: Method::names().join(", "),
            }),
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Slerp => "slerp",
            Method::Nuslerp => "nuslerp",
            Method::TaskVector(n, _) => n,
            Method::ModelStock => "model_stock",
            Method::Karcher => "karcher",
            Method::Passthrough => "passthrough",
            Method::Sce => "sce",
            Method::Multislerp => "multislerp",
            Method::Nearswap => "nearswap",
            Method::ArceeFusion => "arcee_fusion",
            Method::Ram => "ram",
            Method::RamPlusTl => "ramplus_tl",
            Method::TsvM => "tsv_m",
            Method::IsoC => "iso_c",
            Method::IsoCts => "iso_cts",
            Method::RegMean => "regmean",
        }
    }

    /// Its paper or source.
    pub fn reference(&self) -> &'static str {
        match self {
            Method::Linear => "Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
            Method::Slerp => {
                "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; mergekit"
            }
            Method::Nuslerp => "mergekit (Goddard et al., arXiv 2403.13257)",
            Method::TaskVector(name, _) => match *name {
                "task_arithmetic" => {
                    "Ilharco et al., Editing models with task arithmetic, ICLR 2023 (arXiv 2212.04089)"
                }
                "ties" => "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
                "dare_ties" | "dare_linear" => {
                    "Yu et al., Language models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
                }
                "breadcrumbs" | "breadcrumbs_ties" => {
                    "Davari & Belilovsky, Model Breadcrumbs, 2023 (arXiv 2312.06795)"
                }
                _ => "Deep et al., DELLA-Merging, 2024 (arXiv 2406.11617)",
            },
            Method::ModelStock => "Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
            Method::Karcher => "Karcher mean on the sphere; mergekit",
            Method::Passthrough => "mergekit (frankenmerges)",
            Method::Sce => "Wan et al., FuseChat (SCE), 2024 (arXiv 2408.07990)",
            Method::Multislerp => "Goddard, Multi-SLERP (goddard.blog); mergekit",
            Method::Nearswap => "alchemonaut, NearSwap (QuartetAnemoi-70B); mergekit",
            Method::ArceeFusion => "Arcee AI, Arcee Fusion; mergekit",
            Method::Ram | Method::RamPlusTl => {
                "Reinforced Agent Merging (arXiv 2601.13572); mergekit"
            }
            Method::TsvM => "Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)",
            Method::IsoC | Method::IsoCts => {
                "Marczak et al., No Task Left Behind: Isotropic Model Merging, 2025 (arXiv 2502.04959)"
            }
            Method::RegMean => {
                "Jin et al., Dataless Knowledge Fusion by Merging Weights (RegMean), ICLR 2023 (arXiv 2212.09849)"
            }
        }
    }

    /// How it treats `base_model`.
    pub fn base_policy(&self) -> BasePolicy {
        match self {
            Method::Linear | Method::Passthrough | Method::RegMean => BasePolicy::Ignored,
            Method::Slerp
            | Method::TaskVector(..)
            | Method::ModelStock
            | Method::Sce
            | Method::Nearswap
            | Method::ArceeFusion
            | Method::Ram
            | Method::RamPlusTl
            | Method::TsvM
            | Method::IsoC
            | Method::IsoCts => BasePolicy::Required,
            Method::Nuslerp | Method::Karcher | Method::Multislerp => BasePolicy::Optional,
        }
    }

    /// The first of `keys` this method does not read, with the error message
    /// (the check the YAML path and [`merge_tensor`] share).
    pub(crate) fn unknown_parameter<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Option<(&'a str, String)> {
        let known = self.parameters();
        keys.into_iter()
            .find(|k| !known.iter().any(|(n, _)| n == k))
            .map(|k| {
                let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
                (
                    k,
                    format!(
                        "parameter '{k}' is not used by method '{}' (it takes: {})",
                        self.name(),
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                )
            })
    }

    /// The parameters it reads: `(name, per_input)`. Others are an error.
    pub fn parameters(&self) -> Vec<(&'static str, bool)> {
        match self {
            Method::Linear => vec![("weight", true), ("normalize", false)],
            Method::Slerp => vec![("t", false)],
            Method::Nuslerp => vec![
                ("weight", true),
                ("nuslerp_row_wise", false),
                ("nuslerp_flatten", false),
            ],
            Method::TaskVector(_, m) => {
                let mut v = vec![
                    ("weight", true),
                    ("density", true),
                    ("normalize", false),
                    ("rescale", false),
                    ("lambda", false),
                    ("int8_mask", false),
                ];
                match m.sparsification {
                    Some(Sparsification::MagnitudeOutliers) => v.push(("gamma", true)),
                    Some(Sparsification::DellaMagprune) => v.push(("epsilon", true)),
                    _ => {}
                }
                v
            }
            Method::ModelStock => vec![("filter_wise", false)],
            Method::Karcher => vec![("max_iter", false), ("tol", false)],
            Method::Passthrough => vec![("scale", true)],
            Method::Sce => vec![("select_topk", false), ("int8_mask", false)],
            Method::Multislerp => vec![
                ("weight", true),
                ("normalize_weights", false),
                ("eps", false),
            ],
            Method::Nearswap => vec![("t", false)],
            Method::ArceeFusion => vec![],
            Method::Ram => vec![("epsilon", false)],
            Method::RamPlusTl => vec![("r", false), ("alpha", false), ("epsilon", false)],
            Method::TsvM => vec![("lambda", false), ("rank", false)],
            Method::IsoC => vec![("lambda", false)],
            Method::IsoCts => vec![("lambda", false), ("common_space_fraction", false)],
            Method::RegMean => vec![("gram", true), ("alpha", false), ("ridge", false)],
        }
    }
}

/// The inputs of one output tensor.
pub struct TensorInputs<'a> {
    /// Output tensor name (for errors and seeds).
    pub name: &'a str,
    /// Its shape.
    pub shape: &'a [usize],
    /// The base model's tensor, when the method uses one.
    pub base: Option<&'a [f32]>,
    /// The other inputs, in config order.
    pub models: Vec<&'a [f32]>,
    /// Shared parameters resolved for this tensor.
    pub shared: &'a Params,
    /// Per-input parameters resolved for this tensor (same order as `models`).
    pub per_model: &'a [Params],
    /// Seed of random sparsification.
    pub seed: u64,
    /// Source of random sparsification's draws.
    pub draws: sparsify::Draws,
}

impl TensorInputs<'_> {
    fn num(&self, model: Option<usize>, key: &str) -> Result<Option<f64>> {
        // A model's own value wins over the shared one.
        let v = match model {
            Some(i) => self.per_model[i].get(key).or_else(|| self.shared.get(key)),
            None => self.shared.get(key),
        };
        match v {
            None => Ok(None),
            Some(Value::Num(x)) if x.is_finite() => Ok(Some(*x)),
            Some(other) => Err(MergeError::param(
                self.name,
                key,
                format!("expected a number, got {other:?}"),
            )),
        }
    }

    fn req(&self, model: Option<usize>, key: &str) -> Result<f64> {
        self.num(model, key)?.ok_or_else(|| {
            MergeError::param(
                self.name,
                key,
                match model {
                    Some(i) => format!("required for input {} and not given", i + 1),
                    None => "required and not given".to_string(),
                },
            )
        })
    }

    /// Every input's Gram matrix of this tensor from its `gram` file, `None`
    /// when no file has one (the tensor is then not a merged linear layer);
    /// an error when only some have, or for a tensor that is not 2-D.
    fn grams(&self) -> Result<Option<Vec<ndarray::Array2<f64>>>> {
        let mut found = Vec::with_capacity(self.models.len());
        for i in 0..self.models.len() {
            let path = match self.per_model[i].get("gram") {
                Some(Value::Str(p)) => p.clone(),
                Some(other) => {
                    return Err(MergeError::param(
                        self.name,
                        "gram",
                        format!("expected a file path, got {other:?}"),
                    ));
                }
                None => {
                    return Err(MergeError::param(
                        self.name,
                        "gram",
                        format!("required for input {} and not given", i + 1),
                    ));
                }
            };
            let file = weights::Checkpoint::open(&path)?;
            let has = file.infos().iter().any(|t| t.name == self.name);
            found.push((path, has.then(|| file.load(self.name)).transpose()?));
        }
        if found.iter().all(|(_, g)| g.is_none()) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(found.len());
        for (path, g) in found {
            let g = g.ok_or_else(|| {
                MergeError::param(
                    self.name,
                    "gram",
                    format!(
                        "{path} has no Gram matrix for this tensor, other models' files have one"
                    ),
                )
            })?;
            if self.shape.len() != 2 || g.shape().len() != 2 {
                return Err(MergeError::param(
                    self.name,
                    "gram",
                    format!(
                        "{path}: a Gram matrix of shape {:?} for a tensor of shape {:?} (RegMean merges 2-D weights)",
                        g.shape(),
                        self.shape
                    ),
                ));
            }
            let (r, c) = (g.shape()[0], g.shape()[1]);
            MergeError::check_finite(self.name, &path, g.data.iter())?;
            let a = ndarray::Array2::from_shape_fn((r, c), |(i, j)| g.data[[i, j]] as f64);
            out.push(a);
        }
        Ok(Some(out))
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.shared.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(MergeError::param(
                self.name,
                key,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }
}

/// FNV-1a of a tensor name: per-tensor seeds independent of processing order.
pub fn name_seed(seed: u64, name: &str, input: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes().chain((input as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Merges one tensor with `method` (mergekit's semantics; see [`methods`]).
pub fn merge_tensor(method: &Method, x: &TensorInputs) -> Result<Vec<f32>> {
    let inputs_err = |msg: String| MergeError::Inputs {
        method: method.name().to_string(),
        msg: format!("tensor '{}': {msg}", x.name),
    };
    let k = x.models.len();
    let need_base = || x.base.ok_or_else(|| inputs_err("needs base_model".into()));
    // The methods of one base and one other model.
    let base_and_one = || {
        let base = need_base()?;
        if k != 1 {
            return Err(inputs_err(format!(
                "needs the base and exactly one other model, got {k} others"
            )));
        }
        Ok(base)
    };
    // A misspelt or foreign parameter is an error here as in configs.
    x.check_params(method)?;
    match method {
        Method::Linear => {
            if k == 0 {
                return Err(inputs_err("needs at least one model".into()));
            }
            let w = (0..k)
                .map(|i| x.req(Some(i), "weight"))
                .collect::<Result<Vec<_>>>()?;
            let normalize = x.flag("normalize", true)?;
            if normalize && w.iter().sum::<f64>() == 0.0 {
                return Err(MergeError::param(
                    x.name,
                    "weight",
                    "the weights sum to zero with normalize: true",
                ));
            }
            Ok(methods::linear(&x.models, &w, normalize))
        }
        Method::Slerp => {
            let base = base_and_one()?;
            Ok(methods::slerp(x.req(None, "t")?, base, x.models[0]))
        }
        Method::Nuslerp => {
            if k != 2 {
                return Err(inputs_err(format!(
                    "needs exactly two models besides the base, got {k}"
                )));
            }
            let w = [x.req(Some(0), "weight")?, x.req(Some(1), "weight")?];
            let mode = if x.flag("nuslerp_flatten", true)? {
                NuslerpMode::Flatten
            } else if x.flag("nuslerp_row_wise", false)? {
                NuslerpMode::FirstAxis
            } else {
                NuslerpMode::LastAxis
            };
            Ok(methods::nuslerp(
                x.shape,
                x.base,
                x.models[0],
                x.models[1],
                w,
                mode,
            ))
        }
        Method::TaskVector(_, m) => {
            let base = need_base()?;
            let (inputs, opts) = x.task_inputs(m)?;
            methods::task_vector_merge(x.name, base, x.shape, &inputs, m, &opts)
        }
        Method::ModelStock => {
            let base = need_base()?;
            if k < 2 {
                return Err(inputs_err(format!(
                    "needs at least two models besides the base, got {k}"
                )));
            }
            Ok(methods::model_stock(
                x.shape,
                base,
                &x.models,
                x.flag("filter_wise", false)?,
            ))
        }
        Method::Karcher => {
            let mut all: Vec<&[f32]> = x.models.clone();
            if let Some(b) = x.base {
                all.push(b);
            }
            if all.is_empty() {
                return Err(inputs_err("needs at least one model".into()));
            }
            let max_iter = x.num(None, "max_iter")?.unwrap_or(10.0);
            if max_iter < 0.0 {
                return Err(MergeError::param(
                    x.name,
                    "max_iter",
                    "must be non-negative",
                ));
            }
            Ok(methods::karcher(
                &all,
                max_iter as usize,
                x.num(None, "tol")?.unwrap_or(1e-5),
            ))
        }
        Method::Passthrough => {
            if k != 1 {
                return Err(inputs_err(format!("takes exactly one model, got {k}")));
            }
            Ok(match x.num(Some(0), "scale")? {
                Some(s) => x.models[0].iter().map(|v| v * s as f32).collect(),
                None => x.models[0].to_vec(),
            })
        }
        Method::Sce => {
            let base = need_base()?;
            let topk = x.num(None, "select_topk")?.unwrap_or(1.0);
            x.flag("int8_mask", false)?;
            Ok(methods::sce(base, &x.models, topk))
        }
        Method::Multislerp => {
            if k == 0 {
                return Err(inputs_err(
                    "needs at least one model besides the base".into(),
                ));
            }
            let w = (0..k)
                .map(|i| x.req(Some(i), "weight"))
                .collect::<Result<Vec<_>>>()?;
            let normalize = x.flag("normalize_weights", true)?;
            if normalize && k > 1 && w.iter().sum::<f64>() == 0.0 {
                return Err(MergeError::param(
                    x.name,
                    "weight",
                    "the weights sum to zero with normalize_weights: true",
                ));
            }
            let eps = x.num(None, "eps")?.unwrap_or(1e-8);
            methods::multislerp(x.base, &x.models, &w, normalize, eps).map_err(|e| match e {
                MergeError::Inputs { msg, .. } => inputs_err(msg),
                e => e,
            })
        }
        Method::Nearswap | Method::ArceeFusion => {
            let base = base_and_one()?;
            Ok(if *method == Method::Nearswap {
                methods::nearswap(x.req(None, "t")?, base, x.models[0])
            } else {
                let mut rng = weights::rng::Rng::new(name_seed(x.seed, x.name, 0));
                methods::arcee_fusion(x.shape, base, x.models[0], &mut rng)
            })
        }
        Method::Ram | Method::RamPlusTl => {
            let base = need_base()?;
            let epsilon = x.num(None, "epsilon")?.unwrap_or(1e-5);
            if epsilon < 0.0 {
                return Err(MergeError::param(x.name, "epsilon", "must be non-negative"));
            }
            let plus = if *method == Method::RamPlusTl {
                Some((
                    x.num(None, "r")?.unwrap_or(0.1),
                    x.num(None, "alpha")?.unwrap_or(0.2),
                ))
            } else {
                None
            };
            Ok(methods::ram(base, &x.models, epsilon, plus))
        }
        Method::RegMean => {
            if k == 0 {
                return Err(inputs_err("needs at least one model".into()));
            }
            let opts = regmean::RegMeanOptions {
                alpha: x.num(None, "alpha")?.unwrap_or(1.0),
                ridge: x.num(None, "ridge")?.unwrap_or(0.0),
            };
            let grams = x.grams()?;
            match grams {
                Some(g) => {
                    let views: Vec<_> = g.iter().map(|a| a.view()).collect();
                    regmean::regmean(&x.models, [x.shape[0], x.shape[1]], &views, &opts, x.name)
                }
                None => Ok(methods::linear(&x.models, &vec![1.0; k], true)),
            }
        }
        Method::TsvM | Method::IsoC | Method::IsoCts => {
            let base = need_base()?;
            let update = Update::F64(x.subspace_update(method, base)?);
            Ok(update.apply(base, x.num(None, "lambda")?.unwrap_or(1.0)))
        }
    }
}

/// The λ-free part of a merge whose result is `base + λ · update`: the
/// task-vector family and the subspace merges. [`Update::apply`] gives
/// [`merge_tensor`]'s tensor at any λ bit for bit, so a λ grid costs one
/// merge and one cheap pass per λ.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// No task vectors: the merge is the base at every λ.
    Base,
    /// The task-vector family's merged task vector, in f32 (`base + λ·m`
    /// in f32, as [`methods::add_scaled`]).
    F32(Vec<f32>),
    /// A subspace merge's task vector, in f64 (`(base + λ·d)` in f64,
    /// rounded to f32).
    F64(Vec<f64>),
}

impl Update {
    /// The merged tensor at `lambda`.
    pub fn apply(&self, base: &[f32], lambda: f64) -> Vec<f32> {
        match self {
            Update::Base => base.to_vec(),
            Update::F32(m) => {
                let l = lambda as f32;
                base.iter()
                    .zip(m)
                    .map(|(&b, &m)| methods::add_scaled(b, m, l))
                    .collect()
            }
            Update::F64(d) => base
                .iter()
                .zip(d)
                .map(|(&b, &d)| (b as f64 + lambda * d) as f32)
                .collect(),
        }
    }
}

/// The [`Update`] of one tensor for the methods linear in λ (the task-vector
/// family, TSV-M, Iso-C, Iso-CTS), with [`merge_tensor`]'s checks; `None`
/// for other methods. The update does not depend on the `lambda` parameter
/// (the task-vector family still checks that it is a number).
pub fn merge_tensor_update(method: &Method, x: &TensorInputs) -> Result<Option<Update>> {
    if !matches!(
        method,
        Method::TaskVector(..) | Method::TsvM | Method::IsoC | Method::IsoCts
    ) {
        return Ok(None);
    }
    x.check_params(method)?;
    let base = x.base.ok_or_else(|| MergeError::Inputs {
        method: method.name().to_string(),
        msg: format!("tensor '{}': needs base_model", x.name),
    })?;
    Ok(Some(match method {
        Method::TaskVector(_, m) => {
            let (inputs, opts) = x.task_inputs(m)?;
            match methods::task_vector_update(x.name, base, x.shape, &inputs, m, opts.normalize)? {
                Some(m) => Update::F32(m),
                None => Update::Base,
            }
        }
        _ => Update::F64(x.subspace_update(method, base)?),
    }))
}

impl TensorInputs<'_> {
    /// The task-vector family's inputs and options (λ read, not applied).
    fn task_inputs(&self, m: &TaskVectorMethod) -> Result<(Vec<TaskInput<'_>>, TaskVectorOptions)> {
        let x = self;
        let k = x.models.len();
        let rescale = x.flag("rescale", m.rescale)?;
        let mut inputs = Vec::with_capacity(k);
        for i in 0..k {
            let density = x.num(Some(i), "density")?.unwrap_or(1.0);
            if !(0.0..=1.0).contains(&density) {
                return Err(MergeError::param(
                    x.name,
                    "density",
                    format!("{density} for input {} is outside [0, 1]", i + 1),
                ));
            }
            inputs.push(TaskInput {
                tensor: x.models[i],
                weight: x.req(Some(i), "weight")?,
                sparsify: SparsifyParams {
                    density,
                    gamma: x.num(Some(i), "gamma")?.unwrap_or(0.01),
                    epsilon: x.num(Some(i), "epsilon")?.unwrap_or(0.15),
                    rescale,
                    draws: x.draws,
                },
                seed: name_seed(x.seed, x.name, i),
            });
        }
        let opts = TaskVectorOptions {
            normalize: x.flag("normalize", m.normalize)?,
            lambda: x.num(None, "lambda")?.unwrap_or(1.0),
        };
        x.flag("int8_mask", false)?;
        Ok((inputs, opts))
    }

    /// A subspace merge's task vector (f64), before λ and the base.
    fn subspace_update(&self, method: &Method, base: &[f32]) -> Result<Vec<f64>> {
        let x = self;
        let sm = match method {
            Method::TsvM => SubspaceMethod::TsvM {
                rank: match x.num(None, "rank")? {
                    None => None,
                    Some(r) if r >= 1.0 && r.fract() == 0.0 => Some(r as usize),
                    Some(r) => {
                        return Err(MergeError::param(
                            x.name,
                            "rank",
                            format!("{r} is not a positive whole number"),
                        ));
                    }
                },
            },
            Method::IsoC => SubspaceMethod::IsoC,
            _ => SubspaceMethod::IsoCts {
                common_space_fraction: x.num(None, "common_space_fraction")?.unwrap_or(0.8),
            },
        };
        let tasks: Vec<Vec<f64>> = x
            .models
            .iter()
            .map(|m| {
                m.iter()
                    .zip(base)
                    .map(|(&v, &b)| v as f64 - b as f64)
                    .collect()
            })
            .collect();
        subspace::merge_task_vectors(sm, x.shape, &tasks, x.name)
    }

    /// The per-model parameter count and unknown parameters, as
    /// [`merge_tensor`] checks them.
    fn check_params(&self, method: &Method) -> Result<()> {
        let k = self.models.len();
        if self.per_model.len() != k {
            return Err(MergeError::Inputs {
                method: method.name().to_string(),
                msg: format!(
                    "tensor '{}': {k} models but {} per-model parameter sets",
                    self.name,
                    self.per_model.len()
                ),
            });
        }
        for params in std::iter::once(self.shared).chain(self.per_model) {
            if let Some((key, msg)) = method.unknown_parameter(params.keys().map(String::as_str)) {
                return Err(MergeError::param(self.name, key, msg));
            }
        }
        Ok(())
    }
}
