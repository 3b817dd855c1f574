"""Speed and peak memory of `merge` vs mergekit on the same files and configs.

Writes a base and three fine-tunes with SmolLM2-135M's shapes in f32
(134.5M parameters, 538 MB each; HF LLaMA naming, one safetensors file each)
to target/bench-data/merge/, then runs `linear`, `ties` and `dare_ties`
through both tools, each as a child process, and reports wall time and the
child's peak RSS (medians of `--runs`). The two outputs of each deterministic
method are compared tensor by tensor.

    cargo build --release -p merge
    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5
    /tmp/mk/bin/python merge/benches/compare_mergekit.py [--runs 3]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "target", "bench-data", "merge")
H, F, L, V, KV = 576, 1536, 30, 49152, 192
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
    "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": V, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def shapes():
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for l in range(L):
        p = f"model.layers.{l}"
        s[f"{p}.input_layernorm.weight"] = (H,)
        s[f"{p}.post_attention_layernorm.weight"] = (H,)
        s[f"{p}.self_attn.q_proj.weight"] = (H, H)
        s[f"{p}.self_attn.k_proj.weight"] = (KV, H)
        s[f"{p}.self_attn.v_proj.weight"] = (KV, H)
        s[f"{p}.self_attn.o_proj.weight"] = (H, H)
        s[f"{p}.mlp.gate_proj.weight"] = (F, H)
        s[f"{p}.mlp.up_proj.weight"] = (F, H)
        s[f"{p}.mlp.down_proj.weight"] = (H, F)
    return s


def write_models():
    rng = np.random.default_rng(0)
    for i, name in enumerate(["base", "a", "b", "c"]):
        d = os.path.join(DATA, name)
        if os.path.isfile(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        sd = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes().items()}
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CONFIG, f)


CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - {model: ./a, parameters: {weight: 0.5}}\n"
    "  - {model: ./b, parameters: {weight: 0.3}}\n  - {model: ./c, parameters: {weight: 0.2}}\ndtype: float32\n",
    "ties": "merge_method: ties\nbase_model: ./base\nmodels:\n  - {model: ./a, parameters: {weight: 0.5, density: 0.5}}\n"
    "  - {model: ./b, parameters: {weight: 0.3, density: 0.5}}\n  - {model: ./c, parameters: {weight: 0.2, density: 0.5}}\n"
    "dtype: float32\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: ./base\nmodels:\n  - {model: ./a, parameters: {weight: 0.5, density: 0.5}}\n"
    "  - {model: ./b, parameters: {weight: 0.3, density: 0.5}}\n  - {model: ./c, parameters: {weight: 0.2, density: 0.5}}\n"
    "dtype: float32\n",
}

WRAP = "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:],capture_output=True);" \
       "sys.stderr.write(r.stderr.decode()[-2000:]) if r.returncode else None;" \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)"


def measure(cmd):
    """Wall seconds and peak RSS (MB) of `cmd` as a fresh grandchild."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], cwd=DATA, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, int(out.stdout.strip().splitlines()[-1]) / 1024


def max_rel_dev(x_dir, y_dir):
    def load(d):
        sd = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, f)))
        return sd
    x, y = load(x_dir), load(y_dir)
    assert sorted(x) == sorted(y), "tensor names differ"
    return max(float(np.abs(x[k] - y[k]).max() / max(np.abs(y[k]).max(), 1e-6)) for k in y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    write_models()
    ours = os.path.join(ROOT, "target", "release", "merge")
    theirs = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    rows = []
    for name, yaml in CONFIGS.items():
        cfg = os.path.join(DATA, f"{name}.yml")
        with open(cfg, "w") as f:
            f.write(yaml)
        res = {}
        for tool, cmd in [
            ("merge", lambda out: [ours, cfg, out, "--quiet"]),
            ("mergekit", lambda out: [theirs, cfg, out, "--copy-tokenizer", "--random-seed", "0"]),
        ]:
            ts, rss = [], []
            for _ in range(args.runs):
                out = os.path.join(DATA, f"out-{tool}-{name}")
                shutil.rmtree(out, ignore_errors=True)
                t, r = measure(cmd(out))
                ts.append(t)
                rss.append(r)
            res[tool] = (statistics.median(ts), max(rss))
        dev = "random (seeded differently)" if name.startswith("dare") else \
            f"{max_rel_dev(os.path.join(DATA, f'out-merge-{name}'), os.path.join(DATA, f'out-mergekit-{name}')):.1e}"
        rows.append((name, res, dev))
        (tm, rm), (tk, rk) = res["merge"], res["mergekit"]
        print(f"{name}: merge {tm:.2f} s {rm:.0f} MB | mergekit {tk:.2f} s {rk:.0f} MB | "
              f"{tk / tm:.1f}x faster, {rk / rm:.1f}x less memory | max rel. deviation {dev}", flush=True)


if __name__ == "__main__":
    main()
