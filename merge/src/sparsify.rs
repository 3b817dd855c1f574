//! Sparsification of task vectors, as mergekit's `sparsify.py` (v0.1.5).
//!
//! - `magnitude` (TIES): keep the `k = max(1, ⌊density·n⌋)` largest `|x|`.
//! - `random` (DARE): keep each entry with probability `density`.
//! - `magnitude_outliers` (Model Breadcrumbs): drop the `⌊γ·n⌋` largest and
//!   then the smallest, keeping `⌊density·n⌋` entries ranked just below the
//!   outliers (ascending ranks `[n − t − o, n − o)` with `o` shrunk when needed).
//! - `della_magprune` (DELLA): per row (axis 1; 1-D tensors are one row), keep
//!   entry of ascending magnitude rank `r ∈ 1..=m` with probability
//!   `density − ε + 2ε·(r − 1)/(m − 1)`.
//!
//! With `rescale` the kept entries are scaled so the L1 norm equals the
//! original's, unless either norm is below 1e-7 (mergekit's `rescaled_masked_tensor`
//! with `RescaleNorm.l1`; the DARE paper's `1/density` equals it in expectation).
//! Ties in magnitude are broken by position (lower index ranks lower), where
//! torch's unstable `argsort` leaves it open.

use weights::rng::Rng;

/// Which entries of a task vector survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sparsification {
    /// Largest magnitudes (TIES).
    Magnitude,
    /// Bernoulli(density) (DARE).
    Random,
    /// Largest magnitudes below the top-γ outliers (Model Breadcrumbs).
    MagnitudeOutliers,
    /// Rank-dependent Bernoulli probabilities (DELLA's MagPrune).
    DellaMagprune,
}

/// Where the uniform draws of random sparsification (DARE, DELLA) come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Draws {
    /// The seeded generator ([`Rng`]), per tensor and input (the default).
    #[default]
    Seeded,
    /// A hash of each task-vector entry's f32 bits and flat index
    /// ([`value_hash_uniform`]): the same draws any implementation can make, so
    /// a mask can be reproduced outside this crate. The mergekit parity test
    /// injects these draws into mergekit's `torch.bernoulli` to compare DARE
    /// and DELLA tensor for tensor. Keep probabilities are then compared in
    /// f32, as torch holds them.
    ValueHash,
}

/// `splitmix64(bits(v) | index << 32)`'s top 24 bits as a uniform in `[0, 1)`,
/// exact in f32.
pub fn value_hash_uniform(v: f32, index: usize) -> f32 {
    value_hash_bits(v, index) as f32 / (1u32 << 24) as f32
}

/// [`value_hash_uniform`]'s 24 bits as an integer.
fn value_hash_bits(v: f32, index: usize) -> u64 {
    let mut z = (v.to_bits() as u64) | ((index as u64) << 32);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 40
}

/// The integer form of a value-hash keep draw: `value_hash_uniform < p`
/// (compared in f32, as torch holds `p`) holds exactly when the hash's 24 bits
/// are below `⌈p·2²⁴⌉` (the uniform is `bits·2⁻²⁴`, exact, and `p·2²⁴` is exact in f64).
fn hash_threshold(p: f32) -> u64 {
    (f64::from(p) * (1u64 << 24) as f64).ceil().max(0.0) as u64
}

/// The integer form of a seeded keep draw: `Rng::uniform() < p` holds exactly
/// when the draw's top 53 bits are below `⌈p·2⁵³⌉` (`uniform` is `(bits >>
/// 11)·2⁻⁵³`, exact), so the same draws keep the same entries.
fn draw_threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64
}

/// Whether the next draw of `rng` keeps an entry of threshold `t`
/// ([`draw_threshold`]), as 1 or 0, without a branch.
#[inline(always)]
fn kept_bit(rng: &mut Rng, t: u64) -> u32 {
    (((rng.next_u64() >> 11).wrapping_sub(t)) >> 63) as u32
}

/// Per-input sparsification parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparsifyParams {
    /// Fraction of entries kept (`1` keeps all).
    pub density: f64,
    /// Fraction of largest entries removed as outliers (breadcrumbs).
    pub gamma: f64,
    /// Half-width of DELLA's probability range.
    pub epsilon: f64,
    /// Rescale to the original L1 norm.
    pub rescale: bool,
    /// Source of random draws.
    pub draws: Draws,
}

/// Sparsifies `x` (tensor `tensor`, shape `shape`) in place. Errors name the
/// tensor and the violated bound.
pub fn sparsify(
    tensor: &str,
    x: &mut [f32],
    shape: &[usize],
    method: Sparsification,
    p: &SparsifyParams,
    rng: &mut Rng,
) -> crate::Result<()> {
    let bad = |param: &str, msg: String| crate::MergeError::param(tensor, param, msg);
    if !(p.density.is_finite()) {
        return Err(bad("density", format!("{} is not a number", p.density)));
    }
    if p.density >= 1.0 {
        return Ok(());
    }
    let n = x.len();
    let before = if p.rescale { l1(x) } else { 0.0 };
    match method {
        Sparsification::Magnitude => {
            if p.density <= 0.0 || n == 0 {
                x.fill(0.0);
                return Ok(());
            }
            let k = ((p.density * n as f64) as usize).max(1);
            // Keep the top k: zero the n − k smallest.
            keep_rank_range(x, n - k, n);
        }
        Sparsification::MagnitudeOutliers => {
            if !(0.0..=1.0).contains(&p.gamma) {
                return Err(bad("gamma", format!("{} is outside [0, 1]", p.gamma)));
            }
            let target = (p.density.max(0.0) * n as f64) as usize;
            let top = (p.gamma * n as f64) as usize;
            let bot = n.saturating_sub(target + top);
            keep_rank_range(x, bot, (bot + target).min(n));
        }
        Sparsification::Random => {
            let d = p.density.max(0.0);
            // A bit mask, not a branch: at density ½ a branch on a random
            // draw mispredicts every other entry. A dropped entry is +0.0.
            let masked = |v: f32, keep: u32| f32::from_bits(v.to_bits() & keep.wrapping_neg());
            match p.draws {
                Draws::Seeded => {
                    // `uniform() < d` ⟺ `bits >> 11 < ⌈d·2⁵³⌉`: `uniform` is
                    // `(bits >> 11)·2⁻⁵³`, exact, so the same draws keep the
                    // same entries. The local copy keeps the state in registers.
                    let threshold = draw_threshold(d);
                    let mut local = rng.clone();
                    for v in x.iter_mut() {
                        *v = masked(*v, kept_bit(&mut local, threshold));
                    }
                    *rng = local;
                }
                Draws::ValueHash => x.iter_mut().enumerate().for_each(|(e, v)| {
                    *v = masked(*v, u32::from(value_hash_uniform(*v, e) < d as f32))
                }),
            }
        }
        Sparsification::DellaMagprune => {
            if p.density <= 0.0 {
                x.fill(0.0);
                return Ok(());
            }
            if p.density + p.epsilon >= 1.0 || p.density - p.epsilon <= 0.0 {
                return Err(bad(
                    "epsilon",
                    format!(
                        "{} must keep density ± epsilon inside (0, 1) (density {})",
                        p.epsilon, p.density
                    ),
                ));
            }
            della(x, shape, p, rng);
        }
    }
    if p.rescale {
        let after = l1(x);
        if before >= 1e-7 && after >= 1e-7 {
            let s = (before / after) as f32;
            x.iter_mut().for_each(|v| *v *= s);
        }
    }
    Ok(())
}

/// A weighted, sparsified task vector `w · sparsify(x − base)`, read block by
/// block ([`SparseDelta::fill`]). Every sparsification keeps some entries and
/// zeroes the rest, then (with `rescale`) scales all by one factor, so what is
/// held is one bit per entry and that factor; the entries are formed again
/// from the input and the base when read, and no n-sized f32 copy of any
/// input outlives its sparsification.
pub(crate) struct SparseDelta<'a> {
    x: &'a [f32],
    base: &'a [f32],
    /// Bit `e % 64` of word `e / 64`: entry `e` kept.
    bits: Vec<u64>,
    /// The L1 rescale factor, where `rescale` applies.
    scale: Option<f32>,
    weight: f32,
}

impl SparseDelta<'_> {
    /// Entries `start..start + out.len()`, with the f32 operations of
    /// [`sparsify`] followed by `× weight`, in that order (so the same bits).
    pub(crate) fn fill(&self, start: usize, out: &mut [f32]) {
        let SparseDelta {
            x,
            base,
            bits,
            scale,
            weight,
        } = self;
        let (x, b) = (
            &x[start..start + out.len()],
            &base[start..start + out.len()],
        );
        // Branch-free (a branch on a random bit mispredicts half the
        // time): the kept bit widened to an all-ones or all-zeros mask.
        let entry = |word: u64, j: usize, x: f32, b: f32| {
            let keep = ((word >> j) as u32 & 1).wrapping_neg();
            f32::from_bits((x - b).to_bits() & keep)
        };
        let words = |start: usize| start.is_multiple_of(64).then_some(start / 64);
        match words(start) {
            Some(w0) => {
                let chunks = out.chunks_mut(64).zip(x.chunks(64)).zip(b.chunks(64));
                for (c, ((o, x), b)) in chunks.enumerate() {
                    let word = bits[w0 + c];
                    let it = o.iter_mut().zip(x).zip(b).enumerate();
                    match scale {
                        Some(s) => {
                            it.for_each(|(j, ((o, &x), &b))| *o = entry(word, j, x, b) * s * weight)
                        }
                        None => {
                            it.for_each(|(j, ((o, &x), &b))| *o = entry(word, j, x, b) * weight)
                        }
                    }
                }
            }
            None => {
                for (e, ((o, &x), &b)) in out.iter_mut().zip(x).zip(b).enumerate() {
                    let i = start + e;
                    let v = entry(bits[i / 64], i % 64, x, b);
                    *o = match scale {
                        Some(s) => v * s * weight,
                        None => v * weight,
                    };
                }
            }
        }
    }
}

/// The weighted, sparsified task vector `weight · sparsify(x − base)`, as
/// [`sparsify`] gives it on `x − base`. DARE's seeded draws take one pass that
/// draws the mask and sums both L1 norms, in the shadow of the generator's own
/// dependency chain; the other methods sparsify a temporary copy (without
/// rescaling) and keep which entries survived, with the L1 factor that
/// `rescale` would apply (the same sums in the same order, so the same factor).
#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_sparse_delta<'a>(
    tensor: &str,
    x: &'a [f32],
    base: &'a [f32],
    shape: &[usize],
    method: Option<Sparsification>,
    p: &SparsifyParams,
    weight: f32,
    rng: &mut Rng,
) -> crate::Result<SparseDelta<'a>> {
    let words = x.len().div_ceil(64);
    // Nothing dropped (no sparsification, or density 1, where `sparsify`
    // returns at once without rescaling) — once a bad density is refused.
    if method.is_some() && !p.density.is_finite() {
        return Err(crate::MergeError::param(
            tensor,
            "density",
            format!("{} is not a number", p.density),
        ));
    }
    let Some(method) = method.filter(|_| p.density < 1.0) else {
        return Ok(SparseDelta {
            x,
            base,
            bits: vec![u64::MAX; words],
            scale: None,
            weight,
        });
    };
    let seeded_dare = method == Sparsification::Random
        && p.draws == Draws::Seeded
        && p.density.is_finite()
        && p.density < 1.0;
    let mut bits = vec![0u64; words];
    let (before, after) = if seeded_dare {
        // As `sparsify`'s `Random` arm: `uniform() < density` ⟺ `bits >> 11 < ⌈density·2⁵³⌉`.
        let threshold = draw_threshold(p.density);
        // A plain loop over locals (the generator's state stays in registers),
        // summing both L1 norms in `l1`'s lanes, so the factor is `sparsify`'s.
        use crate::methods::{LANES, lanes_total};
        let mut local = rng.clone();
        let whole = x.len() - x.len() % LANES;
        let (mut before, mut after) = ([0f64; LANES], [0f64; LANES]);
        let (mut tail_before, mut tail_after) = (-0f64, -0f64);
        for (c, ((word, x), b)) in bits
            .iter_mut()
            .zip(x.chunks(64))
            .zip(base.chunks(64))
            .enumerate()
        {
            for (j, (&x, &b)) in x.iter().zip(b).enumerate() {
                let v = x - b;
                let keep = kept_bit(&mut local, threshold);
                *word |= u64::from(keep) << j;
                if p.rescale {
                    let (a, k) = (
                        v.abs() as f64,
                        f32::from_bits(v.to_bits() & keep.wrapping_neg()).abs() as f64,
                    );
                    if 64 * c + j < whole {
                        before[j % LANES] += a;
                        after[j % LANES] += k;
                    } else {
                        tail_before += a;
                        tail_after += k;
                    }
                }
            }
        }
        *rng = local;
        (
            lanes_total(&before, tail_before),
            lanes_total(&after, tail_after),
        )
    } else {
        let mut d = Vec::new();
        weights::mem::reserve_huge(&mut d, x.len());
        d.extend(x.iter().zip(base).map(|(x, b)| x - b));
        let before = if p.rescale { l1(&d) } else { 0.0 };
        let unscaled = SparsifyParams {
            rescale: false,
            ..*p
        };
        sparsify(tensor, &mut d, shape, method, &unscaled, rng)?;
        // Kept entries are unchanged and dropped ones +0.0 (a kept −0.0
        // keeps its bit, so it reads back as −0.0).
        for (word, d) in bits.iter_mut().zip(d.chunks(64)) {
            for (j, v) in d.iter().enumerate() {
                *word |= u64::from(v.to_bits() != 0) << j;
            }
        }
        let after = if p.rescale { l1(&d) } else { 0.0 };
        (before, after)
    };
    Ok(SparseDelta {
        x,
        base,
        bits,
        scale: (p.rescale && before >= 1e-7 && after >= 1e-7).then(|| (before / after) as f32),
        weight,
    })
}

/// `Σ|xᵢ|` in f64, over interleaved partial sums (a sequential sum is bound
/// by the adder's latency).
fn l1(x: &[f32]) -> f64 {
    crate::methods::sum_of(x, |v| v.abs() as f64)
}

/// Zeroes every entry whose ascending magnitude rank lies outside `[lo, hi)`.
fn keep_rank_range(x: &mut [f32], lo: usize, hi: usize) {
    let n = x.len();
    if lo == 0 && hi >= n {
        return;
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let key = |i: &u32| (x[*i as usize].abs(), *i);
    let cmp = |a: &u32, b: &u32| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0).then(ka.1.cmp(&kb.1))
    };
    // Partition so idx[..lo] are the lo smallest and idx[hi..] the largest.
    if lo > 0 && lo < n {
        idx.select_nth_unstable_by(lo, cmp);
    }
    if hi > lo && hi < n {
        idx[lo..].select_nth_unstable_by(hi - lo, cmp);
    }
    let mut keep = vec![false; n];
    for &i in &idx[lo.min(n)..hi.min(n)] {
        keep[i as usize] = true;
    }
    x.iter_mut()
        .zip(keep)
        .for_each(|(v, k)| *v = if k { *v } else { 0.0 });
}

fn della(x: &mut [f32], shape: &[usize], p: &SparsifyParams, rng: &mut Rng) {
    let (density, epsilon) = (p.density, p.epsilon);
    // Rows along axis 1 as torch's `argsort(dim=1)`: view as (d0, d1, rest).
    let (d0, d1) = match shape.len() {
        0 | 1 => (1, x.len()),
        _ => (shape[0], shape[1]),
    };
    let rest = x.len() / (d0 * d1).max(1);
    // Keep probability by ascending rank, in f64 and in torch's f32 arithmetic:
    // (d − ε) + rank_norm·2·ε with rank_norm = rank/(d1 − 1) (one entry: 0,
    // where torch gives NaN).
    let by_rank: Vec<(f64, f32)> = (0..d1)
        .map(|rank| {
            let (norm, norm32) = if d1 > 1 {
                (rank as f64 / (d1 - 1) as f64, rank as f32 / (d1 - 1) as f32)
            } else {
                (0.0, 0.0)
            };
            (
                density - epsilon + norm * 2.0 * epsilon,
                (density - epsilon) as f32 + norm32 * 2.0 * epsilon as f32,
            )
        })
        .collect();
    // The seeded draws compare the generator's 53 bits with an integer
    // threshold: `uniform() < p` ⟺ `bits >> 11 < ⌈p·2⁵³⌉` (exact, as for DARE).
    let thresholds: Vec<u64> = by_rank.iter().map(|&(pr, _)| draw_threshold(pr)).collect();
    let hash_thresholds: Vec<u64> = by_rank.iter().map(|&(_, pr)| hash_threshold(pr)).collect();
    let mut row = DellaRow::default();
    for i in 0..d0 {
        for r in 0..rest {
            let at = |j: usize| (i * d1 + j) * rest + r;
            // Rows without a trailing axis are contiguous: plain slice loops.
            if rest == 1 {
                row.load(x[i * d1..(i + 1) * d1].iter().copied());
            } else {
                row.load((0..d1).map(|j| x[at(j)]));
            }
            match p.draws {
                Draws::Seeded => {
                    // The generator's state in registers, as in DARE's loop.
                    let mut local = rng.clone();
                    row.decide(&thresholds, |_| local.next_u64() >> 11);
                    *rng = local;
                }
                Draws::ValueHash => {
                    row.decide(&hash_thresholds, |j| value_hash_bits(x[at(j)], at(j)));
                }
            }
            // A dropped entry becomes +0.0, by mask rather than branch.
            let drop_unless = |v: &mut f32, keep: bool| {
                *v = f32::from_bits(v.to_bits() & u32::from(keep).wrapping_neg())
            };
            if rest == 1 {
                let kept = row.keep.iter();
                x[i * d1..(i + 1) * d1]
                    .iter_mut()
                    .zip(kept)
                    .for_each(|(v, &k)| drop_unless(v, k));
            } else {
                for (j, &keep) in row.keep.iter().enumerate() {
                    drop_unless(&mut x[at(j)], keep);
                }
            }
        }
    }
}

/// One DELLA row's scratch: its magnitudes' bits and, after [`DellaRow::decide`],
/// which entries it keeps.
///
/// An entry of ascending magnitude rank `k` (ties by position) is kept when its
/// draw is below `threshold[k]`, and the thresholds are monotone in rank. So
/// the rank is needed only to the precision of the threshold: the entries are
/// counted into buckets of their magnitude's top bits (a counting sort's first
/// pass), which bounds each entry's rank by its bucket's range of ranks, and
/// the draw settles all but the few that fall between the thresholds at that
/// range's ends. Those few are ranked exactly by counting, or by a radix sort
/// of the row where there are many (rows of equal magnitudes).
#[derive(Default)]
struct DellaRow {
    /// `|v|`'s bits, which order non-negative floats as `total_cmp` does.
    bits: Vec<u32>,
    /// Entries per bucket, then (prefix sums) each bucket's first rank.
    counts: Vec<usize>,
    /// The undecided entries, with their draws.
    open: Vec<(usize, u64)>,
    /// Packed `(bits, position)` keys and scratch for the radix sort, and
    /// each position's rank, where the whole row is ranked.
    keys: Vec<u64>,
    scratch: Vec<u64>,
    ranks: Vec<usize>,
    keep: Vec<bool>,
}

impl DellaRow {
    /// Magnitude bits per bucket: 8 exponent and 4 mantissa bits, so a bucket
    /// spans a sixteenth of an octave.
    const SHIFT: u32 = 19;
    /// Buckets per row: magnitudes below 2⁻⁶⁴ of the row's largest share the
    /// lowest bucket.
    const BUCKETS: u32 = 1024;
    /// Undecided entries beyond which the row is sorted instead of each
    /// entry's rank counted (each count is one pass over the row).
    const MAX_COUNTED: usize = 48;

    fn load(&mut self, row: impl Iterator<Item = f32>) {
        self.bits.clear();
        self.bits.extend(row.map(|v| v.abs().to_bits()));
    }

    /// Fills `keep` with `draw(j) < threshold[rank(j)]` for every entry `j`,
    /// drawing in order of position. `threshold` must be monotone in rank.
    fn decide(&mut self, threshold: &[u64], mut draw: impl FnMut(usize) -> u64) {
        let m = self.bits.len();
        self.keep.clear();
        self.keep.resize(m, false);
        if m == 0 {
            return;
        }
        let (lo, hi) = self
            .bits
            .iter()
            .fold((u32::MAX, 0), |(lo, hi), &b| (lo.min(b), hi.max(b)));
        let offset = (hi >> Self::SHIFT).saturating_sub(Self::BUCKETS - 1);
        let bucket = |b: u32| ((b >> Self::SHIFT).saturating_sub(offset)) as usize;
        let (first, last) = (bucket(lo), bucket(hi));
        self.counts.clear();
        self.counts.resize(last + 2, 0);
        for &b in &self.bits {
            self.counts[bucket(b) + 1] += 1;
        }
        // counts[b] becomes bucket b's first rank, counts[b + 1] the next's.
        for b in first + 1..=last + 1 {
            self.counts[b] += self.counts[b - 1];
        }
        self.open.clear();
        for (j, (&b, keep)) in self.bits.iter().zip(self.keep.iter_mut()).enumerate() {
            let u = draw(j);
            let k = bucket(b);
            let (ta, tb) = (threshold[self.counts[k]], threshold[self.counts[k + 1] - 1]);
            let (tmin, tmax) = if ta <= tb { (ta, tb) } else { (tb, ta) };
            *keep = u < tmin;
            // `tmin ≤ u < tmax` in one comparison: the keep draw is a coin
            // flip, which a branch would mispredict; this one is rarely taken.
            if u.wrapping_sub(tmin) < tmax - tmin {
                self.open.push((j, u));
            }
        }
        if self.open.len() <= Self::MAX_COUNTED {
            for &(j, u) in &self.open {
                let v = self.bits[j];
                let below = self.bits.iter().filter(|&&b| b < v).count();
                let equal_before = self.bits[..j].iter().filter(|&&b| b == v).count();
                self.keep[j] = u < threshold[below + equal_before];
            }
            return;
        }
        // Many undecided: rank the whole row, by (bits, position).
        self.ranks.clear();
        self.ranks.resize(m, 0);
        if let Ok(m32) = u32::try_from(m) {
            self.keys.clear();
            self.keys.extend(
                self.bits
                    .iter()
                    .zip(0..m32)
                    .map(|(&b, j)| (u64::from(b) << 32) | u64::from(j)),
            );
            radix_sort_high(&mut self.keys, &mut self.scratch);
            for (k, key) in self.keys.iter().enumerate() {
                self.ranks[(key & 0xffff_ffff) as usize] = k;
            }
        } else {
            // Positions beyond 32 bits do not pack: a comparison sort.
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_by_key(|&j| (self.bits[j], j));
            for (k, &j) in order.iter().enumerate() {
                self.ranks[j] = k;
            }
        }
        for &(j, u) in &self.open {
            self.keep[j] = u < threshold[self.ranks[j]];
        }
    }
}

/// Sorts `keys` by their high 32 bits, stably (so keys built in ascending
/// order of their low bits sort as whole u64s): an LSD radix sort, one byte
/// per pass, skipping bytes all keys share.
fn radix_sort_high(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    let mut counts = [[0usize; 256]; 4];
    for &k in keys.iter() {
        for (b, c) in counts.iter_mut().enumerate() {
            c[((k >> (32 + 8 * b)) & 0xff) as usize] += 1;
        }
    }
    scratch.clear();
    scratch.resize(keys.len(), 0);
    for (b, c) in counts.iter_mut().enumerate() {
        if c.contains(&keys.len()) {
            continue;
        }
        let mut sum = 0;
        for n in c.iter_mut() {
            let here = *n;
            *n = sum;
            sum += here;
        }
        for &k in keys.iter() {
            let d = ((k >> (32 + 8 * b)) & 0xff) as usize;
            scratch[c[d]] = k;
            c[d] += 1;
        }
        std::mem::swap(keys, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(density: f64) -> SparsifyParams {
        SparsifyParams {
            density,
            gamma: 0.0,
            epsilon: 0.0,
            rescale: false,
            draws: Draws::Seeded,
        }
    }

    /// DELLA as first written (a comparison sort per row, a float draw per
    /// entry), against the bucketed, integer-threshold version: the same
    /// bits, for rows, 3-D rows with a trailing axis, 1-D tensors; with ties
    /// (few distinct magnitudes: every rank counted, or, in long rows, the
    /// row radix-sorted), Gaussian entries, magnitudes over 60 decades with
    /// zeros (the lowest bucket shared), and rows of one value.
    #[test]
    fn della_equals_its_per_row_definition() {
        let mut g = Rng::new(2);
        let ties = |g: &mut Rng| (g.below(9) as f32 - 4.0) * 0.25;
        let gaussian = |g: &mut Rng| g.normal() as f32 * 0.01;
        let wide = |g: &mut Rng| match g.below(4) {
            0 => 0.0,
            _ => (g.normal() * 10f64.powf(g.uniform() * 60.0 - 30.0)) as f32,
        };
        let constant = |_: &mut Rng| -0.5f32;
        type Gen<'a> = &'a dyn Fn(&mut Rng) -> f32;
        let cases: [(Vec<usize>, Gen); 10] = [
            (vec![7, 33], &ties),
            (vec![2, 5, 3], &ties),
            (vec![40], &ties),
            (vec![3, 1], &ties),
            (vec![3, 1000], &ties),
            (vec![4, 576], &gaussian),
            (vec![3, 200, 2], &gaussian),
            (vec![4, 700], &wide),
            (vec![2, 300], &constant),
            (vec![0, 5], &gaussian),
        ];
        for (shape, draw) in cases {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|_| draw(&mut g)).collect();
            // A negative ε makes the thresholds fall with rank.
            for (draws, eps) in [
                (Draws::Seeded, 0.2),
                (Draws::ValueHash, 0.2),
                (Draws::Seeded, -0.2),
                (Draws::ValueHash, -0.2),
            ] {
                let params = SparsifyParams {
                    epsilon: eps,
                    draws,
                    ..p(0.5)
                };
                let mut got = x.clone();
                sparsify(
                    "t",
                    &mut got,
                    &shape,
                    Sparsification::DellaMagprune,
                    &params,
                    &mut Rng::new(3),
                )
                .unwrap();
                // The reference.
                let mut want = x.clone();
                let mut rng = Rng::new(3);
                let (d0, d1) = if shape.len() < 2 {
                    (1, n)
                } else {
                    (shape[0], shape[1])
                };
                let rest = n / (d0 * d1).max(1);
                for i in 0..d0 {
                    for r in 0..rest {
                        let at = |j: usize| (i * d1 + j) * rest + r;
                        let mut order: Vec<usize> = (0..d1).collect();
                        order.sort_by(|&a, &b| {
                            want[at(a)]
                                .abs()
                                .total_cmp(&want[at(b)].abs())
                                .then(a.cmp(&b))
                        });
                        let mut probs = vec![(0f64, 0f32); d1];
                        for (rank, &j) in order.iter().enumerate() {
                            let (nm, nm32) = if d1 > 1 {
                                (rank as f64 / (d1 - 1) as f64, rank as f32 / (d1 - 1) as f32)
                            } else {
                                (0.0, 0.0)
                            };
                            probs[j] = (
                                0.5 - eps + nm * 2.0 * eps,
                                (0.5 - eps) as f32 + nm32 * 2.0 * eps as f32,
                            );
                        }
                        for (j, &(pr, pr32)) in probs.iter().enumerate() {
                            let e = at(j);
                            let keep = match draws {
                                Draws::Seeded => rng.uniform() < pr,
                                Draws::ValueHash => value_hash_uniform(want[e], e) < pr32,
                            };
                            if !keep {
                                want[e] = 0.0;
                            }
                        }
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{shape:?} {draws:?} ε {eps}");
            }
        }
    }

    #[test]
    fn radix_sort_of_the_high_words_equals_sorting() {
        let mut g = Rng::new(6);
        for n in [0usize, 1, 2, 17, 300, 1536] {
            for spread in [3u64, 1 << 31] {
                let mut keys: Vec<u64> = (0..n)
                    .map(|j| (g.next_u64() % spread) << 32 | j as u64)
                    .collect();
                let mut want = keys.clone();
                want.sort_unstable();
                radix_sort_high(&mut keys, &mut Vec::new());
                assert_eq!(keys, want, "n {n} spread {spread}");
            }
        }
    }

    /// The bit-mask deltas give the bits of `sparsify` then `× weight`, read
    /// whole or from an offset that is not a multiple of 64: every method,
    /// with and without rescaling, at densities that keep none, some and all,
    /// with exact zeros (of both signs) among the deltas.
    #[test]
    fn sparse_deltas_read_back_as_sparsify_then_weight() {
        use Sparsification::*;
        let mut g = Rng::new(1);
        let shape = [5usize, 67];
        let n = shape[0] * shape[1];
        let base: Vec<f32> = (0..n).map(|_| g.normal() as f32 * 0.1).collect();
        let mut x: Vec<f32> = base.iter().map(|&b| b + g.normal() as f32).collect();
        x[3] = base[3];
        x[10] = -0.0;
        let mut base = base;
        base[10] = 0.0;
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for method in [
            None,
            Some(Magnitude),
            Some(Random),
            Some(MagnitudeOutliers),
            Some(DellaMagprune),
        ] {
            for draws in [Draws::Seeded, Draws::ValueHash] {
                for density in [0.0, 0.4, 1.0] {
                    for rescale in [false, true] {
                        let params = SparsifyParams {
                            density,
                            gamma: 0.05,
                            epsilon: if method == Some(DellaMagprune) && density == 0.4 {
                                0.2
                            } else {
                                0.0
                            },
                            rescale,
                            draws,
                        };
                        let mut want: Vec<f32> = x.iter().zip(&base).map(|(x, b)| x - b).collect();
                        if let Some(m) = method {
                            sparsify("t", &mut want, &shape, m, &params, &mut Rng::new(7)).unwrap();
                        }
                        want.iter_mut().for_each(|v| *v *= 0.3);
                        let d = weighted_sparse_delta(
                            "t",
                            &x,
                            &base,
                            &shape,
                            method,
                            &params,
                            0.3,
                            &mut Rng::new(7),
                        )
                        .unwrap();
                        let mut got = vec![0f32; n];
                        d.fill(0, &mut got);
                        let case =
                            format!("{method:?} {draws:?} density {density} rescale {rescale}");
                        assert_eq!(bits(&got), bits(&want), "{case}");
                        let mut part = vec![0f32; 100];
                        d.fill(70, &mut part);
                        assert_eq!(bits(&part), bits(&want[70..170]), "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn magnitude_keeps_the_largest_and_rescales_by_l1() {
        let mut x = vec![0.1, -3.0, 2.0, -0.5, 1.0];
        sparsify(
            "t",
            &mut x,
            &[5],
            Sparsification::Magnitude,
            &p(0.4),
            &mut Rng::new(0),
        )
        .unwrap();
        assert_eq!(x, vec![0.0, -3.0, 2.0, 0.0, 0.0]);
        let mut x = vec![0.1, -3.0, 2.0, -0.5, 1.0];
        let q = SparsifyParams {
            rescale: true,
            ..p(0.4)
        };
        sparsify(
            "t",
            &mut x,
            &[5],
            Sparsification::Magnitude,
            &q,
            &mut Rng::new(0),
        )
        .unwrap();
        // L1 before 6.6, after 5.0.
        let s = 6.6f32 / 5.0;
        for (got, want) in x.iter().zip([0.0, -3.0 * s, 2.0 * s, 0.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{x:?}");
        }
        // Positive density keeps at least one entry.
        let mut x = vec![1.0, 2.0, 3.0];
        sparsify(
            "t",
            &mut x,
            &[3],
            Sparsification::Magnitude,
            &p(0.1),
            &mut Rng::new(0),
        )
        .unwrap();
        assert_eq!(x, vec![0.0, 0.0, 3.0]);
    }

    #[test]
    fn breadcrumbs_drops_outliers_then_the_smallest() {
        // n = 10, density 0.5 → keep 5; gamma 0.2 → drop the top 2; bottom 3 dropped.
        let mut x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        let q = SparsifyParams {
            gamma: 0.2,
            ..p(0.5)
        };
        sparsify(
            "t",
            &mut x,
            &[10],
            Sparsification::MagnitudeOutliers,
            &q,
            &mut Rng::new(0),
        )
        .unwrap();
        assert_eq!(x, vec![0., 0., 0., 4., 5., 6., 7., 8., 0., 0.]);
        // gamma too large for the density: fewer outliers removed (n_bot clamps at 0).
        let mut x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        let q = SparsifyParams {
            gamma: 0.9,
            ..p(0.5)
        };
        sparsify(
            "t",
            &mut x,
            &[10],
            Sparsification::MagnitudeOutliers,
            &q,
            &mut Rng::new(0),
        )
        .unwrap();
        assert_eq!(x, vec![1., 2., 3., 4., 5., 0., 0., 0., 0., 0.]);
    }

    #[test]
    fn dare_keeps_density_within_three_sigma_and_is_seeded() {
        let n = 100_000;
        let d = 0.3;
        let mut x = vec![1f32; n];
        sparsify(
            "t",
            &mut x,
            &[n],
            Sparsification::Random,
            &p(d),
            &mut Rng::new(7),
        )
        .unwrap();
        let kept = x.iter().filter(|v| **v != 0.0).count() as f64;
        let sigma = (n as f64 * d * (1.0 - d)).sqrt();
        assert!((kept - n as f64 * d).abs() < 3.0 * sigma, "kept {kept}");
        let mut y = vec![1f32; n];
        sparsify(
            "t",
            &mut y,
            &[n],
            Sparsification::Random,
            &p(d),
            &mut Rng::new(7),
        )
        .unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn random_drops_keep_the_entries_uniform_draws_keep() {
        let n = 20_000;
        for d in [0.0, 1e-12, 0.3, 0.5, 0.9, 1.0 - 1e-16, 1.0, 1.5] {
            let x0: Vec<f32> = (0..n).map(|i| i as f32 - 9_999.5).collect();
            let mut x = x0.clone();
            let mut rng = Rng::new(11);
            sparsify("t", &mut x, &[n], Sparsification::Random, &p(d), &mut rng).unwrap();
            let mut reference = Rng::new(11);
            // Density 1 and above keeps everything without drawing.
            let want: Vec<f32> = x0
                .iter()
                .map(|&v| {
                    if d >= 1.0 || reference.uniform() < d {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "density {d}"
            );
            // The generator moved on by one draw per entry, as before.
            assert_eq!(rng.next_u64(), reference.next_u64(), "density {d}");
        }
    }

    #[test]
    fn della_probabilities_grow_with_rank() {
        // 2 rows of 1000: the top half by magnitude must keep more than the bottom half.
        let (rows, cols) = (2, 1000);
        let mut x: Vec<f32> = (0..rows * cols).map(|i| (i % cols) as f32 + 1.0).collect();
        let q = SparsifyParams {
            epsilon: 0.3,
            ..p(0.5)
        };
        sparsify(
            "t",
            &mut x,
            &[rows, cols],
            Sparsification::DellaMagprune,
            &q,
            &mut Rng::new(1),
        )
        .unwrap();
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let low = row[..cols / 2].iter().filter(|v| **v != 0.0).count();
            let high = row[cols / 2..].iter().filter(|v| **v != 0.0).count();
            // Expected: low ≈ 500·0.35 = 175, high ≈ 500·0.65 = 325.
            assert!(low < 230 && high > 270, "low {low} high {high}");
        }
        let bad = SparsifyParams {
            epsilon: 0.6,
            ..p(0.5)
        };
        assert!(
            sparsify(
                "t",
                &mut x,
                &[rows, cols],
                Sparsification::DellaMagprune,
                &bad,
                &mut Rng::new(1)
            )
            .is_err()
        );
    }
}
