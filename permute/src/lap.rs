//! Linear assignment: the shortest-augmenting-path algorithm of Jonker and
//! Volgenant in the form of Crouse (IEEE TAES 2016), the same algorithm as
//! scipy's `linear_sum_assignment`.
//!
//! Rows are assigned one at a time: a Dijkstra search over reduced costs
//! `c_ij − u_i − v_j` from the new row finds the cheapest augmenting path to a
//! free column, the dual potentials `u`, `v` are updated so reduced costs stay
//! non-negative, and the path is flipped. Among columns of equal distance a
//! free one is preferred, which ends the search early; ties therefore never
//! make it loop (each search scans every column at most once). Costs must be
//! finite: [`solve`] checks before it starts.
//!
//! From n = 128 on, the search first runs on a sparse problem: each row's 32
//! cheapest columns, with a heap instead of a scan. Duals that are feasible
//! on every entry of the full matrix prove the sparse optimum optimal (LP
//! duality), so the full matrix is then checked once; rows whose duals some
//! entry violates gain those edges and are placed again (see
//! `candidates_then_verify`). The totals are the dense search's
//! (`candidate_rounds_reach_the_dense_optimum`); on weight-matching costs
//! n = 3072 takes ≈ 0.17 s against ≈ 0.6 s dense (scipy's speed).

use crate::error::{PermuteError, Result};

/// Which way to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Find the assignment of least total cost.
    Minimize,
    /// Find the assignment of greatest total (a similarity, as in weight matching).
    Maximize,
}

/// Assigns each row of the square `n × n` row-major `cost` a distinct column,
/// optimising the total. Returns `col_of_row`. `what` names the problem in errors.
pub fn solve(cost: &[f64], n: usize, objective: Objective, what: &str) -> Result<Vec<usize>> {
    Ok(solve_warm(cost, n, objective, None, what)?.0)
}

/// Column dual variables of a solved problem, to warm-start the next solve of
/// a similar one (weight matching solves each group again every pass, with
/// costs that change little).
#[derive(Debug, Clone, PartialEq)]
pub struct Duals {
    v: Vec<f64>,
}

/// [`solve`] starting from the duals of a previous, similar problem.
///
/// Warm start: with the previous column duals `v`, every row's dual is reset
/// to its smallest reduced cost `uᵢ = minⱼ (cᵢⱼ − vⱼ)` (so all reduced costs
/// are non-negative, as the search requires), and each row takes its tight
/// column if no earlier row has; only the remaining rows are augmented. When
/// the costs barely changed, almost every row is placed at once. The result is
/// optimal with or without a warm start; only the work differs.
pub fn solve_warm(
    cost: &[f64],
    n: usize,
    objective: Objective,
    warm: Option<&Duals>,
    what: &str,
) -> Result<(Vec<usize>, Duals)> {
    if cost.len() != n * n {
        return Err(PermuteError::Shape {
            what: what.to_string(),
            msg: format!("cost matrix has {} entries, expected {n}x{n}", cost.len()),
        });
    }
    // Shift to minimisation of non-negative costs (any constant shift leaves
    // the optimum); one pass finds the bounds and any non-finite cost.
    let sign = if objective == Objective::Maximize {
        -1.0
    } else {
        1.0
    };
    // Branch-free (vectorised) bounds; a non-finite entry is looked for only
    // when the sum says there is one.
    let (lo, hi, sum) = bounds(cost, sign);
    if !sum.is_finite() {
        let k = cost
            .iter()
            .position(|x| !x.is_finite())
            .expect("a non-finite cost");
        return Err(PermuteError::NonFinite {
            what: what.to_string(),
            msg: format!("cost[{}][{}] = {}", k / n, k % n, cost[k]),
        });
    }
    if n == 0 {
        return Ok((vec![], Duals { v: vec![] }));
    }
    let shifted = Shifted {
        raw: cost,
        sign,
        lo,
    };
    // Stored duals live in the unshifted space: v_raw = v + lo.
    let v0 = warm
        .filter(|d| d.v.len() == n)
        .map(|d| d.v.iter().map(|v| v - lo).collect());
    // (A range that overflows leaves no tolerance to check against.)
    let (assignment, v) = if n >= SPARSE_FROM && (hi - lo).is_finite() {
        candidates_then_verify(&shifted, n, hi - lo, v0)
    } else {
        shortest_augmenting_path(&shifted.to_vec(), n, v0)
    };
    Ok((
        assignment,
        Duals {
            v: v.into_iter().map(|x| x + lo).collect(),
        },
    ))
}

/// `(min, max, Σ 0·x)` of `sign·cost` in eight independent lanes (one
/// running minimum waits on the previous one's latency at every entry); the
/// sum is NaN exactly when an entry is not finite.
fn bounds(cost: &[f64], sign: f64) -> (f64, f64, f64) {
    const LANES: usize = 8;
    let (mut lo, mut hi, mut sum) = (
        [f64::INFINITY; LANES],
        [f64::NEG_INFINITY; LANES],
        [0.0; LANES],
    );
    let chunks = cost.chunks_exact(LANES);
    for (k, &x) in chunks.remainder().iter().enumerate() {
        lo[k] = lo[k].min(sign * x);
        hi[k] = hi[k].max(sign * x);
        sum[k] += x * 0.0;
    }
    for chunk in chunks {
        for k in 0..LANES {
            lo[k] = lo[k].min(sign * chunk[k]);
            hi[k] = hi[k].max(sign * chunk[k]);
            sum[k] += chunk[k] * 0.0;
        }
    }
    let fold = |xs: [f64; LANES], f: fn(f64, f64) -> f64, init: f64| xs.into_iter().fold(init, f);
    (
        fold(lo, f64::min, f64::INFINITY),
        fold(hi, f64::max, f64::NEG_INFINITY),
        sum.iter().sum(),
    )
}

const NONE: usize = usize::MAX;

/// The costs as the search sees them, `sign·cost − lo` (minimisation, all
/// `≥ 0`), read in place rather than copied.
struct Shifted<'a> {
    raw: &'a [f64],
    sign: f64,
    lo: f64,
}

impl Shifted<'_> {
    #[inline]
    fn shift(&self, x: f64) -> f64 {
        self.sign * x - self.lo
    }

    #[inline]
    fn at(&self, k: usize) -> f64 {
        self.shift(self.raw[k])
    }

    /// Row `i` of an `n`-column matrix.
    fn row(&self, i: usize, n: usize) -> impl Iterator<Item = f64> + '_ {
        self.raw[i * n..(i + 1) * n].iter().map(|&x| self.shift(x))
    }

    fn to_vec(&self) -> Vec<f64> {
        self.raw.iter().map(|&x| self.shift(x)).collect()
    }
}

/// Sizes from which [`candidates_then_verify`] runs instead of the dense search.
const SPARSE_FROM: usize = 128;
/// Candidate columns per row in its first round.
const CANDIDATES: usize = 32;
/// Sparse rounds (each ending in a check of the full matrix) before the
/// dense search takes over.
const MAX_ROUNDS: usize = 16;

/// The exact optimum through a sparse problem first: each row keeps only its
/// `k` cheapest columns (by reduced cost under the starting duals), the
/// shortest-augmenting-path search runs on those edges alone (a heap instead
/// of a scan over every column), and the resulting duals are then checked
/// against **every** entry. Duals feasible on the whole matrix prove the
/// matching optimal (LP duality: the matching's cost equals the duals' sum);
/// every entry that violates them joins its row's candidates, and those rows
/// alone are freed and placed again ([`Sparse::reseat`]). A sparse problem
/// without a perfect matching doubles `k`; past `n/4`, or after
/// `MAX_ROUNDS` checks, the dense search finishes from the duals reached. On
/// weight-matching costs the optimum lies among a few dozen columns per row,
/// so one or two checks suffice.
fn candidates_then_verify(
    c: &Shifted<'_>,
    n: usize,
    range: f64,
    warm_v: Option<Vec<f64>>,
) -> (Vec<usize>, Vec<f64>) {
    // Relative to the costs' range: far above the rounding of the dual
    // updates, far below any real gap, whatever the costs' scale.
    let tol = 1e-10 * range.max(f64::MIN_POSITIVE);
    let mut k = CANDIDATES.min(n);
    let v = warm_v.unwrap_or_else(|| vec![0.0; n]);
    let mut cand = cheapest_columns(c, n, &v, k);
    let mut sparse = Sparse::start(n, &cand, v);
    let mut member = vec![false; n];
    for _ in 0..MAX_ROUNDS {
        if !sparse.augment(n, &cand) {
            k *= 2;
            if k > n / 4 {
                return shortest_augmenting_path(&c.to_vec(), n, Some(sparse.v));
            }
            cand = cheapest_columns(c, n, &sparse.v, k);
            sparse = Sparse::start(n, &cand, sparse.v);
            continue;
        }
        let mut violated = false;
        for (i, cols) in cand.iter_mut().enumerate() {
            let ui = sparse.u[i];
            let mut grew = false;
            for (j, (cij, &vj)) in c.row(i, n).zip(&sparse.v).enumerate() {
                if cij - ui - vj < -tol {
                    if !grew {
                        cols.iter().for_each(|&(j, _)| member[j] = true);
                        grew = true;
                    }
                    if !member[j] {
                        cols.push((j, cij));
                        member[j] = true;
                    }
                }
            }
            if grew {
                cols.iter().for_each(|&(j, _)| member[j] = false);
                sparse.reseat(i, cols);
                violated = true;
            }
        }
        if !violated {
            return (sparse.col4row, sparse.v);
        }
    }
    // Candidates that keep missing the optimum: the dense search finishes
    // from the duals reached (a valid warm start).
    shortest_augmenting_path(&c.to_vec(), n, Some(sparse.v))
}

/// A row's candidate edges: `(j, c_ij)`, the cost kept beside its column so
/// that the sparse search reads a few compact rows instead of scattered
/// entries of the whole matrix.
type Edges = Vec<(usize, f64)>;

/// Per row, the `k` columns of least reduced cost `c_ij − v_j`, with their costs.
///
/// A strided sample of the row gives a threshold that about `2k` of its
/// entries pass; only those are ranked (the whole row when fewer than `k` do).
fn cheapest_columns(c: &Shifted<'_>, n: usize, v: &[f64], k: usize) -> Vec<Edges> {
    let stride = (n / (4 * k)).max(1);
    let (mut reduced, mut sample, mut keyed) = (Vec::with_capacity(n), Vec::new(), Vec::new());
    (0..n)
        .map(|i| {
            reduced.clear();
            reduced.extend(c.row(i, n).zip(v).map(|(cij, &vj)| cij - vj));
            keyed.clear();
            if k < n {
                sample.clear();
                sample.extend(reduced.iter().step_by(stride));
                let q = ((2 * k * sample.len()).div_ceil(n)).min(sample.len() - 1);
                let (_, &mut threshold, _) = sample.select_nth_unstable_by(q, f64::total_cmp);
                keyed.extend(
                    reduced
                        .iter()
                        .enumerate()
                        .filter(|&(_, &r)| r <= threshold)
                        .map(|(j, &r)| (r, j)),
                );
            }
            if keyed.len() < k {
                keyed.clear();
                keyed.extend(reduced.iter().enumerate().map(|(j, &r)| (r, j)));
            }
            if k < keyed.len() {
                keyed.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
            }
            keyed[..k]
                .iter()
                .map(|&(_, j)| (j, c.at(i * n + j)))
                .collect()
        })
        .collect()
}

/// A column's place in the search's heap: least distance first, free columns
/// first among equal distances (which ends the search early, as the dense scan does).
#[derive(PartialEq)]
struct Label(f64, bool, usize);

impl Eq for Label {}

impl PartialOrd for Label {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Label {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: `BinaryHeap` pops its greatest.
        other
            .0
            .total_cmp(&self.0)
            .then(other.1.cmp(&self.1))
            .then(other.2.cmp(&self.2))
    }
}

/// The sparse problem's matching and duals: every candidate edge has a
/// non-negative reduced cost `c_ij − u_i − v_j`, every matched one zero.
struct Sparse {
    u: Vec<f64>,
    v: Vec<f64>,
    col4row: Vec<usize>,
    row4col: Vec<usize>,
}

impl Sparse {
    /// From column duals `v`: each row's dual is its least reduced cost over
    /// its candidates, and it takes that column if no earlier row has; then
    /// [`Sparse::reduce`] places most of the rows left free.
    fn start(n: usize, cand: &[Edges], v: Vec<f64>) -> Sparse {
        let mut s = Sparse {
            u: vec![0.0; n],
            v,
            col4row: vec![NONE; n],
            row4col: vec![NONE; n],
        };
        for (i, cols) in cand.iter().enumerate() {
            let arg = s.lower_u(i, cols);
            if s.row4col[arg] == NONE {
                s.row4col[arg] = i;
                s.col4row[i] = arg;
            }
        }
        s.reduce(cand);
        s
    }

    /// Jonker & Volgenant's augmenting row reduction on the candidate edges:
    /// a free row takes its cheapest column and lowers that column's dual by
    /// the gap to its second cheapest, so that the row it displaces (placed
    /// next) sees the column as dearer, an auction step that places most rows
    /// before any shortest-path search. Duals only fall, so every candidate
    /// edge keeps a non-negative reduced cost and every matched edge a zero
    /// one. Two sweeps, each at most `8n` steps; the rows left free get their
    /// least reduced cost as dual for [`Sparse::augment`].
    fn reduce(&mut self, cand: &[Edges]) {
        let n = self.u.len();
        let mut free: Vec<usize> = (0..n).filter(|&i| self.col4row[i] == NONE).collect();
        for _ in 0..2 {
            let mut next = Vec::new();
            let (mut k, mut steps) = (0, 0);
            while k < free.len() {
                let i = free[k];
                k += 1;
                steps += 1;
                // The least and second least reduced costs, with their edges.
                let (mut u1, mut e1, mut u2, mut e2) = (f64::INFINITY, None, f64::INFINITY, None);
                for &(j, cij) in &cand[i] {
                    let r = cij - self.v[j];
                    if r < u1 {
                        (u2, e2, u1, e1) = (u1, e1, r, Some((j, cij)));
                    } else if r < u2 {
                        (u2, e2) = (r, Some((j, cij)));
                    }
                }
                let (mut j1, mut c1) = e1.expect("every row has candidates");
                let mut i0 = self.row4col[j1];
                let lowers = u1 < u2 && u2.is_finite() && steps <= 8 * n;
                if lowers {
                    self.v[j1] -= u2 - u1;
                } else if let Some((j2, c2)) = e2.filter(|_| i0 != NONE && u2 == u1) {
                    // A tie: the second column, which may be free.
                    (j1, c1) = (j2, c2);
                    i0 = self.row4col[j2];
                }
                if i0 != NONE {
                    self.col4row[i0] = NONE;
                    if lowers {
                        k -= 1;
                        free[k] = i0;
                    } else {
                        next.push(i0);
                    }
                }
                self.u[i] = c1 - self.v[j1];
                self.col4row[i] = j1;
                self.row4col[j1] = i;
            }
            free = next;
        }
        for &i in &free {
            self.lower_u(i, &cand[i]);
        }
    }

    /// Sets `u_i` to row `i`'s least reduced cost; returns its column.
    fn lower_u(&mut self, i: usize, cols: &[(usize, f64)]) -> usize {
        let (mut best, mut arg) = (f64::INFINITY, NONE);
        for &(j, cij) in cols {
            let r = cij - self.v[j];
            if r < best {
                best = r;
                arg = j;
            }
        }
        self.u[i] = best;
        arg
    }

    /// Row `i`'s candidates grew by edges its dual violated: lowering `u_i`
    /// restores the invariant except on its matched edge, which is no longer
    /// tight, so the row is freed (the next [`Sparse::augment`] places it).
    fn reseat(&mut self, i: usize, cols: &[(usize, f64)]) {
        self.lower_u(i, cols);
        let j = std::mem::replace(&mut self.col4row[i], NONE);
        if j != NONE {
            self.row4col[j] = NONE;
        }
    }

    /// The shortest-augmenting-path search from every free row on the edges
    /// `cand` only (a heap instead of a scan over every column); `false`
    /// when the edges hold no perfect matching.
    fn augment(&mut self, n: usize, cand: &[Edges]) -> bool {
        let (u, v) = (&mut self.u, &mut self.v);
        let (col4row, row4col) = (&mut self.col4row, &mut self.row4col);
        let mut shortest = vec![f64::INFINITY; n];
        let mut path = vec![NONE; n];
        let mut scanned = vec![false; n];
        let (mut touched, mut rows, mut cols) = (Vec::new(), Vec::new(), Vec::new());
        let mut heap = std::collections::BinaryHeap::new();
        for cur_row in 0..n {
            if col4row[cur_row] != NONE {
                continue;
            }
            let mut min_val = 0.0;
            let mut i = cur_row;
            let sink = loop {
                rows.push(i);
                let ui = u[i];
                for &(j, cij) in &cand[i] {
                    if scanned[j] {
                        continue;
                    }
                    let r = min_val + cij - ui - v[j];
                    if r < shortest[j] {
                        if shortest[j] == f64::INFINITY {
                            touched.push(j);
                        }
                        shortest[j] = r;
                        path[j] = i;
                        heap.push(Label(r, row4col[j] != NONE, j));
                    }
                }
                let j = loop {
                    let Some(Label(r, _, j)) = heap.pop() else {
                        return false;
                    };
                    if !scanned[j] && r == shortest[j] {
                        break j;
                    }
                };
                min_val = shortest[j];
                scanned[j] = true;
                cols.push(j);
                if row4col[j] == NONE {
                    break j;
                }
                i = row4col[j];
            };
            u[cur_row] += min_val;
            for &r in &rows[1..] {
                u[r] += min_val - shortest[col4row[r]];
            }
            for &j in &cols {
                v[j] -= min_val - shortest[j];
            }
            flip(path.as_slice(), row4col, col4row, sink, cur_row);
            for &j in &touched {
                shortest[j] = f64::INFINITY;
                scanned[j] = false;
            }
            touched.clear();
            rows.clear();
            cols.clear();
            heap.clear();
        }
        true
    }
}

/// The dense search (scipy's): every column scanned at each step.
fn shortest_augmenting_path(
    c: &[f64],
    n: usize,
    warm_v: Option<Vec<f64>>,
) -> (Vec<usize>, Vec<f64>) {
    let mut u = vec![0.0; n];
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    let warm = warm_v.is_some();
    let mut v = warm_v.unwrap_or_else(|| vec![0.0; n]);
    if warm {
        for i in 0..n {
            let row = &c[i * n..(i + 1) * n];
            let (mut best, mut arg) = (f64::INFINITY, 0);
            for (j, (&cij, &vj)) in row.iter().zip(&v).enumerate() {
                let r = cij - vj;
                if r < best {
                    best = r;
                    arg = j;
                }
            }
            u[i] = best;
            if row4col[arg] == NONE {
                row4col[arg] = i;
                col4row[i] = arg;
            }
        }
    }
    let mut shortest = vec![f64::INFINITY; n];
    let mut path = vec![NONE; n];
    let mut scanned_rows = vec![false; n];
    let mut scanned_cols = vec![false; n];
    let mut remaining: Vec<usize> = Vec::with_capacity(n);
    for cur_row in 0..n {
        if col4row[cur_row] != NONE {
            continue;
        }
        shortest.iter_mut().for_each(|s| *s = f64::INFINITY);
        scanned_rows.iter_mut().for_each(|s| *s = false);
        scanned_cols.iter_mut().for_each(|s| *s = false);
        remaining.clear();
        remaining.extend((0..n).rev());
        let mut min_val = 0.0;
        let mut i = cur_row;
        let sink = loop {
            scanned_rows[i] = true;
            let row = &c[i * n..(i + 1) * n];
            let ui = u[i];
            let mut index = NONE;
            let mut lowest = f64::INFINITY;
            for (it, &j) in remaining.iter().enumerate() {
                let r = min_val + row[j] - ui - v[j];
                if r < shortest[j] {
                    path[j] = i;
                    shortest[j] = r;
                }
                if shortest[j] < lowest || (shortest[j] == lowest && row4col[j] == NONE) {
                    lowest = shortest[j];
                    index = it;
                }
            }
            min_val = lowest;
            let j = remaining.swap_remove(index);
            scanned_cols[j] = true;
            if row4col[j] == NONE {
                break j;
            }
            i = row4col[j];
        };
        // Dual update keeps reduced costs non-negative and tight on the matching.
        u[cur_row] += min_val;
        for r in 0..n {
            if scanned_rows[r] && r != cur_row {
                u[r] += min_val - shortest[col4row[r]];
            }
        }
        for j in 0..n {
            if scanned_cols[j] {
                v[j] -= min_val - shortest[j];
            }
        }
        flip(&path, &mut row4col, &mut col4row, sink, cur_row);
    }
    (col4row, v)
}

/// Flips the augmenting path that ends at free column `sink` (each column's
/// predecessor row in `path`) back to `cur_row`: every row on it moves to the
/// next column.
fn flip(path: &[usize], row4col: &mut [usize], col4row: &mut [usize], sink: usize, cur_row: usize) {
    let mut j = sink;
    loop {
        let r = path[j];
        row4col[j] = r;
        std::mem::swap(&mut col4row[r], &mut j);
        if r == cur_row {
            break;
        }
    }
}

/// The total of `cost` under an assignment.
pub fn total(cost: &[f64], n: usize, col_of_row: &[usize]) -> f64 {
    col_of_row
        .iter()
        .enumerate()
        .map(|(i, &j)| cost[i * n + j])
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(cost: &[f64], n: usize, objective: Objective) -> f64 {
        fn rec(
            k: usize,
            n: usize,
            used: &mut Vec<bool>,
            acc: f64,
            cost: &[f64],
            best: &mut f64,
            max: bool,
        ) {
            if k == n {
                if (max && acc > *best) || (!max && acc < *best) {
                    *best = acc;
                }
                return;
            }
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    rec(k + 1, n, used, acc + cost[k * n + j], cost, best, max);
                    used[j] = false;
                }
            }
        }
        let max = objective == Objective::Maximize;
        let mut best = if max {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        rec(0, n, &mut vec![false; n], 0.0, cost, &mut best, max);
        best
    }

    fn is_permutation(p: &[usize]) -> bool {
        let mut seen = vec![false; p.len()];
        p.iter()
            .all(|&j| j < p.len() && !std::mem::replace(&mut seen[j], true))
    }

    #[test]
    fn agrees_with_brute_force_up_to_eight() {
        let mut rng = weights::rng::Rng::new(7);
        for n in 1..=8 {
            for trial in 0..20 {
                // Mix continuous costs with small integers (many ties).
                let cost: Vec<f64> = (0..n * n)
                    .map(|_| {
                        if trial % 2 == 0 {
                            rng.normal()
                        } else {
                            (rng.below(4)) as f64
                        }
                    })
                    .collect();
                for obj in [Objective::Minimize, Objective::Maximize] {
                    let p = solve(&cost, n, obj, "t").unwrap();
                    assert!(is_permutation(&p));
                    let best = brute_force(&cost, n, obj);
                    assert!(
                        (total(&cost, n, &p) - best).abs() < 1e-9,
                        "n={n} trial={trial} {obj:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn warm_starts_give_the_same_optimum() {
        let mut rng = weights::rng::Rng::new(3);
        for n in [1usize, 5, 40, 200] {
            let base: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
            let (p0, duals) = solve_warm(&base, n, Objective::Maximize, None, "t").unwrap();
            // A slightly changed problem, and an unrelated one, from the same duals.
            let near: Vec<f64> = base.iter().map(|c| c + 0.01 * rng.normal()).collect();
            let far: Vec<f64> = (0..n * n).map(|_| 100.0 * rng.uniform()).collect();
            for cost in [&base, &near, &far] {
                let cold = solve(cost, n, Objective::Maximize, "t").unwrap();
                let (hot, _) = solve_warm(cost, n, Objective::Maximize, Some(&duals), "t").unwrap();
                assert!(is_permutation(&hot));
                assert!(
                    (total(cost, n, &hot) - total(cost, n, &cold)).abs()
                        < 1e-9 * (1.0 + total(cost, n, &cold).abs())
                );
            }
            assert_eq!(
                solve_warm(&base, n, Objective::Maximize, Some(&duals), "t")
                    .unwrap()
                    .0
                    .len(),
                p0.len()
            );
            // Minimisation too.
            let (_, d) = solve_warm(&base, n, Objective::Minimize, None, "t").unwrap();
            let cold = solve(&near, n, Objective::Minimize, "t").unwrap();
            let (hot, _) = solve_warm(&near, n, Objective::Minimize, Some(&d), "t").unwrap();
            assert!(
                (total(&near, n, &hot) - total(&near, n, &cold)).abs()
                    < 1e-9 * (1.0 + total(&near, n, &cold).abs())
            );
        }
    }

    /// Costs of every kind the sparse first round meets: continuous, wm-like,
    /// low rank (every row wants the same columns: no perfect matching among
    /// the candidates, so `k` doubles up to the dense search), and integer
    /// ties; cold and warm, both objectives.
    #[test]
    fn candidate_rounds_reach_the_dense_optimum() {
        let mut rng = weights::rng::Rng::new(11);
        for n in [SPARSE_FROM, 300, 700] {
            let a: Vec<f64> = (0..n * 3).map(|_| rng.normal()).collect();
            let b: Vec<f64> = (0..n * 3).map(|_| rng.normal()).collect();
            let wm = |rank: usize| -> Vec<f64> {
                (0..n * n)
                    .map(|ij| {
                        (0..rank)
                            .map(|r| a[(ij / n) * 3 + r] * b[(ij % n) * 3 + r])
                            .sum()
                    })
                    .collect()
            };
            let noise: Vec<f64> = (0..n * n).map(|_| 1e-3 * rng.normal()).collect();
            let tiny = |rank: usize, scale: f64| -> Vec<f64> {
                wm(rank)
                    .iter()
                    .zip(&noise)
                    .map(|(c, e)| scale * (c + e))
                    .collect()
            };
            let costs = [
                (0..n * n).map(|_| rng.normal()).collect::<Vec<f64>>(),
                wm(3),
                wm(1),
                (0..n * n).map(|_| rng.below(5) as f64).collect(),
                // Low rank plus noise at tiny scales: the check's tolerance
                // must follow the costs' range, not an absolute floor.
                tiny(1, 1e-12),
                tiny(2, 1e-9),
                tiny(3, 1e-12),
            ];
            for (kind, cost) in costs.iter().enumerate() {
                for obj in [Objective::Minimize, Objective::Maximize] {
                    // `p`'s total against the dense search's on `cost`.
                    let check = |cost: &[f64], p: &[usize], what: &str| {
                        let sign = if obj == Objective::Maximize {
                            -1.0
                        } else {
                            1.0
                        };
                        let lo = cost.iter().map(|&x| sign * x).fold(f64::INFINITY, f64::min);
                        let shifted = Shifted {
                            raw: cost,
                            sign,
                            lo,
                        }
                        .to_vec();
                        let dense = shortest_augmenting_path(&shifted, n, None).0;
                        let (want, got) = (total(cost, n, &dense), total(cost, n, p));
                        let scale = cost.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                        assert!(is_permutation(p));
                        assert!(
                            (want - got).abs() <= 1e-9 * scale * n as f64,
                            "{what} n={n} kind={kind} {obj:?}: {got} vs dense {want}"
                        );
                    };
                    let (p, duals) = solve_warm(cost, n, obj, None, "t").unwrap();
                    check(cost, &p, "cold");
                    let scale = cost.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    let near: Vec<f64> = cost
                        .iter()
                        .map(|x| x + 0.01 * scale * rng.normal())
                        .collect();
                    let (hot, _) = solve_warm(&near, n, obj, Some(&duals), "t").unwrap();
                    check(&near, &hot, "warm");
                }
            }
        }
    }

    #[test]
    fn degenerate_costs_terminate() {
        for n in [1usize, 2, 17, 300] {
            for cost in [vec![0.0; n * n], vec![3.5; n * n]] {
                let p = solve(&cost, n, Objective::Maximize, "t").unwrap();
                assert!(is_permutation(&p));
            }
            // Many ties: costs in {0, 1}.
            let cost: Vec<f64> = (0..n * n)
                .map(|k| ((k * 7919) % 3 == 0) as u8 as f64)
                .collect();
            assert!(is_permutation(
                &solve(&cost, n, Objective::Minimize, "t").unwrap()
            ));
        }
    }

    #[test]
    fn non_finite_and_misshapen_costs_are_errors() {
        assert!(matches!(
            solve(&[1.0, f64::NAN, 0.0, 1.0], 2, Objective::Minimize, "g"),
            Err(PermuteError::NonFinite { .. })
        ));
        assert!(matches!(
            solve(&[1.0, f64::INFINITY, 0.0, 1.0], 2, Objective::Minimize, "g"),
            Err(PermuteError::NonFinite { .. })
        ));
        assert!(matches!(
            solve(&[1.0, 2.0, 3.0], 2, Objective::Minimize, "g"),
            Err(PermuteError::Shape { .. })
        ));
        assert_eq!(
            solve(&[], 0, Objective::Minimize, "g").unwrap(),
            Vec::<usize>::new()
        );
    }
}
