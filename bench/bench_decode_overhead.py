"""Per-step overheads of CPU decoding at SmolLM2-135M's shapes (30 layers, dim 576, 9/3 heads of 64, MLP 1536).

    python bench/bench_decode_overhead.py            # bf16 and fp32, batch 1 and 8, one thread

1. The linears that read the same input, called separately (wq, wk, wv, w1, w3: five PackedLinear calls a
   layer) against stacked (wqkv, w13: two calls, model/packed.py's fuse_linears). Same bytes read.
2. Greedy argmax over [B, 49152] logits in bf16 against the same logits cast to fp32 first (generate.py).
Interleaved, medians of 30 (linears) or 200 (argmax) repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from nanoseek.model.packed import PackedLinear, can_pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_kernels import median_seconds  # noqa: E402

LAYERS, DIM, Q, KV, INTER, VOCAB = 30, 576, 576, 192, 1536, 49152


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=5, clock=time.perf_counter) * 1e3


def linears(dtype: torch.dtype, batch: int) -> tuple[float, float]:
    def make(rows: int) -> PackedLinear:
        return PackedLinear(torch.randn(rows, DIM, dtype=dtype) * 0.02, batch)

    separate = [[make(Q), make(KV), make(KV), make(INTER), make(INTER)] for _ in range(LAYERS)]
    stacked = [[make(Q + 2 * KV), make(2 * INTER)] for _ in range(LAYERS)]
    x = torch.randn(batch, 1, DIM, dtype=dtype)

    def run(layers):
        return lambda: [m(x) for layer in layers for m in layer]

    a, b = [], []
    for _ in range(30):  # interleaved
        a.append(median_ms(run(separate), 1))
        b.append(median_ms(run(stacked), 1))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    torch.set_num_threads(1)
    print("dtype     batch  separate ms  stacked ms  saved ms | argmax bf16 ms  argmax fp32 ms")
    for dtype in (torch.bfloat16, torch.float32):
        if not can_pack(dtype, "cpu"):
            print(f"{dtype}: no oneDNN prepacking on this CPU")
            continue
        for batch in (1, 8):
            sep, stk = linears(dtype, batch)
            arg = ""
            if dtype == torch.bfloat16:
                logits = torch.randn(batch, VOCAB).bfloat16()
                arg = (f"{median_ms(lambda: logits.argmax(-1), 200):14.3f}  "
                       f"{median_ms(lambda: logits.float().argmax(-1), 200):14.3f}")
            print(f"{str(dtype)[6:]:9s} {batch:5d}  {sep:11.2f}  {stk:10.2f}  {sep - stk:8.2f} | {arg}")


if __name__ == "__main__":
    main()
