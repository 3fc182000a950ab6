"""One-row (and few-row) matrix products at SmolLM2-135M's shapes: the kernels a decode step spends its time in.

    python bench/bench_decode_kernels.py                  # 1 thread, CPU

For each weight shape [out, in] and rows M: GB of weight read per second (weight bytes / median time; CPU
time of this process, so other jobs' time slices are left out) of
  linear    torch.nn.functional.linear (what transformers and an unprepared model call)
  packed    oneDNN on a weight prepacked once (nanoseek.model.packed.PackedLinear)
  int8      torch._weight_int8pack_mm, int8 weights with one bf16 scale per row (bf16 runs only; its figure
            uses the bf16 weight's bytes too, so the three columns compare times at equal work)
Enough copies of each weight are cycled through that they never sit in the cache (64 MB per shape).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.model.packed import PackedLinear, can_pack

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # q/o, k/v, gate/up, down, head


def median_seconds(fn, reps: int, warmup: int = 3, clock=time.process_time) -> float:
    """Median time of `reps` calls of `fn` after `warmup` untimed ones, on `clock`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def rate(fn, nbytes: int, reps: int = 60) -> float:
    return nbytes / max(median_seconds(fn, reps), 1e-9) / 1e9


def kernels(weights: list[torch.Tensor], dtype: torch.dtype) -> dict:
    turn = [0]

    def pick(items):
        turn[0] = (turn[0] + 1) % len(items)
        return items[turn[0]]

    found = {"linear": lambda x: F.linear(x, pick(weights))}
    if can_pack(dtype, "cpu"):
        packed = [PackedLinear(w) for w in weights]
        found["packed"] = lambda x: pick(packed)(x)
    if dtype == torch.bfloat16:
        scales = [w.float().abs().amax(1).clamp(min=1e-8) / 127 for w in weights]
        ints = [torch.round(w.float() / s[:, None]).to(torch.int8) for w, s in zip(weights, scales)]
        pairs = list(zip(ints, [s.to(dtype) for s in scales]))
        found["int8"] = lambda x: torch._weight_int8pack_mm(x, *pick(pairs))
    return found


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'dtype':<9} {'weight':>12} {'rows':>4}  GB/s of weight read (CPU time)")
    for dtype in (torch.float32, torch.bfloat16):
        for out_dim, in_dim in SHAPES:
            nbytes = out_dim * in_dim * dtype.itemsize
            weights = [torch.randn(out_dim, in_dim).to(dtype) for _ in range(max(1, int(64e6 // nbytes)))]
            found = kernels(weights, dtype)
            for rows in (1, 8):
                x = torch.randn(rows, in_dim).to(dtype)
                rates = "  ".join(f"{name} {rate(lambda: fn(x), nbytes):5.1f}" for name, fn in found.items())
                print(f"{str(dtype)[6:]:<9} {f'{out_dim}x{in_dim}':>12} {rows:>4}  {rates}")


if __name__ == "__main__":
    main()
