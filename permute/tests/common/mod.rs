//! Convolution helpers shared by the CNN tests (plain ndarray, eval mode).
#![allow(dead_code)]

use ndarray::{Array1, Array2, Array4, ArrayD, Ix1, Ix2, Ix4};
use weights::StateDict;

/// Same-padding, stride-1 2-D convolution (no bias), `x: [N, C, H, W]`.
pub fn conv(x: &Array4<f32>, w: &ArrayD<f32>) -> Array4<f32> {
    let w = w.view().into_dimensionality::<Ix4>().unwrap();
    let (n, cin, h, wd) = x.dim();
    let (cout, _, kh, kw) = w.dim();
    let (ph, pw) = (kh / 2, kw / 2);
    Array4::from_shape_fn((n, cout, h, wd), |(b, o, i, j)| {
        let mut acc = 0.0;
        for c in 0..cin {
            for u in 0..kh {
                for v in 0..kw {
                    let (ii, jj) = (
                        i as isize + u as isize - ph as isize,
                        j as isize + v as isize - pw as isize,
                    );
                    if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < wd {
                        acc += x[[b, c, ii as usize, jj as usize]] * w[[o, c, u, v]];
                    }
                }
            }
        }
        acc
    })
}

pub fn batch_norm(x: &Array4<f32>, sd: &StateDict, p: &str) -> Array4<f32> {
    let g = |n: &str| vector(sd, &format!("{p}.{n}"));
    let (w, b, m, v) = (g("weight"), g("bias"), g("running_mean"), g("running_var"));
    Array4::from_shape_fn(x.dim(), |(n, c, i, j)| {
        (x[[n, c, i, j]] - m[c]) / (v[c] + 1e-5).sqrt() * w[c] + b[c]
    })
}

pub fn relu(x: Array4<f32>) -> Array4<f32> {
    x.mapv(|v| v.max(0.0))
}

/// A 1-D tensor of the state dict.
pub fn vector(sd: &StateDict, name: &str) -> Array1<f32> {
    sd.get(name)
        .unwrap()
        .data
        .view()
        .into_dimensionality::<Ix1>()
        .unwrap()
        .to_owned()
}

/// A 2-D tensor of the state dict.
pub fn matrix(sd: &StateDict, name: &str) -> Array2<f32> {
    sd.get(name)
        .unwrap()
        .data
        .view()
        .into_dimensionality::<Ix2>()
        .unwrap()
        .to_owned()
}

/// `x · Wᵀ + b` with `{prefix}.weight` and `{prefix}.bias`.
pub fn linear(x: &Array2<f32>, sd: &StateDict, prefix: &str) -> Array2<f32> {
    x.dot(&matrix(sd, &format!("{prefix}.weight")).t()) + vector(sd, &format!("{prefix}.bias"))
}
