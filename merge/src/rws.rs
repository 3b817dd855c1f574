//! Robust weight signatures (Ruan et al., "Robust Weight Signatures: Gaining
//! Robustness as Easy as Patching Weights?", ICML 2023): the difference
//! between a model fine-tuned on corrupted data and its clean parent, kept
//! as a patch that is added to (and removed from) clean models, restricted
//! to the shallowest layers and quantised for storage.
//!
//! A [`Signature`] is a task vector with a layer order. Layers are the
//! tensor-name prefixes before the last `.` (`features.0` for
//! `features.0.weight` and `.bias`), in the model's own order ([`layers`]).
//!
//! Patching is done in f64 ([`Patched`]): every weight and every scaled
//! patch `fl32(α·δ)` is an f32, and the f64 sum of two f32 values whose
//! magnitudes are within a factor 2²⁹ of each other (or one of which is 0)
//! is exact, so [`Patched::unpatch`] gives the clean weights back bit for
//! bit; [`Patched::to_state_dict`] rounds the patched model to f32 once.

use indexmap::IndexMap;
use ndarray::ArrayD;
use weights::{StateDict, Tensor};

use crate::error::{MergeError, Result};

fn patch_err(what: impl Into<String>, msg: impl Into<String>) -> MergeError {
    MergeError::Patch {
        what: what.into(),
        msg: msg.into(),
    }
}

/// The layer of a tensor: its name up to the last `.`.
pub fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(l, _)| l)
}

/// The layers of a state dict in order of first appearance.
pub fn layers(sd: &StateDict) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in sd.keys() {
        let l = layer_of(k);
        if !out.iter().any(|o| o == l) {
            out.push(l.to_string());
        }
    }
    out
}

/// A weight patch: per tensor, `robust − clean` (f32), and the layers of
/// the model it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// The name it is reported under.
    pub name: String,
    /// The differences, a subset of the model's tensors.
    pub deltas: StateDict,
    /// All layers of the source model, in depth order.
    pub model_layers: Vec<String>,
}

/// One layer's share of a signature.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerNorm {
    /// The layer.
    pub layer: String,
    /// ‖δ_l‖ (Frobenius, over the layer's tensors).
    pub delta: f64,
    /// ‖W_l‖ of the clean model.
    pub weight: f64,
    /// ‖δ_l‖ / ‖W_l‖.
    pub relative: f64,
}

fn sq_norm(t: &Tensor) -> f64 {
    t.data.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

impl Signature {
    /// `robust − clean` for every tensor; both models must have the same
    /// tensors, shapes and finite values.
    pub fn extract(name: &str, clean: &StateDict, robust: &StateDict) -> Result<Signature> {
        let mut deltas = StateDict::new();
        for (k, a) in clean.iter() {
            let b = robust.get(k).ok_or_else(|| MergeError::MissingTensor {
                tensor: k.to_string(),
                model: format!("{name} (robust model)"),
            })?;
            if a.shape() != b.shape() {
                return Err(MergeError::ShapeMismatch {
                    tensor: k.to_string(),
                    model: format!("{name} (robust model)"),
                    expected: a.shape().to_vec(),
                    got: b.shape().to_vec(),
                });
            }
            MergeError::check_finite(k, &format!("{name} (clean model)"), a.data.iter())?;
            MergeError::check_finite(k, &format!("{name} (robust model)"), b.data.iter())?;
            deltas.insert(k, Tensor::f32(&b.data - &a.data));
        }
        if let Some(k) = robust.keys().find(|k| !clean.contains(k)) {
            return Err(MergeError::MissingTensor {
                tensor: k.to_string(),
                model: format!("{name} (clean model)"),
            });
        }
        Ok(Signature {
            name: name.to_string(),
            deltas,
            model_layers: layers(clean),
        })
    }

    /// The layers this signature patches, in depth order.
    pub fn layers(&self) -> Vec<String> {
        layers(&self.deltas)
    }

    /// The part of the signature on the first `k` layers of its model
    /// (1 ≤ k ≤ the model's layer count).
    pub fn first_layers(&self, k: usize) -> Result<Signature> {
        let n = self.model_layers.len();
        if k == 0 || k > n {
            return Err(patch_err(
                &self.name,
                format!("k = {k} layers: the model has {n} (k must be 1 to {n})"),
            ));
        }
        let keep = &self.model_layers[..k];
        Ok(Signature {
            name: format!("{}[:{k}]", self.name),
            deltas: self
                .deltas
                .iter()
                .filter(|(t, _)| keep.iter().any(|l| l == layer_of(t)))
                .map(|(t, v)| (t.to_string(), v.clone()))
                .collect(),
            model_layers: self.model_layers.clone(),
        })
    }

    /// ‖δ_l‖ / ‖W_l‖ per layer of the signature, against the clean model.
    pub fn layer_norms(&self, clean: &StateDict) -> Result<Vec<LayerNorm>> {
        self.check_fits(clean, "clean model")?;
        Ok(self
            .layers()
            .into_iter()
            .map(|layer| {
                let (mut d, mut w) = (0.0, 0.0);
                for (t, delta) in self.deltas.iter().filter(|(t, _)| layer_of(t) == layer) {
                    d += sq_norm(delta);
                    w += sq_norm(clean.get(t).expect("checked"));
                }
                let (d, w) = (d.sqrt(), w.sqrt());
                LayerNorm {
                    layer,
                    delta: d,
                    weight: w,
                    relative: if w > 0.0 { d / w } else { f64::INFINITY },
                }
            })
            .collect())
    }

    /// The tensors of `self` with `other`'s of the same name: an error
    /// when `other` patches other tensors or shapes one differently.
    fn paired<'a>(
        &'a self,
        other: &'a Signature,
    ) -> Result<Vec<(&'a str, &'a Tensor, &'a Tensor)>> {
        if other.deltas.len() != self.deltas.len() {
            return Err(patch_err(
                &other.name,
                format!(
                    "patches {} tensors, '{}' patches {}",
                    other.deltas.len(),
                    self.name,
                    self.deltas.len()
                ),
            ));
        }
        self.deltas
            .iter()
            .map(|(t, a)| {
                let b = other
                    .deltas
                    .get(t)
                    .ok_or_else(|| MergeError::MissingTensor {
                        tensor: t.to_string(),
                        model: other.name.clone(),
                    })?;
                if a.shape() != b.shape() {
                    return Err(MergeError::ShapeMismatch {
                        tensor: t.to_string(),
                        model: other.name.clone(),
                        expected: a.shape().to_vec(),
                        got: b.shape().to_vec(),
                    });
                }
                Ok((t, a, b))
            })
            .collect()
    }

    /// Cosine similarity of the two signatures as flat vectors (over the
    /// same tensors); 0 when either is zero.
    pub fn cosine(&self, other: &Signature) -> Result<f64> {
        let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
        for (_, a, b) in self.paired(other)? {
            for (&x, &y) in a.data.iter().zip(b.data.iter()) {
                dot += x as f64 * y as f64;
                na += x as f64 * x as f64;
                nb += y as f64 * y as f64;
            }
        }
        Ok(if na > 0.0 && nb > 0.0 {
            dot / (na.sqrt() * nb.sqrt())
        } else {
            0.0
        })
    }

    /// `self − other` over the same tensors (e.g. a corruption's signature
    /// net of what fine-tuning on clean data alone moves).
    pub fn minus(&self, other: &Signature, name: &str) -> Result<Signature> {
        let deltas = self
            .paired(other)?
            .into_iter()
            .map(|(t, a, b)| (t.to_string(), Tensor::f32(&a.data - &b.data)))
            .collect();
        Ok(Signature {
            name: name.to_string(),
            deltas,
            model_layers: self.model_layers.clone(),
        })
    }

    /// Values it stores.
    pub fn numel(&self) -> usize {
        self.deltas.numel()
    }

    /// Bytes as f32.
    pub fn bytes_f32(&self) -> usize {
        4 * self.numel()
    }

    /// An error naming the first tensor of the signature that `model` lacks
    /// or shapes differently.
    pub fn check_fits(&self, model: &StateDict, model_name: &str) -> Result<()> {
        for (t, d) in self.deltas.iter() {
            let w = model.get(t).ok_or_else(|| {
                patch_err(
                    &self.name,
                    format!("patches '{t}', which the {model_name} does not have"),
                )
            })?;
            if w.shape() != d.shape() {
                return Err(patch_err(
                    &self.name,
                    format!(
                        "'{t}' is {:?} in the signature but {:?} in the {model_name}",
                        d.shape(),
                        w.shape()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Symmetric per-channel quantisation to `bits` (2–8): per output
    /// channel (axis 0; one scale for a 1-D tensor) the scale is
    /// `max |δ| / (2^(bits−1) − 1)`, each value `round(δ / scale)`.
    pub fn quantise(&self, bits: u8) -> Result<QuantisedSignature> {
        if !(2..=8).contains(&bits) {
            return Err(patch_err(
                &self.name,
                format!("{bits}-bit quantisation: bits must be 2 to 8"),
            ));
        }
        let qmax = ((1i32 << (bits - 1)) - 1) as f32;
        let tensors = self
            .deltas
            .iter()
            .map(|(t, d)| {
                let shape = d.shape().to_vec();
                let rows = if shape.len() >= 2 { shape[0] } else { 1 };
                let per_row = d.data.len() / rows.max(1);
                let flat: Vec<f32> = d.data.iter().copied().collect();
                let mut scales = Vec::with_capacity(rows);
                let mut codes = Vec::with_capacity(flat.len());
                for row in flat.chunks(per_row.max(1)) {
                    let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let s = m / qmax;
                    scales.push(s);
                    codes.extend(row.iter().map(|&v| {
                        if s > 0.0 {
                            (v / s).round().clamp(-qmax, qmax) as i8
                        } else {
                            0
                        }
                    }));
                }
                QuantisedTensor {
                    name: t.to_string(),
                    shape,
                    codes,
                    scales,
                }
            })
            .collect();
        Ok(QuantisedSignature {
            name: format!("{}@{bits}bit", self.name),
            bits,
            tensors,
            model_layers: self.model_layers.clone(),
        })
    }
}

/// One tensor of a [`QuantisedSignature`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantisedTensor {
    /// Tensor name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// One code per value, row-major.
    pub codes: Vec<i8>,
    /// One scale per row (axis 0), or one for a 1-D tensor.
    pub scales: Vec<f32>,
}

/// A signature stored as `bits`-bit codes with per-channel f32 scales.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantisedSignature {
    /// Name.
    pub name: String,
    /// Bits per code.
    pub bits: u8,
    /// The tensors.
    pub tensors: Vec<QuantisedTensor>,
    /// The source model's layers.
    pub model_layers: Vec<String>,
}

impl QuantisedSignature {
    /// Storage: the codes packed at `bits` per value (rounded up to a byte
    /// per tensor) plus 4 bytes per scale.
    pub fn bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| (t.codes.len() * self.bits as usize).div_ceil(8) + 4 * t.scales.len())
            .sum()
    }

    /// Back to f32 values `code · scale`.
    pub fn dequantise(&self) -> Signature {
        let deltas = self
            .tensors
            .iter()
            .map(|t| {
                let per_row = t.codes.len() / t.scales.len().max(1);
                let v: Vec<f32> = t
                    .codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| c as f32 * t.scales[i / per_row.max(1)])
                    .collect();
                (
                    t.name.clone(),
                    Tensor::f32(ArrayD::from_shape_vec(t.shape.clone(), v).expect("shape")),
                )
            })
            .collect();
        Signature {
            name: self.name.clone(),
            deltas,
            model_layers: self.model_layers.clone(),
        }
    }
}

/// A model with patches added, held in f64 so that removing them is exact.
#[derive(Clone, Debug)]
pub struct Patched {
    values: IndexMap<String, ArrayD<f64>>,
    template: StateDict,
}

fn check_alpha(sig: &Signature, alpha: f64) -> Result<()> {
    if !alpha.is_finite() {
        return Err(patch_err(
            &sig.name,
            format!("coefficient α = {alpha} is not a finite number"),
        ));
    }
    Ok(())
}

fn scaled(alpha: f64, d: f32) -> f64 {
    ((alpha as f32) * d) as f64
}

impl Patched {
    /// `model + Σ αᵢ·δᵢ`: every signature is checked against the model (its
    /// tensors present and shaped alike, α finite) before anything is added.
    pub fn new(model: &StateDict, patches: &[(&Signature, f64)]) -> Result<Patched> {
        let mut p = Patched {
            values: model
                .iter()
                .map(|(k, t)| (k.to_string(), t.data.mapv(|v| v as f64)))
                .collect(),
            template: model.clone(),
        };
        p.add(patches, 1.0)?;
        Ok(p)
    }

    fn add(&mut self, patches: &[(&Signature, f64)], sign: f64) -> Result<()> {
        for (sig, alpha) in patches {
            check_alpha(sig, *alpha)?;
            sig.check_fits(&self.template, "model")?;
        }
        for (sig, alpha) in patches {
            for (t, d) in sig.deltas.iter() {
                let v = self.values.get_mut(t).expect("checked");
                v.zip_mut_with(&d.data, |w, &x| *w += sign * scaled(*alpha, x));
            }
        }
        Ok(())
    }

    /// Removes patches: the list given to [`Patched::new`], subtracted in
    /// reverse order so that every intermediate sum is one the patching
    /// computed (and so exact).
    pub fn unpatch(mut self, patches: &[(&Signature, f64)]) -> Result<Patched> {
        let reversed: Vec<(&Signature, f64)> = patches.iter().rev().copied().collect();
        self.add(&reversed, -1.0)?;
        Ok(self)
    }

    /// The model in f32 (each value rounded once), with the input's dtypes
    /// and metadata.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd: StateDict = self
            .template
            .iter()
            .map(|(k, t)| {
                let data = self.values[k].mapv(|v| v as f32);
                (k.to_string(), Tensor::new(data, t.dtype))
            })
            .collect();
        sd.metadata = self.template.metadata.clone();
        sd
    }
}

/// `model + Σ αᵢ·δᵢ` in f32 (see [`Patched`]).
pub fn patch(model: &StateDict, patches: &[(&Signature, f64)]) -> Result<StateDict> {
    Ok(Patched::new(model, patches)?.to_state_dict())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(seed: u64) -> StateDict {
        let mut rng = weights::rng::Rng::new(seed);
        let mut t = |s: Vec<usize>| {
            let n: usize = s.iter().product();
            Tensor::f32(
                ArrayD::from_shape_vec(s, (0..n).map(|_| rng.normal() as f32 * 0.1).collect())
                    .unwrap(),
            )
        };
        let mut sd = StateDict::new();
        sd.insert("features.0.weight", t(vec![4, 1, 3, 3]));
        sd.insert("features.0.bias", t(vec![4]));
        sd.insert("classifier.0.weight", t(vec![3, 8]));
        sd.insert("classifier.0.bias", t(vec![3]));
        sd
    }

    #[test]
    fn extraction_layers_and_norms_by_hand() {
        let clean = model(1);
        let mut robust = clean.clone();
        robust.get_mut("features.0.bias").unwrap().data[[0]] += 3.0;
        robust.get_mut("classifier.0.weight").unwrap().data[[1, 2]] -= 4.0;
        let s = Signature::extract("gauss", &clean, &robust).unwrap();
        assert_eq!(s.model_layers, ["features.0", "classifier.0"]);
        let norms = s.layer_norms(&clean).unwrap();
        let w0 = (sq_norm(clean.get("features.0.weight").unwrap())
            + sq_norm(clean.get("features.0.bias").unwrap()))
        .sqrt();
        assert!((norms[0].delta - 3.0).abs() < 1e-5, "{norms:?}");
        assert!((norms[0].relative - 3.0 / w0).abs() < 1e-5);
        assert!((norms[1].delta - 4.0).abs() < 1e-5);
        let first = s.first_layers(1).unwrap();
        assert_eq!(first.layers(), ["features.0"]);
        assert_eq!(first.numel(), 40);
        // Cosine: with itself 1, with its negation −1, with a disjoint patch 0.
        assert!((s.cosine(&s).unwrap() - 1.0).abs() < 1e-12);
        let mut neg = s.clone();
        for (_, t) in neg.deltas.iter_mut() {
            t.data.mapv_inplace(|v| -v);
        }
        assert!((s.cosine(&neg).unwrap() + 1.0).abs() < 1e-12);
        let mut other = clean.clone();
        other.get_mut("features.0.bias").unwrap().data[[1]] += 1.0;
        let o = Signature::extract("o", &clean, &other).unwrap();
        assert_eq!(s.cosine(&o).unwrap(), 0.0);
        // Net of another signature: robust − other, tensor by tensor.
        let net = s.minus(&o, "net").unwrap();
        assert_eq!(net.deltas.get("features.0.bias").unwrap().data[[1]], -1.0);
        assert_eq!(
            net.deltas.get("classifier.0.weight").unwrap().data[[1, 2]],
            s.deltas.get("classifier.0.weight").unwrap().data[[1, 2]]
        );
        assert!(s.minus(&first, "x").is_err());
    }

    #[test]
    fn patch_then_unpatch_is_the_identity_bit_for_bit() {
        let clean = model(2);
        let sigs: Vec<Signature> = (10..13)
            .map(|k| Signature::extract(&format!("s{k}"), &clean, &model(k)).unwrap())
            .collect();
        // Awkward coefficients, zeros, and a tiny weight next to a big patch.
        let mut clean = clean;
        clean.get_mut("classifier.0.bias").unwrap().data[[0]] = 0.0;
        clean.get_mut("classifier.0.bias").unwrap().data[[1]] = 1e-7;
        for patches in [
            vec![(&sigs[0], 1.0)],
            vec![(&sigs[0], 0.3), (&sigs[1], -1.7)],
            vec![(&sigs[0], 1.0 / 3.0), (&sigs[1], 2.5), (&sigs[2], 0.1)],
        ] {
            let p = Patched::new(&clean, &patches).unwrap();
            assert_ne!(p.to_state_dict(), clean);
            let back = p.unpatch(&patches).unwrap().to_state_dict();
            for (k, t) in clean.iter() {
                let same = t
                    .data
                    .iter()
                    .zip(back.get(k).unwrap().data.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{k} not restored bit for bit");
            }
        }
        // α = 1 of a signature gives the robust model back (to f32 rounding).
        let robust = model(10);
        let s = Signature::extract("r", &clean, &robust).unwrap();
        let p = patch(&clean, &[(&s, 1.0)]).unwrap();
        for (k, t) in robust.iter() {
            let d = (&t.data - &p.get(k).unwrap().data).mapv(f32::abs);
            assert!(d.iter().all(|&v| v < 1e-6), "{k}");
        }
    }

    #[test]
    fn quantisation_error_is_within_half_a_scale() {
        let clean = model(3);
        let s = Signature::extract("q", &clean, &model(4)).unwrap();
        for bits in [8u8, 4, 2] {
            let q = s.quantise(bits).unwrap();
            let back = q.dequantise();
            for (t, qt) in q.tensors.iter().map(|t| (t.name.as_str(), t)) {
                let d = s.deltas.get(t).unwrap();
                let per_row = qt.codes.len() / qt.scales.len();
                let qmax = ((1i32 << (bits - 1)) - 1) as f32;
                for (i, (a, b)) in d
                    .data
                    .iter()
                    .zip(back.deltas.get(t).unwrap().data.iter())
                    .enumerate()
                {
                    let scale = qt.scales[i / per_row];
                    assert!((a - b).abs() <= scale / 2.0 + 1e-7, "{t}[{i}] {a} vs {b}");
                    assert!((qt.codes[i] as f32).abs() <= qmax);
                }
                // The largest value of each row is represented exactly.
                if d.shape().len() >= 2 {
                    assert_eq!(qt.scales.len(), d.shape()[0], "{t}: one scale per channel");
                } else {
                    assert_eq!(qt.scales.len(), 1);
                }
            }
            // Bytes: codes packed plus 4 per scale (4 + 1 + 3 + 1 scales).
            let codes = [36usize, 4, 24, 3]
                .iter()
                .map(|n| (n * bits as usize).div_ceil(8))
                .sum::<usize>();
            assert_eq!(q.bytes(), codes + 4 * 9);
        }
        let e = s.quantise(1).unwrap_err().to_string();
        assert!(e.contains("q") && e.contains("1-bit"), "{e}");
    }

    #[test]
    fn bad_patches_are_named_before_anything_changes() {
        let clean = model(5);
        let s = Signature::extract("gauss", &clean, &model(6)).unwrap();
        let e = Patched::new(&clean, &[(&s, f64::NAN)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gauss") && e.contains("not a finite"), "{e}");
        let e = s.first_layers(3).unwrap_err().to_string();
        assert!(e.contains("k = 3") && e.contains("has 2"), "{e}");
        assert!(s.first_layers(0).is_err());
        let mut other = clean.clone();
        other.insert(
            "classifier.0.weight",
            Tensor::f32(ArrayD::zeros(vec![3, 9])),
        );
        let e = Patched::new(&other, &[(&s, 1.0)]).unwrap_err().to_string();
        assert!(
            e.contains("classifier.0.weight") && e.contains("[3, 9]"),
            "{e}"
        );
        other.remove("classifier.0.weight");
        let e = Patched::new(&other, &[(&s, 1.0)]).unwrap_err().to_string();
        assert!(e.contains("does not have"), "{e}");
        let e = Signature::extract("x", &clean, &other)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("classifier.0.weight") && e.contains("robust"),
            "{e}"
        );
        let mut nan = clean.clone();
        nan.get_mut("features.0.bias").unwrap().data[[2]] = f32::INFINITY;
        let e = Signature::extract("x", &clean, &nan)
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite"), "{e}");
    }
}
