//! Helpers shared by the merge integration tests.

use weights::StateDict;

/// The largest absolute difference between same-named tensors (same tensor set required).
pub fn max_diff(a: &StateDict, b: &StateDict) -> f32 {
    assert_eq!(a.len(), b.len(), "different tensor sets");
    a.iter()
        .map(|(n, t)| {
            t.data
                .iter()
                .zip(b.get(n).unwrap().data.iter())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        })
        .fold(0.0, f32::max)
}
