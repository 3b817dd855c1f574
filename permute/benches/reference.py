"""Python reference for `cargo bench -p permute` on the same inputs' kinds
(same sizes and distributions; numpy's generator, not ours): scipy's
linear_sum_assignment, and weight matching of two 784-512-512-512-10 MLPs
with a numpy port of Git Re-Basin's `weight_matching` (Ainsworth et al.,
github.com/samuela/git-re-basin, src/weight_matching.py), medians.

    pip install numpy scipy
    python3 permute/benches/reference.py [max_n]   # after cargo bench -p permute
    python3 permute/benches/reference.py 4096 lap  # the LAP rows only
    python3 permute/benches/reference.py 0         # weight matching only (after
                                                   # the wm_speed example has run)
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


if sys.argv[2:3] == ["lap"]:
    sys.exit(0)

if max_n == 0:
    # What a transformer pass is made of (`wm_speed bound` times the same).
    a = rng.standard_normal((3072, 768), dtype=np.float32)
    b = rng.standard_normal((3072, 768), dtype=np.float32)
    t = median_time(lambda: a @ b.T, 5)
    print(f"numpy GEMM 3072x768 . 768x3072 f32: {t * 1e3:.1f} ms")
    a = rng.standard_normal((3072, 4 * 3072), dtype=np.float32)
    b = rng.standard_normal((3072, 4 * 3072), dtype=np.float32)
    wm = (a @ b.T).astype(np.float64)
    t = median_time(lambda: linear_sum_assignment(wm, maximize=True), 3)
    print(f"scipy lap wm_like/3072: {t * 1e3:.1f} ms")


def mlp(seed, width=512):
    r = np.random.default_rng(seed)
    sizes = [784, width, width, width, 10]
    p = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"layers.{i}.weight"] = (r.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        p[f"layers.{i}.bias"] = (r.standard_normal(n_out) / np.sqrt(n_out)).astype(np.float32)
    return p


def make_spec(axes_to_perm):
    """Git Re-Basin's spec: `axes_to_perm` and its inverse `perm_to_axes`."""
    perm_to_axes = {}
    for w, axes in axes_to_perm.items():
        for axis, p in enumerate(axes):
            if p is not None:
                perm_to_axes.setdefault(p, []).append((w, axis))
    return axes_to_perm, perm_to_axes


# Git Re-Basin's permutation spec for an MLP (any width).
mlp_spec = make_spec(
    {
        **{f"layers.{i}.weight": (f"P_{i}" if i < 3 else None, f"P_{i - 1}" if i > 0 else None) for i in range(4)},
        **{f"layers.{i}.bias": (f"P_{i}" if i < 3 else None,) for i in range(4)},
    }
)


def transformer_spec(layers):
    """The usual Git Re-Basin-style transformer spec: one residual permutation,
    one per-unit attention permutation per layer (q/k/v rows, o columns: it mixes
    heads, which breaks the function, but costs what a head-structured group
    costs) and one FFN permutation per layer."""
    a = {"model.embed_tokens.weight": (None, "P_res"), "model.norm.weight": ("P_res",)}
    for l in range(layers):
        p = f"model.layers.{l}"
        a[f"{p}.input_layernorm.weight"] = ("P_res",)
        a[f"{p}.post_attention_layernorm.weight"] = ("P_res",)
        for n in ["q_proj", "k_proj", "v_proj"]:
            a[f"{p}.self_attn.{n}.weight"] = (f"P_attn_{l}", "P_res")
        a[f"{p}.self_attn.o_proj.weight"] = ("P_res", f"P_attn_{l}")
        a[f"{p}.mlp.gate_proj.weight"] = (f"P_ffn_{l}", "P_res")
        a[f"{p}.mlp.up_proj.weight"] = (f"P_ffn_{l}", "P_res")
        a[f"{p}.mlp.down_proj.weight"] = ("P_res", f"P_ffn_{l}")
    return make_spec(a)


def get_permuted_param(spec, perm, k, params, except_axis=None):
    w = params[k]
    for axis, p in enumerate(spec[0][k]):
        if axis == except_axis or p is None:
            continue
        w = np.take(w, perm[p], axis=axis)
    return w


def weight_matching(spec, params_a, params_b, max_iter=100, seed=0):
    perm_to_axes = spec[1]
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
                w_b = get_permuted_param(spec, perm, wk, params_b, except_axis=axis)
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


def bench_models(stem):
    from safetensors.numpy import load_file

    a = os.path.join(bench_dir, f"{stem}_a.safetensors")
    if not os.path.isfile(a):
        return None
    print(f"using the bench's {stem} models from target/bench-data")
    return load_file(a), load_file(os.path.join(bench_dir, f"{stem}_b.safetensors"))


for width, stem in [(512, "mlp"), (1024, "mlp1024")]:
    models = bench_models(stem)
    if models is None and width != 512:
        continue  # written by `cargo run -p permute --release --example wm_speed -- mlp 1024`
    pa, pb = models or (mlp(3, width), mlp(4, width))
    _, passes = weight_matching(mlp_spec, pa, pb)
    t = median_time(lambda: weight_matching(mlp_spec, pa, pb), 5)
    print(f"git-re-basin weight_matching mlp 784-{width}x3-10: {t * 1e3:.1f} ms ({passes} passes)")
    # The visiting order's seed sets the pass count: seeds 0-4, one run each.
    times, counts = [], []
    for seed in range(5):
        t = time.perf_counter()
        counts.append(weight_matching(mlp_spec, pa, pb, seed=seed)[1])
        times.append(time.perf_counter() - t)
    per_pass = statistics.median(t / c for t, c in zip(times, counts))
    print(
        f"  seeds 0-4: median {statistics.median(times) * 1e3:.1f} ms, passes {counts}, "
        f"median {per_pass * 1e3:.1f} ms per pass"
    )

models = bench_models("transformer")
if models is not None:
    spec = transformer_spec(12)
    t = median_time(lambda: weight_matching(spec, *models, max_iter=1), 3)
    print(f"git-re-basin weight_matching transformer 12x768, one pass: {t:.2f} s")
    t = time.perf_counter()
    _, passes = weight_matching(spec, *models)
    print(f"  to convergence: {time.perf_counter() - t:.1f} s ({passes} passes)")
