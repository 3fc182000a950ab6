"""The NPT block: a frozen decoder block whose attention residual is replaced by an adapter that modulates
the MLP's gate, so attention reaches the block only through that gate, per token. From the same frozen modules:

    a     = attn(attn_norm(x))                            [B, T, dim]   attention output, no residual
    m     = ffn_norm(x)                                   [B, T, dim]   the block's input, normed
    z     = down(a / rms(x))                              [B, T, rank]  rms over dim, per token (A_proj)
    shift = gate_shift(z)                                 [B, T, inter] additive path (B_add)
    scale = 0.5 + sigmoid(gate_scale(z))                  [B, T, inter] multiplicative path (B_mult), in [0.5, 1.5]
    g     = w1(m) * scale + SHIFT_SCALE * shift           (safe mode: w1(m) + SHIFT_SCALE * shift)
    out   = x + w2(silu(g) * w3(m))

The adapter (down, gate_shift, gate_scale) is the only trainable part. Lessons of earlier runs that fought NaNs:
- The factor must never reach 0 (a `1 + tanh` one did, zeroing activations, sending gradients to 0 or inf) nor
  grow without bound: `0.5 + sigmoid(.)` stays in [0.5, 1.5] for any input, +-inf included, and is 1 at init
  (`0.5 * sigmoid(.) + 0.5` would span only (0.5, 1.0) and shrink every gate by a quarter at init).
- The additive path is scaled by SHIFT_SCALE = 0.1 and gate_shift starts at N(0, 0.001): far below w1(m).
- `down` reads a / rms(x) and starts at N(0, 1/dim), so z is O(1) at any width; with a raw `a` and std 0.02 a
  small model's z was ~1e-3 and the zero-initialised gate_scale took thousands of steps to move.
So the student starts as the base minus the converted layers' attention residuals (up to 0.1 * shift, under
1e-3 of the output's norm in tests/test_npt.py); teacher-student training (train/objectives.py) puts them back."""

import torch
from torch import nn

from nanoseek.model.layers import MLP, swiglu

SHIFT_SCALE = 0.1  # the additive path enters at a tenth of its size


def gate_factor(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., inter] -> 0.5 + sigmoid(logits) in [0.5, 1.5], in the logits' dtype: computed in fp32, where
    sigmoid saturates cleanly (+inf gives 1.5, -inf 0.5; only NaN gives NaN) and bf16 rounding stays in range."""
    return (0.5 + torch.sigmoid(logits.float())).to(logits.dtype)


class NPTAdapter(nn.Module):
    """Low-rank map from the attention output to the two gate modulations; gate_scale is absent in safe mode."""

    def __init__(self, dim: int, inter_dim: int, rank: int, safe_mode: bool = False):
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(dim, rank, bias=False)
        self.gate_shift = nn.Linear(rank, inter_dim, bias=False)
        self.gate_scale = None if safe_mode else nn.Linear(rank, inter_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:  # the nn.Module convention, e.g. for weights materialised from "meta"
        nn.init.normal_(self.down.weight, std=self.down.in_features ** -0.5)
        nn.init.normal_(self.gate_shift.weight, std=0.001)
        if self.gate_scale is not None:
            nn.init.zeros_(self.gate_scale.weight)

    def forward(self, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attn_out [B, T, dim] -> (shift, scale logits or None in safe mode), each [B, T, inter]: the raw outputs,
        before SHIFT_SCALE and gate_factor, which the regulariser penalises."""
        z = self.down(attn_out)  # [B, T, rank]
        return self.gate_shift(z), (self.gate_scale(z) if self.gate_scale is not None else None)


class NPTBlock(nn.Module):
    """A Block whose attention residual is replaced by gate modulation. It holds the base block's submodules
    under their own names, so the frozen weights keep their state-dict names and are shared, not copied."""

    def __init__(self, block: nn.Module, rank: int, safe_mode: bool = False):
        super().__init__()
        if not isinstance(block.ffn, MLP):
            raise ValueError(f"layer {block.layer_id} has a {type(block.ffn).__name__} feed-forward; NPT modulates "
                             "a dense SwiGLU MLP's gate, so choose dense layers (--layers)")
        self.layer_id = block.layer_id
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = block.attn_norm, block.attn, block.ffn_norm, block.ffn
        w1 = block.ffn.w1
        # Trainable weights in the base's float dtype; fp32 over a quantised base (FrozenQuantizedLinear has no
        # .weight, and its compute is fp32). The block's norm is never quantised: its device is the base's.
        weight = getattr(w1, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        device = block.ffn_norm.weight.device
        self.adapter = NPTAdapter(w1.in_features, w1.out_features, rank, safe_mode).to(device, dtype)

    def forward(self, x: torch.Tensor, start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cache=None, router_losses: list | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]; Block's signature (a dense layer has no router losses)."""
        attn_out = self.attn(self.attn_norm(x), start_pos, key_mask, cache)
        # attn_out over x's per-token rms, the stream it would have been added to: the same scale in any model
        # (a small fresh model's stream has rms ~0.1, a large trained one's is orders of magnitude larger).
        rms_inv = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        shift, scale_logits = self.adapter((attn_out.float() * rms_inv).to(attn_out.dtype))
        gate, up = self.ffn.gate_up(self.ffn_norm(x))
        if scale_logits is not None:
            gate = gate * gate_factor(scale_logits)
        # The base's opt-in clamp applies to the modulated gate as it would to the plain one.
        return x + self.ffn.w2(swiglu(gate + SHIFT_SCALE * shift, up, self.ffn.clamp, self.ffn.clamped))
