//! Streaming execution of a [`MergeConfig`]: inputs are memory-mapped and read
//! one tensor at a time, tensors are merged in parallel (rayon) under a memory
//! budget, and the output is a sharded safetensors folder (or one file) written
//! atomically — the index last, after the base model's `config.json` and
//! tokenizer files — so an interrupted run leaves no loadable partial model.
//!
//! Peak memory is about `Σ over tensors in flight of (inputs + 2) × size`,
//! independent of model size; `max_memory` bounds the sum (one tensor larger
//! than the budget runs alone).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use indexmap::IndexMap;
use rayon::prelude::*;
use weights::{Checkpoint, CheckpointWriter, DType, TensorInfo, TensorSource};

use crate::config::{MergeConfig, Setting, model_path, parse_dtype, resolve};
use crate::error::{MergeError, Result};
use crate::{BasePolicy, Method, Params, TensorInputs, Value, merge_tensor};

/// What to do when an embedding-like tensor's vocabulary differs from the base's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmbedPolicy {
    /// Refuse with [`MergeError::VocabMismatch`].
    #[default]
    Error,
    /// Use the base's rows for tokens a model lacks and drop rows beyond the base's vocabulary.
    BaseRows,
}

/// A progress callback: `(done, total)`, called from the merge's worker threads.
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>);

impl Progress {
    /// Wraps `f`.
    pub fn new(f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        Progress(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Seed of random sparsification (per tensor and input, order-independent).
    pub seed: u64,
    /// Largest shard, in bytes.
    pub shard_bytes: u64,
    /// Memory budget for tensors in flight, in bytes (`None`: two tensors per core).
    pub max_memory: Option<u64>,
    /// Told `(tensors done, tensors in all)` after every tensor (the
    /// command line draws a progress bar with it; `None`: nothing).
    pub progress: Option<Progress>,
    /// Vocabulary mismatches.
    pub embed: EmbedPolicy,
    /// Source of DARE's and DELLA's draws (seeded, or a value hash any tool can reproduce).
    pub draws: crate::sparsify::Draws,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            seed: 0,
            shard_bytes: weights::DEFAULT_SHARD_BYTES,
            max_memory: None,
            progress: None,
            embed: EmbedPolicy::Error,
            draws: Default::default(),
        }
    }
}

/// What [`run`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// Output tensors written.
    pub tensors: usize,
    /// Their elements.
    pub elements: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Files copied from the base model (config, tokenizer).
    pub copied: Vec<String>,
}

/// One input of a planned tensor.
#[derive(Clone, Debug)]
struct InputRef {
    model: usize,
    name: String,
    /// Index into the plan's parameter layers.
    params: usize,
}

#[derive(Clone, Debug)]
struct Planned {
    out: String,
    shape: Vec<usize>,
    dtype: DType,
    base: Option<InputRef>,
    inputs: Vec<InputRef>,
    /// Slice parameters index.
    slice: usize,
    t: f64,
}

/// The layer index in a tensor name (`model.layers.7.mlp…` → 7) and where it sits.
pub fn layer_of(name: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let mut offset = 0;
    let parts: Vec<&str> = name.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if i > 0
            && matches!(parts[i - 1], "layers" | "layer" | "h" | "blocks")
            && let Ok(n) = p.parse::<usize>()
        {
            return Some((n, offset..offset + p.len()));
        }
        offset += p.len() + 1;
    }
    None
}

fn with_layer(name: &str, layer: usize) -> String {
    match layer_of(name) {
        Some((_, r)) => format!("{}{}{}", &name[..r.start], layer, &name[r.end..]),
        None => name.to_string(),
    }
}

/// Whether a tensor has a vocabulary axis 0 (token embeddings, LM heads).
pub fn is_embedding(name: &str) -> bool {
    [
        "embed_tokens",
        "lm_head",
        "wte",
        "word_embeddings",
        "embed_in",
        "embed_out",
    ]
    .iter()
    .any(|k| name.contains(k))
}

struct Plan {
    models: Vec<(String, Checkpoint)>,
    /// Parameter layers: per input (most specific first), resolved per tensor.
    layers: Vec<IndexMap<String, Setting>>,
    tensors: Vec<Planned>,
    /// Which model's files (config, tokenizer) are copied.
    reference: usize,
    /// Output layer count when slices renumber layers.
    out_layers: Option<usize>,
    /// The config's folder: relative file parameters (`gram`) resolve against it.
    config_dir: PathBuf,
}

fn open_models(cfg: &MergeConfig, dir: &Path, out: &Path) -> Result<IndexMap<String, usize>> {
    let mut names: IndexMap<String, usize> = IndexMap::new();
    let mut add = |m: &str| {
        let n = names.len();
        names.entry(m.to_string()).or_insert(n);
    };
    if let Some(b) = &cfg.base_model {
        add(b);
    }
    for m in cfg.models.iter().flatten() {
        add(&m.model);
    }
    for s in cfg.slices.iter().flatten() {
        if let Some(b) = &s.base_model {
            add(b);
        }
        for src in &s.sources {
            add(&src.model);
        }
    }
    let out_abs = out.canonicalize().ok();
    for m in names.keys() {
        let p = model_path(m, dir);
        if out_abs.is_some() && p.canonicalize().ok() == out_abs {
            return Err(MergeError::Config {
                path: out.to_path_buf(),
                msg: format!("the output would overwrite input model '{m}'"),
            });
        }
    }
    Ok(names)
}

fn plan(cfg: &MergeConfig, config_dir: &Path, out: &Path) -> Result<Plan> {
    let method = cfg.method();
    let ids = open_models(cfg, config_dir, out)?;
    let mut models = Vec::new();
    for m in ids.keys() {
        models.push((m.clone(), Checkpoint::open(model_path(m, config_dir))?));
    }
    let force_dtype = cfg
        .out_dtype
        .as_ref()
        .or(cfg.dtype.as_ref())
        .map(|d| parse_dtype(d).expect("checked by parse"));
    let mut layers: Vec<IndexMap<String, Setting>> = vec![cfg.parameters.clone()];
    let mut tensors = Vec::new();
    let uses_base = method.base_policy() != BasePolicy::Ignored;
    let mut out_layers = None;
    let reference;
    // Layer tensors' t within a slice of `len` layers.
    let t_of = |idx: usize, len: usize| {
        if len > 1 {
            idx as f64 / (len - 1) as f64
        } else {
            1.0
        }
    };

    if let Some(list) = &cfg.models {
        let base = if uses_base {
            cfg.base_model.as_ref().map(|b| ids[b])
        } else {
            None
        };
        // Inputs: listed models (the base among them only when the method ignores bases).
        let mut inputs = Vec::new();
        for m in list {
            let id = ids[&m.model];
            if Some(id) == base {
                continue;
            }
            layers.push(m.parameters.clone());
            inputs.push((id, layers.len() - 1));
        }
        reference = base.unwrap_or(inputs.first().map_or(0, |x| x.0));
        let infos = models[reference].1.infos();
        let n_layers = infos
            .iter()
            .filter_map(|i| layer_of(&i.name))
            .map(|(l, _)| l + 1)
            .max()
            .unwrap_or(0);
        for info in infos {
            let t = match layer_of(&info.name) {
                Some((l, _)) => t_of(l, n_layers),
                None => 0.0,
            };
            let r = |(model, params): (usize, usize)| InputRef {
                model,
                name: info.name.clone(),
                params,
            };
            tensors.push(Planned {
                out: info.name.clone(),
                dtype: weights::output_dtype(info.dtype, force_dtype),
                shape: info.shape.clone(),
                base: base.map(|b| r((b, 0))),
                inputs: inputs.iter().map(|&x| r(x)).collect(),
                slice: 0,
                t,
            });
        }
    } else {
        let slices = cfg.slices.as_ref().expect("models or slices");
        let mut counter = 0usize;
        let first_src = ids[&slices[0].sources[0].model];
        reference = cfg.base_model.as_ref().map_or(first_src, |b| ids[b]);
        let mut non_layer: Vec<Planned> = Vec::new();
        for (si, s) in slices.iter().enumerate() {
            layers.push(s.parameters.clone());
            let slice_layer = layers.len() - 1;
            let base_name = s
                .base_model
                .as_ref()
                .or(cfg.base_model.as_ref())
                .filter(|_| uses_base);
            let mut base = None;
            let mut inputs = Vec::new();
            for src in &s.sources {
                layers.push(src.parameters.clone());
                let entry = (ids[&src.model], src.layer_range[0], layers.len() - 1);
                if base_name == Some(&src.model) && base.is_none() {
                    base = Some(entry);
                } else {
                    inputs.push(entry);
                }
            }
            if let Some(b) = base_name
                && base.is_none()
            {
                return Err(MergeError::Config {
                    path: config_dir.to_path_buf(),
                    msg: format!("slice {si}: base_model '{b}' must be one of the slice's sources"),
                });
            }
            let len = s.sources[0].layer_range[1] - s.sources[0].layer_range[0];
            let lead = base.unwrap_or(inputs[0]);
            let infos = models[lead.0].1.infos();
            for idx in 0..len {
                let src_layer = lead.1 + idx;
                for info in infos
                    .iter()
                    .filter(|i| layer_of(&i.name).is_some_and(|(l, _)| l == src_layer))
                {
                    let r = |(model, start, params): (usize, usize, usize)| InputRef {
                        model,
                        name: with_layer(&info.name, start + idx),
                        params,
                    };
                    tensors.push(Planned {
                        out: with_layer(&info.name, counter),
                        dtype: weights::output_dtype(info.dtype, force_dtype),
                        shape: info.shape.clone(),
                        base: base.map(r),
                        inputs: inputs.iter().map(|&x| r(x)).collect(),
                        slice: slice_layer,
                        t: t_of(idx, len),
                    });
                }
                counter += 1;
            }
            // Tensors outside the layers: embeddings from the first slice, the rest from the last.
            let is_first = si == 0;
            let is_last = si + 1 == slices.len();
            for info in infos.iter().filter(|i| layer_of(&i.name).is_none()) {
                let pre = is_embedding(&info.name) && !info.name.contains("lm_head");
                if (pre && is_first) || (!pre && is_last) {
                    let r = |(model, _, params): (usize, usize, usize)| InputRef {
                        model,
                        name: info.name.clone(),
                        params,
                    };
                    non_layer.push(Planned {
                        out: info.name.clone(),
                        dtype: weights::output_dtype(info.dtype, force_dtype),
                        shape: info.shape.clone(),
                        base: base.map(r),
                        inputs: inputs.iter().map(|&x| r(x)).collect(),
                        slice: slice_layer,
                        t: 0.0,
                    });
                }
            }
        }
        out_layers = Some(counter);
        tensors.extend(non_layer);
    }
    Ok(Plan {
        models,
        layers,
        tensors,
        reference,
        out_layers,
        config_dir: config_dir.to_path_buf(),
    })
}

/// A simple counting semaphore over bytes.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, want: u64) -> u64 {
        let want = want.min(self.limit);
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + want > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += want;
        want
    }

    fn release(&self, n: u64) {
        *self.used.lock().expect("budget lock") -= n;
        self.freed.notify_all();
    }
}

/// Loads `r` as the shape `shape`, checking values and (embedding)
/// vocabulary. A tensor its file stores as `f32` is read in place from the
/// memory map (borrowed: [`merge_one`] releases its pages once merged);
/// others are converted into a buffer and their stored pages released now.
fn load_input<'p>(
    plan: &'p Plan,
    p: &Planned,
    r: &InputRef,
    base: Option<&[f32]>,
    embed: EmbedPolicy,
) -> Result<Cow<'p, [f32]>> {
    let (label, src) = (&plan.models[r.model].0, &plan.models[r.model].1);
    let info = src.info(&r.name).ok_or_else(|| MergeError::MissingTensor {
        tensor: r.name.clone(),
        model: label.clone(),
    })?;
    if info.shape == p.shape
        && let Some(view) = src.f32_view(&r.name)
    {
        MergeError::check_finite_slice(&r.name, label, view)?;
        return Ok(Cow::Borrowed(view));
    }
    let t = src.load(&r.name)?;
    src.release(&r.name);
    let data = t.data.into_raw_vec_and_offset().0;
    MergeError::check_finite_slice(&r.name, label, &data)?;
    if info.shape == p.shape {
        return Ok(Cow::Owned(data));
    }
    let same_rest = info.shape.len() == p.shape.len() && info.shape[1..] == p.shape[1..];
    if is_embedding(&p.out) && same_rest {
        if embed == EmbedPolicy::BaseRows
            && let Some(base) = base
        {
            let row: usize = p.shape[1..].iter().product();
            let keep = info.shape[0].min(p.shape[0]) * row;
            let mut out = data[..keep].to_vec();
            out.extend_from_slice(&base[keep..]);
            return Ok(Cow::Owned(out));
        }
        return Err(MergeError::VocabMismatch {
            tensor: r.name.clone(),
            model: label.clone(),
            rows: info.shape[0],
            base_rows: p.shape[0],
        });
    }
    Err(MergeError::ShapeMismatch {
        tensor: r.name.clone(),
        model: label.clone(),
        expected: p.shape.clone(),
        got: info.shape,
    })
}

fn merge_one(plan: &Plan, method: &Method, p: &Planned, opts: &RunOptions) -> Result<Vec<f32>> {
    // The base is loaded first so embeddings can borrow its rows.
    let base = match &p.base {
        Some(r) => Some(load_input(plan, p, r, None, EmbedPolicy::Error)?),
        None => None,
    };
    let mut inputs = Vec::with_capacity(p.inputs.len());
    for r in &p.inputs {
        inputs.push(load_input(plan, p, r, base.as_deref(), opts.embed)?);
    }
    let shared = resolve(&[&plan.layers[p.slice], &plan.layers[0]], &p.out, p.t);
    let per_model: Vec<Params> = p
        .inputs
        .iter()
        .map(|r| {
            let mut params = resolve(
                &[
                    &plan.layers[r.params],
                    &plan.layers[p.slice],
                    &plan.layers[0],
                ],
                &r.name,
                p.t,
            );
            // File parameters are paths like the models'.
            for key in crate::FILE_PARAMETERS {
                if let Some(Value::Str(f)) = params.get_mut(*key) {
                    *f = model_path(f, &plan.config_dir)
                        .to_string_lossy()
                        .into_owned();
                }
            }
            params
        })
        .collect();
    let merged = merge_tensor(
        method,
        &TensorInputs {
            name: &p.out,
            shape: &p.shape,
            base: base.as_deref(),
            models: inputs.iter().map(|v| v.as_ref()).collect(),
            shared: &shared,
            per_model: &per_model,
            seed: opts.seed,
            draws: opts.draws,
        },
    );
    // The inputs read in place leave the resident set now.
    for (r, data) in p
        .base
        .iter()
        .chain(&p.inputs)
        .zip(base.iter().chain(&inputs))
    {
        if let Cow::Borrowed(_) = data {
            plan.models[r.model].1.release(&r.name);
        }
    }
    merged
}

/// Files copied from the reference (base) model's folder next to the weights.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

fn copy_files(plan: &Plan, cfg_text: Option<&str>, out: &Path) -> Result<Vec<String>> {
    let src = plan.models[plan.reference].1.path();
    let dir = if src.is_dir() {
        src.to_path_buf()
    } else {
        src.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut copied = Vec::new();
    weights::atomic::create_dir_all(out)?;
    for f in COPIED_FILES {
        let from = dir.join(f);
        if !from.is_file() {
            continue;
        }
        let mut bytes = std::fs::read(&from).map_err(|e| MergeError::Io {
            path: from.clone(),
            source: e,
        })?;
        if *f == "config.json"
            && let Some(n) = plan.out_layers
        {
            let mut v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| MergeError::Config {
                    path: from.clone(),
                    msg: e.to_string(),
                })?;
            if let Some(o) = v.as_object_mut() {
                o.insert("num_hidden_layers".into(), n.into());
            }
            bytes = serde_json::to_vec_pretty(&v).expect("JSON");
        }
        weights::atomic::write_atomic(out.join(f), &bytes)?;
        copied.push(f.to_string());
    }
    if let Some(text) = cfg_text {
        weights::atomic::write_atomic(out.join("mergekit_config.yml"), text.as_bytes())?;
    }
    Ok(copied)
}

/// Runs `cfg` (whose model paths are relative to `config_dir` when they do not
/// exist as given) into `out`: a folder (sharded, with config and tokenizer
/// files) or a `.safetensors` file.
pub fn run(
    cfg: &MergeConfig,
    config_dir: &Path,
    cfg_text: Option<&str>,
    out: &Path,
    opts: &RunOptions,
) -> Result<RunReport> {
    let start = Instant::now();
    let method = cfg.method();
    let plan = plan(cfg, config_dir, out)?;
    // Every input must exist before anything is written.
    for p in &plan.tensors {
        for r in p.base.iter().chain(&p.inputs) {
            if plan.models[r.model].1.info(&r.name).is_none() {
                return Err(MergeError::MissingTensor {
                    tensor: r.name.clone(),
                    model: plan.models[r.model].0.clone(),
                });
            }
        }
    }
    let infos: Vec<TensorInfo> = plan
        .tensors
        .iter()
        .map(|p| TensorInfo {
            name: p.out.clone(),
            dtype: p.dtype,
            shape: p.shape.clone(),
        })
        .collect();
    let single = CheckpointWriter::is_single_file(out);
    let copied = if single {
        Vec::new()
    } else {
        copy_files(&plan, cfg_text, out)?
    };
    let mut meta = IndexMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let writer = Mutex::new(CheckpointWriter::create(
        out,
        &infos,
        &meta,
        opts.shard_bytes,
    )?);
    let largest = plan
        .tensors
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(0);
    let per = |p: &Planned| {
        p.shape.iter().product::<usize>() as u64 * 4 * (p.inputs.len() as u64 * 2 + 3)
    };
    let limit = opts.max_memory.unwrap_or_else(|| {
        largest
            * 4
            * (plan
                .tensors
                .iter()
                .map(|p| p.inputs.len() as u64 * 2 + 3)
                .max()
                .unwrap_or(3))
            * 2
    });
    let budget = Budget {
        limit: limit.max(1),
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let total = plan.tensors.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Largest first keeps the tail of the run parallel.
    let mut order: Vec<usize> = (0..plan.tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.tensors[i].shape.iter().product::<usize>()));
    order
        .par_iter()
        .with_max_len(1)
        .try_for_each(|&i| -> Result<()> {
            let p = &plan.tensors[i];
            let held = budget.acquire(per(p));
            let merged = merge_one(&plan, &method, p, opts);
            let res = merged.and_then(|data| {
                let view = ndarray::ArrayViewD::from_shape(p.shape.as_slice(), &data)
                    .expect("merged tensor has the planned size");
                writer
                    .lock()
                    .expect("writer lock")
                    .write(&p.out, view)
                    .map_err(MergeError::from)
            });
            budget.release(held);
            if let Some(p) = &opts.progress {
                (p.0)(
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                    total,
                );
            }
            res
        })?;
    writer.into_inner().expect("writer lock").finish()?;
    Ok(RunReport {
        tensors: plan.tensors.len(),
        elements: plan
            .tensors
            .iter()
            .map(|p| p.shape.iter().product::<usize>() as u64)
            .sum(),
        seconds: start.elapsed().as_secs_f64(),
        copied,
    })
}

/// Loads the config at `path` and runs it into `out`.
pub fn run_file(path: &Path, out: &Path, opts: &RunOptions) -> Result<RunReport> {
    let text = std::fs::read_to_string(path).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let cfg = MergeConfig::parse(&text, path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    run(&cfg, &dir, Some(&text), out, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(
            layer_of("model.layers.12.mlp.up_proj.weight").map(|x| x.0),
            Some(12)
        );
        assert_eq!(
            layer_of("encoder.layer.3.attention.self.query.weight").map(|x| x.0),
            Some(3)
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(
            with_layer("model.layers.12.mlp.up_proj.weight", 3),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert!(is_embedding("model.embed_tokens.weight") && is_embedding("lm_head.weight"));
    }
}
