"""Python reference for `cargo bench -p weights --bench read`: the same reads
with Hugging Face safetensors (numpy) and llama.cpp's gguf-py, median of runs.

    pip install numpy safetensors gguf
    python3 weights/benches/read_reference.py [models]
"""

import os
import statistics
import sys
import time

import numpy as np

models = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "models")


def bench(label, path, fn, runs=10):
    fn()  # warm the page cache
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    size = os.path.getsize(path)
    print(f"{label:<40} median {med * 1e3:8.1f} ms  {size / med / 1e6:8.0f} MB/s")


st = os.path.join(models, "all-MiniLM-L6-v2/model.safetensors")
if os.path.isfile(st):
    from safetensors.numpy import load_file

    def read_st():
        # load_file copies every tensor into a numpy array; convert to f32 as the Rust reader does.
        return {k: v.astype(np.float32, copy=False) for k, v in load_file(st).items()}

    bench("safetensors.numpy load_file (MiniLM)", st, read_st)

gg = os.path.join(models, "SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
if os.path.isfile(gg):
    import gguf

    def read_gguf():
        r = gguf.GGUFReader(gg)
        return [gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors]

    bench("gguf-py GGUFReader + dequantize (SmolLM2)", gg, read_gguf, runs=3)
