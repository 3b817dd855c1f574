//! Low-rank weights: PEFT LoRA adapters, and the merging methods built for
//! them — Reversible Model Merging, LoRA-LEGO and shared-basis merging.
//!
//! - [`LoraAdapter`] reads and writes Hugging Face PEFT adapters
//!   (`adapter_model.safetensors` with `base_model.model.<module>.lora_{A,B}.weight`
//!   and `adapter_config.json` with `r`, `lora_alpha`, `target_modules`,
//!   `use_rslora`), gives each module's `ΔW = s·B·A` (`s = α/r`, or `α/√r`
//!   with rsLoRA), and fuses into / unfuses from a base state dict.
//! - [`rmm_fit`] (Reversible Model Merging): per weight position, the `n`
//!   task deltas stacked as rows `X` (n × D) are stored as their mean `μ` plus
//!   a rank-`p` basis from the centred truncated SVD, `X − 1μᵀ ≈ C·B` with
//!   `C = U_p Σ_p` (n × p) and `B = V_pᵀ` (p × D); task `i` is rebuilt as
//!   `μ + C_i·B`. Exact for `p ≥ n − 1`; the error falls monotonically in `p`.
//! - [`lora_lego`] (LoRA-LEGO, Zhao et al. 2024): every rank-one unit
//!   `[√s·B[:,i]; √s·A[i,:]]` of every adapter is clustered with seeded
//!   k-means (k-means++ start); the `k` centroids are the units of the merged
//!   rank-`k` LoRA, each rescaled to its members' mean norm (averaging shrinks
//!   norms). With `k` = the total rank every unit is its own cluster and the
//!   merged ΔW is the sum of the adapters' ΔW.
//! - [`shared_basis`] (Sub-MoE-style): the SVD of `[W₁ … W_k]` gives a shared
//!   left basis `U_r`; each matrix keeps its right factor `Σ_r V_{r,i}ᵀ`, the
//!   merge is `U_r Σᵢ wᵢ Σ_r V_{r,i}ᵀ`, rebuilt at rank `r`.

use std::path::Path;

use indexmap::IndexMap;
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use weights::{StateDict, Tensor, TensorSource};

use crate::error::{MergeError, Result};

fn lr(what: impl Into<String>, msg: impl Into<String>) -> MergeError {
    MergeError::LowRank {
        what: what.into(),
        msg: msg.into(),
    }
}

/// The fields of `adapter_config.json` this crate uses (the rest is kept verbatim).
#[derive(Clone, Debug)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator α.
    pub lora_alpha: f64,
    /// rsLoRA scaling (`α/√r`).
    pub use_rslora: bool,
    /// Target module names (suffixes such as `q_proj`).
    pub target_modules: Vec<String>,
    /// Per-module ranks that differ from `r` (PEFT's `rank_pattern`; keys are
    /// module names or their dotted suffixes).
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module α that differ from `lora_alpha` (PEFT's `alpha_pattern`).
    pub alpha_pattern: IndexMap<String, f64>,
    /// The whole JSON object, written back on save with the fields above updated.
    pub raw: serde_json::Map<String, serde_json::Value>,
}

impl LoraConfig {
    /// A PEFT config for rank `r`, scale numerator `alpha`, on `targets`.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        let mut raw = serde_json::Map::new();
        raw.insert("peft_type".into(), "LORA".into());
        raw.insert("task_type".into(), "CAUSAL_LM".into());
        raw.insert("bias".into(), "none".into());
        raw.insert("lora_dropout".into(), 0.0.into());
        LoraConfig {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
            raw,
        }
    }

    /// The scale `s` of `ΔW = s·B·A` for modules without a pattern entry.
    pub fn scale(&self) -> f64 {
        self.scale_with(self.lora_alpha, self.r)
    }

    fn scale_with(&self, alpha: f64, r: usize) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The rank of `module` (a weight name without `.weight`).
    pub fn rank_of(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// The scale of `module`'s `ΔW = s·B·A`, its patterns applied.
    pub fn scale_of(&self, module: &str) -> f64 {
        let alpha = pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        self.scale_with(alpha, self.rank_of(module))
    }
}

/// The value of the first pattern key that is `module` or a dotted suffix of it
/// (PEFT matches `(.*\.)?KEY$`).
fn pattern_value<V: Copy>(pattern: &IndexMap<String, V>, module: &str) -> Option<V> {
    pattern
        .iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}

/// One module's factors: `a` is `r × in`, `b` is `out × r`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `lora_A` (r × in).
    pub a: Array2<f32>,
    /// `lora_B` (out × r).
    pub b: Array2<f32>,
}

/// A LoRA adapter keyed by the base weight it modifies (`<module>.weight`).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Its configuration.
    pub config: LoraConfig,
    /// Factors per base weight name, in file order.
    pub modules: IndexMap<String, LoraPair>,
    /// Tensors stored at full rank (PEFT's `modules_to_save`), by base tensor
    /// name: fusing replaces the base's tensor with them.
    pub full: IndexMap<String, Tensor>,
}

const PREFIX: &str = "base_model.model.";

impl LoraAdapter {
    /// Reads a PEFT adapter folder.
    pub fn load(dir: impl AsRef<Path>) -> Result<LoraAdapter> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| MergeError::Io {
            path: cfg_path.clone(),
            source: e,
        })?;
        let bad = |msg: String| MergeError::Config {
            path: cfg_path.clone(),
            msg,
        };
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let r = raw
            .get("r")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("'r' is missing or not a positive integer".into()))?
            as usize;
        let lora_alpha = raw
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("'lora_alpha' is missing or not a number".into()))?;
        if r == 0 {
            return Err(bad("'r' must be positive".into()));
        }
        let target_modules = match raw.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let use_rslora = raw
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let pattern = |key: &str| -> Result<IndexMap<String, f64>> {
            match raw.get(key) {
                None | Some(serde_json::Value::Null) => Ok(IndexMap::new()),
                Some(serde_json::Value::Object(o)) => o
                    .iter()
                    .map(|(k, v)| {
                        v.as_f64()
                            .filter(|x| *x > 0.0)
                            .map(|x| (k.clone(), x))
                            .ok_or_else(|| bad(format!("'{key}': '{k}' is not a positive number")))
                    })
                    .collect(),
                Some(_) => Err(bad(format!("'{key}' is not an object"))),
            }
        };
        let alpha_pattern = pattern("alpha_pattern")?;
        let mut rank_pattern = IndexMap::new();
        for (k, v) in pattern("rank_pattern")? {
            if v.fract() != 0.0 {
                return Err(bad(format!("'rank_pattern': '{k}' is not a whole number")));
            }
            rank_pattern.insert(k, v as usize);
        }
        // PEFT options that change what the factors mean: refuse rather than misread.
        if raw.get("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad(
                "'fan_in_fan_out: true' (Conv1D layouts) is not supported".into(),
            ));
        }
        let modules_to_save: Vec<String> = match raw.get("modules_to_save") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad("'modules_to_save' holds a non-string".into()))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("'modules_to_save' is not a list".into())),
        };
        if raw
            .get("bias")
            .and_then(|v| v.as_str())
            .is_some_and(|b| b != "none")
        {
            return Err(bad(
                "LoRA biases ('bias' other than \"none\") are not supported".into(),
            ));
        }
        if raw.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad(
                "'use_dora: true' (DoRA magnitude vectors) is not supported".into(),
            ));
        }
        let config = LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            rank_pattern,
            alpha_pattern,
            raw,
        };
        let saved = |name: &str| {
            let module = name
                .strip_suffix(".weight")
                .or_else(|| name.strip_suffix(".bias"));
            module.is_some_and(|m| {
                modules_to_save
                    .iter()
                    .any(|k| m == k || m.ends_with(&format!(".{k}")))
            })
        };
        let mut full = IndexMap::new();
        let st = weights::SafetensorsFile::open(dir.join("adapter_model.safetensors"))?;
        let mut a_of: IndexMap<String, Array2<f32>> = IndexMap::new();
        let mut b_of: IndexMap<String, Array2<f32>> = IndexMap::new();
        for info in st.infos() {
            let (module, which) = match info.name.strip_suffix(".lora_A.weight") {
                Some(m) => (m, 'A'),
                None => match info.name.strip_suffix(".lora_B.weight") {
                    Some(m) => (m, 'B'),
                    None if saved(info.name.strip_prefix(PREFIX).unwrap_or(&info.name)) => {
                        let name = info.name.strip_prefix(PREFIX).unwrap_or(&info.name);
                        full.insert(name.to_string(), st.load(&info.name)?);
                        continue;
                    }
                    None => {
                        return Err(lr(
                            st.path().display().to_string(),
                            format!(
                                "tensor '{}' is neither a lora_A/lora_B weight nor in modules_to_save (only LoRA adapters are supported)",
                                info.name
                            ),
                        ));
                    }
                },
            };
            let weight = format!("{}.weight", module.strip_prefix(PREFIX).unwrap_or(module));
            let t = st.load(&info.name)?;
            let m = t.data.into_dimensionality::<ndarray::Ix2>().map_err(|_| {
                lr(
                    &info.name,
                    format!("expected a matrix, got shape {:?}", info.shape),
                )
            })?;
            if which == 'A' {
                a_of.insert(weight, m);
            } else {
                b_of.insert(weight, m);
            }
        }
        let mut modules = IndexMap::new();
        for (w, a) in a_of {
            let b = b_of
                .shift_remove(&w)
                .ok_or_else(|| lr(&w, "has lora_A but no lora_B"))?;
            let rank = config.rank_of(w.strip_suffix(".weight").unwrap_or(&w));
            check_pair(&w, &a, &b, rank)?;
            modules.insert(w, LoraPair { a, b });
        }
        if let Some((w, _)) = b_of.first() {
            return Err(lr(w, "has lora_B but no lora_A"));
        }
        Ok(LoraAdapter {
            config,
            modules,
            full,
        })
    }

    /// Writes the adapter as PEFT does (both files atomically).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| MergeError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut sd = StateDict::new();
        for (w, p) in &self.modules {
            let module = w.strip_suffix(".weight").unwrap_or(w);
            sd.insert(
                format!("{PREFIX}{module}.lora_A.weight"),
                Tensor::f32(p.a.clone().into_dyn()),
            );
            sd.insert(
                format!("{PREFIX}{module}.lora_B.weight"),
                Tensor::f32(p.b.clone().into_dyn()),
            );
        }
        for (name, t) in &self.full {
            sd.insert(format!("{PREFIX}{name}"), t.clone());
        }
        sd.metadata.insert("format".into(), "pt".into());
        sd.save_safetensors(dir.join("adapter_model.safetensors"))?;
        let mut raw = self.config.raw.clone();
        raw.insert(
            "rank_pattern".into(),
            serde_json::to_value(&self.config.rank_pattern).expect("JSON"),
        );
        raw.insert(
            "alpha_pattern".into(),
            serde_json::to_value(&self.config.alpha_pattern).expect("JSON"),
        );
        if !self.full.is_empty() {
            let mut keys: Vec<String> = Vec::new();
            for name in self.full.keys() {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let key = module.rsplit('.').next().unwrap_or(module).to_string();
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            raw.insert("modules_to_save".into(), keys.into());
        }
        raw.insert("r".into(), self.config.r.into());
        raw.insert("lora_alpha".into(), self.config.lora_alpha.into());
        raw.insert("use_rslora".into(), self.config.use_rslora.into());
        raw.insert(
            "target_modules".into(),
            self.config.target_modules.clone().into(),
        );
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(raw)).expect("JSON");
        weights::atomic::write_atomic(dir.join("adapter_config.json"), text.as_bytes())?;
        Ok(())
    }

    /// `ΔW = s·B·A` of the module adapting `weight`.
    pub fn delta(&self, weight: &str) -> Option<Array2<f32>> {
        let p = self.modules.get(weight)?;
        let s = self
            .config
            .scale_of(weight.strip_suffix(".weight").unwrap_or(weight));
        Some(p.b.dot(&p.a) * s as f32)
    }

    /// Every module's ΔW (a task vector for [`crate::merge_tensor`] and friends).
    pub fn deltas(&self) -> IndexMap<String, Array2<f32>> {
        self.modules
            .keys()
            .map(|w| (w.clone(), self.delta(w).expect("listed")))
            .collect()
    }

    /// `base + sign·ΔW` for every module (sign 1 fuses, −1 unfuses), the
    /// full-rank tensors replacing the base's when fusing. Errors name a module
    /// whose weight the base lacks or whose shape differs, and unfusing an
    /// adapter with full-rank tensors (the replaced values are gone).
    pub fn fuse(&self, base: &StateDict, sign: f32) -> Result<StateDict> {
        let mut out = base.clone();
        if let Some(name) = self.full.keys().next()
            && sign < 0.0
        {
            return Err(lr(
                name,
                "is stored at full rank (modules_to_save): unfusing cannot restore the base's values",
            ));
        }
        for (name, t) in &self.full {
            let slot = out.get_mut(name).ok_or_else(|| MergeError::MissingTensor {
                tensor: name.clone(),
                model: "base".into(),
            })?;
            if slot.shape() != t.shape() {
                return Err(MergeError::ShapeMismatch {
                    tensor: name.clone(),
                    model: "LoRA adapter (modules_to_save)".into(),
                    expected: slot.shape().to_vec(),
                    got: t.shape().to_vec(),
                });
            }
            slot.data.assign(&t.data);
        }
        for w in self.modules.keys() {
            let t = out.get_mut(w).ok_or_else(|| MergeError::MissingTensor {
                tensor: w.clone(),
                model: "base".into(),
            })?;
            let d = self.delta(w).expect("listed");
            if t.shape() != d.shape() {
                return Err(MergeError::ShapeMismatch {
                    tensor: w.clone(),
                    model: "LoRA adapter".into(),
                    expected: t.shape().to_vec(),
                    got: d.shape().to_vec(),
                });
            }
            t.data.zip_mut_with(&d.into_dyn(), |x, y| *x += sign * y);
        }
        Ok(out)
    }
}

impl LoraAdapter {
    /// A rank-`r` LoRA approximating dense deltas (e.g. a merged task vector)
    /// by truncated SVD, `ΔW ≈ (U_r √Σ_r)(√Σ_r V_rᵀ)`, with `lora_alpha = r` so
    /// the scale is 1 (the way `mergekit-extract-lora` turns a merge back into
    /// an adapter). Exact when every delta has rank ≤ `r`.
    pub fn from_deltas(
        deltas: &IndexMap<String, Array2<f32>>,
        r: usize,
        targets: &[&str],
    ) -> Result<LoraAdapter> {
        if r == 0 {
            return Err(lr("from_deltas", "rank must be at least 1"));
        }
        let mut modules = IndexMap::new();
        for (w, d) in deltas {
            let svd = spectra::linalg::thin_svd(d.view(), w)?;
            let k = r.min(svd.s.len());
            let mut b = Array2::<f32>::zeros((d.nrows(), r));
            let mut a = Array2::<f32>::zeros((r, d.ncols()));
            for j in 0..k {
                let sq = svd.s[j].sqrt();
                b.column_mut(j).assign(&svd.u.column(j).mapv(|v| v * sq));
                a.row_mut(j).assign(&svd.vt.row(j).mapv(|v| v * sq));
            }
            modules.insert(w.clone(), LoraPair { a, b });
        }
        Ok(LoraAdapter {
            config: LoraConfig::new(r, r as f64, targets),
            modules,
            full: IndexMap::new(),
        })
    }
}

fn check_pair(w: &str, a: &Array2<f32>, b: &Array2<f32>, r: usize) -> Result<()> {
    if a.nrows() != b.ncols() {
        return Err(lr(
            w,
            format!("lora_A has rank {} but lora_B has {}", a.nrows(), b.ncols()),
        ));
    }
    if a.nrows() != r {
        return Err(lr(
            w,
            format!(
                "factors have rank {} but the config says r = {r}",
                a.nrows()
            ),
        ));
    }
    if let Some(v) = a.iter().chain(b.iter()).find(|v| !v.is_finite()) {
        return Err(lr(w, format!("non-finite factor value {v}")));
    }
    Ok(())
}

/// One weight position of a [`ReversibleMerge`].
#[derive(Clone, Debug)]
pub struct RmmPosition {
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// Mean task delta (flattened).
    pub mean: Array1<f32>,
    /// Basis, `p × D`.
    pub basis: Array2<f32>,
    /// Per-task coefficients, `n × p`.
    pub coeffs: Array2<f32>,
}

/// Reversible Model Merging: a compact store from which each task's weights
/// are rebuilt (see the module docs).
#[derive(Clone, Debug)]
pub struct ReversibleMerge {
    /// Per weight name.
    pub positions: IndexMap<String, RmmPosition>,
    /// Number of tasks `n`.
    pub tasks: usize,
    /// Components kept `p`.
    pub rank: usize,
}

/// Fits RMM with `p` components to `n` tasks' deltas (same names and shapes in each).
pub fn rmm_fit(tasks: &[IndexMap<String, Array2<f32>>], p: usize) -> Result<ReversibleMerge> {
    let n = tasks.len();
    if n == 0 {
        return Err(lr("rmm", "no tasks"));
    }
    if p == 0 {
        return Err(lr("rmm", "p must be at least 1"));
    }
    let mut positions = IndexMap::new();
    for (name, first) in &tasks[0] {
        let d = first.len();
        let mut x = Array2::<f64>::zeros((n, d));
        for (i, t) in tasks.iter().enumerate() {
            let m = t.get(name).ok_or_else(|| MergeError::MissingTensor {
                tensor: name.clone(),
                model: format!("task {}", i + 1),
            })?;
            if m.shape() != first.shape() {
                return Err(MergeError::ShapeMismatch {
                    tensor: name.clone(),
                    model: format!("task {}", i + 1),
                    expected: first.shape().to_vec(),
                    got: m.shape().to_vec(),
                });
            }
            x.row_mut(i)
                .iter_mut()
                .zip(m.iter())
                .for_each(|(o, &v)| *o = v as f64);
        }
        let mean = x.mean_axis(Axis(0)).expect("n > 0");
        let xc = &x - &mean.view().insert_axis(Axis(0));
        let keep = p.min(n).min(d);
        let (basis, coeffs) = if xc.iter().all(|v| *v == 0.0) {
            (Array2::zeros((keep, d)), Array2::zeros((n, keep)))
        } else {
            let svd = spectra::linalg::thin_svd(xc.view(), name)?;
            let k = keep.min(svd.s.len());
            let mut c = svd.u.slice(s![.., ..k]).to_owned();
            for j in 0..k {
                c.column_mut(j).mapv_inplace(|v| v * svd.s[j]);
            }
            (
                svd.vt.slice(s![..k, ..]).mapv(|v| v as f32),
                c.mapv(|v| v as f32),
            )
        };
        positions.insert(
            name.clone(),
            RmmPosition {
                shape: first.shape().to_vec(),
                mean: mean.mapv(|v| v as f32),
                basis,
                coeffs,
            },
        );
    }
    Ok(ReversibleMerge {
        positions,
        tasks: n,
        rank: p,
    })
}

impl ReversibleMerge {
    /// Task `i`'s deltas, rebuilt.
    pub fn reconstruct(&self, task: usize) -> Result<IndexMap<String, Array2<f32>>> {
        if task >= self.tasks {
            return Err(lr(
                "rmm",
                format!("task {task} out of range (there are {})", self.tasks),
            ));
        }
        Ok(self
            .positions
            .iter()
            .map(|(name, p)| {
                let v = &p.mean + &p.coeffs.row(task).dot(&p.basis);
                let m = v
                    .into_shape_with_order((p.shape[0], p.shape[1]))
                    .expect("stored shape");
                (name.clone(), m)
            })
            .collect())
    }

    /// Stored floats over the `n·D` of keeping every task: `(D + p·D + n·p)/(n·D)` summed over positions.
    pub fn storage_ratio(&self) -> f64 {
        let (mut stored, mut full) = (0usize, 0usize);
        for p in self.positions.values() {
            stored += p.mean.len() + p.basis.len() + p.coeffs.len();
            full += self.tasks * p.mean.len();
        }
        stored as f64 / full.max(1) as f64
    }

    /// Per task, `‖rebuilt − original‖_F / ‖original‖_F` over all positions.
    pub fn errors(&self, tasks: &[IndexMap<String, Array2<f32>>]) -> Result<Vec<f64>> {
        (0..self.tasks)
            .map(|i| {
                let rebuilt = self.reconstruct(i)?;
                let (mut num, mut den) = (0f64, 0f64);
                for (name, r) in &rebuilt {
                    let o = &tasks[i][name];
                    for (a, b) in r.iter().zip(o.iter()) {
                        num += ((a - b) as f64).powi(2);
                        den += (*b as f64).powi(2);
                    }
                }
                Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
            })
            .collect()
    }
}

/// Seeded k-means (k-means++ start, Lloyd iterations until assignments settle
/// or 300 rounds) of the rows of `x`; returns `(centroids k × d, assignment)`.
pub fn kmeans(x: ArrayView2<f32>, k: usize, seed: u64) -> Result<(Array2<f32>, Vec<usize>)> {
    let n = x.nrows();
    if k == 0 || k > n {
        return Err(lr(
            "k-means",
            format!("k = {k} must be in 1..={n} (the number of points)"),
        ));
    }
    let dist = |a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>| -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(p, q)| ((p - q) as f64).powi(2))
            .sum()
    };
    let mut rng = weights::rng::Rng::new(seed);
    let mut chosen = vec![rng.below(n)];
    let mut d2: Vec<f64> = (0..n).map(|i| dist(x.row(i), x.row(chosen[0]))).collect();
    while chosen.len() < k {
        let total: f64 = d2.iter().sum();
        let next = if total > 0.0 {
            let mut target = rng.uniform() * total;
            let mut pick = n - 1;
            for (i, &w) in d2.iter().enumerate() {
                if w > 0.0 && target < w {
                    pick = i;
                    break;
                }
                target -= w;
            }
            if d2[pick] == 0.0 {
                (0..n).find(|&i| d2[i] > 0.0).unwrap_or(pick)
            } else {
                pick
            }
        } else {
            // Every remaining point coincides with a centre: take unchosen ones in order.
            (0..n).find(|i| !chosen.contains(i)).expect("k <= n")
        };
        chosen.push(next);
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(dist(x.row(i), x.row(next)));
        }
    }
    let mut c = Array2::<f32>::zeros((k, x.ncols()));
    for (j, &i) in chosen.iter().enumerate() {
        c.row_mut(j).assign(&x.row(i));
    }
    let mut assign = vec![usize::MAX; n];
    for _ in 0..300 {
        let mut changed = false;
        for (i, slot) in assign.iter_mut().enumerate() {
            let best = (0..k)
                .min_by(|&p, &q| {
                    dist(x.row(i), c.row(p))
                        .total_cmp(&dist(x.row(i), c.row(q)))
                        .then(p.cmp(&q))
                })
                .expect("k > 0");
            if *slot != best {
                *slot = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = Array2::<f64>::zeros((k, x.ncols()));
        let mut counts = vec![0usize; k];
        for i in 0..n {
            counts[assign[i]] += 1;
            sums.row_mut(assign[i])
                .iter_mut()
                .zip(x.row(i))
                .for_each(|(s, &v)| *s += v as f64);
        }
        for (j, &count) in counts.iter().enumerate() {
            if count > 0 {
                c.row_mut(j)
                    .iter_mut()
                    .zip(sums.row(j))
                    .for_each(|(o, &s)| *o = (s / count as f64) as f32);
            } else {
                // An empty cluster takes the point farthest from its centre.
                let far = (0..n)
                    .max_by(|&p, &q| {
                        dist(x.row(p), c.row(assign[p]))
                            .total_cmp(&dist(x.row(q), c.row(assign[q])))
                    })
                    .expect("n > 0");
                let row = x.row(far).to_owned();
                c.row_mut(j).assign(&row);
            }
        }
    }
    Ok((c, assign))
}

/// LoRA-LEGO: clusters the rank-one units of `adapters` into a rank-`k` LoRA
/// per module (see the module docs). `rescale` applies the norm calibration.
pub fn lora_lego(
    adapters: &[LoraAdapter],
    k: usize,
    seed: u64,
    rescale: bool,
) -> Result<LoraAdapter> {
    let first = adapters
        .first()
        .ok_or_else(|| lr("lora_lego", "no adapters"))?;
    let mut modules = IndexMap::new();
    for w in first.modules.keys() {
        let mut units: Vec<Vec<f32>> = Vec::new();
        let (out_dim, in_dim) = (first.modules[w].b.nrows(), first.modules[w].a.ncols());
        for (ai, ad) in adapters.iter().enumerate() {
            let p = ad.modules.get(w).ok_or_else(|| MergeError::MissingTensor {
                tensor: w.clone(),
                model: format!("adapter {}", ai + 1),
            })?;
            if p.b.nrows() != out_dim || p.a.ncols() != in_dim {
                return Err(MergeError::ShapeMismatch {
                    tensor: w.clone(),
                    model: format!("adapter {}", ai + 1),
                    expected: vec![out_dim, in_dim],
                    got: vec![p.b.nrows(), p.a.ncols()],
                });
            }
            let r = (ad.config.scale_of(w.strip_suffix(".weight").unwrap_or(w)) as f32).sqrt();
            for i in 0..p.a.nrows() {
                units.push(
                    p.b.column(i)
                        .iter()
                        .chain(p.a.row(i).iter())
                        .map(|v| v * r)
                        .collect(),
                );
            }
        }
        let d = out_dim + in_dim;
        let x = Array2::from_shape_vec((units.len(), d), units.concat()).expect("unit rows");
        let (mut c, assign) = kmeans(x.view(), k, seed).map_err(|e| lr(w, e.to_string()))?;
        if rescale {
            for j in 0..k {
                let members: Vec<f64> = (0..x.nrows())
                    .filter(|&i| assign[i] == j)
                    .map(|i| {
                        x.row(i)
                            .iter()
                            .map(|v| (*v as f64).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .collect();
                let cn = c
                    .row(j)
                    .iter()
                    .map(|v| (*v as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if !members.is_empty() && cn > 0.0 {
                    let target = members.iter().sum::<f64>() / members.len() as f64;
                    c.row_mut(j).mapv_inplace(|v| v * (target / cn) as f32);
                }
            }
        }
        let b = c.slice(s![.., ..out_dim]).t().to_owned();
        let a = c.slice(s![.., out_dim..]).to_owned();
        modules.insert(w.clone(), LoraPair { a, b });
    }
    let mut config = first.config.clone();
    config.r = k;
    config.lora_alpha = k as f64;
    config.use_rslora = false;
    // Every merged module has rank k.
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    Ok(LoraAdapter {
        config,
        modules,
        full: IndexMap::new(),
    })
}

/// A shared left basis for related matrices (see the module docs).
#[derive(Clone, Debug)]
pub struct SharedBasis {
    /// Shared left basis, `m × r`.
    pub u: Array2<f32>,
    /// Per matrix, its right factor `Σ_r V_{r,i}ᵀ` (`r × nᵢ`).
    pub right: Vec<Array2<f32>>,
}

/// Shared-basis decomposition of `mats` (all with `m` rows) at rank `rank`.
pub fn shared_basis(mats: &[ArrayView2<f32>], rank: usize) -> Result<SharedBasis> {
    let m = mats
        .first()
        .ok_or_else(|| lr("shared_basis", "no matrices"))?
        .nrows();
    if let Some(i) = mats.iter().position(|w| w.nrows() != m) {
        return Err(lr(
            "shared_basis",
            format!(
                "matrix {} has {} rows, the first has {m}",
                i + 1,
                mats[i].nrows()
            ),
        ));
    }
    let views: Vec<_> = mats.to_vec();
    let cat =
        ndarray::concatenate(Axis(1), &views).map_err(|e| lr("shared_basis", e.to_string()))?;
    let svd = spectra::linalg::thin_svd(cat.view(), "shared_basis")?;
    let r = rank.min(svd.s.len());
    if r == 0 {
        return Err(lr("shared_basis", "rank must be at least 1"));
    }
    let u = svd.u.slice(s![.., ..r]).to_owned();
    let mut right = Vec::new();
    let mut col = 0;
    for w in mats {
        let mut v = svd.vt.slice(s![..r, col..col + w.ncols()]).to_owned();
        for j in 0..r {
            v.row_mut(j).mapv_inplace(|x| x * svd.s[j]);
        }
        right.push(v);
        col += w.ncols();
    }
    Ok(SharedBasis { u, right })
}

impl SharedBasis {
    /// Matrix `i` rebuilt at the stored rank.
    pub fn reconstruct(&self, i: usize) -> Array2<f32> {
        self.u.dot(&self.right[i])
    }

    /// `U_r Σᵢ wᵢ Σ_r V_{r,i}ᵀ` (the matrices must have equal column counts).
    pub fn merge(&self, weights: &[f32]) -> Result<Array2<f32>> {
        if weights.len() != self.right.len() {
            return Err(lr(
                "shared_basis",
                format!(
                    "{} weights for {} matrices",
                    weights.len(),
                    self.right.len()
                ),
            ));
        }
        let n = self.right[0].ncols();
        if self.right.iter().any(|v| v.ncols() != n) {
            return Err(lr(
                "shared_basis",
                "merging needs matrices with equal column counts",
            ));
        }
        let mut acc = Array2::<f32>::zeros(self.right[0].raw_dim());
        for (v, &w) in self.right.iter().zip(weights) {
            acc.scaled_add(w, v);
        }
        Ok(self.u.dot(&acc))
    }
}
