//! Sub-MoE: compressing a mixture-of-experts layer by merging its experts in
//! a shared subspace (Li, Zhu, Wang, Li, Gu, Han and Guo, "Sub-MoE: Efficient
//! Mixture-of-Expert LLMs Compression via Subspace Expert Merging", 2025,
//! arXiv 2506.23266), with the two baselines the paper compares against:
//! frequency pruning and plain averaging within clusters.
//!
//! The layer is Mixtral's: a router `G ∈ ℝ^{E×h}` and `E` experts
//! `E_i(x) = W2 · (silu(W1 x) ⊙ (W3 x))` with `W1` (gate_proj) and `W3`
//! (up_proj) of shape `[ffn, hidden]` and `W2` (down_proj) `[hidden, ffn]`, in
//! Hugging Face's `[out, in]` layout; a token goes to the top-k experts of
//! `softmax(G x)`, weighted by their renormalised probabilities. Everything
//! here is plain ndarray: the caller runs the model on calibration prompts and
//! hands in the experts' outputs and the router's hidden states.
//!
//! # What the method does, and where each rule comes from
//!
//! Sources read: the paper (sections 3.2–3.4, eqs. 2–12); the authors'
//! experimental code `Chooovy/MoE_Merge` (paths `/aifs4su/lilujun/SVD-MoE-merge`,
//! `component/merge_mixtral_SVDWmerge_share{U,V,UV}.py`), which holds their
//! joint-SVD building blocks but no clustering; and the public
//! reimplementation `zhy617/SMoE` (`src/qwen/analysis/direct_expert_similarity.py`,
//! `src/qwen/compress/kmeans_cluster.py`, `src/qwen/compress/merge_experts.py`).
//! The code the paper announces (`lliai/MoERazor`) could not be found.
//!
//! 1. **Clustering features** ([`expert_similarity`], [`cluster_experts`]).
//!    Eq. 2: `Sim(E_i, E_j) = (1/m) Σ_l cos(E_i(x_l), E_j(x_l))`, the mean over
//!    the `m` calibration tokens of the per-token cosine of the two experts'
//!    outputs (not the cosine of the flattened outputs); zhy617/SMoE computes
//!    exactly that (with `ε = 1e-8` in the denominator, i.e. a zero output
//!    counts as cosine 0) and sets the diagonal to 1. The paper then runs
//!    k-means with k-means++ seeding; zhy617/SMoE runs scikit-learn's
//!    `KMeans(init="k-means++", n_init=10)` on the rows of the distance matrix
//!    `1 − Sim`, i.e. each expert's feature vector is its row of similarities
//!    (Euclidean distances between rows of `1 − Sim` equal those between rows
//!    of `Sim`). [`cluster_experts`] does that with [`crate::lora::kmeans`]
//!    and ten seeded restarts, keeping the lowest inertia. (The paper's text
//!    also writes the centroids as means of the output collections `𝒴_j`;
//!    we follow the code, which is what was run.) The paper's multi-layer
//!    joint allocation of cluster counts is not implemented: `k` is per layer.
//! 2. **Experts Union Decomposition** ([`union_merge`]). For each weight kind
//!    separately (`W1`, `W3` and `W2`, never mixed), the cluster's `n` matrices
//!    `W^{(i)} ∈ ℝ^{O×I}` are concatenated along the **input** axis,
//!    `M = [W^{(1)}, …, W^{(n)}] ∈ ℝ^{O × nI}`, and `M = U Σ [V^{(1)}; …; V^{(n)}]ᵀ`
//!    (eq. 5: the paper says "vertically" and writes `;`, but its shapes
//!    `U ∈ ℝ^{O×r}`, `V ∈ ℝ^{r×nI}` mean side by side). So the shared `U`
//!    spans the **output** space of every kind: `[ffn, n·hidden]` with `U` of
//!    `ffn` rows for `W1`/`W3`, `[hidden, n·ffn]` with `U` of `hidden` rows for
//!    `W2`. Both codes do the same (zhy617: `torch.cat(weights, dim=1)` on
//!    `[out, in]` weights; the authors' `shareU` file:
//!    `torch.stack(w, dim=1).reshape(out, -1)`), and Sub-MoE†'s whitening
//!    `W_i S_i` with `S_i` acting on the input (eqs. 10–11) only fits that
//!    orientation. The authors' code also tried the transpose (stacking along
//!    the output axis and sharing `V`, `SVDWmerge_shareUV.py`);
//!    [`SharedBasis::Input`] offers it for ablations.
//! 3. **V merging** (eq. 7): `V_merged = Σ_{i∈Q} f_i V^{(i)} / Σ_{i∈Q} f_i` with
//!    `f_i` the routing frequency of eq. 6 (fraction of calibration tokens whose
//!    top-k contains expert `i`, [`router_frequencies`]; any non-negative scale
//!    works, raw counts too); if every member has frequency 0 the members
//!    count equally (zhy617/SMoE's fallback). Reconstruction (eq. 8):
//!    `W_merged = U Σ V_mergedᵀ`. Note what this is at full rank: every block
//!    is reproduced exactly, `W^{(i)} = U Σ V^{(i)ᵀ}`, so
//!    `W_merged = Σ f_i W^{(i)} / Σ f_i` — the frequency-weighted average.
//!    The subspace only changes the result once it is truncated (item 5):
//!    `U_r Σ_r V^{(i)ᵀ}_r = U_r U_rᵀ W^{(i)}`, so
//!    `W_merged = U_r U_rᵀ · Σ f_i W^{(i)} / Σ f_i`, the weighted average
//!    projected onto the cluster's top-`r` shared output subspace.
//!    Singleton clusters at full rank are copied (as zhy617/SMoE does).
//! 4. **Router** ([`RouterMerge`]). The paper says nothing about the gate. The
//!    authors' code keeps all experts and so never changes it; zhy617/SMoE
//!    gives each merged expert the frequency-weighted mean of its members'
//!    gate rows, `g_Q = Σ f_i g_i / Σ f_i` (its default), optionally with a
//!    bias `τ ln f_Q` (a "logit adjustment" Mixtral's bias-free gate cannot
//!    hold). We use that mean ([`RouterMerge::FrequencyMean`], default) or the
//!    plain mean. The exact router of "the cluster gets the tokens its members
//!    got" would be the logit `log Σ_{i∈Q} exp(g_i · x)`, which is not linear
//!    in `x`; the weighted mean is its first-order (equal-logit) form up to the
//!    constant `ln |Q|`, which a bias-free gate cannot carry either.
//! 5. **Intra-expert rank reduction** (Sub-MoE†, section 3.4,
//!    [`SubMoeOptions::rank`]): keep the top `r` singular triplets before
//!    reconstruction, `W_merged = U_r Σ_r V_{merged,r}ᵀ`. The discarded
//!    energy `Σ_{j>r} σ_j²` of the concatenation equals
//!    `Σ_i ‖W^{(i)} − U_r Σ_r V^{(i)ᵀ}_r‖²_F` (Eckart–Young), reported per
//!    member. The storage of a merged weight is then the two factors
//!    `A = U_r Σ_r ∈ ℝ^{O×r}` (the paper folds `Σ` into `U`, its footnote 2)
//!    and `B = V_{merged,r}ᵀ ∈ ℝ^{r×I}`, `r (O + I)` numbers instead of `O I`;
//!    [`UnionMerge`] returns them and [`SubMoeReport`] counts them. The paper's
//!    activation-aware whitening of Sub-MoE† (`W_i S_i`, de-whitened `V`) is
//!    not implemented: the truncation here is the plain SVD one.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, s};
use serde::{Deserialize, Serialize};
use spectra::linalg::thin_svd;

use crate::{MergeError, Result};

fn moe(what: impl Into<String>, msg: impl Into<String>) -> MergeError {
    MergeError::Moe {
        what: what.into(),
        msg: msg.into(),
    }
}

fn check_finite_f32(what: &str, a: &ArrayView2<f32>) -> Result<()> {
    match a.iter().position(|v| !v.is_finite()) {
        Some(p) => {
            let cols = a.ncols().max(1);
            Err(moe(
                what,
                format!(
                    "non-finite value {} at [{}, {}]",
                    a.iter().nth(p).expect("position found"),
                    p / cols,
                    p % cols
                ),
            ))
        }
        None => Ok(()),
    }
}

/// The three weights of one Mixtral expert, in Hugging Face's `[out, in]`
/// layout: `E(x) = w2 · (silu(w1 x) ⊙ (w3 x))`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertWeights {
    /// gate_proj (Mixtral's `w1`), `[ffn, hidden]`.
    pub w1: Array2<f32>,
    /// down_proj (`w2`), `[hidden, ffn]`.
    pub w2: Array2<f32>,
    /// up_proj (`w3`), `[ffn, hidden]`.
    pub w3: Array2<f32>,
}

/// Which weight of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightKind {
    /// gate_proj, `[ffn, hidden]`.
    W1,
    /// down_proj, `[hidden, ffn]`.
    W2,
    /// up_proj, `[ffn, hidden]`.
    W3,
}

impl WeightKind {
    /// The three kinds, in the order `w1, w2, w3`.
    pub const ALL: [WeightKind; 3] = [WeightKind::W1, WeightKind::W2, WeightKind::W3];

    /// Mixtral's field name (`w1`, `w2`, `w3`).
    pub fn name(self) -> &'static str {
        match self {
            WeightKind::W1 => "w1",
            WeightKind::W2 => "w2",
            WeightKind::W3 => "w3",
        }
    }
}

impl ExpertWeights {
    /// The weight of `kind`.
    pub fn get(&self, kind: WeightKind) -> &Array2<f32> {
        match kind {
            WeightKind::W1 => &self.w1,
            WeightKind::W2 => &self.w2,
            WeightKind::W3 => &self.w3,
        }
    }

    fn get_mut(&mut self, kind: WeightKind) -> &mut Array2<f32> {
        match kind {
            WeightKind::W1 => &mut self.w1,
            WeightKind::W2 => &mut self.w2,
            WeightKind::W3 => &mut self.w3,
        }
    }

    /// Number of parameters, `3 · ffn · hidden`.
    pub fn params(&self) -> usize {
        self.w1.len() + self.w2.len() + self.w3.len()
    }

    /// Checks that the shapes agree with `[ffn, hidden]` (`w1`, `w3`) and
    /// `[hidden, ffn]` (`w2`), non-empty, and that every value is finite;
    /// errors name `what.w1` etc.
    pub fn check(&self, what: &str, hidden: usize, ffn: usize) -> Result<()> {
        for kind in WeightKind::ALL {
            let w = self.get(kind);
            let expected = match kind {
                WeightKind::W2 => [hidden, ffn],
                _ => [ffn, hidden],
            };
            let name = format!("{what}.{}", kind.name());
            if w.shape() != expected {
                let role = match kind {
                    WeightKind::W1 => "gate_proj is [ffn, hidden]",
                    WeightKind::W2 => "down_proj is [hidden, ffn]",
                    WeightKind::W3 => "up_proj is [ffn, hidden]",
                };
                return Err(moe(
                    name,
                    format!("shape {:?}, expected {expected:?} ({role})", w.shape()),
                ));
            }
            check_finite_f32(&name, &w.view())?;
        }
        Ok(())
    }

    /// The expert's output on each row of `x` (`[tokens, hidden]` →
    /// `[tokens, hidden]`): `w2 · (silu(w1 x) ⊙ (w3 x))`, `silu(z) = z / (1 + e^{−z})`.
    ///
    /// # Panics
    /// If `x` has not `hidden` columns.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut h = x.dot(&self.w1.t());
        let up = x.dot(&self.w3.t());
        h.zip_mut_with(&up, |g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
        h.dot(&self.w2.t())
    }
}

/// One mixture-of-experts layer in Mixtral's form.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeLayer {
    /// Router, `[experts, hidden]`: logits `gate · x`.
    pub gate: Array2<f32>,
    /// The experts, in router-row order.
    pub experts: Vec<ExpertWeights>,
}

impl MoeLayer {
    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Hidden size (the router's columns).
    pub fn hidden(&self) -> usize {
        self.gate.ncols()
    }

    /// Intermediate size (rows of the first expert's `w1`; 0 without experts).
    pub fn ffn(&self) -> usize {
        self.experts.first().map_or(0, |e| e.w1.nrows())
    }

    /// Number of parameters: router plus experts.
    pub fn params(&self) -> usize {
        self.gate.len()
            + self
                .experts
                .iter()
                .map(ExpertWeights::params)
                .sum::<usize>()
    }

    /// Checks the layer: at least one expert, a router of one row per expert,
    /// every expert of the first one's shapes, nothing empty or non-finite.
    /// Errors name the field under `what` (`what.gate`,
    /// `what.experts[3].w2`, ...).
    pub fn check(&self, what: &str) -> Result<()> {
        let n = self.experts.len();
        if n == 0 {
            return Err(moe(format!("{what}.experts"), "the layer has no experts"));
        }
        let (h, f) = (self.gate.ncols(), self.ffn());
        if self.gate.nrows() != n {
            return Err(moe(
                format!("{what}.gate"),
                format!(
                    "shape {:?}, expected [{n}, hidden] (one router row per expert, {n} experts)",
                    self.gate.shape()
                ),
            ));
        }
        if h == 0 || f == 0 {
            return Err(moe(
                format!("{what}.experts[0].w1"),
                format!("empty dimension: hidden {h}, ffn {f}"),
            ));
        }
        check_finite_f32(&format!("{what}.gate"), &self.gate.view())?;
        for (i, e) in self.experts.iter().enumerate() {
            e.check(&format!("{what}.experts[{i}]"), h, f)?;
        }
        Ok(())
    }

    /// The layer's output on each row of `x` (`[tokens, hidden]`) with
    /// Mixtral's routing: the `top_k` largest router logits (ties to the lower
    /// index), their softmax probabilities renormalised over the top-k, and
    /// `y = Σ_top-k p_i E_i(x)`.
    pub fn forward(&self, x: ArrayView2<f32>, top_k: usize) -> Result<Array2<f32>> {
        self.check("layer")?;
        check_tokens("x", x, self.hidden())?;
        check_top_k(top_k, self.num_experts())?;
        let logits = router_logits(self.gate.view(), x);
        let mut out = Array2::<f32>::zeros((x.nrows(), self.hidden()));
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.num_experts()];
        for (t, row) in logits.outer_iter().enumerate() {
            let top = top_k_indices(row, top_k);
            let m = row[top[0]];
            let ws: Vec<f64> = top.iter().map(|&e| (row[e] - m).exp()).collect();
            let z: f64 = ws.iter().sum();
            for (&e, w) in top.iter().zip(ws) {
                routed[e].push((t, (w / z) as f32));
            }
        }
        for (e, tokens) in routed.iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let idx: Vec<usize> = tokens.iter().map(|&(t, _)| t).collect();
            let y = self.experts[e].forward(x.select(Axis(0), &idx).view());
            for (row, &(t, p)) in y.outer_iter().zip(tokens) {
                out.row_mut(t).scaled_add(p, &row);
            }
        }
        Ok(out)
    }
}

fn check_tokens(what: &str, x: ArrayView2<f32>, hidden: usize) -> Result<()> {
    if x.nrows() == 0 {
        return Err(moe(what, "no tokens (0 rows)"));
    }
    if x.ncols() != hidden {
        return Err(moe(
            what,
            format!(
                "shape {:?}, expected [tokens, {hidden}] (the router's hidden size)",
                x.shape()
            ),
        ));
    }
    check_finite_f32(what, &x)
}

fn check_top_k(top_k: usize, experts: usize) -> Result<()> {
    if top_k == 0 || top_k > experts {
        return Err(moe(
            "top_k",
            format!("{top_k} must be in 1..={experts} (the number of experts)"),
        ));
    }
    Ok(())
}

/// Router logits `[tokens, experts]` in f64.
fn router_logits(gate: ArrayView2<f32>, x: ArrayView2<f32>) -> Array2<f64> {
    let g = gate.mapv(f64::from);
    x.mapv(f64::from).dot(&g.t())
}

/// Indices of the `k` largest entries, largest first, ties to the lower index.
fn top_k_indices(row: ArrayView1<f64>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routing frequencies (Sub-MoE eq. 6): for each expert, the fraction of the
/// tokens (rows of `hidden`, `[tokens, hidden]`, the router's inputs) whose
/// top-`top_k` experts under Mixtral's routing `softmax(gate · x)` contain it,
/// `f_i = |{x : i ∈ TopK(G x, k)}| / |𝒳|`. The frequencies sum to `top_k`.
/// Softmax is monotone, so the top-k of the logits is taken; ties go to the
/// lower index (torch's `topk` leaves them unspecified).
pub fn router_frequencies(
    gate: ArrayView2<f32>,
    hidden: ArrayView2<f32>,
    top_k: usize,
) -> Result<Vec<f64>> {
    let e = gate.nrows();
    if e == 0 || gate.ncols() == 0 {
        return Err(moe(
            "gate",
            format!("empty router of shape {:?}", gate.shape()),
        ));
    }
    check_finite_f32("gate", &gate)?;
    check_tokens("hidden", hidden, gate.ncols())?;
    check_top_k(top_k, e)?;
    let logits = router_logits(gate, hidden);
    let mut counts = vec![0usize; e];
    for row in logits.outer_iter() {
        for i in top_k_indices(row, top_k) {
            counts[i] += 1;
        }
    }
    let t = hidden.nrows() as f64;
    Ok(counts.into_iter().map(|c| c as f64 / t).collect())
}

/// Expert output similarity (Sub-MoE eq. 2): `outputs[i]` is expert `i`'s
/// output `[tokens, hidden]` on the same calibration tokens, and
/// `S_ij = (1/m) Σ_l E_i(x_l)·E_j(x_l) / (‖E_i(x_l)‖ ‖E_j(x_l)‖)`, the mean over
/// the `m` tokens of the per-token cosine (a token where either output is zero
/// counts 0, as the `ε` of zhy617/SMoE makes it); the diagonal is 1. f64
/// arithmetic; symmetric.
pub fn expert_similarity(outputs: &[ArrayView2<f32>]) -> Result<Array2<f64>> {
    let n = outputs.len();
    let first = outputs
        .first()
        .ok_or_else(|| moe("outputs", "no experts' outputs"))?;
    let (m, h) = first.dim();
    if m == 0 || h == 0 {
        return Err(moe(
            "outputs[0]",
            format!("empty output of shape {:?}", first.shape()),
        ));
    }
    for (i, o) in outputs.iter().enumerate() {
        let what = format!("outputs[{i}]");
        if o.dim() != (m, h) {
            return Err(moe(
                what,
                format!(
                    "shape {:?}, expected [{m}, {h}] (outputs[0]'s: the same tokens for every expert)",
                    o.shape()
                ),
            ));
        }
        check_finite_f32(&what, o)?;
    }
    let wide: Vec<Array2<f64>> = outputs.iter().map(|o| o.mapv(f64::from)).collect();
    let norms: Vec<Array1<f64>> = wide
        .iter()
        .map(|o| o.map_axis(Axis(1), |r| r.dot(&r).sqrt()))
        .collect();
    let mut sim = Array2::<f64>::eye(n);
    for i in 0..n {
        for j in i + 1..n {
            let mut total = 0.0;
            let tokens = wide[i].outer_iter().zip(wide[j].outer_iter());
            for ((a, b), d) in tokens.zip(&norms[i] * &norms[j]) {
                if d > 0.0 {
                    total += a.dot(&b) / d;
                }
            }
            sim[[i, j]] = total / m as f64;
            sim[[j, i]] = sim[[i, j]];
        }
    }
    Ok(sim)
}

/// Adaptive expert clustering (Sub-MoE section 3.2): k-means with k-means++
/// seeding ([`crate::lora::kmeans`]) of the experts, each represented by its
/// row of the similarity matrix (`similarity`, `n × n`, e.g. from
/// [`expert_similarity`]) — what zhy617/SMoE runs (scikit-learn on the rows of
/// `1 − S`, the same Euclidean geometry). As scikit-learn's `n_init=10`, ten
/// restarts with seeds drawn from `seed` are run and the lowest inertia
/// `Σ ‖row − centroid‖²` kept (the first on ties).
///
/// Returns each expert's cluster in `0..k`, numbered in order of first
/// appearance (expert 0 is in cluster 0); every cluster is non-empty: if
/// k-means leaves one empty (duplicate rows), the expert farthest from its
/// centroid in the largest cluster is moved into it.
pub fn cluster_experts(similarity: ArrayView2<f64>, k: usize, seed: u64) -> Result<Vec<usize>> {
    let n = similarity.nrows();
    if n == 0 || similarity.ncols() != n {
        return Err(moe(
            "similarity",
            format!(
                "shape {:?}, expected a non-empty square [experts, experts] matrix",
                similarity.shape()
            ),
        ));
    }
    if let Some(p) = similarity.iter().position(|v| !v.is_finite()) {
        return Err(moe(
            "similarity",
            format!("non-finite value at [{}, {}]", p / n, p % n),
        ));
    }
    if k == 0 || k > n {
        return Err(moe(
            "k",
            format!("{k} clusters must be in 1..={n} (the number of experts)"),
        ));
    }
    let x = similarity.mapv(|v| v as f32);
    let dist = |a: ArrayView1<f32>, b: ArrayView1<f32>| -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2))
            .sum()
    };
    let mut rng = weights::rng::Rng::new(seed);
    let mut best: Option<(f64, Array2<f32>, Vec<usize>)> = None;
    for _ in 0..10 {
        let (c, assign) = crate::lora::kmeans(x.view(), k, rng.next_u64())?;
        let inertia: f64 = (0..n).map(|i| dist(x.row(i), c.row(assign[i]))).sum();
        if best.as_ref().is_none_or(|(b, _, _)| inertia < *b) {
            best = Some((inertia, c, assign));
        }
    }
    let (_, c, mut assign) = best.expect("ten restarts ran");
    // Fill empty clusters from the largest one.
    loop {
        let mut sizes = vec![0usize; k];
        assign.iter().for_each(|&a| sizes[a] += 1);
        let Some(empty) = sizes.iter().position(|&s| s == 0) else {
            break;
        };
        let largest = (0..k)
            .max_by(|&a, &b| sizes[a].cmp(&sizes[b]).then(b.cmp(&a)))
            .expect("k > 0");
        let far = (0..n)
            .filter(|&i| assign[i] == largest)
            .max_by(|&a, &b| {
                dist(x.row(a), c.row(largest))
                    .total_cmp(&dist(x.row(b), c.row(largest)))
                    .then(b.cmp(&a))
            })
            .expect("the largest cluster has members");
        assign[far] = empty;
    }
    // Canonical numbering: by first appearance.
    let mut map = vec![usize::MAX; k];
    let mut next = 0;
    for a in assign.iter_mut() {
        if map[*a] == usize::MAX {
            map[*a] = next;
            next += 1;
        }
        *a = map[*a];
    }
    Ok(assign)
}

/// The members of each cluster of `assignment` (labels `0..k`, none empty).
fn clusters_of(assignment: &[usize], n: usize) -> Result<Vec<Vec<usize>>> {
    if assignment.len() != n {
        return Err(moe(
            "assignment",
            format!(
                "{} labels for {n} experts (one cluster label per expert)",
                assignment.len()
            ),
        ));
    }
    let k = assignment.iter().max().map_or(0, |&m| m + 1);
    let mut clusters = vec![Vec::new(); k];
    for (i, &a) in assignment.iter().enumerate() {
        clusters[a].push(i);
    }
    if let Some(c) = clusters.iter().position(Vec::is_empty) {
        return Err(moe(
            "assignment",
            format!(
                "cluster {c} has no experts: labels must cover 0..{k} (the number of merged experts) with none empty"
            ),
        ));
    }
    Ok(clusters)
}

fn check_frequencies(frequencies: &[f64], n: usize) -> Result<()> {
    if frequencies.len() != n {
        return Err(moe(
            "frequencies",
            format!(
                "{} values for {n} experts (one routing frequency per expert)",
                frequencies.len()
            ),
        ));
    }
    if let Some(i) = frequencies.iter().position(|f| !f.is_finite() || *f < 0.0) {
        return Err(moe(
            "frequencies",
            format!(
                "value {} of expert {i} is not a finite non-negative number",
                frequencies[i]
            ),
        ));
    }
    Ok(())
}

/// `f_i / Σ f` over `members`, or equal weights if they sum to 0.
fn cluster_coefficients(frequencies: Option<&[f64]>, members: &[usize]) -> Vec<f64> {
    let n = members.len() as f64;
    let f: Vec<f64> = match frequencies {
        Some(freq) => members.iter().map(|&i| freq[i]).collect(),
        None => vec![1.0; members.len()],
    };
    let total: f64 = f.iter().sum();
    if total > 0.0 {
        f.iter().map(|v| v / total).collect()
    } else {
        vec![1.0 / n; members.len()]
    }
}

/// Which side of each weight the members of a cluster share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum SharedBasis {
    /// The paper's: concatenate `[W^{(1)}, …, W^{(n)}]` along the input axis,
    /// share `U` (output space), merge the `V` blocks.
    #[default]
    Output,
    /// The transpose (the authors' `shareUV` experiment): stack along the
    /// output axis, share `V` (input space), merge the `U` blocks.
    Input,
}

/// How the router row of a merged cluster is formed (see the module docs,
/// item 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum RouterMerge {
    /// `g_Q = Σ_{i∈Q} f_i g_i / Σ_{i∈Q} f_i` (zhy617/SMoE), equal weights if
    /// every member's frequency is 0.
    #[default]
    FrequencyMean,
    /// `g_Q = (1/|Q|) Σ_{i∈Q} g_i`.
    Mean,
}

/// Options of [`submoe_merge`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SubMoeOptions {
    /// Intra-expert rank `r` (Sub-MoE†): keep the top `r` singular triplets of
    /// each concatenation. `None`: full rank, no truncation (singletons are
    /// copied). A rank at or above `min(O, nI)` keeps everything. Must not be 0.
    pub rank: Option<usize>,
    /// Which side the cluster shares (the paper's: [`SharedBasis::Output`]).
    pub shared: SharedBasis,
    /// How the merged router rows are formed.
    pub router: RouterMerge,
}

/// One Experts Union Decomposition and V merge ([`union_merge`]).
#[derive(Clone, Debug)]
pub struct UnionMerge {
    /// Left factor `[O, r]`: `U_r Σ_r` for [`SharedBasis::Output`]
    /// (`V_{merged,r}` for `Input`).
    pub a: Array2<f32>,
    /// Right factor `[r, I]`: `V_{merged,r}ᵀ` for `Output` (`(U_r Σ_r)ᵀ` for
    /// `Input`); `a · b` is the merged weight.
    pub b: Array2<f32>,
    /// The merged weight `[O, I]` (computed in f64 from the factors).
    pub merged: Array2<f32>,
    /// Singular values of the concatenation, descending (`min(O, nI)` of them).
    pub singular_values: Vec<f64>,
    /// Kept rank `r`.
    pub rank: usize,
    /// `Σ_{j<r} σ_j²`.
    pub kept_energy: f64,
    /// `Σ_{j≥r} σ_j²`.
    pub discarded_energy: f64,
    /// Per member, `‖W^{(i)} − U_r Σ_r V^{(i)ᵀ}_r‖²_F` (its own block
    /// reconstructed from the shared basis); they sum to `discarded_energy`.
    pub subspace_sq_errors: Vec<f64>,
    /// Per member, `‖W^{(i)}‖²_F`.
    pub sq_norms: Vec<f64>,
}

/// Experts Union Decomposition and frequency-based V merging (Sub-MoE eqs.
/// 5, 7, 8, 12) of one weight kind of one cluster: `weights` are the members'
/// matrices (`[O, I]` each, the same shape), `coefficients` their
/// non-negative frequencies `f_i` (normalised here; equal weights if all 0),
/// `rank` the optional truncation. With [`SharedBasis::Output`],
/// `[W^{(1)}, …, W^{(n)}] = U Σ [V^{(1)}; …]ᵀ` (thin SVD in f64) and
/// `W_merged = U_r Σ_r (Σ f_i V^{(i)}_r / Σ f_i)ᵀ`; with `Input` the same on the
/// transposes. `what` names errors (`what[2]`, `what.coefficients`, ...).
pub fn union_merge(
    weights: &[ArrayView2<f32>],
    coefficients: &[f64],
    rank: Option<usize>,
    shared: SharedBasis,
    what: &str,
) -> Result<UnionMerge> {
    let n = weights.len();
    let first = weights
        .first()
        .ok_or_else(|| moe(what, "no matrices to merge"))?;
    let shape = first.dim();
    if shape.0 == 0 || shape.1 == 0 {
        return Err(moe(
            format!("{what}[0]"),
            format!("empty matrix of shape {:?}", first.shape()),
        ));
    }
    for (i, w) in weights.iter().enumerate() {
        let name = format!("{what}[{i}]");
        if w.dim() != shape {
            return Err(moe(
                name,
                format!(
                    "shape {:?}, expected {:?} (the first member's)",
                    w.shape(),
                    first.shape()
                ),
            ));
        }
        check_finite_f32(&name, w)?;
    }
    if coefficients.len() != n {
        return Err(moe(
            format!("{what}.coefficients"),
            format!("{} values for {n} matrices", coefficients.len()),
        ));
    }
    if let Some(i) = coefficients.iter().position(|f| !f.is_finite() || *f < 0.0) {
        return Err(moe(
            format!("{what}.coefficients"),
            format!(
                "value {} of member {i} is not a finite non-negative number",
                coefficients[i]
            ),
        ));
    }
    if rank == Some(0) {
        return Err(moe("rank", "must be at least 1 (None keeps the full rank)"));
    }
    let coef = cluster_coefficients(Some(coefficients), &(0..n).collect::<Vec<_>>());
    // Orient so that the shared factor is on the left.
    let oriented: Vec<ArrayView2<f32>> = match shared {
        SharedBasis::Output => weights.to_vec(),
        SharedBasis::Input => weights.iter().map(|w| w.t()).collect(),
    };
    let (o, i_dim) = oriented[0].dim();
    let mut m = Array2::<f64>::zeros((o, n * i_dim));
    for (j, w) in oriented.iter().enumerate() {
        m.slice_mut(s![.., j * i_dim..(j + 1) * i_dim])
            .zip_mut_with(w, |d, &v| *d = f64::from(v));
    }
    let svd = thin_svd(m.view(), what)?;
    let q = svd.s.len();
    let r = rank.map_or(q, |r| r.min(q));
    let energy = |range: std::ops::Range<usize>| -> f64 { range.map(|j| svd.s[j].powi(2)).sum() };
    let left = &svd.u.slice(s![.., ..r]) * &svd.s.slice(s![..r]);
    let mut right = Array2::<f64>::zeros((r, i_dim));
    let mut subspace_sq_errors = Vec::with_capacity(n);
    let mut sq_norms = Vec::with_capacity(n);
    for (j, &c) in coef.iter().enumerate() {
        let block = svd.vt.slice(s![..r, j * i_dim..(j + 1) * i_dim]);
        right.scaled_add(c, &block);
        let own = left.dot(&block);
        let orig = m.slice(s![.., j * i_dim..(j + 1) * i_dim]);
        subspace_sq_errors.push(
            orig.iter()
                .zip(own.iter())
                .map(|(x, y)| (x - y).powi(2))
                .sum(),
        );
        sq_norms.push(orig.iter().map(|x| x * x).sum());
    }
    let merged = left.dot(&right);
    let (a, b, merged) = match shared {
        SharedBasis::Output => (left, right, merged),
        SharedBasis::Input => (
            right.t().to_owned(),
            left.t().to_owned(),
            merged.t().to_owned(),
        ),
    };
    Ok(UnionMerge {
        a: a.mapv(|v| v as f32),
        b: b.mapv(|v| v as f32),
        merged: merged.mapv(|v| v as f32),
        singular_values: svd.s.to_vec(),
        rank: r,
        kept_energy: energy(0..r),
        discarded_energy: energy(r..q),
        subspace_sq_errors,
        sq_norms,
    })
}

/// What [`submoe_merge`] did to one weight kind of one cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightReport {
    /// Which weight.
    pub kind: WeightKind,
    /// Kept rank `r`.
    pub rank: usize,
    /// `min(O, nI)`: the size of the concatenation's thin SVD.
    pub full_rank: usize,
    /// `Σ_{j<r} σ_j²` of the concatenation.
    pub kept_energy: f64,
    /// `Σ_{j≥r} σ_j²`: the squared error of the members' rank-`r`
    /// reconstructions from the shared basis, summed.
    pub discarded_energy: f64,
    /// Per member, `‖W^{(i)} − U_r Σ_r V^{(i)ᵀ}_r‖_F / ‖W^{(i)}‖_F` (absolute if
    /// `W^{(i)} = 0`): how well the shared basis holds each member.
    pub subspace_errors: Vec<f64>,
    /// Per member, `‖W_merged − W^{(i)}‖_F / ‖W^{(i)}‖_F` (absolute if 0): how far
    /// the merged expert is from it.
    pub merge_errors: Vec<f64>,
    /// Parameters stored for this merged weight: `r (O + I)` with a rank
    /// option (the factors), `O · I` without.
    pub stored_params: usize,
}

/// What [`submoe_merge`] did to one cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterReport {
    /// The original experts merged into this one, ascending.
    pub members: Vec<usize>,
    /// Their merge coefficients `f_i / Σ f` (equal if all frequencies are 0).
    pub coefficients: Vec<f64>,
    /// One report per weight kind, in the order `w1, w2, w3`.
    pub weights: Vec<WeightReport>,
}

/// What [`submoe_merge`] did to a layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubMoeReport {
    /// One entry per merged expert (cluster), in order.
    pub clusters: Vec<ClusterReport>,
    /// Parameters of the input layer (router plus experts).
    pub params_before: usize,
    /// Parameters of the result: router plus each merged weight's
    /// `stored_params` (factored when rank-reduced).
    pub params_after: usize,
}

fn rel_error(sq_err: f64, sq_norm: f64) -> f64 {
    if sq_norm > 0.0 {
        (sq_err / sq_norm).sqrt()
    } else {
        sq_err.sqrt()
    }
}

/// The merged router: one row per cluster.
fn merged_gate(
    gate: &Array2<f32>,
    clusters: &[Vec<usize>],
    frequencies: Option<&[f64]>,
) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((clusters.len(), gate.ncols()));
    for (c, members) in clusters.iter().enumerate() {
        let coef = cluster_coefficients(frequencies, members);
        let mut row = Array1::<f64>::zeros(gate.ncols());
        for (&i, &w) in members.iter().zip(&coef) {
            row.scaled_add(w, &gate.row(i).mapv(f64::from));
        }
        out.row_mut(c).assign(&row.mapv(|v| v as f32));
    }
    out
}

/// Sub-MoE (Li et al. 2025): merges each cluster of `assignment` (expert →
/// cluster label in `0..k`, every cluster non-empty, e.g. from
/// [`cluster_experts`]) into one expert by Experts Union Decomposition of each
/// weight kind, frequency-weighted V merging and reconstruction
/// ([`union_merge`]), optionally rank-reduced (`opts.rank`, Sub-MoE†), and
/// gives it the router row of `opts.router`. `frequencies` are the experts'
/// routing frequencies (eq. 6, [`router_frequencies`]; non-negative, any
/// scale). Returns the layer of `k` experts (cluster `c` is expert `c`) and a
/// report of energies, errors and parameter counts. See the module docs for
/// the exact rules and their sources.
pub fn submoe_merge(
    layer: &MoeLayer,
    assignment: &[usize],
    frequencies: &[f64],
    opts: &SubMoeOptions,
) -> Result<(MoeLayer, SubMoeReport)> {
    layer.check("layer")?;
    let n = layer.num_experts();
    let clusters = clusters_of(assignment, n)?;
    check_frequencies(frequencies, n)?;
    if opts.rank == Some(0) {
        return Err(moe(
            "opts.rank",
            "must be at least 1 (None keeps the full rank)",
        ));
    }
    let mut experts = Vec::with_capacity(clusters.len());
    let mut reports = Vec::with_capacity(clusters.len());
    let mut params_after = clusters.len() * layer.hidden();
    for (c, members) in clusters.iter().enumerate() {
        let coefficients = cluster_coefficients(Some(frequencies), members);
        let mut merged = layer.experts[members[0]].clone();
        let mut weights = Vec::with_capacity(3);
        for kind in WeightKind::ALL {
            let (o, i) = layer.experts[members[0]].get(kind).dim();
            let report = if opts.rank.is_none() && members.len() == 1 {
                // Full rank, one member: a copy (zhy617/SMoE copies singletons).
                let w = layer.experts[members[0]].get(kind);
                let sq: f64 = w.iter().map(|&v| f64::from(v).powi(2)).sum();
                WeightReport {
                    kind,
                    rank: o.min(i),
                    full_rank: o.min(i),
                    kept_energy: sq,
                    discarded_energy: 0.0,
                    subspace_errors: vec![0.0],
                    merge_errors: vec![0.0],
                    stored_params: o * i,
                }
            } else {
                let views: Vec<ArrayView2<f32>> = members
                    .iter()
                    .map(|&e| layer.experts[e].get(kind).view())
                    .collect();
                let what = format!("cluster {c} ({members:?}) {}", kind.name());
                let u = union_merge(&views, &coefficients, opts.rank, opts.shared, &what)?;
                let merge_errors = views
                    .iter()
                    .zip(&u.sq_norms)
                    .map(|(w, &sq)| {
                        let e: f64 = w
                            .iter()
                            .zip(u.merged.iter())
                            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                            .sum();
                        rel_error(e, sq)
                    })
                    .collect();
                let report = WeightReport {
                    kind,
                    rank: u.rank,
                    full_rank: u.singular_values.len(),
                    kept_energy: u.kept_energy,
                    discarded_energy: u.discarded_energy,
                    subspace_errors: u
                        .subspace_sq_errors
                        .iter()
                        .zip(&u.sq_norms)
                        .map(|(&e, &sq)| rel_error(e, sq))
                        .collect(),
                    merge_errors,
                    stored_params: if opts.rank.is_some() {
                        u.rank * (o + i)
                    } else {
                        o * i
                    },
                };
                *merged.get_mut(kind) = u.merged;
                report
            };
            params_after += report.stored_params;
            weights.push(report);
        }
        experts.push(merged);
        reports.push(ClusterReport {
            members: members.clone(),
            coefficients,
            weights,
        });
    }
    let router_freq = match opts.router {
        RouterMerge::FrequencyMean => Some(frequencies),
        RouterMerge::Mean => None,
    };
    let gate = merged_gate(&layer.gate, &clusters, router_freq);
    Ok((
        MoeLayer { gate, experts },
        SubMoeReport {
            clusters: reports,
            params_before: layer.params(),
            params_after,
        },
    ))
}

/// The `keep` most-routed experts (largest `frequencies`, ties to the lower
/// index), returned in ascending index order.
pub fn most_routed(frequencies: &[f64], keep: usize) -> Result<Vec<usize>> {
    let n = frequencies.len();
    check_frequencies(frequencies, n)?;
    if keep == 0 || keep > n {
        return Err(moe(
            "keep",
            format!("{keep} experts to keep must be in 1..={n} (the number of experts)"),
        ));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| frequencies[b].total_cmp(&frequencies[a]).then(a.cmp(&b)));
    idx.truncate(keep);
    idx.sort_unstable();
    Ok(idx)
}

/// Frequency pruning (the paper's "Frequency-prune" baseline, from
/// MoE-Compression): keeps the `keep` most-routed experts ([`most_routed`]:
/// ties to the lower index) and their router rows, in their original order;
/// the others and their rows are dropped.
pub fn prune_experts(layer: &MoeLayer, frequencies: &[f64], keep: usize) -> Result<MoeLayer> {
    layer.check("layer")?;
    check_frequencies(frequencies, layer.num_experts())?;
    let kept = most_routed(frequencies, keep)?;
    Ok(MoeLayer {
        gate: layer.gate.select(Axis(0), &kept),
        experts: kept.iter().map(|&i| layer.experts[i].clone()).collect(),
    })
}

/// Plain merging within clusters (the averaging baseline, as in HC-SMoE and
/// the paper's "Average" ablation): each cluster of `assignment` becomes the
/// mean of its members' weights — frequency-weighted,
/// `Σ f_i W^{(i)} / Σ f_i`, with `frequencies` (equal weights where a
/// cluster's frequencies are all 0), plain without — and its router row the
/// same mean of the members' rows (as [`RouterMerge::FrequencyMean`] /
/// [`RouterMerge::Mean`] in [`submoe_merge`]). At full rank this equals
/// Sub-MoE with the same frequencies (module docs, item 3).
pub fn average_clusters(
    layer: &MoeLayer,
    assignment: &[usize],
    frequencies: Option<&[f64]>,
) -> Result<MoeLayer> {
    layer.check("layer")?;
    let n = layer.num_experts();
    let clusters = clusters_of(assignment, n)?;
    if let Some(f) = frequencies {
        check_frequencies(f, n)?;
    }
    let experts = clusters
        .iter()
        .map(|members| {
            let coef = cluster_coefficients(frequencies, members);
            let mut merged = layer.experts[members[0]].clone();
            for kind in WeightKind::ALL {
                let mut acc = Array2::<f64>::zeros(merged.get(kind).dim());
                for (&e, &w) in members.iter().zip(&coef) {
                    acc.scaled_add(w, &layer.experts[e].get(kind).mapv(f64::from));
                }
                *merged.get_mut(kind) = acc.mapv(|v| v as f32);
            }
            merged
        })
        .collect();
    Ok(MoeLayer {
        gate: merged_gate(&layer.gate, &clusters, frequencies),
        experts,
    })
}
