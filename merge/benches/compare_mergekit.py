"""Speed and peak memory of `merge` vs mergekit on the same files and configs.

Writes a base and three fine-tunes with SmolLM2-135M's shapes in f32
(134.5M parameters, 538 MB each; HF LLaMA naming, one safetensors file each)
to target/bench-data/merge/, then runs every method both tools have through
both, each as a child process, and reports wall time and the child's peak RSS
(medians of `--runs`; `--methods` picks some). The two outputs of each
deterministic method are compared tensor by tensor. TSV-M, Iso-C and Iso-CTS,
which mergekit lacks, are timed against their authors' algorithms re-run in
torch float64 (`tests/fixtures/svd_reference.py`, the equality fixture's
reference: load, merge, save), and the outputs compared.

    cargo build --release -p merge
    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5
    /tmp/mk/bin/python merge/benches/compare_mergekit.py [--runs 3] [--methods ties sce ...]
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


def _models(params, base=True, names=("a", "b", "c"), shared=None):
    """A config: `params[i]` is model i's parameter string (or None)."""
    y = "base_model: ./base\n" if base else ""
    y += "models:\n"
    for n, p in zip(names, params):
        y += f"  - {{model: ./{n}" + (f", parameters: {{{p}}}" if p else "") + "}\n"
    if shared:
        y += f"parameters: {{{shared}}}\n"
    return y + "dtype: float32\n"


W3 = ["weight: 0.5", "weight: 0.3", "weight: 0.2"]
WD = [w + ", density: 0.5" for w in W3]
# Every method both tools have (mergekit 0.1.5), then the ones only this crate has.
CONFIGS = {
    "linear": "merge_method: linear\n" + _models(W3, base=False),
    "slerp": "merge_method: slerp\n" + _models([None, None], names=("base", "a"), shared="t: 0.4"),
    "nuslerp": "merge_method: nuslerp\n" + _models(["weight: 0.6", "weight: 0.4"], names=("a", "b")),
    "task_arithmetic": "merge_method: task_arithmetic\n" + _models(W3),
    "ties": "merge_method: ties\n" + _models(WD),
    "dare_ties": "merge_method: dare_ties\n" + _models(WD),
    "dare_linear": "merge_method: dare_linear\n" + _models(WD),
    "breadcrumbs": "merge_method: breadcrumbs\n" + _models(WD),
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\n" + _models(WD),
    "della": "merge_method: della\n" + _models(WD),
    "della_linear": "merge_method: della_linear\n" + _models(WD),
    "model_stock": "merge_method: model_stock\n" + _models([None] * 3),
    "karcher": "merge_method: karcher\n" + _models([None] * 3, base=False),
    "passthrough": "merge_method: passthrough\n" + _models([None], base=False),
    "sce": "merge_method: sce\n" + _models([None] * 3, shared="select_topk: 0.5"),
    "multislerp": "merge_method: multislerp\n" + _models(W3),
    "nearswap": "merge_method: nearswap\n" + _models([None], shared="t: 0.001"),
    "arcee_fusion": "merge_method: arcee_fusion\n" + _models([None]),
    "ram": "merge_method: ram\n" + _models([None] * 3),
    "ramplus_tl": "merge_method: ramplus_tl\n" + _models([None] * 3),
}
OURS_ONLY = {
    "tsv_m": "merge_method: tsv_m\n" + _models([None] * 3),
    "iso_c": "merge_method: iso_c\n" + _models([None] * 3, shared="lambda: 1.5"),
    "iso_cts": "merge_method: iso_cts\n" + _models([None] * 3, shared="lambda: 1.5"),
}
# Randomised in both tools with different generators (or sampled quantiles above 10⁶ entries).
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"}

# The SVD merges' reference: the equality fixture's re-run of the authors' code.
SVD_REFERENCE = (
    "import os,sys,yaml;sys.path.insert(0," + repr(os.path.join(ROOT, "merge", "tests", "fixtures")) + ");"
    "import svd_reference as r;from safetensors.torch import save_file;"
    "cfg=yaml.safe_load(open(sys.argv[1]));os.makedirs(sys.argv[2]);"
    "save_file(r.merge(cfg,os.path.dirname(sys.argv[1])),os.path.join(sys.argv[2],'model.safetensors'))"
)

WRAP = "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:],capture_output=True);" \
       "sys.stderr.write(r.stderr.decode()[-2000:]) if r.returncode else None;" \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)"


def measure(cmd):
    """Wall seconds and peak RSS (MB) of `cmd` as a fresh grandchild.

    Dirty pages left by the previous run (mergekit does not fsync its output;
    ours is committed with fsync) are flushed first, so that no run pays for
    the writeback of another."""
    os.sync()
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
    dev = max(float(np.abs(x[k] - y[k]).max() / max(np.abs(y[k]).max(), 1e-6)) for k in y)
    # Entries that differ by more than 1e-6 of their tensor's max |value|: at
    # sparsification thresholds, exact magnitude ties (common in tensors of
    # 10⁷ f32 values) are broken by position here, by torch's unstable sort there.
    differ = sum(int((np.abs(x[k] - y[k]) > 1e-6 * np.abs(y[k]).max()).sum()) for k in y)
    total = sum(y[k].size for k in y)
    return dev, differ, total


def timed(tool, name, cmd, runs):
    """Median wall time and peak RSS of `cmd(out)` over `runs` fresh outputs."""
    ts, rss = [], []
    for _ in range(runs):
        out = os.path.join(DATA, f"out-{tool}-{name}")
        shutil.rmtree(out, ignore_errors=True)
        t, r = measure(cmd(out))
        ts.append(t)
        rss.append(r)
    return statistics.median(ts), max(rss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", nargs="*", help="only these (default: all)")
    args = ap.parse_args()
    write_models()
    ours = os.path.join(ROOT, "target", "release", "merge")
    theirs = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    for name, yaml in {**OURS_ONLY, **CONFIGS}.items():
        if args.methods and name not in args.methods:
            continue
        cfg = os.path.join(DATA, f"{name}.yml")
        with open(cfg, "w") as f:
            f.write(yaml)
        tm, rm = timed("merge", name, lambda out: [ours, cfg, out, "--quiet"], args.runs)
        if name in OURS_ONLY:
            tr, rr = timed("mergekit", name, lambda out: [sys.executable, "-c", SVD_REFERENCE, cfg, out], args.runs)
            d, n, total = max_rel_dev(os.path.join(DATA, f"out-merge-{name}"), os.path.join(DATA, f"out-mergekit-{name}"))
            print(f"{name}: merge {tm:.2f} s {rm:.0f} MB | authors' algorithm in torch f64 {tr:.2f} s {rr:.0f} MB | "
                  f"{tr / tm:.1f}x faster, {rr / rm:.1f}x less memory | max rel. deviation {d:.1e}, "
                  f"{n} of {total} entries differ", flush=True)
            drop_outputs(name)
            continue
        tk, rk = timed("mergekit", name,
                       lambda out: [theirs, cfg, out, "--copy-tokenizer", "--random-seed", "0"], args.runs)
        if name in RANDOM:
            dev = "random (seeded differently)"
        else:
            d, n, total = max_rel_dev(os.path.join(DATA, f"out-merge-{name}"), os.path.join(DATA, f"out-mergekit-{name}"))
            dev = f"{d:.1e}, {n} of {total} entries differ"
        print(f"{name}: merge {tm:.2f} s {rm:.0f} MB | mergekit {tk:.2f} s {rk:.0f} MB | "
              f"{tk / tm:.1f}x faster, {rk / rm:.1f}x less memory | max rel. deviation {dev}", flush=True)
        drop_outputs(name)


def drop_outputs(name):
    """Deletes a method's outputs once compared: 538 MB per tool and method,
    kept, fill the page cache, and every later run then pays the kernel's
    reclaim (our runs took up to twice their time late in a full bench)."""
    for tool in ("merge", "mergekit"):
        shutil.rmtree(os.path.join(DATA, f"out-{tool}-{name}"), ignore_errors=True)


if __name__ == "__main__":
    main()
