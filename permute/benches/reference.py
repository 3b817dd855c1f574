"""Python reference for `cargo bench -p permute` on the same inputs' kinds
(same sizes and distributions; numpy's generator, not ours): scipy's
linear_sum_assignment, and weight matching of two 784-512-512-512-10 MLPs
with a numpy port of Git Re-Basin's `weight_matching` (Ainsworth et al.,
github.com/samuela/git-re-basin, src/weight_matching.py), medians.

    pip install numpy scipy
    python3 permute/benches/reference.py [max_n]
"""

import statistics
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

max_n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
rng = np.random.default_rng(0)


def median_time(fn, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


for n in [512, 1024, 2048, 4096]:
    if n > max_n or max_n == 0:
        break
    uni = rng.random((n, n))
    a = rng.standard_normal((n, 4 * n), dtype=np.float32)
    b = rng.standard_normal((n, 4 * n), dtype=np.float32)
    wm = (a @ b.T).astype(np.float64)
    runs = 5 if n <= 1024 else 3
    for label, c in [("uniform", uni), ("wm_like", wm)]:
        t = median_time(lambda: linear_sum_assignment(c, maximize=True), runs)
        print(f"scipy lap {label}/{n}: {t * 1e3:.1f} ms")


def mlp(seed):
    r = np.random.default_rng(seed)
    sizes = [784, 512, 512, 512, 10]
    p = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"layers.{i}.weight"] = (r.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        p[f"layers.{i}.bias"] = (r.standard_normal(n_out) / np.sqrt(n_out)).astype(np.float32)
    return p


# Git Re-Basin's permutation spec for an MLP: axes_to_perm.
axes_to_perm = {}
for i in range(4):
    axes_to_perm[f"layers.{i}.weight"] = (f"P_{i}" if i < 3 else None, f"P_{i - 1}" if i > 0 else None)
    axes_to_perm[f"layers.{i}.bias"] = (f"P_{i}" if i < 3 else None,)
perm_to_axes = {}
for w, axes in axes_to_perm.items():
    for axis, p in enumerate(axes):
        if p is not None:
            perm_to_axes.setdefault(p, []).append((w, axis))


def get_permuted_param(perm, k, params, except_axis=None):
    w = params[k]
    for axis, p in enumerate(axes_to_perm[k]):
        if axis == except_axis or p is None:
            continue
        w = np.take(w, perm[p], axis=axis)
    return w


def weight_matching(params_a, params_b, max_iter=100, seed=0):
    perm_sizes = {p: params_a[axes[0][0]].shape[axes[0][1]] for p, axes in perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in perm_sizes.items()}
    names = list(perm.keys())
    r = np.random.default_rng(seed)
    for it in range(max_iter):
        progress = False
        for p_ix in r.permutation(len(names)):
            p = names[p_ix]
            n = perm_sizes[p]
            A = np.zeros((n, n))
            for wk, axis in perm_to_axes[p]:
                w_a = params_a[wk]
                w_b = get_permuted_param(perm, wk, params_b, except_axis=axis)
                w_a = np.moveaxis(w_a, axis, 0).reshape((n, -1))
                w_b = np.moveaxis(w_b, axis, 0).reshape((n, -1))
                A += w_a @ w_b.T
            ri, ci = linear_sum_assignment(A, maximize=True)
            old_l = np.vdot(A, np.eye(n)[perm[p]])
            new_l = np.vdot(A, np.eye(n)[ci, :])
            progress = progress or new_l > old_l + 1e-12
            perm[p] = ci
        if not progress:
            return perm, it + 1
    return perm, max_iter


# The bench's own models when it has run (identical weights on both sides).
import os
bench_dir = os.path.join(os.path.dirname(__file__), "..", "..", "target", "bench-data")
if os.path.isfile(os.path.join(bench_dir, "mlp_a.safetensors")):
    from safetensors.numpy import load_file

    pa = load_file(os.path.join(bench_dir, "mlp_a.safetensors"))
    pb = load_file(os.path.join(bench_dir, "mlp_b.safetensors"))
    print("using the bench's models from target/bench-data")
else:
    pa, pb = mlp(3), mlp(4)
_, passes = weight_matching(pa, pb)
t = median_time(lambda: weight_matching(pa, pb), 5)
print(f"git-re-basin weight_matching mlp 784-512x3-10: {t * 1e3:.1f} ms ({passes} passes)")
