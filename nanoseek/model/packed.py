"""Linear layers prepared for CPU decoding: each weight reordered once into oneDNN's blocked layout.

A small-batch decode step is a chain of matrix-vector products, as fast as each weight is read, and oneDNN reads
a prepacked weight far faster than bf16 `F.linear` (bench/RESULTS.md, "Generation on the real model").
Inference only: a packed layer has no gradient and does not follow `model.to()`; pack last."""

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """oneDNN prepacking: CPU builds with mkldnn, fp32 or bf16 (bf16 only where the CPU has bf16 support)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """y = x W^T with W prepacked for oneDNN (no bias: nanoseek's linears have none)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 1):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # batch_hint: the rows per call oneDNN should choose its blocking for (the decode batch).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed"


@torch.no_grad()
def fuse_linears(model: nn.Module) -> int:
    """Stack the linears that read the same input (a module's FUSIBLE groups: GQA's wq, wk, wv; SwiGLU's w1,
    w3) into one PackedLinear each, in place, dropping the parts; returns how many groups. One call reads the
    same bytes but pays the per-call overhead once (bench/bench_decode_overhead.py). For generation only."""
    weight = next(model.parameters())
    if not can_pack(weight.dtype, weight.device):
        return 0
    count = 0
    for module in list(model.modules()):
        for fused_name, names in getattr(module, "FUSIBLE", ()):
            parts = [getattr(module, name) for name in names]
            if not all(type(part) is nn.Linear and part.bias is None for part in parts):
                continue
            setattr(module, fused_name, PackedLinear(torch.cat([part.weight for part in parts])))
            for name in names:
                setattr(module, name, None)
            count += 1
    return count


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free nn.Linear of `model` (in place) by a PackedLinear; returns how many. Nothing
    happens where `can_pack` says no (a GPU, a build without oneDNN, fp16). For generation only."""
    weight = next(model.parameters())
    if not can_pack(weight.dtype, weight.device):
        return 0
    # wkv_b stays: MLA's absorbed attention reads its weight directly, split per head.
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.bias is None and name != "wkv_b"]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight))
    return len(swaps)
