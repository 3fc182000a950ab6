"""Decode speed and KV-cache size: MHA vs GQA vs MLA (absorbed, and naive) at equal width.

    python bench/bench_decode.py                       # CPU defaults: 6 layers, dim 256, 8 heads
    python bench/bench_decode.py --device cuda --dim 1024 --n-layers 12 --n-heads 16 \
        --kv-lora-rank 256 --batch-sizes 1 64 --prompt-len 512 --new-tokens 256 --no-uncached
    python bench/bench_decode.py --real FOLDER --dtype bfloat16 --batch-sizes 1 8 --new-tokens 64
                                                       # a real model against transformers: see decode_real.py
    python bench/bench_decode.py --converted RUN --dtype bfloat16   # MLA / MTP on a converted model

Models (dense SwiGLU everywhere, no MTP, so only attention and its cache differ):
  mha        n_kv_heads = n_heads: 2 * n_heads * head_dim cached values per token and layer
  gqa        n_heads / 4 KV heads
  mla        MLA decoding from the latent cache with the up-projections absorbed (the default)
  mla-naive  MLA with the latent cache, but K/V re-expanded per head at every step (absorb=False)
For each: decode tokens/s (batch x new tokens / seconds, prompt prefill included once) with the cache
and, at batch 1, by re-running the whole sequence for every token (the cache-less reference).
Method: one thread on CPU; greedy decoding; every repeat runs each model once, in a rotated order,
after one warm-up; medians. Prints a table and one JSON line per measurement.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import tyro

from nanoseek import ModelConfig, Transformer
from nanoseek.generate import GREEDY, generate


@dataclass
class Args:
    device: str = "cpu"
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    kv_lora_rank: int = 64
    qk_rope_head_dim: int = 16
    vocab_size: int = 2048
    batch_sizes: tuple[int, ...] = (1, 16)
    prompt_len: int = 16
    new_tokens: int = 256
    repeats: int = 3
    uncached: bool = True
    """Also time the cache-less re-forward at batch 1 (slow)."""
    dtype: str = "float32"
    """float32 or bfloat16 (weights and cache)."""
    models: tuple[str, ...] = ("mha", "gqa", "mla", "mla-naive")
    real: str | None = None
    """A transformers folder: compare nanoseek with transformers' generate on it (bench/decode_real.py)."""
    compile: bool = False
    """With --real: compile nanoseek's decode step (the warm-up includes the compilation)."""
    converted: str | None = None
    """A `nanoseek convert --to mla` run: time its latent-cache and MTP speculative decoding (decode_converted.py)."""


def build(name: str, args: Args) -> Transformer:
    head_dim = args.dim // args.n_heads
    shape = dict(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                 max_seq_len=args.prompt_len + args.new_tokens + 1, inter_dim=3 * args.dim,
                 n_routed_experts=0, mtp_depth=0)
    if name in ("mha", "gqa"):
        cfg = ModelConfig.from_preset("tiny-gqa", **shape, head_dim=head_dim,
                                      n_kv_heads=args.n_heads if name == "mha" else max(1, args.n_heads // 4))
    else:
        cfg = ModelConfig.from_preset("tiny-dense", **shape, kv_lora_rank=args.kv_lora_rank,
                                      qk_nope_head_dim=head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                                      v_head_dim=head_dim)
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device, getattr(torch, args.dtype)).eval()
    for layer in model.layers:
        if hasattr(layer.attn, "absorb"):
            layer.attn.absorb = name != "mla-naive"
    return model


def timed_decode(model: Transformer, batch: int, args: Args, use_cache: bool) -> float:
    """Seconds for prefill + args.new_tokens greedy tokens."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab_size, (batch, args.prompt_len), generator=generator).to(args.device)
    if args.device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, args.new_tokens, GREEDY, use_cache=use_cache)
    if args.device != "cpu":
        torch.cuda.synchronize()
    assert out.shape[1] == args.prompt_len + args.new_tokens
    return time.perf_counter() - start


def main(args: Args) -> None:
    if args.real:
        from decode_real import compare  # bench/ is the script's directory, hence on sys.path

        compare(args.real, getattr(torch, args.dtype), args.batch_sizes, args.new_tokens, args.repeats, args.compile)
        return
    if args.converted:
        from decode_converted import compare as compare_converted

        compare_converted(args.converted, getattr(torch, args.dtype), args.batch_sizes, args.new_tokens, args.repeats)
        return
    if args.device == "cpu":
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    models = {name: build(name, args) for name in args.models}
    cases = [(b, True) for b in args.batch_sizes] + ([(1, False)] if args.uncached else [])
    times: dict[tuple[str, int, bool], list[float]] = {}
    for name, model in models.items():  # warm-up
        timed_decode(model, args.batch_sizes[0], dataclasses.replace(args, new_tokens=8), True)
    names = list(models)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for batch, cached in cases:
                times.setdefault((name, batch, cached), []).append(timed_decode(models[name], batch, args, cached))
    device = torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or platform.machine()
    print(f"# decode: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.dtype}, {device}, medians of {args.repeats}")
    print(f"{'model':<10} {'KV B/token':>10} {'batch':>5} {'cache':>6} {'tokens/s':>10} {'vs mha':>7} {'cache x':>8}")
    for (name, batch, cached), values in times.items():
        seconds = statistics.median(values)
        rate = batch * args.new_tokens / seconds
        kv = models[name].kv_bytes_per_token(getattr(torch, args.dtype))
        base = times.get(("mha", batch, cached))
        vs = statistics.median(base) / seconds if base else float("nan")
        uncached = times.get((name, batch, False))
        speedup = statistics.median(uncached) / seconds if cached and uncached else float("nan")
        print(f"{name:<10} {kv:>10,} {batch:>5} {'yes' if cached else 'no':>6} {rate:>10.1f} {vs:>7.2f} "
              f"{speedup:>8.1f}")
        print(json.dumps({"model": name, "kv_bytes_per_token": kv, "batch": batch, "cached": cached,
                          "tokens_per_s": rate, "seconds": seconds, "device": device}))


if __name__ == "__main__":
    main(tyro.cli(Args))
