"""Forward+backward cost of the attention / FFN kinds at one small shape, on CPU.

    python bench/bench_model.py                 # defaults: batch 4 x 256 tokens, 15 interleaved repeats
    python bench/bench_model.py --repeats 11 --batch 8

Models (all the `tiny` preset's shape: vocab 2048, dim 128, 4 layers, 4 heads, no MTP unless named):
  mha        GQA module with n_kv_heads = n_heads (the dense baseline every ratio is against)
  gqa        4 query heads share 2 KV heads (the `tiny-gqa` preset)
  mla        Multi-head Latent Attention, dense SwiGLU (`tiny-dense`)
  mla-moe    MLA + DeepSeekMoE, 1 shared + 8 routed experts, top-2 (`tiny` without MTP)
  mla-moe-mtp  the `tiny` preset itself (one MTP module)

Method. One thread and flush-denormal (DESIGN.md: 2-thread torch on these shared 2-core boxes is
erratic); every repeat runs each model once, in a rotated order, after two warm-up steps each; the
figures are the median and, as a second estimate that is less sensitive to other processes on the box,
the minimum. Memory is measured as the bytes autograd saves for backward, with
torch.autograd.graph.saved_tensors_hooks: every tensor saved during the forward is counted once per
storage (views of one buffer are one buffer), and parameters (which linear layers save too) are left
out. That is the activation memory that training holds at the end of the forward pass, its peak for
these models; it is exact and repeatable, unlike RSS or tracemalloc (torch allocates outside Python's
allocator and keeps freed blocks), and it does not count short-lived temporaries inside one op.
KV cache bytes per token are the caches' own figure (Transformer.kv_bytes_per_token) over all layers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer

SHAPE = dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, max_seq_len=256, inter_dim=384)

MODELS = {
    "mha": dict(attention="gqa", n_kv_heads=4, n_routed_experts=0, mtp_depth=0),
    "gqa": dict(attention="gqa", n_kv_heads=2, n_routed_experts=0, mtp_depth=0),
    "mla": dict(n_routed_experts=0, mtp_depth=0),
    "mla-moe": dict(mtp_depth=0),
    "mla-moe-mtp": dict(),
}


def build(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", **SHAPE, **MODELS[name]))
    return model.train()


def train_step(model: Transformer, idx: torch.Tensor, targets: torch.Tensor) -> float:
    """One forward + backward; returns seconds."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(idx, targets).loss.backward()
    return time.perf_counter() - start


def saved_activation_bytes(model: Transformer, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd keeps for backward after one forward."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in param_storages:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())  # saved tensors stay alive: no reuse
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(idx, targets).loss
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPE["vocab_size"]
    idx = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    targets = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)  # +1: MTP look-ahead

    models = {name: build(name) for name in MODELS}
    for model in models.values():
        for _ in range(2):
            train_step(model, idx, targets)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            times[name].append(train_step(models[name], idx, targets))

    base_time, base_min = statistics.median(times["mha"]), min(times["mha"])
    base_mem = saved_activation_bytes(models["mha"], idx, targets)
    tokens = args.batch * args.seq
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"batch {args.batch} x {args.seq} tokens, median of {args.repeats} interleaved fwd+bwd steps")
    print("| model | params (active) | fwd+bwd ms median (min-max) | vs mha: median | vs mha: min | tokens/s (median) | "
          "saved activations MiB | vs mha | KV cache B/token (bf16, all layers) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        med = statistics.median(times[name])
        mem = saved_activation_bytes(model, idx, targets)
        total, active = model.num_params(), model.num_params(active=True)
        params = f"{total / 1e6:.2f}M" + (f" ({active / 1e6:.2f}M)" if active != total else "")
        print(f"| {name} | {params} | {med * 1e3:.0f} ({min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}) "
              f"| {med / base_time:.2f} | {min(times[name]) / base_min:.2f} | {tokens / med:,.0f} | {mem / 2**20:.1f} | {mem / base_mem:.2f} "
              f"| {model.kv_bytes_per_token(torch.bfloat16)} |")


if __name__ == "__main__":
    main()
