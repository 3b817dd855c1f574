//! mergekit's YAML configuration format.
//!
//! ```yaml
//! merge_method: ties
//! base_model: ./base
//! models:
//!   - model: ./math
//!     parameters: {weight: [0.2, 0.8], density: 0.5}   # gradient over layers
//!   - model: ./code
//!     parameters:
//!       weight: [{filter: self_attn, value: 0.7}, {value: 0.3}]  # first match wins
//! parameters: {normalize: true}
//! dtype: float32
//! out_dtype: bfloat16
//! ```
//!
//! A parameter is resolved per tensor as mergekit's `evaluate_setting`: a
//! scalar is itself; a list of numbers is a gradient interpolated piecewise
//! linearly at `t = layer / (layers − 1)` of the slice (`t = 0` for tensors
//! outside the layers; other lists pick `values[⌊t·(n−1)⌋]`); a list of
//! `{filter, value}` takes the first whose filter is absent, `*`, or a
//! substring of the tensor name. A model's own parameters win over the
//! slice's, which win over the global ones. Keys this crate does not
//! implement (`modules`, `tokenizer`, `chat_template`, a `tokenizer_source`
//! other than `base`, LoRA `model+adapter` references) are errors, never
//! silently ignored.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

use crate::error::{MergeError, Result};
use crate::{Method, Params, Value};

/// A scalar as YAML writes it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
}

/// `{filter, value}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    /// Substring of tensor names this applies to (`None` or `*`: all).
    #[serde(default)]
    pub filter: Option<String>,
    /// The value (scalar or gradient).
    pub value: ScalarOrGradient,
}

/// A scalar or a gradient list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarOrGradient {
    /// One value.
    Scalar(Scalar),
    /// Values spread over the layers.
    Gradient(Vec<Scalar>),
}

/// Any parameter setting of the config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// A scalar.
    Scalar(Scalar),
    /// A gradient.
    Gradient(Vec<Scalar>),
    /// One conditional.
    Conditional(Conditional),
    /// Conditionals, first match wins.
    Conditionals(Vec<Conditional>),
}

/// `{model, parameters}` of `models:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputModel {
    /// Path of the checkpoint.
    pub model: String,
    /// Per-model parameters.
    #[serde(default)]
    pub parameters: IndexMap<String, Setting>,
}

/// A source of an output slice.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSource {
    /// Path of the checkpoint.
    pub model: String,
    /// Half-open layer range `[start, end)`.
    pub layer_range: [usize; 2],
    /// Per-source parameters.
    #[serde(default)]
    pub parameters: IndexMap<String, Setting>,
}

/// One output slice: layers merged from sources of equal length.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSlice {
    /// Its sources.
    pub sources: Vec<SliceSource>,
    /// A base model for this slice (else the global one).
    #[serde(default)]
    pub base_model: Option<String>,
    /// Slice parameters.
    #[serde(default)]
    pub parameters: IndexMap<String, Setting>,
}

/// A mergekit merge configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The method, by name.
    pub merge_method: String,
    /// The base model.
    #[serde(default)]
    pub base_model: Option<String>,
    /// Whole models to merge.
    #[serde(default)]
    pub models: Option<Vec<InputModel>>,
    /// Output slices (layer ranges).
    #[serde(default)]
    pub slices: Option<Vec<OutputSlice>>,
    /// Global parameters.
    #[serde(default)]
    pub parameters: IndexMap<String, Setting>,
    /// Dtype the inputs are read in (accepted: float32; computation is f32).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Dtype of the written tensors (default: `dtype`, else the base's).
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// Only `base` is supported (the base's tokenizer files are copied).
    #[serde(default)]
    pub tokenizer_source: Option<String>,
    /// Unsupported.
    #[serde(default)]
    pub modules: Option<serde_yaml_ng::Value>,
    /// Unsupported.
    #[serde(default)]
    pub tokenizer: Option<serde_yaml_ng::Value>,
    /// Unsupported.
    #[serde(default)]
    pub chat_template: Option<serde_yaml_ng::Value>,
}

impl MergeConfig {
    /// Parses and checks a config held in `text` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<MergeConfig> {
        let err = |msg: String| MergeError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let cfg: MergeConfig = serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?;
        let method = Method::from_name(&cfg.merge_method)?;
        for (key, present) in [
            ("modules", cfg.modules.is_some()),
            ("tokenizer", cfg.tokenizer.is_some()),
            ("chat_template", cfg.chat_template.is_some()),
        ] {
            if present {
                return Err(err(format!("'{key}' is not supported by this tool")));
            }
        }
        if let Some(t) = &cfg.tokenizer_source
            && t != "base"
        {
            return Err(err(format!(
                "tokenizer_source '{t}' is not supported (only 'base': the base model's tokenizer is copied)"
            )));
        }
        match (&cfg.models, &cfg.slices) {
            (Some(_), Some(_)) => {
                return Err(err("give either 'models' or 'slices', not both".into()));
            }
            (None, None) => return Err(err("give 'models' or 'slices'".into())),
            (Some(m), None) if m.is_empty() => return Err(err("'models' is empty".into())),
            (None, Some(s)) if s.is_empty() => return Err(err("'slices' is empty".into())),
            _ => {}
        }
        for d in [&cfg.dtype, &cfg.out_dtype].into_iter().flatten() {
            parse_dtype(d).map_err(err)?;
        }
        let mut all: Vec<(&str, &IndexMap<String, Setting>)> =
            vec![("parameters", &cfg.parameters)];
        let models: Vec<&str> = cfg
            .models
            .iter()
            .flatten()
            .map(|m| m.model.as_str())
            .chain(
                cfg.slices
                    .iter()
                    .flatten()
                    .flat_map(|s| s.sources.iter().map(|x| x.model.as_str())),
            )
            .collect();
        for m in cfg.models.iter().flatten() {
            all.push((m.model.as_str(), &m.parameters));
        }
        for s in cfg.slices.iter().flatten() {
            all.push(("slice", &s.parameters));
            if s.sources.is_empty() {
                return Err(err("a slice has no sources".into()));
            }
            let len = s.sources[0].layer_range[1].saturating_sub(s.sources[0].layer_range[0]);
            for src in &s.sources {
                all.push((src.model.as_str(), &src.parameters));
                let [a, b] = src.layer_range;
                if b <= a {
                    return Err(err(format!(
                        "model '{}': empty layer_range [{a}, {b}]",
                        src.model
                    )));
                }
                if b - a != len {
                    return Err(err(
                        "all sources of a slice must span the same number of layers".into(),
                    ));
                }
            }
        }
        for m in models {
            if m.contains('+') {
                return Err(err(format!(
                    "model '{m}': 'model+lora' references are not supported; fuse the LoRA first"
                )));
            }
        }
        // mergekit 0.1.5 adds a `base_model` missing from `models` as one more
        // input without parameters (plan.py's normalize_config); a method
        // that has no base role then refuses it: linear for its required
        // per-model `weight`, passthrough for its single input.
        if method.base_policy() == crate::BasePolicy::Ignored
            && let (Some(b), Some(list)) = (&cfg.base_model, &cfg.models)
            && !list.iter().any(|m| &m.model == b)
        {
            return Err(err(format!(
                "base_model '{b}' is not among 'models': mergekit 0.1.5 then merges it as one more \
                 input, which method '{}' refuses ({}); list it under 'models' or drop 'base_model'",
                method.name(),
                if method == Method::Passthrough {
                    "it takes exactly one model".to_string()
                } else {
                    format!("missing required parameter weight for {b}")
                }
            )));
        }
        for (owner, params) in all {
            if let Some((_, msg)) = method.unknown_parameter(params.keys().map(String::as_str)) {
                return Err(err(format!("{owner}: {msg}")));
            }
        }
        Ok(cfg)
    }

    /// Reads and parses a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<MergeConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| MergeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        MergeConfig::parse(&text, path)
    }

    /// The method.
    pub fn method(&self) -> Method {
        Method::from_name(&self.merge_method).expect("checked by parse")
    }
}

/// A mergekit dtype name as a [`weights::DType`].
pub(crate) fn parse_dtype(s: &str) -> std::result::Result<weights::DType, String> {
    use weights::DType;
    Ok(match s {
        "float32" | "fp32" | "f32" => DType::F32,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        "bfloat16" | "bf16" => DType::BF16,
        "float64" | "f64" => DType::F64,
        _ => {
            return Err(format!(
                "unknown dtype '{s}' (float32, float16, bfloat16, float64)"
            ));
        }
    })
}

fn scalar_value(s: &Scalar) -> Value {
    match s {
        Scalar::Bool(b) => Value::Bool(*b),
        Scalar::Num(x) => Value::Num(*x),
        Scalar::Str(x) => Value::Str(x.clone()),
    }
}

fn gradient(values: &[Scalar], t: f64) -> Option<Value> {
    if values.is_empty() {
        return None;
    }
    let nums: Option<Vec<f64>> = values
        .iter()
        .map(|v| match v {
            Scalar::Num(x) => Some(*x),
            _ => None,
        })
        .collect();
    let last = values.len() - 1;
    match nums {
        Some(nums) => {
            let scaled = t * last as f64;
            let i0 = (scaled as usize).min(last);
            let i1 = (i0 + 1).min(last);
            let frac = scaled - i0 as f64;
            Some(Value::Num((1.0 - frac) * nums[i0] + frac * nums[i1]))
        }
        None => Some(scalar_value(
            &values[((t * last as f64) as usize).min(last)],
        )),
    }
}

fn eval_sg(v: &ScalarOrGradient, t: f64) -> Option<Value> {
    match v {
        ScalarOrGradient::Scalar(s) => Some(scalar_value(s)),
        ScalarOrGradient::Gradient(g) => gradient(g, t),
    }
}

/// Resolves one setting for `tensor` at layer position `t` (mergekit's
/// `evaluate_setting`); `None` when no filter matches.
pub fn evaluate(setting: &Setting, tensor: &str, t: f64) -> Option<Value> {
    let conds: &[Conditional] = match setting {
        Setting::Scalar(s) => return Some(scalar_value(s)),
        Setting::Gradient(g) => return gradient(g, t),
        Setting::Conditional(c) => std::slice::from_ref(c),
        Setting::Conditionals(cs) => cs,
    };
    conds
        .iter()
        .find(|c| match c.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => tensor.contains(f),
        })
        .and_then(|c| eval_sg(&c.value, t))
}

/// Resolves every parameter of `layers` (most specific first) for a tensor.
pub fn resolve(layers: &[&IndexMap<String, Setting>], tensor: &str, t: f64) -> Params {
    let mut out = Params::new();
    for params in layers.iter().rev() {
        for (k, s) in params.iter() {
            if let Some(v) = evaluate(s, tensor, t) {
                out.insert(k.clone(), v);
            }
        }
    }
    out
}

/// A model path of the config, relative to the working directory or, when
/// that does not exist, to the config's folder.
pub fn model_path(model: &str, config_dir: &Path) -> PathBuf {
    let p = PathBuf::from(model);
    if p.exists() || p.is_absolute() {
        p
    } else {
        config_dir.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MergeConfig> {
        MergeConfig::parse(text, Path::new("test.yml"))
    }

    #[test]
    fn gradients_interpolate_piecewise_linearly() {
        let g = Setting::Gradient(vec![Scalar::Num(0.0), Scalar::Num(1.0), Scalar::Num(0.5)]);
        let at = |t: f64| match evaluate(&g, "x", t) {
            Some(Value::Num(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(0.25), 0.5);
        assert_eq!(at(0.5), 1.0);
        assert_eq!(at(0.75), 0.75);
        assert_eq!(at(1.0), 0.5);
        // Layer 3 of 7 (t = 0.5) of a 5-point gradient: scaled 2.0 → the third point.
        let g5 = Setting::Gradient((0..5).map(|i| Scalar::Num(i as f64 * 10.0)).collect());
        assert_eq!(evaluate(&g5, "x", 3.0 / 6.0), Some(Value::Num(20.0)));
    }

    #[test]
    fn filters_pick_the_first_match() {
        let cfg = parse(
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n        - filter: self_attn\n          value: 0.7\n        - filter: mlp\n          value: [0, 1]\n        - value: 0.3\n",
        )
        .unwrap();
        let s = &cfg.models.as_ref().unwrap()[0].parameters["weight"];
        assert_eq!(
            evaluate(s, "model.layers.0.self_attn.q_proj.weight", 0.0),
            Some(Value::Num(0.7))
        );
        assert_eq!(
            evaluate(s, "model.layers.3.mlp.up_proj.weight", 0.5),
            Some(Value::Num(0.5))
        );
        assert_eq!(evaluate(s, "model.norm.weight", 0.0), Some(Value::Num(0.3)));
        // No catch-all: unmatched tensors get nothing.
        let only = Setting::Conditionals(vec![Conditional {
            filter: Some("mlp".into()),
            value: ScalarOrGradient::Scalar(Scalar::Num(1.0)),
        }]);
        assert_eq!(evaluate(&only, "lm_head.weight", 0.0), None);
    }

    #[test]
    fn model_parameters_override_global_ones() {
        let cfg = parse(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {density: 0.5}\nparameters: {density: 0.9, weight: 1.0}\n",
        )
        .unwrap();
        let m = &cfg.models.as_ref().unwrap()[0];
        let p = resolve(&[&m.parameters, &cfg.parameters], "w", 0.0);
        assert_eq!(p["density"], Value::Num(0.5));
        assert_eq!(p["weight"], Value::Num(1.0));
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let msg = |t: &str| parse(t).unwrap_err().to_string();
        assert!(
            msg("merge_method: frobnicate\nmodels: [{model: a}]\n")
                .contains("unknown merge method 'frobnicate'")
        );
        assert!(
            msg("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n")
                .contains("not both")
        );
        // mergekit 0.1.5 refuses a base it would merge without a weight.
        let e = msg(
            "merge_method: linear\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n",
        );
        assert!(
            e.contains("base_model 'base'") && e.contains("weight"),
            "{e}"
        );
        let e = msg("merge_method: passthrough\nbase_model: base\nmodels: [{model: a}]\n");
        assert!(e.contains("exactly one"), "{e}");
        // Listed with a weight, the base is merged like the others (as in mergekit).
        parse("merge_method: linear\nbase_model: a\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n").unwrap();
        assert!(
            msg("merge_method: linear\nmodels: [{model: a}]\nfoo: 1\n")
                .contains("unknown field `foo`")
        );
        assert!(
            msg("merge_method: linear\nmodels: [{model: a, parameters: {density: 0.5}}]\n")
                .contains("parameter 'density'")
        );
        assert!(
            msg("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n")
                .contains("union")
        );
        assert!(
            msg("merge_method: linear\nmodels: [{model: a}]\nout_dtype: int4\n").contains("int4")
        );
        assert!(
            msg("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]\n")
                .contains("same number of layers")
        );
    }
}
