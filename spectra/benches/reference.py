"""Python reference timings for `cargo bench -p spectra` (medians).

    pip install numpy safetensors weightwatcher==0.7.7
    python3 spectra/benches/reference.py [models]
"""

import os
import statistics
import subprocess
import sys
import time

import numpy as np

models = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "models")


def median_time(fn, runs):
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


rng = np.random.default_rng(1)
for m, n in [(768, 768), (768, 3072), (2048, 2048)]:
    a = rng.standard_normal((m, n)).astype(np.float32)
    t = median_time(lambda: np.linalg.svd(a, compute_uv=False), 5)
    print(f"numpy svd(compute_uv=False) f32 {m}x{n}: {t * 1e3:.1f} ms")

x = rng.standard_normal((2000, 1025))
y = rng.standard_normal((2000, 1024))


def ridge():
    return np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ y)


t = median_time(ridge, 10)
print(f"numpy ridge least squares f64 2000x1025 -> 1024 (solve(XtX + I, XtY)): {t * 1e3:.1f} ms")

script = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ww_reference.py")
if os.path.isfile(os.path.join(models, "all-MiniLM-L6-v2/model.safetensors")):
    ts = []
    for _ in range(3):
        out = subprocess.run([sys.executable, script, models], capture_output=True, text=True, check=True).stdout
        ts.append(float(out.split(" in ")[1].split(" s")[0]))
    print(f"WeightWatcher WWFit + numpy SVD, all-MiniLM-L6-v2 (40 layers): {statistics.median(ts):.2f} s")
