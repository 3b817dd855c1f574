//! Dense decompositions behind one small interface: thin and full SVD,
//! singular values only, symmetric eigenvalues, for `f32` and `f64` ndarray
//! views. The backend is `faer` (pure Rust, no system packages).
//!
//! Conventions: singular values are returned in **descending** order,
//! symmetric eigenvalues in **ascending** order, `A = U · diag(s) · Vᵀ` with
//! `U` of shape `m × k`, `Vᵀ` of shape `k × n`, `k = min(m, n)` (thin) or
//! `U` `m × m`, `Vᵀ` `n × n` (full). Every function refuses empty matrices and
//! non-finite entries with a typed error instead of returning NaN.
//!
//! With the `lapack` cargo feature the same functions call LAPACK through
//! `ndarray-linalg` (divide-and-conquer `gesdd` for SVDs, `syevd` for
//! eigenvalues; OpenBLAS from the system, `apt install libopenblas-dev`),
//! which DESIGN.md measured faster on large matrices.

#[cfg(not(feature = "lapack"))]
use faer::MatRef;
use ndarray::{Array1, Array2, ArrayView2};

use crate::error::{Result, SpectraError};

/// What the active backend needs of a scalar (nothing more for faer).
#[cfg(not(feature = "lapack"))]
pub trait Backend {}
#[cfg(not(feature = "lapack"))]
impl<T> Backend for T {}
/// What the active backend needs of a scalar (LAPACK bindings).
#[cfg(feature = "lapack")]
pub trait Backend: ndarray_linalg::Scalar<Real = Self> + ndarray_linalg::Lapack {}
#[cfg(feature = "lapack")]
impl<T: ndarray_linalg::Scalar<Real = T> + ndarray_linalg::Lapack> Backend for T {}

/// The floating-point types the decompositions accept (`f32`, `f64`).
pub trait Scalar:
    faer::traits::RealField + Backend + Copy + Send + Sync + std::fmt::Debug + 'static
{
    /// Machine epsilon of the type.
    const EPSILON: f64;
    /// Widens to `f64`.
    fn as_f64(self) -> f64;
    /// Narrows from `f64`.
    fn of_f64(v: f64) -> Self;
}

impl Scalar for f32 {
    const EPSILON: f64 = f32::EPSILON as f64;
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn of_f64(v: f64) -> Self {
        v as f32
    }
}

impl Scalar for f64 {
    const EPSILON: f64 = f64::EPSILON;
    fn as_f64(self) -> f64 {
        self
    }
    fn of_f64(v: f64) -> Self {
        v
    }
}

/// A singular value decomposition `A = U · diag(s) · Vᵀ`.
#[derive(Debug, Clone)]
pub struct Svd<T> {
    /// Left singular vectors as columns.
    pub u: Array2<T>,
    /// Singular values, descending.
    pub s: Array1<T>,
    /// Right singular vectors as rows.
    pub vt: Array2<T>,
}

/// Checks that `a` is non-empty and finite; `name` goes into the error.
pub fn check_matrix<T: Scalar>(a: ArrayView2<'_, T>, name: &str) -> Result<()> {
    if a.is_empty() {
        return Err(SpectraError::Empty {
            name: name.to_string(),
            shape: a.shape().to_vec(),
        });
    }
    let bad = a.iter().filter(|v| !v.as_f64().is_finite()).count();
    if bad > 0 {
        return Err(SpectraError::NonFinite {
            name: name.to_string(),
            count: bad,
        });
    }
    Ok(())
}

#[cfg(not(feature = "lapack"))]
/// Runs `f` on a faer view of `a` (zero-copy for standard or Fortran layout).
fn with_faer<T: Scalar, R>(a: ArrayView2<'_, T>, f: impl FnOnce(MatRef<'_, T>) -> R) -> R {
    let (m, n) = a.dim();
    if let Some(s) = a.as_slice() {
        return f(MatRef::from_row_major_slice(s, m, n));
    }
    if let Some(s) = a.t().as_slice() {
        return f(MatRef::from_column_major_slice(s, m, n));
    }
    let owned = a.as_standard_layout();
    f(MatRef::from_row_major_slice(
        owned.as_slice().expect("standard layout"),
        m,
        n,
    ))
}

#[cfg(not(feature = "lapack"))]
fn to_ndarray<T: Scalar>(m: MatRef<'_, T>) -> Array2<T> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)])
}

fn no_conv(name: &str, what: &'static str) -> SpectraError {
    SpectraError::NoConvergence {
        name: name.to_string(),
        what,
    }
}

/// Singular values of `a`, descending.
pub fn singular_values<T: Scalar>(a: ArrayView2<'_, T>, name: &str) -> Result<Vec<T>> {
    check_matrix(a, name)?;
    values_impl(a).ok_or_else(|| no_conv(name, "SVD"))
}

#[cfg(feature = "lapack")]
fn values_impl<T: Scalar>(a: ArrayView2<'_, T>) -> Option<Vec<T>> {
    use ndarray_linalg::{JobSvd, SVDDC};
    a.svddc(JobSvd::None).ok().map(|(_, s, _)| s.to_vec())
}

#[cfg(not(feature = "lapack"))]
fn values_impl<T: Scalar>(a: ArrayView2<'_, T>) -> Option<Vec<T>> {
    with_faer(a, |m| faer_svd(m, None)).map(|(s, _)| s)
}

/// faer's split of one decomposition: a fixed number of parts, not the
/// pool's thread count. faer's SVD and eigensolvers with `Par::rayon(0)`
/// (its default: as many parts as rayon threads) differ in the last bits
/// between core counts, so a merge built on them (TSV-M, Iso-C, the
/// task-vector analysis) resumed on another machine would not reproduce its
/// rows; with a fixed split they are bit-identical on any pool
/// (`results_do_not_depend_on_the_thread_count`).
#[cfg(not(feature = "lapack"))]
const DECOMPOSITION_PAR: faer::Par = faer::Par::Rayon(std::num::NonZeroUsize::new(4).unwrap());

/// The two ways faer solves an SVD's bidiagonal problem: divide and conquer
/// above 128 rows (its default), then, where that returned a non-finite
/// result, QR iteration at every size (`recursion_threshold` past any size).
/// (Eigenvalues without eigenvectors are QR iteration already: faer does not
/// read the threshold there, so they are only checked.)
///
/// faer 0.24.4's divide and conquer returns NaN factors, with no error, on
/// some matrices of low numerical rank: an Iso-CTS task matrix with its
/// common subspace projected out (576 × 576, rank 116) gave all-NaN `U`, `V`
/// and three NaN singular values, while its transpose and QR iteration
/// decompose it (`a_divide_and_conquer_failure_falls_back_to_qr_iteration`).
#[cfg(not(feature = "lapack"))]
const RECURSION_THRESHOLDS: [usize; 2] = [128, usize::MAX];

#[cfg(not(feature = "lapack"))]
fn all_finite<T: Scalar>(values: &[T], mats: &[&faer::Mat<T>]) -> bool {
    values.iter().all(|v| v.as_f64().is_finite())
        && mats.iter().all(|m| {
            m.col_iter()
                .all(|c| c.iter().all(|v| v.as_f64().is_finite()))
        })
}

/// The singular values and (`vectors: Some(thin)`) `U` and `V` of one faer SVD.
#[cfg(not(feature = "lapack"))]
type FaerSvd<T> = (Vec<T>, Option<(faer::Mat<T>, faer::Mat<T>)>);

/// faer's SVD of `a` at [`DECOMPOSITION_PAR`]: the singular values
/// (descending) and, when `vectors` is `Some(thin)`, `U` and `V`; each of
/// [`RECURSION_THRESHOLDS`] in turn until the result is finite.
#[cfg(not(feature = "lapack"))]
fn faer_svd<T: Scalar>(a: MatRef<'_, T>, vectors: Option<bool>) -> Option<FaerSvd<T>> {
    RECURSION_THRESHOLDS
        .iter()
        .find_map(|&threshold| faer_svd_with(a, vectors, threshold))
}

#[cfg(not(feature = "lapack"))]
fn faer_svd_with<T: Scalar>(
    a: MatRef<'_, T>,
    vectors: Option<bool>,
    recursion_threshold: usize,
) -> Option<FaerSvd<T>> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::svd::{ComputeSvdVectors, SvdParams, svd, svd_scratch};
    let (m, n) = a.shape();
    let k = m.min(n);
    let (compute, cols_u, cols_v) = match vectors {
        None => (ComputeSvdVectors::No, 0, 0),
        Some(true) => (ComputeSvdVectors::Thin, k, k),
        Some(false) => (ComputeSvdVectors::Full, m, n),
    };
    let params = SvdParams {
        recursion_threshold,
        ..faer::Auto::<T>::auto()
    };
    let mut uv = vectors.map(|_| (faer::Mat::zeros(m, cols_u), faer::Mat::zeros(n, cols_v)));
    let mut s = faer::diag::Diag::<T>::zeros(k);
    let scratch = svd_scratch::<T>(m, n, compute, compute, DECOMPOSITION_PAR, params.into());
    let (u, v) = match &mut uv {
        Some((u, v)) => (Some(u.as_mut()), Some(v.as_mut())),
        None => (None, None),
    };
    svd(
        a,
        s.as_mut(),
        u,
        v,
        DECOMPOSITION_PAR,
        MemStack::new(&mut MemBuffer::new(scratch)),
        params.into(),
    )
    .ok()?;
    let s: Vec<T> = s.column_vector().iter().copied().collect();
    let mats: Vec<&faer::Mat<T>> = uv.iter().flat_map(|(u, v)| [u, v]).collect();
    all_finite(&s, &mats).then_some((s, uv))
}

#[cfg(feature = "lapack")]
fn svd_impl<T: Scalar>(a: ArrayView2<'_, T>, name: &str, thin: bool) -> Result<Svd<T>> {
    use ndarray_linalg::{JobSvd, SVDDC};
    check_matrix(a, name)?;
    let job = if thin { JobSvd::Some } else { JobSvd::All };
    match a.svddc(job).map_err(|_| no_conv(name, "SVD"))? {
        (Some(u), s, Some(vt)) => Ok(Svd { u, s, vt }),
        _ => Err(no_conv(name, "SVD")),
    }
}

#[cfg(not(feature = "lapack"))]
fn svd_impl<T: Scalar>(a: ArrayView2<'_, T>, name: &str, thin: bool) -> Result<Svd<T>> {
    check_matrix(a, name)?;
    let (s, uv) = with_faer(a, |m| faer_svd(m, Some(thin))).ok_or_else(|| no_conv(name, "SVD"))?;
    let (u, v) = uv.expect("vectors were asked for");
    Ok(Svd {
        u: to_ndarray(u.as_ref()),
        s: Array1::from(s),
        vt: to_ndarray(v.as_ref().transpose()),
    })
}

/// Thin SVD: `U` is `m × k`, `Vᵀ` is `k × n`, `k = min(m, n)`.
pub fn thin_svd<T: Scalar>(a: ArrayView2<'_, T>, name: &str) -> Result<Svd<T>> {
    svd_impl(a, name, true)
}

/// Full SVD: `U` is `m × m`, `Vᵀ` is `n × n`, `s` has `min(m, n)` values.
pub fn full_svd<T: Scalar>(a: ArrayView2<'_, T>, name: &str) -> Result<Svd<T>> {
    svd_impl(a, name, false)
}

/// Eigenvalues of the symmetric matrix `a` (its lower triangle is read), ascending.
pub fn symmetric_eigenvalues<T: Scalar>(a: ArrayView2<'_, T>, name: &str) -> Result<Vec<T>> {
    check_matrix(a, name)?;
    if a.nrows() != a.ncols() {
        return Err(SpectraError::Shape {
            name: name.to_string(),
            msg: format!(
                "symmetric eigenvalues need a square matrix, got {:?}",
                a.shape()
            ),
        });
    }
    eigh_impl(a).ok_or_else(|| no_conv(name, "symmetric eigendecomposition"))
}

#[cfg(feature = "lapack")]
fn eigh_impl<T: Scalar>(a: ArrayView2<'_, T>) -> Option<Vec<T>> {
    use ndarray_linalg::{EigValsh, UPLO};
    a.eigvalsh(UPLO::Lower).ok().map(|e| e.to_vec())
}

/// faer's eigenvalues of the symmetric `a` (lower triangle), ascending, at
/// [`DECOMPOSITION_PAR`]; `None` when faer errs or returns a non-finite value
/// (a `NoConvergence` error for the caller, never NaN).
#[cfg(not(feature = "lapack"))]
fn eigh_impl<T: Scalar>(a: ArrayView2<'_, T>) -> Option<Vec<T>> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
    with_faer(a, |m| {
        let n = m.nrows();
        let mut s = faer::diag::Diag::<T>::zeros(n);
        let scratch = self_adjoint_evd_scratch::<T>(
            n,
            ComputeEigenvectors::No,
            DECOMPOSITION_PAR,
            Default::default(),
        );
        self_adjoint_evd(
            m,
            s.as_mut(),
            None,
            DECOMPOSITION_PAR,
            MemStack::new(&mut MemBuffer::new(scratch)),
            Default::default(),
        )
        .ok()?;
        let s: Vec<T> = s.column_vector().iter().copied().collect();
        all_finite(&s, &[]).then_some(s)
    })
}

/// A faer view of an ndarray view, whatever its strides (no copy).
fn faer_view<'a, T: Scalar>(a: ArrayView2<'a, T>) -> faer::MatRef<'a, T> {
    let (m, n) = a.dim();
    let (rs, cs) = (a.strides()[0], a.strides()[1]);
    // SAFETY: the pointer, sizes and element strides describe exactly the
    // elements of `a`, which stay borrowed for `'a`.
    unsafe { faer::MatRef::from_raw_parts(a.as_ptr(), m, n, rs, cs) }
}

/// `out = A · Bᵀ` (`A` is `m × k`, `B` is `n × k`, both of any strides, so a
/// transposed view costs no copy; `out` row-major `m × n`), faer's GEMM on
/// every core of rayon's pool: the products behind weight matching's
/// similarities. Measured here on 3072 × 768 · 768 × 3072 in f32: 85–99 ms
/// against 101–117 ms for ndarray's `matrixmultiply`.
pub fn matmul_nt(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    out: &mut [f32],
    name: &str,
) -> Result<()> {
    gemm_nt(a, b, out, faer::Accum::Replace, name)
}

/// `out += A · Bᵀ`, otherwise as [`matmul_nt`] (a low-rank update of a kept product).
pub fn matmul_nt_add(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    out: &mut [f32],
    name: &str,
) -> Result<()> {
    gemm_nt(a, b, out, faer::Accum::Add, name)
}

fn gemm_nt(
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    out: &mut [f32],
    accum: faer::Accum,
    name: &str,
) -> Result<()> {
    let ((m, k), (n, k2)) = (a.dim(), b.dim());
    if k != k2 || out.len() != m * n {
        return Err(SpectraError::Shape {
            name: name.to_string(),
            msg: format!(
                "A·Bᵀ needs A and B with as many columns and room for {m} × {n} products, got {:?}, {:?} and {} values",
                a.shape(),
                b.shape(),
                out.len()
            ),
        });
    }
    let c = faer::MatMut::from_row_major_slice_mut(out, m, n);
    faer::linalg::matmul::matmul(
        c,
        accum,
        faer_view(a),
        faer_view(b).transpose(),
        1.0f32,
        faer::Par::rayon(0),
    );
    Ok(())
}

fn check_ridge(ridge: f64) -> Result<()> {
    if ridge >= 0.0 && ridge.is_finite() {
        Ok(())
    } else {
        Err(SpectraError::Option {
            option: "ridge",
            msg: format!("{ridge} (must be finite and ≥ 0)"),
        })
    }
}

/// Solves `(A + ridge·I) Z = B` for a symmetric positive (semi-)definite `d × d`
/// matrix `A` (its lower triangle is read) and a `d × k` right-hand side,
/// through the Cholesky factor, in `f64` (faer on both backends). With
/// `ridge = 0`, `A` must be positive definite; a singular one is a typed error
/// naming `name` that says to add a ridge. The solve of RegMean's
/// `(Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ Wᵢ` and of [`ridge_least_squares`].
pub fn solve_spd(
    a: ArrayView2<'_, f64>,
    b: ArrayView2<'_, f64>,
    ridge: f64,
    name: &str,
) -> Result<Array2<f64>> {
    check_matrix(a, name)?;
    check_matrix(b, name)?;
    let d = a.nrows();
    if a.ncols() != d || b.nrows() != d {
        return Err(SpectraError::Shape {
            name: name.to_string(),
            msg: format!(
                "a symmetric solve needs a square matrix and a right-hand side with as many rows, got {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        });
    }
    check_ridge(ridge)?;
    let k = b.ncols();
    let mut gram =
        faer::Mat::<f64>::from_fn(d, d, |i, j| a[(i, j)] + if i == j { ridge } else { 0.0 });
    let mut rhs = faer::Mat::<f64>::from_fn(d, k, |i, j| b[(i, j)]);
    solve_spd_in_place(&mut gram, &mut rhs, name, || {
        format!(
            "the {d} × {d} matrix + {ridge}·I is not positive definite (singular or indefinite; use a ridge > 0)"
        )
    })?;
    Ok(Array2::from_shape_fn((d, k), |(i, j)| rhs[(i, j)]))
}

/// Cholesky solve of `gram · Z = rhs` in place (`rhs` becomes `Z`);
/// `singular` says what a matrix without a Cholesky factor means to the caller.
fn solve_spd_in_place(
    gram: &mut faer::Mat<f64>,
    rhs: &mut faer::Mat<f64>,
    name: &str,
    singular: impl FnOnce() -> String,
) -> Result<()> {
    let llt = gram
        .llt(faer::Side::Lower)
        .map_err(|_| SpectraError::Shape {
            name: name.to_string(),
            msg: singular(),
        })?;
    faer::linalg::solvers::Solve::solve_in_place(&llt, rhs.as_mut());
    if (0..rhs.nrows()).any(|i| (0..rhs.ncols()).any(|j| !rhs[(i, j)].is_finite())) {
        return Err(no_conv(name, "symmetric solve"));
    }
    Ok(())
}

/// Ridge-regularised least squares, `W = argmin ‖X W − Y‖² + ridge·‖W‖²
/// = (XᵀX + ridge·I)⁻¹ XᵀY`, through the Cholesky factor of the `d × d` Gram
/// matrix, in `f64` (both backends use faer: the system is small and
/// symmetric positive definite). `X` is `n × d`, `Y` is `n × k`, the result
/// `d × k`. With `ridge = 0`, `X` must have full column rank. This is the
/// per-layer solve of PLeaS (Nasery et al., 2024) and of RegMean-style merges.
pub fn ridge_least_squares(
    x: ArrayView2<'_, f64>,
    y: ArrayView2<'_, f64>,
    ridge: f64,
    name: &str,
) -> Result<Array2<f64>> {
    check_matrix(x, name)?;
    check_matrix(y, name)?;
    if x.nrows() != y.nrows() {
        return Err(SpectraError::Shape {
            name: name.to_string(),
            msg: format!(
                "least squares needs as many rows in X as in Y, got {:?} and {:?}",
                x.shape(),
                y.shape()
            ),
        });
    }
    check_ridge(ridge)?;
    let xs = x.as_standard_layout();
    let ys = y.as_standard_layout();
    let (n, d) = x.dim();
    let k = y.ncols();
    let xf = faer::MatRef::from_row_major_slice(xs.as_slice().expect("standard"), n, d);
    let yf = faer::MatRef::from_row_major_slice(ys.as_slice().expect("standard"), n, k);
    let mut gram: faer::Mat<f64> = xf.transpose() * xf;
    for i in 0..d {
        gram[(i, i)] += ridge;
    }
    let mut rhs: faer::Mat<f64> = xf.transpose() * yf;
    solve_spd_in_place(&mut gram, &mut rhs, name, || {
        format!(
            "XᵀX + {ridge}·I is not positive definite (X {n} × {d} is rank-deficient; use a ridge > 0)"
        )
    })?;
    Ok(Array2::from_shape_fn((d, k), |(i, j)| rhs[(i, j)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    fn gaussian(m: usize, n: usize, seed: u64) -> Array2<f64> {
        let mut rng = weights::rng::Rng::new(seed);
        Array2::from_shape_fn((m, n), |_| rng.normal())
    }

    #[test]
    fn thin_svd_reconstructs_in_f32_and_f64() {
        for &(m, n) in &[(7usize, 5usize), (5, 7), (40, 40)] {
            let a = gaussian(m, n, 3);
            let svd = thin_svd(a.view(), "a").unwrap();
            let k = m.min(n);
            assert_eq!(
                (svd.u.dim(), svd.s.len(), svd.vt.dim()),
                ((m, k), k, (k, n))
            );
            let rec = svd.u.dot(&Array2::from_diag(&svd.s)).dot(&svd.vt);
            let err = (&rec - &a).mapv(|x| x * x).sum().sqrt() / a.mapv(|x| x * x).sum().sqrt();
            assert!(err < 1e-12, "f64 {m}x{n}: {err}");
            assert!(svd.s.windows(2).into_iter().all(|w| w[0] >= w[1]));

            let a32 = a.mapv(|x| x as f32);
            let s = thin_svd(a32.view(), "a32").unwrap();
            let rec = s.u.dot(&Array2::from_diag(&s.s)).dot(&s.vt);
            let err = (&rec - &a32).mapv(|x| x * x).sum().sqrt() / a32.mapv(|x| x * x).sum().sqrt();
            assert!(err < 1e-5, "f32 {m}x{n}: {err}");
        }
    }

    #[test]
    fn full_svd_has_square_orthogonal_factors() {
        let a = gaussian(6, 3, 5);
        let svd = full_svd(a.view(), "a").unwrap();
        assert_eq!((svd.u.dim(), svd.vt.dim()), ((6, 6), (3, 3)));
        let eye = svd.u.t().dot(&svd.u);
        assert!(
            (&eye - &Array2::<f64>::eye(6))
                .iter()
                .all(|x| x.abs() < 1e-12)
        );
    }

    #[test]
    fn known_singular_values_are_exact() {
        let d = array![[3.0f64, 0.0, 0.0], [0.0, -5.0, 0.0], [0.0, 0.0, 1.0]];
        // Exact to machine precision (a few ulps).
        let s = singular_values(d.view(), "diag").unwrap();
        for (got, want) in s.iter().zip([5.0, 3.0, 1.0]) {
            assert!((got - want).abs() <= 4.0 * f64::EPSILON * want, "{s:?}");
        }
        // rank 1: u vᵀ with |u| = 3, |v| = 5 -> one singular value 15
        let u = array![1.0f64, 2.0, 2.0];
        let v = array![3.0f64, 4.0];
        let r1 = Array2::from_shape_fn((3, 2), |(i, j)| u[i] * v[j]);
        let s = singular_values(r1.view(), "rank1").unwrap();
        assert!((s[0] - 15.0).abs() < 1e-12 && s[1].abs() < 1e-12, "{s:?}");
        // a rotation is orthogonal: all singular values 1
        let (c, sn) = (0.3f64.cos(), 0.3f64.sin());
        let q = array![[c, -sn], [sn, c]];
        for x in singular_values(q.view(), "rot").unwrap() {
            assert!((x - 1.0).abs() < 1e-14);
        }
        let sym = array![[2.0f64, 1.0], [1.0, 2.0]];
        let e = symmetric_eigenvalues(sym.view(), "sym").unwrap();
        assert!((e[0] - 1.0).abs() < 1e-14 && (e[1] - 3.0).abs() < 1e-14);
    }

    #[test]
    fn non_finite_and_empty_inputs_are_errors() {
        let mut a = Array2::<f32>::zeros((3, 3));
        a[[1, 1]] = f32::NAN;
        a[[2, 0]] = f32::INFINITY;
        assert!(matches!(
            singular_values(a.view(), "w"),
            Err(SpectraError::NonFinite { count: 2, .. })
        ));
        let e = Array2::<f32>::zeros((0, 3));
        assert!(matches!(
            thin_svd(e.view(), "w"),
            Err(SpectraError::Empty { .. })
        ));
        let r = Array2::<f64>::zeros((2, 3));
        assert!(matches!(
            symmetric_eigenvalues(r.view(), "w"),
            Err(SpectraError::Shape { .. })
        ));
    }

    #[test]
    fn ridge_least_squares_recovers_an_exact_solution_and_matches_the_normal_equations() {
        let x = gaussian(50, 6, 1);
        let w = gaussian(6, 3, 2);
        let y = x.dot(&w);
        let got = ridge_least_squares(x.view(), y.view(), 0.0, "exact").unwrap();
        assert!((&got - &w).iter().all(|v| v.abs() < 1e-9), "{got}");
        // Ridge: hand-checked 1-D case, w = Σxy / (Σx² + λ) = 8 / (5 + 1).
        let x1 = array![[1.0], [2.0]];
        let y1 = array![[2.0], [3.0]];
        let got = ridge_least_squares(x1.view(), y1.view(), 1.0, "ridge").unwrap();
        assert!((got[[0, 0]] - 8.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn ridge_least_squares_names_bad_input() {
        let x = array![[1.0, 1.0], [2.0, 2.0]];
        let y = array![[1.0], [2.0]];
        let e = ridge_least_squares(x.view(), y.view(), 0.0, "layers.1").unwrap_err();
        assert!(
            e.to_string().contains("layers.1") && e.to_string().contains("ridge"),
            "{e}"
        );
        assert!(ridge_least_squares(x.view(), y.view(), 1e-6, "ok").is_ok());
        let short = array![[1.0]];
        let e = ridge_least_squares(x.view(), short.view(), 1.0, "rows").unwrap_err();
        assert!(e.to_string().contains("rows"), "{e}");
        let e = ridge_least_squares(x.view(), y.view(), -1.0, "neg").unwrap_err();
        assert!(e.to_string().contains("ridge"), "{e}");
        let nan = array![[f64::NAN], [1.0]];
        assert!(ridge_least_squares(x.view(), nan.view(), 1.0, "nan").is_err());
    }

    /// faer's default parallelism (`Par::rayon(0)`) splits a decomposition
    /// into one part per rayon thread, and its results differ in the last
    /// bits between thread counts; the fixed split here must not: the merges built on them (TSV-M, Iso-C, RegMean,
    /// weight matching) must not change with the machine's core count, or a
    /// run resumed on another machine would not reproduce its rows. Sizes are
    /// SmolLM2's MLP shapes, large enough that faer splits the work.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let a = gaussian(576, 1536, 11);
        let b = gaussian(640, 1536, 12);
        let a32 = a.mapv(|x| x as f32);
        let b32 = b.mapv(|x| x as f32);
        let mut gram = Array2::<f64>::zeros((576, 576));
        ndarray::linalg::general_mat_mul(1.0, &a, &a.t(), 0.0, &mut gram);
        let rhs = gaussian(576, 64, 13);
        let run = || {
            let svd = thin_svd(a.view(), "a").unwrap();
            let svd32 = thin_svd(a32.view(), "a32").unwrap();
            let mut prod = vec![0f32; 576 * 640];
            matmul_nt(a32.view(), b32.view(), &mut prod, "ab").unwrap();
            let solved = solve_spd(gram.view(), rhs.view(), 1e-3, "gram").unwrap();
            (
                svd.u,
                svd.s,
                svd.vt,
                svd32.s,
                svd32.vt,
                singular_values(b.view(), "b").unwrap(),
                symmetric_eigenvalues(gram.view(), "gram").unwrap(),
                prod,
                solved,
            )
        };
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(run)
        };
        let one = on(1);
        for threads in [2, 3, 8] {
            assert!(on(threads) == one, "{threads} threads differ from one");
        }
    }

    /// A matrix on which faer 0.24.4's divide and conquer returns NaN with no
    /// error (found by the merge study's Iso-CTS on SmolLM2: a task matrix
    /// with a common subspace projected out). This one is synthetic, of the
    /// same kind: `G − Q Qᵀ G` with `Q` 500 orthonormal columns of a random
    /// 576 × 576 matrix (3 of 40 seeds fail; seed 7 is one).
    #[cfg(not(feature = "lapack"))]
    fn projected_out(seed: u64) -> Array2<f64> {
        let mut rng = weights::rng::Rng::new(seed);
        let g = Array2::from_shape_fn((576, 576), |_| rng.normal() * 1e-3);
        let h = Array2::from_shape_fn((576, 576), |_| rng.normal() * 1e-3);
        let q = thin_svd(h.view(), "h").unwrap().u;
        let q = q.slice(ndarray::s![.., ..500]);
        &g - &q.dot(&q.t().dot(&g))
    }

    #[cfg(not(feature = "lapack"))]
    #[test]
    fn a_divide_and_conquer_failure_falls_back_to_qr_iteration() {
        let a = projected_out(7);
        let view = faer::MatRef::from_row_major_slice(a.as_slice().unwrap(), 576, 576);
        // faer's default really fails here, so the fallback is what is tested.
        assert!(faer_svd_with(view, Some(true), 128).is_none());
        assert!(faer_svd_with(view, None, 128).is_none());
        let svd = thin_svd(a.view(), "a").unwrap();
        let values = singular_values(a.view(), "a").unwrap();
        // A second algorithm: the transpose's SVD, which faer's default
        // decomposes (Aᵀ = V Σ Uᵀ).
        let t = thin_svd(a.t(), "at").unwrap();
        let top = svd.s[0];
        for (i, ((&x, &alone), &y)) in svd.s.iter().zip(&values).zip(&t.s).enumerate() {
            assert!((x - y).abs() <= 1e-12 * top, "σ{i}");
            assert!((alone - y).abs() <= 1e-12 * top, "σ{i} alone");
        }
        // Rank 76 (576 − 500), the rest at rounding level.
        assert!(svd.s[75] > 1e3 * svd.s[76], "{} {}", svd.s[75], svd.s[76]);
        let back = (&svd.u * &svd.s).dot(&svd.vt);
        let err = (&back - &a).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(err <= 1e-14, "reconstruction error {err:e}");
        let eye = Array2::<f64>::eye(576);
        for q in [svd.u.t().dot(&svd.u), svd.vt.dot(&svd.vt.t())] {
            let err = (&q - &eye).iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(err <= 1e-10, "orthonormality error {err:e}");
        }
    }

    /// The SVD's fallback (QR iteration at every size) gives what the default
    /// gives, where the default works; eigenvalues are checked for finiteness.
    #[cfg(not(feature = "lapack"))]
    #[test]
    fn the_qr_iteration_fallbacks_agree_with_the_defaults() {
        let a = gaussian(300, 200, 21);
        let mut sym = a.dot(&a.t());
        sym /= 300.0;
        fn view(x: &Array2<f64>) -> faer::MatRef<'_, f64> {
            faer::MatRef::from_row_major_slice(x.as_slice().unwrap(), x.nrows(), x.ncols())
        }
        let (d, _) = faer_svd_with(view(&a), None, 128).unwrap();
        let (q, _) = faer_svd_with(view(&a), None, usize::MAX).unwrap();
        for (x, y) in d.iter().zip(&q) {
            assert!((x - y).abs() <= 1e-11 * d[0], "{x} {y}");
        }
        let (d, uv) = faer_svd_with(view(&a), Some(true), 128).unwrap();
        let (q, uvq) = faer_svd_with(view(&a), Some(true), usize::MAX).unwrap();
        for (x, y) in d.iter().zip(&q) {
            assert!((x - y).abs() <= 1e-11 * d[0], "{x} {y}");
        }
        // Singular vectors agree up to sign where the values are distinct.
        let ((u, _), (uq, _)) = (uv.unwrap(), uvq.unwrap());
        for j in 0..10 {
            let dot: f64 = (0..300).map(|i| u[(i, j)] * uq[(i, j)]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-9, "column {j}: {dot}");
        }
        let e = symmetric_eigenvalues(sym.view(), "sym").unwrap();
        assert!(e.windows(2).all(|w| w[0] <= w[1]));
    }
}
