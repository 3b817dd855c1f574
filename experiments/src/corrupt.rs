//! Seeded image corruptions in the spirit of MNIST-C (Mu & Gilmer 2019) and
//! ImageNet-C / CIFAR-C (Hendrycks & Dietterich 2019), for square grey images
//! with pixels in [0, 1] stored as rows (`Split::x`, `[n, side²]`).
//!
//! Each corruption has five severities; its parameter per severity follows
//! ImageNet-C's tables where they carry over to 28×28 grey digits (noise,
//! contrast, brightness) and is scaled down where they do not (blur σ in
//! pixels, rotation angle). Every output is clipped to [0, 1].
//!
//! Randomness is per image: image `i` of a split corrupted with `seed` draws
//! from `Rng::new(image_seed(seed, corruption, i))`, so a corrupted split is
//! the same whatever order or subset it is computed in.

use anyhow::{Context, bail};
use weights::rng::Rng;

use crate::data::Split;

/// A corruption type.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// Additive Gaussian noise, σ per severity.
    GaussianNoise,
    /// Poisson (shot) noise: `Poisson(x·λ)/λ`, fewer photons λ at higher severity.
    ShotNoise,
    /// Salt-and-pepper: a fraction of pixels set to 0 or 1 (half each).
    ImpulseNoise,
    /// Separable Gaussian blur, σ in pixels, edge pixels repeated.
    GaussianBlur,
    /// Contrast towards each image's mean: `(x − m)·c + m`.
    Contrast,
    /// Brightness: `x + b`.
    Brightness,
    /// Rotation about the image centre by ±θ degrees (sign drawn per
    /// image), bilinear, zero outside.
    Rotate,
}

/// Severities run from 1 (mildest) to this.
pub const MAX_SEVERITY: u8 = 5;

impl Corruption {
    /// Every corruption, in a fixed order.
    pub const ALL: [Corruption; 7] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::GaussianBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Rotate,
    ];

    /// Its name (`gaussian_noise`, …).
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::Rotate => "rotate",
        }
    }

    /// Parses a name (`gaussian_noise` or `gaussian-noise`); an unknown one
    /// is an error that lists the known ones.
    pub fn from_name(s: &str) -> anyhow::Result<Corruption> {
        let key = s.replace('-', "_");
        Corruption::ALL
            .into_iter()
            .find(|c| c.name() == key)
            .with_context(|| {
                format!(
                    "unknown corruption '{s}' (known: {})",
                    Corruption::ALL.map(Corruption::name).join(", ")
                )
            })
    }

    /// The corruption's parameter at `severity` (1–5): σ, λ, fraction, blur
    /// σ in pixels, contrast factor, brightness shift or angle in degrees.
    pub fn parameter(self, severity: u8) -> anyhow::Result<f64> {
        if !(1..=MAX_SEVERITY).contains(&severity) {
            bail!(
                "{}: severity {severity} is out of range (1 to {MAX_SEVERITY})",
                self.name()
            );
        }
        let table: [f64; 5] = match self {
            // ImageNet-C's σ, photon counts, salt-and-pepper amounts,
            // contrast factors and brightness shifts.
            Corruption::GaussianNoise => [0.08, 0.12, 0.18, 0.26, 0.38],
            Corruption::ShotNoise => [60.0, 25.0, 12.0, 5.0, 3.0],
            Corruption::ImpulseNoise => [0.03, 0.06, 0.09, 0.17, 0.27],
            Corruption::Contrast => [0.4, 0.3, 0.2, 0.1, 0.05],
            Corruption::Brightness => [0.1, 0.2, 0.3, 0.4, 0.5],
            // 28-pixel digits: ImageNet-C's 1–6 px blur would erase them.
            Corruption::GaussianBlur => [0.5, 0.75, 1.0, 1.5, 2.0],
            Corruption::Rotate => [10.0, 20.0, 30.0, 45.0, 60.0],
        };
        Ok(table[severity as usize - 1])
    }
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The seed image `index` draws its randomness from.
pub fn image_seed(seed: u64, c: Corruption, index: usize) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((c as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(index as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Poisson draw (Knuth's product of uniforms; λ here is at most 60).
fn poisson(rng: &mut Rng, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    let limit = (-lambda).exp();
    let (mut k, mut p) = (0u32, 1.0f64);
    loop {
        p *= rng.uniform();
        if p <= limit {
            return k as f64;
        }
        k += 1;
    }
}

/// The normalised 1-D Gaussian kernel of `sigma` pixels, radius ⌈3σ⌉.
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f64> = (-r..=r)
        .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

fn blur(img: &[f32], side: usize, sigma: f64) -> Vec<f32> {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let at = |i: i64| i.clamp(0, side as i64 - 1) as usize;
    // One 1-D pass of the kernel; `index(y, x, shifted)` picks the neighbour
    // along the pass's axis.
    let pass = |src: &[f64], index: &dyn Fn(usize, usize, usize) -> usize| -> Vec<f64> {
        let mut out = vec![0f64; side * side];
        for y in 0..side {
            for x in 0..side {
                out[y * side + x] = k
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * src[index(y, x, j)])
                    .sum();
            }
        }
        out
    };
    let img: Vec<f64> = img.iter().map(|&v| v as f64).collect();
    let rows = pass(&img, &|y, x, j| y * side + at(x as i64 + j as i64 - r));
    let cols = pass(&rows, &|y, x, j| at(y as i64 + j as i64 - r) * side + x);
    cols.into_iter().map(|v| v as f32).collect()
}

/// Rotation by `degrees` (counter-clockwise on screen) about the centre,
/// bilinear, zero outside: output pixel (row y, column x) samples the input
/// at the point that rotates onto it.
pub fn rotate(img: &[f32], side: usize, degrees: f64) -> Vec<f32> {
    let (s, c) = degrees.to_radians().sin_cos();
    let mid = (side as f64 - 1.0) / 2.0;
    let px = |y: i64, x: i64| -> f64 {
        if (0..side as i64).contains(&y) && (0..side as i64).contains(&x) {
            img[y as usize * side + x as usize] as f64
        } else {
            0.0
        }
    };
    let mut out = vec![0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            // Screen coordinates: u right, v up. Inverse rotation by −θ.
            let (u, v) = (x as f64 - mid, mid - y as f64);
            let (su, sv) = (c * u + s * v, -s * u + c * v);
            let (sx, sy) = (su + mid, mid - sv);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let v = px(y0, x0) * (1.0 - fx) * (1.0 - fy)
                + px(y0, x0 + 1) * fx * (1.0 - fy)
                + px(y0 + 1, x0) * (1.0 - fx) * fy
                + px(y0 + 1, x0 + 1) * fx * fy;
            out[y * side + x] = v as f32;
        }
    }
    out
}

/// One corrupted image (`side × side`, row-major, values in [0, 1]).
pub fn corrupt_image(
    img: &[f32],
    side: usize,
    c: Corruption,
    severity: u8,
    rng: &mut Rng,
) -> anyhow::Result<Vec<f32>> {
    anyhow::ensure!(
        img.len() == side * side,
        "{c}: an image of {} pixels is not {side}×{side}",
        img.len()
    );
    let p = c.parameter(severity)?;
    let clip = |v: f64| v.clamp(0.0, 1.0) as f32;
    Ok(match c {
        Corruption::GaussianNoise => img
            .iter()
            .map(|&x| clip(x as f64 + p * rng.normal()))
            .collect(),
        Corruption::ShotNoise => img
            .iter()
            .map(|&x| clip(poisson(rng, x as f64 * p) / p))
            .collect(),
        Corruption::ImpulseNoise => img
            .iter()
            .map(|&x| {
                if rng.uniform() < p {
                    if rng.uniform() < 0.5 { 0.0 } else { 1.0 }
                } else {
                    x
                }
            })
            .collect(),
        Corruption::GaussianBlur => blur(img, side, p),
        Corruption::Contrast => {
            let m = img.iter().map(|&x| x as f64).sum::<f64>() / img.len() as f64;
            img.iter().map(|&x| clip((x as f64 - m) * p + m)).collect()
        }
        Corruption::Brightness => img.iter().map(|&x| clip(x as f64 + p)).collect(),
        Corruption::Rotate => {
            let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            rotate(img, side, sign * p)
        }
    })
}

/// The split with every image corrupted by `c` at `severity` (labels kept),
/// image `i` drawing from [`image_seed`]`(seed, c, i)`.
pub fn corrupt(split: &Split, c: Corruption, severity: u8, seed: u64) -> anyhow::Result<Split> {
    c.parameter(severity)?;
    let pixels = split.x.ncols();
    let side = (pixels as f64).sqrt().round() as usize;
    anyhow::ensure!(
        side * side == pixels,
        "{c}: images of {pixels} pixels are not square"
    );
    let rows: Vec<Vec<f32>> = {
        use rayon::prelude::*;
        (0..split.y.len())
            .into_par_iter()
            .map(|i| {
                let mut rng = Rng::new(image_seed(seed, c, i));
                let img = split.x.row(i).to_vec();
                corrupt_image(&img, side, c, severity, &mut rng)
            })
            .collect::<anyhow::Result<_>>()?
    };
    let x = ndarray::Array2::from_shape_vec((rows.len(), pixels), rows.concat())?;
    Ok(Split {
        x,
        y: split.y.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruptions_are_written_and_read_by_name() {
        for c in Corruption::ALL {
            let v = serde_json::to_value(c).unwrap();
            assert_eq!(v, c.name());
            assert_eq!(serde_json::from_value::<Corruption>(v).unwrap(), c);
        }
    }

    /// A 5×5 image: value (y·5 + x)/24.
    fn ramp() -> Vec<f32> {
        (0..25).map(|i| i as f32 / 24.0).collect()
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-6
    }

    #[test]
    fn contrast_and_brightness_match_hand_computed_pixels() {
        let img = ramp(); // mean 0.5
        let mut rng = Rng::new(0);
        // Severity 2: c = 0.3. Pixel 0: (0 − 0.5)·0.3 + 0.5 = 0.35.
        let out = corrupt_image(&img, 5, Corruption::Contrast, 2, &mut rng).unwrap();
        assert!(close(out[0], 0.35), "{}", out[0]);
        assert!(close(out[24], 0.65), "{}", out[24]);
        // Severity 3: b = 0.3. Pixel 6: 6/24 + 0.3 = 0.55; pixel 24 clips at 1.
        let out = corrupt_image(&img, 5, Corruption::Brightness, 3, &mut rng).unwrap();
        assert!(close(out[6], 0.55), "{}", out[6]);
        assert_eq!(out[24], 1.0);
    }

    #[test]
    fn gaussian_blur_of_a_point_is_the_outer_product_of_its_kernel() {
        let mut img = vec![0f32; 81];
        img[4 * 9 + 4] = 1.0;
        let mut rng = Rng::new(0);
        // Severity 3: σ = 1 px, radius 3.
        let out = corrupt_image(&img, 9, Corruption::GaussianBlur, 3, &mut rng).unwrap();
        let z: f64 = (-3..=3).map(|d: i32| (-(d * d) as f64 / 2.0).exp()).sum();
        let k0 = 1.0 / z;
        let k1 = (-0.5f64).exp() / z;
        assert!(close(out[4 * 9 + 4], k0 * k0), "{}", out[40]);
        assert!(close(out[4 * 9 + 5], k0 * k1), "{}", out[41]);
        assert!(close(out[3 * 9 + 5], k1 * k1), "{}", out[32]);
        let total: f32 = out.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "blur keeps the mass: {total}");
    }

    #[test]
    fn rotation_by_a_right_angle_moves_pixels_exactly() {
        let img = ramp();
        // 90° counter-clockwise: the top-right pixel (row 0, col 4) goes to
        // the top-left (row 0, col 0); the centre stays.
        let out = rotate(&img, 5, 90.0);
        assert!(close(out[0], img[4] as f64), "{} vs {}", out[0], img[4]);
        assert!(close(out[12], img[12] as f64));
        // Bottom-left (row 4, col 0) goes to bottom-right (row 4, col 4).
        assert!(close(out[24], img[20] as f64), "{} vs {}", out[24], img[20]);
        // Rotating back restores every pixel.
        let back = rotate(&out, 5, -90.0);
        for (a, b) in back.iter().zip(&img) {
            assert!(close(*a, *b as f64));
        }
        // Severity 1 (±10°) on a one-pixel image keeps its centre pixel.
        let mut rng = Rng::new(3);
        let out = corrupt_image(&[0.7], 1, Corruption::Rotate, 1, &mut rng).unwrap();
        assert!(close(out[0], 0.7f32 as f64));
    }

    #[test]
    fn noises_draw_from_the_documented_distributions() {
        let img = vec![0.5f32; 400];
        // Gaussian: the same draws as the rng's normal sequence, σ = 0.18.
        let mut rng = Rng::new(image_seed(7, Corruption::GaussianNoise, 0));
        let out = corrupt_image(&img, 20, Corruption::GaussianNoise, 3, &mut rng).unwrap();
        let mut check = Rng::new(image_seed(7, Corruption::GaussianNoise, 0));
        let z0 = check.normal();
        assert!(close(out[0], (0.5 + 0.18 * z0).clamp(0.0, 1.0)));
        // Impulse: severity 5 sets about 27 % of pixels to 0 or 1.
        let mut rng = Rng::new(1);
        let big = vec![0.5f32; 10_000];
        let out = corrupt_image(&big, 100, Corruption::ImpulseNoise, 5, &mut rng).unwrap();
        let hit = out.iter().filter(|&&v| v != 0.5).count() as f64 / 1e4;
        assert!((hit - 0.27).abs() < 0.02, "{hit}");
        assert!(out.iter().all(|&v| v == 0.0 || v == 0.5 || v == 1.0));
        // Shot: Poisson(0.5·λ)/λ has mean 0.5 and variance 0.5/λ (λ = 12).
        let out = corrupt_image(&big, 100, Corruption::ShotNoise, 3, &mut rng).unwrap();
        let m = out.iter().map(|&v| v as f64).sum::<f64>() / 1e4;
        let var = out.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / 1e4;
        assert!((m - 0.5).abs() < 0.01, "{m}");
        assert!((var - 0.5 / 12.0).abs() < 0.005, "{var}");
        // Every count is a multiple of 1/λ.
        assert!(
            out.iter()
                .all(|&v| ((v as f64 * 12.0) - (v as f64 * 12.0).round()).abs() < 1e-4)
        );
    }

    #[test]
    fn corrupted_splits_are_deterministic_per_seed_and_per_image() {
        let x = ndarray::Array2::from_shape_fn((6, 16), |(i, j)| ((i * 16 + j) % 7) as f32 / 7.0);
        let split = Split {
            x,
            y: vec![0, 1, 2, 3, 4, 5],
        };
        for c in Corruption::ALL {
            let a = corrupt(&split, c, 4, 11).unwrap();
            let b = corrupt(&split, c, 4, 11).unwrap();
            assert_eq!(a.x, b.x, "{c}");
            assert_eq!(a.y, split.y);
            assert!(a.x.iter().all(|v| (0.0..=1.0).contains(v)), "{c}");
            // A subset gives the same rows (randomness is per image index
            // within the split it was asked for: rows 0..3 of a 3-row split).
            let sub = corrupt(&split.take(3), c, 4, 11).unwrap();
            assert_eq!(sub.x, a.x.slice(ndarray::s![..3, ..]), "{c}");
            if matches!(
                c,
                Corruption::GaussianNoise | Corruption::ShotNoise | Corruption::ImpulseNoise
            ) {
                let other = corrupt(&split, c, 4, 12).unwrap();
                assert_ne!(a.x, other.x, "{c}: another seed, other noise");
            }
        }
    }

    #[test]
    fn bad_names_severities_and_shapes_are_named() {
        let e = Corruption::from_name("fog").unwrap_err().to_string();
        assert!(e.contains("'fog'") && e.contains("gaussian_noise"), "{e}");
        assert_eq!(
            Corruption::from_name("gaussian-blur").unwrap(),
            Corruption::GaussianBlur
        );
        for s in [0, 6] {
            let e = Corruption::Contrast.parameter(s).unwrap_err().to_string();
            assert!(
                e.contains("contrast") && e.contains(&format!("severity {s}")),
                "{e}"
            );
        }
        let split = Split {
            x: ndarray::Array2::zeros((2, 10)),
            y: vec![0, 1],
        };
        let e = corrupt(&split, Corruption::Rotate, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotate") && e.contains("not square"), "{e}");
    }
}
