//! The toolkit's seeded random numbers, in one place for every crate: no
//! RNG dependency, and the same seed gives the same draws on every platform.
//!
//! - [`Rng`]: xoshiro256** (Blackman & Vigna), seeded through SplitMix64, with
//!   uniform, integer and Gaussian (polar Box–Muller) draws and shuffles. Use
//!   it for anything new.
//! - [`SplitMix64`]: Steele, Lea & Flood's SplitMix64 stream, the seeder of
//!   [`Rng`]. The character model's random initialisation, S²FT's random
//!   channel selection and the MNIST MLPs' initialisation and batch order
//!   draw from it, as they did before this module existed, so their
//!   published figures reproduce to the bit.
//!
//! ```
//! use weights::rng::{Rng, SplitMix64};
//! let mut rng = Rng::new(7);
//! let mut order: Vec<usize> = (0..10).collect();
//! rng.shuffle(&mut order);
//! assert_eq!(Rng::new(7).below(10), Rng::new(7).below(10));
//! let u = SplitMix64::new(7).uniform();
//! assert!((0.0..1.0).contains(&u));
//! ```

/// SplitMix64: one 64-bit state advanced by the golden-ratio increment and
/// mixed by two multiply–xorshifts.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream whose state starts at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Uniform in [0, 1) (the top 53 bits).
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Standard normal by the basic Box–Muller transform (two uniforms per
    /// draw, the cosine branch).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Shuffles `xs` in place (Fisher–Yates, swap index `⌊u·(i+1)⌋`).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = (self.uniform() * (i + 1) as f64) as usize % (i + 1);
            xs.swap(i, j);
        }
    }
}

fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    spare: Option<f64>,
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut seeder = SplitMix64::new(seed);
        let mut next = || seeder.next_u64();
        Rng {
            s: [next(), next(), next(), next()],
            spare: None,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller, polar form).
    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let k = (-2.0 * s.ln() / s).sqrt();
                self.spare = Some(v * k);
                return u * k;
            }
        }
    }

    /// An `f32` array of standard normal draws, filled in logical
    /// (row-major) order: `rng.normal_array((3, 4))` is an `Array2`.
    pub fn normal_array<Sh: ndarray::ShapeBuilder>(
        &mut self,
        shape: Sh,
    ) -> ndarray::Array<f32, Sh::Dim> {
        ndarray::Array::from_shape_fn(shape, |_| self.normal() as f32)
    }

    /// Shuffles `xs` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_gives_the_reference_stream() {
        // Vigna's splitmix64.c from state 0.
        let mut g = SplitMix64::new(0);
        let got: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(
            got,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
    }

    #[test]
    fn xoshiro_gives_the_reference_stream() {
        // The paper's xoshiro256** step in Python, seeded by four SplitMix64
        // outputs from 42.
        let mut g = Rng::new(42);
        let got: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(
            got,
            [
                0x1578_0B2E_0C2E_C716,
                0x6104_D986_6D11_3A7E,
                0xAE17_5332_39E4_99A1
            ]
        );
    }

    #[test]
    fn shuffles_are_permutations_and_normals_are_standard() {
        let mut a: Vec<usize> = (0..1000).collect();
        let mut b = a.clone();
        Rng::new(1).shuffle(&mut a);
        SplitMix64::new(1).shuffle(&mut b);
        for xs in [&mut a, &mut b] {
            assert_ne!(xs[..10], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            xs.sort_unstable();
            assert!(xs.iter().enumerate().all(|(i, &x)| i == x));
        }
        let n = 200_000;
        let (mut r, mut s) = (Rng::new(2), SplitMix64::new(2));
        for draws in [
            (0..n).map(|_| r.normal()).collect::<Vec<_>>(),
            (0..n).map(|_| s.normal()).collect(),
        ] {
            let mean = draws.iter().sum::<f64>() / n as f64;
            let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
                "{mean} {var}"
            );
        }
        assert!((0..n).all(|_| r.below(7) < 7));
    }
}
