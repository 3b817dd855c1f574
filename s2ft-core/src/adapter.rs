//! S²FT adapters — the trained deltas as index lists plus dense blocks — and
//! PEFT-format export of LoRA adapters.
//!
//! An [`S2ftAdapter`] is saved as `adapter.safetensors` (one `[out, |S|]` or
//! `[|S|, in]` tensor per adapted weight, under the weight's name) and
//! `adapter_config.json` (`"adapter_type": "s2ft"`, the model shape, and per
//! weight its axis and indices). Fusing adds the blocks into a state dict's
//! selected columns/rows and returns the overwritten values, so unfusing
//! restores the base **bit for bit** (subtracting would not: `(w + d) − d ≠ w`
//! in floating point) and switching adapters costs two block copies.

use std::path::Path;

use burn::prelude::*;
use indexmap::IndexMap;
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use weights::{StateDict, Tensor as WTensor, TensorSource};

use crate::config::LlamaConfig;
use crate::error::{Result, S2ftError};
use crate::model::{DeltaAxis, Llama, PROJ_NAMES, layer_prefix, to_weights};

/// One adapted weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterEntry {
    /// Base weight name (`model.layers.3.self_attn.o_proj.weight`).
    pub weight: String,
    /// Columns or rows.
    pub axis: DeltaAxis,
    /// Selected indices on that axis.
    pub indices: Vec<usize>,
    /// The base weight's shape `[out, in]`.
    pub weight_shape: [usize; 2],
}

/// A trained S²FT adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct S2ftAdapter {
    /// The shape of the model it was trained on.
    pub config: LlamaConfig,
    /// Adapted weights.
    pub entries: Vec<AdapterEntry>,
    /// Their dense blocks, by weight name.
    pub deltas: IndexMap<String, Array2<f32>>,
}

#[derive(Serialize, Deserialize)]
struct AdapterFile {
    adapter_type: String,
    config: LlamaConfig,
    entries: Vec<AdapterEntry>,
}

/// The values a fuse overwrote, to restore them exactly.
#[derive(Clone, Debug)]
pub struct Undo {
    saved: Vec<(String, DeltaAxis, Vec<usize>, Array2<f32>)>,
}

fn err(m: impl Into<String>) -> S2ftError {
    S2ftError::Adapter(m.into())
}

impl S2ftAdapter {
    /// The deltas a model carries (after S²FT training).
    pub fn extract<B: Backend>(model: &Llama<B>) -> Result<Self> {
        let mut entries = Vec::new();
        let mut deltas = IndexMap::new();
        for (l, blk) in model.layers.iter().enumerate() {
            for name in PROJ_NAMES {
                let p = blk.proj(name);
                let (Some(d), Some(axis)) = (&p.delta, p.delta_axis) else {
                    continue;
                };
                let weight = format!("{}.{name}.weight", layer_prefix(l));
                let t = to_weights(d.val());
                let sh = t.shape().to_vec();
                let m = Array2::from_shape_vec((sh[0], sh[1]), t.data.iter().copied().collect())
                    .expect("2-D");
                entries.push(AdapterEntry {
                    weight: weight.clone(),
                    axis,
                    indices: p.delta_idx.clone(),
                    weight_shape: p.dims(),
                });
                deltas.insert(weight, m);
            }
        }
        if entries.is_empty() {
            return Err(err("the model carries no S²FT deltas"));
        }
        Ok(S2ftAdapter {
            config: model.config.clone(),
            entries,
            deltas,
        })
    }

    /// Writes `adapter.safetensors` and `adapter_config.json` into `dir` (atomically).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| weights::WeightsError::io(dir, e))?;
        let mut sd = StateDict::new();
        for (w, d) in &self.deltas {
            sd.insert(w.clone(), WTensor::f32(d.clone().into_dyn()));
        }
        sd.save_safetensors(dir.join("adapter.safetensors"))?;
        let meta = AdapterFile {
            adapter_type: "s2ft".into(),
            config: self.config.clone(),
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&meta).expect("JSON");
        weights::atomic::write_atomic(dir.join("adapter_config.json"), text.as_bytes())?;
        Ok(())
    }

    /// Reads an adapter saved by [`S2ftAdapter::save`], checking every block
    /// against its entry.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| weights::WeightsError::io(&cfg_path, e))?;
        let meta: AdapterFile =
            serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
        if meta.adapter_type != "s2ft" {
            return Err(err(format!(
                "{}: adapter_type '{}' is not 's2ft'",
                cfg_path.display(),
                meta.adapter_type
            )));
        }
        let st = weights::SafetensorsFile::open(dir.join("adapter.safetensors"))?;
        let mut deltas = IndexMap::new();
        for e in &meta.entries {
            let t = st.load(&e.weight)?;
            let sh = t.shape().to_vec();
            let want = block_shape(e);
            if sh != want {
                return Err(err(format!(
                    "'{}': block has shape {sh:?}, its entry implies {want:?}",
                    e.weight
                )));
            }
            deltas.insert(
                e.weight.clone(),
                Array2::from_shape_vec((sh[0], sh[1]), t.data.iter().copied().collect())
                    .expect("2-D"),
            );
        }
        let a = S2ftAdapter {
            config: meta.config,
            entries: meta.entries,
            deltas,
        };
        a.check_indices()?;
        Ok(a)
    }

    fn check_indices(&self) -> Result<()> {
        for e in &self.entries {
            let bound = match e.axis {
                DeltaAxis::Cols => e.weight_shape[1],
                DeltaAxis::Rows => e.weight_shape[0],
            };
            if let Some(i) = e.indices.iter().find(|&&i| i >= bound) {
                return Err(err(format!(
                    "'{}': index {i} out of range (axis length {bound})",
                    e.weight
                )));
            }
        }
        Ok(())
    }

    /// Checks the adapter fits `sd` (every weight present with the recorded shape).
    pub fn check(&self, sd: &StateDict) -> Result<()> {
        for e in &self.entries {
            let t = sd.get(&e.weight).ok_or_else(|| {
                err(format!(
                    "the model has no weight '{}' (adapter for another architecture?)",
                    e.weight
                ))
            })?;
            if t.shape() != e.weight_shape {
                return Err(err(format!(
                    "'{}' has shape {:?} in the model but {:?} in the adapter",
                    e.weight,
                    t.shape(),
                    e.weight_shape
                )));
            }
        }
        Ok(())
    }

    /// Adds every block into `sd` and returns what it overwrote.
    pub fn fuse(&self, sd: &mut StateDict) -> Result<Undo> {
        self.check(sd)?;
        let mut saved = Vec::new();
        for e in &self.entries {
            let d = &self.deltas[&e.weight];
            let mut w = as_matrix(&mut sd.get_mut(&e.weight).expect("checked").data);
            let mut old = Array2::<f32>::zeros(d.raw_dim());
            match e.axis {
                // Row by row: W's rows are contiguous, the selected columns a gather.
                DeltaAxis::Cols => {
                    for ((mut wr, dr), mut or) in
                        w.rows_mut().into_iter().zip(d.rows()).zip(old.rows_mut())
                    {
                        for ((&i, &dv), ov) in e.indices.iter().zip(dr).zip(or.iter_mut()) {
                            *ov = wr[i];
                            wr[i] += dv;
                        }
                    }
                }
                DeltaAxis::Rows => {
                    for (k, &i) in e.indices.iter().enumerate() {
                        old.row_mut(k).assign(&w.row(i));
                        w.row_mut(i).zip_mut_with(&d.row(k), |a, b| *a += b);
                    }
                }
            }
            saved.push((e.weight.clone(), e.axis, e.indices.clone(), old));
        }
        Ok(Undo { saved })
    }

    /// The full-size `ΔW` of every adapted weight (zeros outside the blocks):
    /// a task vector for the `merge` crate.
    pub fn dense(&self) -> IndexMap<String, Array2<f32>> {
        self.entries
            .iter()
            .map(|e| {
                let mut m = Array2::<f32>::zeros((e.weight_shape[0], e.weight_shape[1]));
                let d = &self.deltas[&e.weight];
                for (k, &i) in e.indices.iter().enumerate() {
                    match e.axis {
                        DeltaAxis::Cols => {
                            m.column_mut(i).zip_mut_with(&d.column(k), |a, b| *a += b)
                        }
                        DeltaAxis::Rows => m.row_mut(i).zip_mut_with(&d.row(k), |a, b| *a += b),
                    }
                }
                (e.weight.clone(), m)
            })
            .collect()
    }

    /// Trainable parameters the adapter holds.
    pub fn num_params(&self) -> usize {
        self.deltas.values().map(|d| d.len()).sum()
    }
}

/// A 2-D view of a weight [`S2ftAdapter::check`] has validated.
fn as_matrix(data: &mut ndarray::ArrayD<f32>) -> ndarray::ArrayViewMut2<'_, f32> {
    data.view_mut()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("adapted weights are 2-D")
}

fn block_shape(e: &AdapterEntry) -> Vec<usize> {
    match e.axis {
        DeltaAxis::Cols => vec![e.weight_shape[0], e.indices.len()],
        DeltaAxis::Rows => vec![e.indices.len(), e.weight_shape[1]],
    }
}

/// Restores what a [`S2ftAdapter::fuse`] overwrote (undo in reverse order when
/// several adapters were fused).
pub fn unfuse(sd: &mut StateDict, undo: Undo) -> Result<()> {
    for (name, axis, idx, old) in undo.saved.into_iter().rev() {
        let t = sd
            .get_mut(&name)
            .ok_or_else(|| err(format!("the model lost weight '{name}'")))?;
        let sh = t.shape().to_vec();
        let (along, across) = match axis {
            DeltaAxis::Cols => (1, 0),
            DeltaAxis::Rows => (0, 1),
        };
        if sh.len() != 2 || idx.iter().any(|&i| i >= sh[along]) || old.shape()[across] != sh[across]
        {
            return Err(err(format!(
                "'{name}' changed shape to {sh:?} since the adapter was fused"
            )));
        }
        let mut w = as_matrix(&mut t.data);
        match axis {
            DeltaAxis::Cols => {
                for (mut wr, or) in w.rows_mut().into_iter().zip(old.rows()) {
                    for (&i, &ov) in idx.iter().zip(or) {
                        wr[i] = ov;
                    }
                }
            }
            DeltaAxis::Rows => {
                for (k, &i) in idx.iter().enumerate() {
                    w.row_mut(i).assign(&old.row(k));
                }
            }
        }
    }
    Ok(())
}

/// Writes the LoRA factors a model carries as a Hugging Face PEFT adapter
/// (`adapter_model.safetensors` with `base_model.model.<module>.lora_{A,B}.weight`,
/// `adapter_config.json` with `r`, `lora_alpha`, `lora_dropout` (the rate it
/// was trained with), `target_modules`).
pub fn save_lora_peft<B: Backend>(model: &Llama<B>, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let mut sd = StateDict::new();
    let (mut r, mut scale, mut dropout) = (0usize, 0f32, 0f64);
    let mut targets: Vec<String> = Vec::new();
    for (l, blk) in model.layers.iter().enumerate() {
        for name in PROJ_NAMES {
            let p = blk.proj(name);
            let (Some(a), Some(b)) = (&p.lora_a, &p.lora_b) else {
                continue;
            };
            let module = format!("{}.{name}", layer_prefix(l));
            sd.insert(
                format!("base_model.model.{module}.lora_A.weight"),
                to_weights(a.val()),
            );
            sd.insert(
                format!("base_model.model.{module}.lora_B.weight"),
                to_weights(b.val()),
            );
            r = a.val().dims()[0];
            scale = p.lora_scale;
            dropout = p.lora_dropout;
            let short = name.rsplit('.').next().expect("name").to_string();
            if !targets.contains(&short) {
                targets.push(short);
            }
        }
    }
    if sd.is_empty() {
        return Err(err("the model carries no LoRA factors"));
    }
    std::fs::create_dir_all(dir).map_err(|e| weights::WeightsError::io(dir, e))?;
    sd.metadata.insert("format".into(), "pt".into());
    sd.save_safetensors(dir.join("adapter_model.safetensors"))?;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": scale as f64 * r as f64,
        "lora_dropout": dropout,
        "bias": "none",
        "use_rslora": false,
        "target_modules": targets,
    });
    weights::atomic::write_atomic(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).expect("JSON").as_bytes(),
    )?;
    Ok(())
}
