//! Summary statistics of a tensor, as `weights inspect` prints them, and the
//! median the benchmarks and studies quote.

use ndarray::ArrayViewD;
use serde::Serialize;

/// Min, max, mean and standard deviation over the non-NaN values, plus the NaN count.
///
/// `std` is the population standard deviation (ddof = 0, as numpy's default),
/// accumulated in `f64`. Statistics of a tensor with no non-NaN value are
/// `None` (JSON `null`), never NaN.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorStats {
    /// Number of elements, NaNs included.
    pub numel: usize,
    /// Smallest non-NaN value (may be `-inf`); `None` when every value is NaN.
    pub min: Option<f64>,
    /// Largest non-NaN value (may be `inf`); `None` when every value is NaN.
    pub max: Option<f64>,
    /// Mean of the non-NaN values; `None` when there is none or it is not finite.
    pub mean: Option<f64>,
    /// Population standard deviation of the non-NaN values; `None` when there
    /// is none or it is not finite.
    pub std: Option<f64>,
    /// Number of NaN elements.
    pub nan: usize,
}

/// Computes [`TensorStats`] in two passes (mean, then squared deviations).
pub fn tensor_stats(data: ArrayViewD<'_, f32>) -> TensorStats {
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0f64;
    let mut nan = 0usize;
    for &v in data.iter() {
        if v.is_nan() {
            nan += 1;
            continue;
        }
        min = min.min(v);
        max = max.max(v);
        sum += v as f64;
    }
    let n = data.len() - nan;
    if n == 0 {
        return TensorStats {
            numel: data.len(),
            min: None,
            max: None,
            mean: None,
            std: None,
            nan,
        };
    }
    let mean = sum / n as f64;
    let var = if mean.is_finite() {
        data.iter()
            .filter(|v| !v.is_nan())
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64
    } else {
        f64::NAN
    };
    let finite = |x: f64| x.is_finite().then_some(x);
    TensorStats {
        numel: data.len(),
        min: Some(min as f64),
        max: Some(max as f64),
        mean: finite(mean),
        std: finite(var.sqrt()),
        nan,
    }
}

/// The median of `values` (the upper one of an even count, as timing
/// reports quote it); NaN when there are none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The arithmetic mean of `values`; NaN when there are none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    #[test]
    fn stats_by_hand() {
        let a = ArrayD::from_shape_vec(vec![5], vec![1.0, 2.0, f32::NAN, 3.0, 6.0]).unwrap();
        let s = tensor_stats(a.view());
        assert_eq!(
            (s.min, s.max, s.mean, s.nan),
            (Some(1.0), Some(6.0), Some(3.0), 1)
        );
        // deviations -2, -1, 0, 3 -> variance 14/4
        assert!((s.std.unwrap() - (3.5f64).sqrt()).abs() < 1e-12);
        let empty = tensor_stats(ArrayD::<f32>::zeros(vec![0]).view());
        assert_eq!(empty.mean, None);
    }

    #[test]
    fn median_is_the_upper_middle_and_nan_when_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
        assert_eq!(mean([1.0, 2.0, 6.0]), 3.0);
        assert!(mean(std::iter::empty()).is_nan());
    }
}
