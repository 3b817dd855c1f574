"""PyTorch reference for `examples/efficiency.rs`: median step time and peak
memory of full fine-tuning, LoRA (PEFT) and S²FT (as the paper's code does
it: trainable column slices of o_proj and down_proj beside the frozen
weight) on the same model, batch and rank, on CPU.

    /tmp/pyenv/bin/pip install torch transformers peft gguf
    /tmp/pyenv/bin/python s2ft-core/benches/torch_reference.py \
        --model models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --method full [--batch 8 --seq 64 --rank 8 --steps 8]

One method per process, so `peak_rss_mb` (the process's maximum resident
set) belongs to that method alone; `farm-bench` pairs it with the Rust
example (`--methods full`). Prints one JSON object.

Same work as the Rust side: `--batch` × `--seq` random tokens (the same LCG),
loss on every position (mean next-token cross-entropy), AdamW at lr 1e-5, the
first step left out of the median. LoRA: rank r, alpha 2r, no dropout, on
q, k, v, o, gate, up, down. S²FT: heads and channels drawn at random with the
Rust side's budget split (half the LoRA parameter count to o_proj columns,
half to down_proj columns), ΔW a trainable [out, k] block applied as
`x[:, idx] @ Δᵀ`.
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path):
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )


def tokens(batch, seq, vocab):
    x, out = 7, []
    for _ in range(batch * seq):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((x >> 33) % vocab)
    return torch.tensor(out, dtype=torch.long).view(batch, seq)


class SliceDelta(nn.Module):
    """y = x Wᵀ + x[:, idx] Δᵀ with W frozen: S²FT's trainable input columns."""

    def __init__(self, base: nn.Linear, idx):
        super().__init__()
        self.base = base
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(base.out_features, len(idx)))

    def forward(self, x):
        return self.base(x) + x.index_select(-1, self.idx) @ self.delta.t()


def lora_count(cfg, r):
    h, d = cfg.hidden_size, cfg.head_dim if hasattr(cfg, "head_dim") and cfg.head_dim else cfg.hidden_size // cfg.num_attention_heads
    q, kv, f = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]
    return cfg.num_hidden_layers * sum(r * (o + i) for o, i in shapes)


def apply_s2ft(model, r, seed=0):
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    budget = lora_count(cfg, r)
    # s2ft_core::s2ft::ratios_for_budget with heads_share 0.5: whole heads
    # first, the rest of the budget in down_proj channels.
    n_layers, h = cfg.num_hidden_layers, cfg.hidden_size
    heads = min(int(budget * 0.5 // (h * d * n_layers)), cfg.num_attention_heads)
    channels = min(int((budget - heads * h * d * n_layers) // (h * n_layers)), cfg.intermediate_size)
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        hs = torch.randperm(cfg.num_attention_heads, generator=g)[:heads].sort().values.tolist()
        cols = [h * d + j for h in hs for j in range(d)]
        layer.self_attn.o_proj = SliceDelta(layer.self_attn.o_proj, cols)
        ch = torch.randperm(cfg.intermediate_size, generator=g)[:channels].sort().values.tolist()
        layer.mlp.down_proj = SliceDelta(layer.mlp.down_proj, ch)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", choices=["full", "lora", "s2ft"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    model = load(a.model)
    model.config.use_cache = False
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS)
        )
    elif a.method == "s2ft":
        for p in model.parameters():
            p.requires_grad_(False)
        model = apply_s2ft(model, a.rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    x = tokens(a.batch, a.seq, model.config.vocab_size)
    times = []
    for _ in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "method": a.method,
        "trainable_params": sum(p.numel() for p in params),
        "median_step_ms": statistics.median(times[1:]) * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
