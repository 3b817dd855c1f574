//! Power-law fits of an empirical spectral density, as WeightWatcher does them.
//!
//! The Clauset–Shalizi–Newman method (SIAM Review 51, 2009) on the sorted
//! eigenvalues `x₀ ≤ x₁ ≤ … ≤ x_{N−1}` (those above `1e-5`, WeightWatcher's
//! `EVALS_THRESH`): every `xᵢ` but the largest is a candidate `xmin`, with
//! tail `xᵢ … x_{N−1}` of `n = N − i` values and
//!
//! - `α = 1 + n / Σ_{j≥i} ln(xⱼ / xᵢ)` (continuous maximum likelihood),
//!   computed in O(1) per candidate from suffix sums of `ln x`;
//! - `D = max_{j≥i} | 1 − (xⱼ/xᵢ)^{1−α} − (j − i)/n |`, the Kolmogorov–Smirnov
//!   distance between the fitted CDF and the empirical CDF `0, 1/n, …` at the
//!   tail points (WeightWatcher's `WW_powerlaw` convention; `D = 1` when `α ≤ 1`);
//!
//! and the candidate of least `D` (the first on ties) is kept, with
//! `σ_α = (α − 1)/√n`. A naive scan costs O(N²) exponentials; here each `D`
//! is bounded from √n probes and refined only where the bound could beat the
//! current maximum, and candidates stop as soon as they cannot beat the best
//! `D` so far ([`ks_distance_bounded`]): the result is the exact minimiser.
//!
//! Like WeightWatcher, fewer than 20 eigenvalues switch to its small-N rule:
//! the bias-corrected `α = 1 + (n − 1)/Σ ln(xⱼ/xᵢ)`, tails of at least 8
//! values, and `xmin` minimising `D − 0.868/√n`.
//!
//! Options: `clip_xmax` is WeightWatcher's `fix_fingers = 'clip_xmax'`
//! exactly (tested on MiniLM against `WeightWatcher.fit_powerlaw`): for
//! `k = 2, 3, …, max_fingers − 1` the fit is redone without the `k` largest
//! eigenvalues, the first whose α is more than `finger_thresh` below the
//! unclipped α is kept (reported as `k − 1` fingers, the tail counted over
//! the whole spectrum), and the search stops once α ≤ 2. `xmin_peak`
//! restricts `xmin` to `[0.95·p, 1.5·p]` around the peak `p` of a 100-bin
//! histogram of `log10 λ`, which is what WeightWatcher's `fix_fingers =
//! 'xmin_peak'` documents; WeightWatcher 0.7.7 itself returns a failed fit
//! for it on every layer (it hands that range to `WWFit`, which takes one
//! number), so this option has no reference to match.

use serde::Serialize;

/// Eigenvalues at or below this are not fitted (WeightWatcher's `EVALS_THRESH`).
pub const EVALS_THRESH: f64 = 1e-5;
/// Below this many eigenvalues the small-N rule is used (WeightWatcher's `SMALL_N_CUTOFF`).
pub const SMALL_N_CUTOFF: usize = 20;

/// How `xmin` is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FixFingers {
    /// Plain CSN over all candidates.
    #[default]
    None,
    /// Restrict `xmin` to near the peak of the log-histogram.
    XminPeak,
    /// Clip the largest eigenvalues ("fingers") while α drops.
    ClipXmax {
        /// At most this many eigenvalues are clipped (WeightWatcher default 10).
        max_fingers: usize,
        /// α must drop by more than this to accept a clip (default 1.0).
        finger_thresh: f64,
    },
}

/// A fitted power law `p(λ) ∝ λ^{−α}` for `λ ≥ xmin`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerLawFit {
    /// Exponent α.
    pub alpha: f64,
    /// Lower bound of the tail.
    pub xmin: f64,
    /// Largest eigenvalue used.
    pub xmax: f64,
    /// KS distance `D` at the chosen `xmin`.
    pub ks_distance: f64,
    /// Standard error `(α − 1)/√n`.
    pub sigma: f64,
    /// Number of eigenvalues `≥ xmin` (`num_pl_spikes` in WeightWatcher;
    /// with clipped fingers, they are counted too, as WeightWatcher does).
    pub num_pl_spikes: usize,
    /// `ClipXmax`'s finger count as WeightWatcher reports it: the fit left
    /// out the `num_fingers + 1` largest eigenvalues (0: none).
    pub num_fingers: usize,
}

/// Why a fit could not be made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum NotFitted {
    /// Fewer eigenvalues above [`EVALS_THRESH`] than required.
    TooFewEigenvalues {
        /// Eigenvalues above [`EVALS_THRESH`].
        have: usize,
        /// The least number required (`min_evals`, at least 2).
        need: usize,
    },
    /// All eigenvalues are equal (no tail to fit).
    Degenerate,
}

impl std::fmt::Display for NotFitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotFitted::TooFewEigenvalues { have, need } => {
                write!(f, "{have} eigenvalues, fewer than {need}")
            }
            NotFitted::Degenerate => write!(f, "all eigenvalues are equal"),
        }
    }
}

impl std::error::Error for NotFitted {}

/// Fits a power law to `evals` (any order; NaN-free, checked by callers).
/// `min_evals` is the least number of eigenvalues above [`EVALS_THRESH`].
pub fn fit_power_law(
    evals: &[f64],
    fix: FixFingers,
    min_evals: usize,
) -> Result<PowerLawFit, NotFitted> {
    let mut x: Vec<f64> = evals
        .iter()
        .copied()
        .filter(|&v| v > EVALS_THRESH)
        .collect();
    x.sort_by(|a, b| a.total_cmp(b));
    let need = min_evals.max(2);
    if x.len() < need {
        return Err(NotFitted::TooFewEigenvalues {
            have: x.len(),
            need,
        });
    }
    if x[0] == x[x.len() - 1] {
        return Err(NotFitted::Degenerate);
    }
    match fix {
        FixFingers::None => fit_sorted(&x, None),
        FixFingers::XminPeak => {
            let peak = log_histogram_peak(&x, 100);
            fit_sorted(&x, Some((0.95 * peak, 1.5 * peak)))
        }
        FixFingers::ClipXmax {
            max_fingers,
            finger_thresh,
        } => clip_fingers(&x, max_fingers, finger_thresh),
    }
}

/// The maximum-likelihood fit with a given `xmin` (no search): the tail is
/// every eigenvalue `≥ xmin`.
pub fn fit_power_law_xmin(evals: &[f64], xmin: f64) -> Result<PowerLawFit, NotFitted> {
    let mut x: Vec<f64> = evals
        .iter()
        .copied()
        .filter(|&v| v >= xmin && v > EVALS_THRESH)
        .collect();
    x.sort_by(|a, b| a.total_cmp(b));
    if x.len() < 2 {
        return Err(NotFitted::TooFewEigenvalues {
            have: x.len(),
            need: 2,
        });
    }
    let n = x.len() as f64;
    let logs: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let s: f64 = logs.iter().map(|l| l - xmin.ln()).sum();
    if s <= 0.0 {
        return Err(NotFitted::Degenerate);
    }
    let alpha = 1.0 + n / s;
    let shifted: Vec<f64> = std::iter::once(xmin.ln())
        .chain(logs.iter().copied())
        .collect();
    Ok(PowerLawFit {
        alpha,
        xmin,
        xmax: x[x.len() - 1],
        // Empirical CDF of the tail against the fit from xmin itself.
        ks_distance: ks_from(&shifted, alpha),
        sigma: (alpha - 1.0) / n.sqrt(),
        num_pl_spikes: x.len(),
        num_fingers: 0,
    })
}

/// KS distance of the points `logs[1..]` against a power law starting at `exp(logs[0])`.
fn ks_from(logs: &[f64], alpha: f64) -> f64 {
    let n = (logs.len() - 1) as f64;
    logs[1..]
        .iter()
        .enumerate()
        .map(|(j, l)| (1.0 - ((1.0 - alpha) * (l - logs[0])).exp() - j as f64 / n).abs())
        .fold(0.0, f64::max)
}

/// The left edge of the fullest of `bins` equal bins of `log10 x` (as numpy's histogram).
pub fn log_histogram_peak(x: &[f64], bins: usize) -> f64 {
    let logs: Vec<f64> = x.iter().map(|v| v.log10()).collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi <= lo {
        return 10f64.powf(lo);
    }
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for l in &logs {
        let b = (((l - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let best = counts
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0);
    10f64.powf(lo + best as f64 * width)
}

/// CSN on sorted positive `x`, candidates optionally limited to `xmin ∈ [lo, hi]`.
fn fit_sorted(x: &[f64], range: Option<(f64, f64)>) -> Result<PowerLawFit, NotFitted> {
    let n_all = x.len();
    let logs: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    // suffix[i] = Σ_{j ≥ i} ln x_j
    let mut suffix = vec![0.0; n_all + 1];
    for i in (0..n_all).rev() {
        suffix[i] = suffix[i + 1] + logs[i];
    }
    let small = n_all < SMALL_N_CUTOFF;
    let in_range = |i: usize| range.is_none_or(|(lo, hi)| x[i] >= lo && x[i] <= hi);
    let mut best: Option<(f64, usize, f64, f64)> = None; // (objective, i, alpha, D)
    for pass in 0..2 {
        for i in 0..n_all - 1 {
            if pass == 0 && !in_range(i) {
                continue;
            }
            let n = (n_all - i) as f64;
            let s = suffix[i] - n * logs[i];
            let (alpha, objective_shift) = if small {
                if n_all - i < 8 || s <= 1e-12 {
                    continue;
                }
                (1.0 + (n - 1.0) / s, -0.868 / n.sqrt())
            } else {
                (1.0 + n / s, 0.0)
            };
            // Candidates that cannot beat the best so far stop early.
            let cutoff = best.map_or(f64::INFINITY, |b| b.0 - objective_shift);
            let d = if alpha > 1.0 && s > 0.0 {
                ks_distance_bounded(&logs[i..], alpha, cutoff)
            } else {
                1.0
            };
            let obj = d + objective_shift;
            if best.is_none_or(|b| obj < b.0) {
                best = Some((obj, i, alpha, d));
            }
        }
        // No candidate inside the requested range: fall back to all candidates.
        if best.is_some() || range.is_none() {
            break;
        }
    }
    let (_, i, alpha, d) = match best {
        Some(b) => b,
        // Small-N with no admissible tail: use the whole sample, as WeightWatcher does.
        None => {
            let n = n_all as f64;
            let s = suffix[0] - n * logs[0];
            if s <= 1e-12 {
                return Err(NotFitted::Degenerate);
            }
            let alpha = 1.0 + (n - 1.0) / s;
            (
                0.0,
                0,
                alpha,
                if alpha > 1.0 {
                    ks_distance(&logs, alpha)
                } else {
                    1.0
                },
            )
        }
    };
    let n = n_all - i;
    Ok(PowerLawFit {
        alpha,
        xmin: x[i],
        xmax: x[n_all - 1],
        ks_distance: d,
        sigma: (alpha - 1.0) / (n as f64).sqrt(),
        num_pl_spikes: n,
        num_fingers: 0,
    })
}

/// `max_j |1 − exp((1−α)(ln x_j − ln x_0)) − j/n|` over a sorted tail given by its logs.
pub fn ks_distance(tail_logs: &[f64], alpha: f64) -> f64 {
    ks_distance_bounded(tail_logs, alpha, f64::INFINITY)
}

/// [`ks_distance`], exact whenever the result is below `cutoff`; once the
/// distance is known to be at least `cutoff` it returns early with a value
/// `≥ cutoff`.
///
/// Both CDFs increase along the tail, so between two probed points `a < b`
/// every deviation is at most `max(F_b − E_{a+1}, E_{b−1} − F_a)`. The tail is
/// probed every `√n` points first; only the stretches whose bound exceeds the
/// largest deviation found so far are then scanned point by point. This keeps
/// the exact result and makes a CSN fit close to O(N^1.5) instead of O(N²).
pub fn ks_distance_bounded(tail_logs: &[f64], alpha: f64, cutoff: f64) -> f64 {
    let n = tail_logs.len();
    let nf = n as f64;
    let l0 = tail_logs[0];
    let c = 1.0 - alpha;
    let theory = |j: usize| 1.0 - (c * (tail_logs[j] - l0)).exp();
    let emp = |j: usize| j as f64 / nf;
    let stride = ((n as f64).sqrt() as usize).max(1);
    let mut probes: Vec<usize> = (0..n).step_by(stride).collect();
    if probes.last() != Some(&(n - 1)) {
        probes.push(n - 1);
    }
    let f: Vec<f64> = probes.iter().map(|&j| theory(j)).collect();
    let mut d = 0f64;
    for (k, &j) in probes.iter().enumerate() {
        d = d.max((f[k] - emp(j)).abs());
    }
    if d >= cutoff {
        return d;
    }
    for k in 0..probes.len() - 1 {
        let (a, b) = (probes[k], probes[k + 1]);
        if b - a < 2 {
            continue;
        }
        let bound = (f[k + 1] - emp(a + 1)).max(emp(b - 1) - f[k]);
        if bound <= d {
            continue;
        }
        for j in a + 1..b {
            d = d.max((theory(j) - emp(j)).abs());
        }
        if d >= cutoff {
            return d;
        }
    }
    d
}

/// WeightWatcher's `fit_clipped_powerlaw`: clip the top `idx` eigenvalues for
/// `idx = 2, 3, …` and accept the first fit whose α is more than
/// `finger_thresh` below the unclipped one; stop if α reaches 2.
fn clip_fingers(
    x: &[f64],
    max_fingers: usize,
    finger_thresh: f64,
) -> Result<PowerLawFit, NotFitted> {
    let first = fit_sorted(x, None)?;
    for idx in 2..max_fingers {
        if idx + 2 > x.len() {
            break;
        }
        let Ok(fit) = fit_sorted(&x[..x.len() - idx], None) else {
            break;
        };
        if fit.alpha + finger_thresh < first.alpha {
            // WeightWatcher's bookkeeping: `idx` values were dropped but it
            // reports `idx − 1` fingers, and counts the tail over the whole
            // spectrum (clipped values included).
            return Ok(PowerLawFit {
                num_fingers: idx - 1,
                num_pl_spikes: fit.num_pl_spikes + idx,
                ..fit
            });
        }
        if fit.alpha <= 2.0 {
            break;
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weights::rng::Rng;

    /// Pareto samples with density ∝ x^{−α} on [xmin, ∞): x = xmin·(1−u)^{−1/(α−1)}.
    fn pareto(n: usize, alpha: f64, xmin: f64, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| xmin * (1.0 - rng.uniform()).powf(-1.0 / (alpha - 1.0)))
            .collect()
    }

    #[test]
    fn recovers_alpha_of_pareto_samples() {
        for (k, &alpha) in [2.0, 3.0, 4.5].iter().enumerate() {
            let x = pareto(20_000, alpha, 1.0, 42 + k as u64);
            // With the known xmin, the MLE alone (standard error (α−1)/√n ≤ 0.025).
            let known = fit_power_law_xmin(&x, 1.0).unwrap();
            assert!(
                (known.alpha - alpha).abs() < 0.05,
                "alpha {alpha}: fitted {}",
                known.alpha
            );
            assert_eq!(known.num_pl_spikes, 20_000);
            // With xmin searched by CSN: a higher xmin leaves fewer points, so a wider margin.
            let fit = fit_power_law(&x, FixFingers::None, 50).unwrap();
            assert!(
                (fit.alpha - alpha).abs() < 3.0 * fit.sigma.max(0.025),
                "alpha {alpha}: {fit:?}"
            );
            assert!(fit.ks_distance < 0.05, "D = {}", fit.ks_distance);
            assert!(
                (fit.sigma - (fit.alpha - 1.0) / (fit.num_pl_spikes as f64).sqrt()).abs() < 1e-12
            );
        }
    }

    #[test]
    fn bounded_ks_equals_the_plain_scan() {
        let mut rng = Rng::new(1);
        for n in [2usize, 3, 10, 97, 1000] {
            let mut logs: Vec<f64> = (0..n).map(|_| rng.uniform() * 5.0).collect();
            logs.sort_by(|a, b| a.total_cmp(b));
            for alpha in [1.5, 2.0, 3.7] {
                let plain = logs
                    .iter()
                    .enumerate()
                    .map(|(j, l)| {
                        (1.0 - ((1.0 - alpha) * (l - logs[0])).exp() - j as f64 / n as f64).abs()
                    })
                    .fold(0.0, f64::max);
                assert_eq!(ks_distance(&logs, alpha), plain, "n={n} alpha={alpha}");
            }
        }
    }

    #[test]
    fn finds_the_tail_above_a_uniform_bulk() {
        // A bulk uniform on [0.1, 1) below a Pareto(3) tail from xmin = 1.
        let mut rng = Rng::new(9);
        let mut x: Vec<f64> = (0..5000).map(|_| 0.1 + 0.9 * rng.uniform()).collect();
        x.extend(pareto(5000, 3.0, 1.0, 10));
        let fit = fit_power_law(&x, FixFingers::None, 50).unwrap();
        assert!((fit.alpha - 3.0).abs() < 0.1, "{fit:?}");
        assert!((fit.xmin - 1.0).abs() < 0.1, "{fit:?}");
        let peak = fit_power_law(&x, FixFingers::XminPeak, 50).unwrap();
        assert!(peak.alpha.is_finite());
    }

    #[test]
    fn ks_distance_by_hand() {
        // Tail {1, e}: α = 1 + 2/(0 + 1) = 3. Theory at x = e: 1 − e^{−2}; empirical 1/2.
        let fit = fit_sorted(&[1.0, std::f64::consts::E, 10.0], None);
        let d = ks_distance(&[0.0, 1.0], 3.0);
        assert!((d - (1.0 - (-2.0f64).exp() - 0.5)).abs() < 1e-15);
        assert!(fit.is_ok());
        // Three points 1, 2, 4 with α = 2: F(2) = 1/2, F(4) = 3/4 vs 1/3, 2/3 -> D = 1/6.
        let logs = [1f64.ln(), 2f64.ln(), 4f64.ln()];
        assert!((ks_distance(&logs, 2.0) - 1.0 / 6.0).abs() < 1e-15);
    }

    /// `(D, α, xmin)` of the least-D candidate `xmin` (sorted `x`, candidates
    /// where `keep(xmin)`), written from the definition: O(N²), no suffix sums.
    fn brute_force(x: &[f64], keep: impl Fn(f64) -> bool) -> (f64, f64, f64) {
        let mut best = (f64::INFINITY, 0.0, 0.0);
        for i in 0..x.len() - 1 {
            if !keep(x[i]) {
                continue;
            }
            let tail = &x[i..];
            let n = tail.len() as f64;
            let alpha = 1.0 + n / tail.iter().map(|t| (t / x[i]).ln()).sum::<f64>();
            let d = tail
                .iter()
                .enumerate()
                .map(|(j, t)| (1.0 - (t / x[i]).powf(1.0 - alpha) - j as f64 / n).abs())
                .fold(0.0, f64::max);
            if d < best.0 {
                best = (d, alpha, x[i]);
            }
        }
        best
    }

    #[test]
    fn matches_a_direct_evaluation_of_the_definition() {
        // O(N^2) reference written from the formula, with no suffix sums.
        let x = {
            let mut v = pareto(300, 2.5, 0.5, 77);
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        let best = brute_force(&x, |_| true);
        let fit = fit_power_law(&x, FixFingers::None, 10).unwrap();
        assert!((fit.ks_distance - best.0).abs() < 1e-12);
        assert!((fit.alpha - best.1).abs() < 1e-9);
        assert_eq!(fit.xmin, best.2);
    }

    #[test]
    fn degenerate_inputs_are_not_fitted() {
        assert_eq!(
            fit_power_law(&[1.0; 100], FixFingers::None, 10),
            Err(NotFitted::Degenerate)
        );
        assert_eq!(
            fit_power_law(&[1.0, 2.0, 0.0, 1e-9], FixFingers::None, 10),
            Err(NotFitted::TooFewEigenvalues { have: 2, need: 10 })
        );
        // Small N (< 20) uses the small-N rule and still gives a finite fit.
        let fit = fit_power_law(&pareto(15, 3.0, 1.0, 3), FixFingers::None, 8).unwrap();
        assert!(fit.alpha.is_finite() && fit.num_pl_spikes >= 8);
    }

    #[test]
    fn clip_xmax_leaves_a_clean_power_law_alone() {
        // (Where clipping does lower α: tests/minilm.rs, on WeightWatcher's fixtures.)
        let x = pareto(2000, 2.5, 1.0, 5);
        let fit0 = fit_power_law(&x, FixFingers::None, 50).unwrap();
        let clip = FixFingers::ClipXmax {
            max_fingers: 10,
            finger_thresh: 1.0,
        };
        let same = fit_power_law(&x, clip, 50).unwrap();
        assert_eq!(same.num_fingers, 0, "a clean power law has no fingers");
        assert_eq!(same, fit0);
    }

    #[test]
    fn xmin_peak_is_the_best_candidate_near_the_histogram_peak() {
        // Brute force over the candidates in [0.95 p, 1.5 p], from the definition.
        let mut x = pareto(400, 2.5, 1.0, 21);
        x.extend((0..600).map(|i| 0.2 + 0.8 * i as f64 / 600.0));
        x.sort_by(|a, b| a.total_cmp(b));
        let p = log_histogram_peak(&x, 100);
        let best = brute_force(&x, |xmin| (0.95 * p..=1.5 * p).contains(&xmin));
        let fit = fit_power_law(&x, FixFingers::XminPeak, 50).unwrap();
        assert!(best.0.is_finite(), "no candidate near the peak {p}");
        assert_eq!(fit.xmin, best.2);
        assert!((fit.alpha - best.1).abs() < 1e-9 && (fit.ks_distance - best.0).abs() < 1e-12);
        // The plain fit is free to go elsewhere, and here it does.
        let plain = fit_power_law(&x, FixFingers::None, 50).unwrap();
        assert!(
            plain.xmin > 1.5 * p || plain.xmin < 0.95 * p,
            "{plain:?} vs peak {p}"
        );
    }
}
