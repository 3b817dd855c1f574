//! WeightWatcher layer metrics, a Marchenko–Pastur bulk fit, and the
//! randomisation control.
//!
//! From the eigenvalues `λ` of one ESD ([`crate::esd`]) and its power-law fit
//! ([`crate::powerlaw`]), as WeightWatcher's `apply_norm_metrics` defines them:
//!
//! | metric | formula |
//! |---|---|
//! | `log_norm` | `log10 Σλ` (squared Frobenius norm) |
//! | `log_spectral_norm` | `log10 λmax` |
//! | `alpha_weighted` | `α · log10 λmax` |
//! | `log_alpha_norm` | `log10 Σ λ^α` |
//! | `stable_rank` | `Σλ / λmax` |
//! | `entropy` | `−Σ pᵢ ln pᵢ / ln r`, `pᵢ = λᵢ/Σλ`, `r` the numerical rank |
//! | `effective_rank` | `exp(−Σ pᵢ ln pᵢ)` (Roy & Vetterli 2007) |
//!
//! The numerical rank counts singular values above `σmax · N · ε` (numpy's
//! `matrix_rank`, ε of the decomposition's precision).
//!
//! **Marchenko–Pastur fit.** For an `N × M` matrix of i.i.d. entries of
//! variance `s²`, the eigenvalues of `WᵀW` fill `[s²(√N − √M)², s²(√N + √M)²]`
//! and their mean is `N·s²`. We estimate `s²` from the mean of the bulk,
//! count as spikes the eigenvalues above the edge `λ₊` plus four
//! Tracy–Widom scales `s²(√N + √M)(1/√N + 1/√M)^{1/3}` (Johnstone 2001; pure
//! noise exceeds it with probability below 10⁻⁴), drop them from the bulk and
//! re-estimate until the count is stable. `mp_softrank = λ₊ / λmax` as in
//! WeightWatcher. WeightWatcher itself fits `s` to a kernel density by brute
//! force, so its `num_spikes` can differ from ours; the definition here is
//! deterministic and has no bandwidth parameter.
//!
//! **Randomisation control.** Shuffling the entries of `W` destroys learned
//! correlations but keeps the entry distribution; [`rand_distance`] is the
//! Jensen–Shannon divergence (base 2, in `[0, 1]`) between the 100-bin
//! histograms of `log10 λ` of the original and shuffled ESD on a common range.

use ndarray::Array2;
use serde::Serialize;

use crate::error::Result;
use crate::esd::{Esd, esd};
use crate::powerlaw::PowerLawFit;
use weights::rng::Rng;

/// Norm-based metrics of one ESD.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NormMetrics {
    /// `log10 Σλ`, the log of the squared Frobenius norm.
    pub log_norm: f64,
    /// `log10 λmax`, the log of the squared spectral norm.
    pub log_spectral_norm: f64,
    /// `Σλ / λmax`.
    pub stable_rank: f64,
    /// Normalised spectral entropy `−Σ pᵢ ln pᵢ / ln r`, `pᵢ = λᵢ/Σλ`;
    /// `None` when the numerical rank `r` is at most 1.
    pub entropy: Option<f64>,
    /// `exp(−Σ pᵢ ln pᵢ)` (Roy & Vetterli 2007).
    pub effective_rank: f64,
    /// Numerical rank: singular values above `σmax · N · ε`.
    pub rank: usize,
}

/// Computes [`NormMetrics`]; `None` when every eigenvalue is zero.
pub fn norm_metrics(e: &Esd, epsilon: f64) -> Option<NormMetrics> {
    let total: f64 = e.evals.iter().sum();
    let lmax = e.evals.iter().copied().fold(0f64, f64::max);
    if lmax <= 0.0 || !total.is_finite() {
        return None;
    }
    let tol = e.sv_max * e.n as f64 * epsilon;
    let rank = e.evals.iter().filter(|&&l| l.max(0.0).sqrt() > tol).count();
    let h: f64 = e
        .evals
        .iter()
        .map(|&l| l / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    Some(NormMetrics {
        log_norm: total.log10(),
        log_spectral_norm: lmax.log10(),
        stable_rank: total / lmax,
        entropy: (rank > 1).then(|| h / (rank as f64).ln()),
        effective_rank: h.exp(),
        rank,
    })
}

/// `α · log10 λmax` and `log10 Σ λ^α`.
pub fn alpha_metrics(e: &Esd, fit: &PowerLawFit) -> (f64, f64) {
    let lmax = e.evals.iter().copied().fold(0f64, f64::max);
    let sum: f64 = e
        .evals
        .iter()
        .filter(|&&l| l > 0.0)
        .map(|&l| l.powf(fit.alpha))
        .sum();
    (fit.alpha * lmax.log10(), sum.log10())
}

/// A Marchenko–Pastur bulk fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MpFit {
    /// Estimated entry variance `s²` (in the units of the ESD: ÷N when normalised).
    pub s2: f64,
    /// Lower bulk edge `λ₋`.
    pub bulk_min: f64,
    /// Upper bulk edge `λ₊`.
    pub bulk_max: f64,
    /// `λ₊` plus four Tracy–Widom scales: eigenvalues above are spikes.
    pub spike_threshold: f64,
    /// Eigenvalues above `spike_threshold`.
    pub num_spikes: usize,
    /// `λ₊ / λmax`.
    pub mp_softrank: f64,
}

/// Fits the Marchenko–Pastur bulk of `e` (see the module docs).
/// `scale` is 1 for raw ESDs and `1/N` for normalised ones.
pub fn mp_fit(e: &Esd, normalized: bool) -> Option<MpFit> {
    let (n, m) = (e.n as f64, e.m as f64);
    let unit = if normalized { 1.0 / n } else { 1.0 };
    let lmax = e.evals.iter().copied().fold(0f64, f64::max);
    if lmax <= 0.0 {
        return None;
    }
    let edge = |s2: f64| s2 * (n.sqrt() + m.sqrt()).powi(2) * unit;
    let tw = |s2: f64| s2 * (n.sqrt() + m.sqrt()) * (1.0 / n.sqrt() + 1.0 / m.sqrt()).cbrt() * unit;
    let mut spikes = 0usize;
    let mut s2 = 0.0;
    for _ in 0..50 {
        let bulk = &e.evals[..e.evals.len() - spikes];
        if bulk.is_empty() {
            break;
        }
        s2 = bulk.iter().sum::<f64>() / bulk.len() as f64 / (n * unit);
        let threshold = edge(s2) + 4.0 * tw(s2);
        let now = e.evals.iter().filter(|&&l| l > threshold).count();
        if now == spikes {
            break;
        }
        spikes = now;
    }
    let bulk_max = edge(s2);
    Some(MpFit {
        s2,
        bulk_min: s2 * (n.sqrt() - m.sqrt()).powi(2) * unit,
        bulk_max,
        spike_threshold: bulk_max + 4.0 * tw(s2),
        num_spikes: spikes,
        mp_softrank: bulk_max / lmax,
    })
}

/// The ESD of `mats` with each matrix's entries shuffled (seeded).
pub fn randomized_esd(mats: &[Array2<f32>], normalize: bool, seed: u64, name: &str) -> Result<Esd> {
    let mut rng = Rng::new(seed);
    let shuffled: Vec<Array2<f32>> = mats
        .iter()
        .map(|w| {
            let mut v: Vec<f32> = w.iter().copied().collect();
            rng.shuffle(&mut v);
            Array2::from_shape_vec(w.dim(), v).expect("same size")
        })
        .collect();
    esd(&shuffled, normalize, name)
}

/// Jensen–Shannon divergence (base 2) between histograms of `log10 λ`
/// (positive eigenvalues) of two ESDs on their common range, with
/// `clamp(√n, 10, 100)` bins for `n` eigenvalues (so that two samples of one
/// law score near 0 even for small layers).
pub fn rand_distance(a: &[f64], b: &[f64]) -> f64 {
    let la: Vec<f64> = a.iter().filter(|&&x| x > 0.0).map(|x| x.log10()).collect();
    let lb: Vec<f64> = b.iter().filter(|&&x| x > 0.0).map(|x| x.log10()).collect();
    let lo = la.iter().chain(&lb).copied().fold(f64::INFINITY, f64::min);
    let hi = la
        .iter()
        .chain(&lb)
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if la.is_empty() || lb.is_empty() || hi <= lo {
        return 0.0;
    }
    let bins = ((la.len().min(lb.len()) as f64).sqrt() as usize).clamp(10, 100);
    let hist = |xs: &[f64]| {
        let mut h = vec![0f64; bins];
        for x in xs {
            h[(((x - lo) / (hi - lo) * bins as f64) as usize).min(bins - 1)] += 1.0;
        }
        let t = xs.len() as f64;
        h.iter_mut().for_each(|v| *v /= t);
        h
    };
    let (p, q) = (hist(&la), hist(&lb));
    let kl = |x: &[f64], m: &[f64]| -> f64 {
        x.iter()
            .zip(m)
            .filter(|(xi, _)| **xi > 0.0)
            .map(|(xi, mi)| xi * (xi / mi).log2())
            .sum()
    };
    let mid: Vec<f64> = p.iter().zip(&q).map(|(x, y)| 0.5 * (x + y)).collect();
    (0.5 * kl(&p, &mid) + 0.5 * kl(&q, &mid)).clamp(0.0, 1.0)
}

/// WeightWatcher's reading of α: below 2 over-trained, above 6 under-trained.
pub fn alpha_warning(alpha: f64) -> Option<&'static str> {
    if alpha < 2.0 {
        Some("over-trained")
    } else if alpha > 6.0 {
        Some("under-trained")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_matrix_has_no_spikes_and_rank_one_signal_has_one() {
        for seed in 0..5 {
            let w = Rng::new(seed).normal_array((400, 200));
            let e = esd(std::slice::from_ref(&w), false, "noise").unwrap();
            let fit = mp_fit(&e, false).unwrap();
            assert_eq!(
                fit.num_spikes,
                0,
                "seed {seed}: {fit:?}, λmax {}",
                e.evals.last().unwrap()
            );
            assert!((fit.s2 - 1.0).abs() < 0.02, "{fit:?}");
            assert!(fit.mp_softrank > 0.9 && fit.mp_softrank < 1.1, "{fit:?}");

            // BBP: a rank-1 signal θ·u vᵀ (unit u, v) is visible when θ² > √(N·M) ≈ 283.
            let mut rng = Rng::new(100 + seed);
            let u: Vec<f64> = (0..400).map(|_| rng.normal()).collect();
            let v: Vec<f64> = (0..200).map(|_| rng.normal()).collect();
            let (nu, nv) = (
                u.iter().map(|x| x * x).sum::<f64>().sqrt(),
                v.iter().map(|x| x * x).sum::<f64>().sqrt(),
            );
            let theta = 3.0 * (400.0f64 * 200.0).powf(0.25);
            let spiked = Array2::from_shape_fn((400, 200), |(i, j)| {
                w[[i, j]] + (theta * u[i] / nu * v[j] / nv) as f32
            });
            let e = esd(&[spiked], false, "spiked").unwrap();
            let fit = mp_fit(&e, false).unwrap();
            assert_eq!(fit.num_spikes, 1, "seed {seed}: {fit:?}");
            assert!(fit.mp_softrank < 0.6);
            // Normalising the ESD changes units, not spikes.
            let e = esd(std::slice::from_ref(&w), true, "noise").unwrap();
            assert_eq!(mp_fit(&e, true).unwrap().num_spikes, 0);
        }
    }

    #[test]
    fn norm_metrics_by_hand() {
        // Singular values 4, 2, 0 of a 3x3 diagonal: λ = 16, 4, 0.
        let w = Array2::from_diag(&ndarray::arr1(&[4.0f32, 2.0, 0.0]));
        let e = esd(&[w], false, "d").unwrap();
        let m = norm_metrics(&e, f32::EPSILON as f64).unwrap();
        assert!((m.log_norm - 20f64.log10()).abs() < 1e-12);
        assert!((m.log_spectral_norm - 16f64.log10()).abs() < 1e-12);
        assert!((m.stable_rank - 20.0 / 16.0).abs() < 1e-12);
        assert_eq!(m.rank, 2);
        let (p, q) = (0.8f64, 0.2f64);
        let h = -(p * p.ln() + q * q.ln());
        assert!((m.entropy.unwrap() - h / 2f64.ln()).abs() < 1e-12);
        assert!((m.effective_rank - h.exp()).abs() < 1e-12);
        let zero = esd(&[Array2::zeros((3, 3))], false, "z").unwrap();
        assert!(norm_metrics(&zero, 1e-7).is_none());
        assert!(mp_fit(&zero, false).is_none());
    }

    #[test]
    fn shuffling_a_structured_matrix_moves_its_esd() {
        // Low rank plus small noise: shuffling spreads the spectrum into a bulk.
        let mut rng = Rng::new(3);
        let u: Vec<f32> = (0..200).map(|_| rng.normal() as f32).collect();
        let w = Array2::from_shape_fn((200, 100), |(i, j)| {
            u[i] * (j as f32 / 100.0) + 0.01 * rng.normal() as f32
        });
        let e = esd(std::slice::from_ref(&w), false, "w").unwrap();
        let r = randomized_esd(std::slice::from_ref(&w), false, 1, "w").unwrap();
        let d = rand_distance(&e.evals, &r.evals);
        assert!(d > 0.3, "{d}");
        let noise = Rng::new(5).normal_array((200, 100));
        let e = esd(std::slice::from_ref(&noise), false, "n").unwrap();
        let r = randomized_esd(&[noise], false, 1, "n").unwrap();
        let d0 = rand_distance(&e.evals, &r.evals);
        assert!(d0 < 0.1 && d0 < d / 5.0, "{d0} vs {d}");
        assert_eq!(rand_distance(&e.evals, &e.evals), 0.0);
    }

    #[test]
    fn warnings_follow_weightwatcher() {
        assert_eq!(alpha_warning(1.5), Some("over-trained"));
        assert_eq!(alpha_warning(4.0), None);
        assert_eq!(alpha_warning(7.0), Some("under-trained"));
    }
}
