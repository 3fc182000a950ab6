"""The CPU kernel choices behind nanoseek's eager fast paths, each against its alternative.

    python bench/bench_cpu_kernels.py                    # everything, 1 thread
    python bench/bench_cpu_kernels.py --parts attention  # a subset: matmul, norm, attention, muon

matmul     fp32 vs bf16 matmul at the nanoGPT-recipe shapes ([768, 128] activations): on a CPU with AMX,
           oneDNN's bf16 kernels are several times faster; elsewhere bf16 is emulated.
norm       RMSNorm forward + backward: the model's closed-form backward (`_RMSNormFunction`) vs the same
           formula differentiated by autograd, and LayerNorm's fused kernel for scale.
attention  F.scaled_dot_product_attention forward + backward on CPU: fp32, bf16, and bf16 inputs attended
           in fp32 (casts included; what `attend` does for sequences <= CPU_FP32_ATTENTION_MAX_LEN).
muon       Newton-Schulz (5 steps) for a 4-layer, 128-wide model's hidden matrices: one call per matrix vs
           one batched call per shape, in fp32 and bf16.

Method: the variants of a row alternate call by call (A B B A ...), after warm-up; medians in ms, with a
real (non-zero-stride) upstream gradient for backward. Values equal to rounding: tests/test_fastpaths.py,
tests/test_optim.py. Results print as tables and one JSON object.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fastpaths import interleaved, ms, run_parts  # noqa: E402

from nanoseek.model.layers import RMSNorm  # noqa: E402
from nanoseek.train.hardware import cpu_has_amx  # noqa: E402
from nanoseek.train.optim import newton_schulz  # noqa: E402

PARTS = ("matmul", "norm", "attention", "muon")


@dataclass
class Args:
    parts: tuple[str, ...] = PARTS
    repeats: int = 30
    threads: int = 1
    attention_shapes: tuple[str, ...] = ("12:4:64:32", "12:4:256:32", "4:8:256:64", "1:12:1024:64")
    """BATCH:HEADS:SEQ:HEAD_DIM; the first is nanoGPT's CPU recipe."""
    json: Path | None = None


def _table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    print()


def bench_matmul(args: Args) -> list[dict]:
    rows, out = [], []
    for m, k, n in ((768, 128, 128), (768, 128, 352), (768, 352, 128)):
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        t = interleaved({"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16}, args.repeats)
        row = {"shape": f"[{m},{k}]x[{k},{n}]", "fp32_ms": ms(t["fp32"]), "bf16_ms": ms(t["bf16"])}
        out.append(row)
        rows.append([row["shape"], row["fp32_ms"], row["bf16_ms"], row["fp32_ms"] / row["bf16_ms"]])
    _table(["matmul", "fp32 ms", "bf16 ms", "bf16 speed-up"], rows)
    return out


def _norm_by_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def bench_norm(args: Args) -> dict:
    x = torch.randn(12, 64, 128, requires_grad=True)
    grad = torch.randn(12, 64, 128)
    norm, layer_norm = RMSNorm(128), torch.nn.LayerNorm(128, bias=False)
    t = interleaved({
        "closed form": lambda: norm(x).backward(grad),
        "autograd": lambda: _norm_by_autograd(x, norm.weight, norm.eps).backward(grad),
        "LayerNorm": lambda: layer_norm(x).backward(grad),
    }, args.repeats * 4)
    result = {name: ms(v) for name, v in t.items()}
    _table(["[12, 64, 128] forward + backward", "ms"], [[k, v] for k, v in result.items()])
    return result


def bench_attention(args: Args) -> list[dict]:
    rows, out = [], []
    for spec in args.attention_shapes:
        shape = tuple(int(v) for v in spec.split(":"))
        grad32 = torch.randn(*shape)

        def run(dtype: torch.dtype, upcast: bool):
            leaves = [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3)]
            inputs = [t.float() for t in leaves] if upcast else leaves
            out = F.scaled_dot_product_attention(*inputs, is_causal=True).to(dtype)
            out.backward(grad32.to(dtype))

        t = interleaved({"fp32": lambda: run(torch.float32, False), "bf16": lambda: run(torch.bfloat16, False),
                         "bf16 via fp32": lambda: run(torch.bfloat16, True)}, max(5, args.repeats // 3))
        row = {"shape": spec, **{name: ms(v) for name, v in t.items()}}
        out.append(row)
        rows.append([spec, row["fp32"], row["bf16"], row["bf16 via fp32"]])
    _table(["B:H:T:D", "fp32 ms", "bf16 ms", "bf16 inputs, fp32 attention ms"], rows)
    return out


def bench_muon(args: Args) -> dict:
    # 4 layers: wq, wk, wv, wo (128 x 128), w1, w3 (352 x 128), w2 (128 x 352).
    mats = [torch.randn(128, 128) for _ in range(16)] + [torch.randn(352, 128) for _ in range(8)] + \
        [torch.randn(128, 352) for _ in range(4)]
    shapes: dict[tuple, list[torch.Tensor]] = {}
    for m in mats:
        shapes.setdefault(tuple(m.shape), []).append(m)

    def per_matrix(dtype):
        return lambda: [newton_schulz(m, work_dtype=dtype) for m in mats]

    def batched(dtype):
        return lambda: [newton_schulz(torch.stack(group), work_dtype=dtype) for group in shapes.values()]

    t = interleaved({"per matrix fp32": per_matrix(torch.float32), "batched fp32": batched(torch.float32),
                     "per matrix bf16": per_matrix(torch.bfloat16), "batched bf16": batched(torch.bfloat16)},
                    max(5, args.repeats // 3))
    result = {name: ms(v) for name, v in t.items()}
    _table(["Newton-Schulz, 28 matrices", "ms"], [[k, v] for k, v in result.items()])
    return result


def main(args: Args) -> None:
    print(f"CPU with AMX: {cpu_has_amx()}\n")
    run_parts(args, PARTS, globals(), amx=cpu_has_amx())


if __name__ == "__main__":
    main(tyro.cli(Args))
