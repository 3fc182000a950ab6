"""Static, preallocated decoding caches: fixed shapes, so a decode step traces and compiles once.

The dynamic caches in attention.py return a prefix that grows by one position per token (a new shape every
step: torch.compile would recompile or go dynamic). These hold `max_len` slots per row from the start and
always hand attention all of them; a boolean mask hides the slots a query may not see. Writes go to slot
indices held in a tensor, never a Python int, so the decode step's graph is the same at every position.

Ragged batches are left-padded. Row b's prompt starts at slot pad[b]; the token in slot s sits at RoPE
position s - pad[b], as if that prompt were decoded alone, and a query in slot t sees slots pad[b]..t. One
`SlotLayout` is shared by every layer's cache; the caller moves it with `advance` before each forward.
"""

from __future__ import annotations

import torch


class SlotLayout:
    """Where the next forward writes and what it sees, for every layer at once.

    After advance(start, T): slots [T] (cache slots written), positions [B, T] (RoPE positions, per row),
    mask [B, 1, T, S] (True: the query may attend to that slot).
    """

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        if pad is None:
            pad = torch.zeros(batch, dtype=torch.long, device=device)
        if pad.shape != (batch,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}; expected one left-padding length per row ({batch},)")
        self.batch, self.max_len = batch, max_len
        self.pad = pad.to(device=device, dtype=torch.long)  # [B]
        self.keys = torch.arange(max_len, device=device)  # [S]
        self.advance(0, 1)

    def advance(self, start: int | torch.Tensor, seq_len: int) -> None:
        """The next forward covers slots start..start+seq_len-1 (start: an int, or a 0-dim long tensor that a
        compiled step can take as an input without recompiling)."""
        if not torch.is_tensor(start) and start + seq_len > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} slots; slot {start + seq_len - 1} does not fit")
        self.slots = start + self.keys[:seq_len]  # [T]
        self.positions = (self.slots[None, :] - self.pad[:, None]).clamp(min=0)  # [B, T]
        keys, queries = self.keys[None, None, :], self.slots[None, :, None]
        visible = (keys <= queries) & (keys >= self.pad[:, None, None])  # [B, T, S]: causal, after the padding
        # A padding query (before its row's prompt) sees only itself: finite, and never read by a real token.
        self.mask = (visible | (keys == queries)).unsqueeze(1)  # [B, 1, T, S]


class StaticKVCache:
    """Keys and values for GQA in max_len fixed slots: [B, n_kv_heads, S, head_dim] each."""

    def __init__(self, layout: SlotLayout, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.layout = layout
        self.k = torch.zeros(layout.batch, n_kv_heads, layout.max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] to the layout's slots; return the whole cache [B, Hkv, S, D] (start_pos is
        the layout's: it is taken for the dynamic caches' signature)."""
        self.k.index_copy_(2, self.layout.slots, k.to(self.k.dtype))
        self.v.index_copy_(2, self.layout.slots, v.to(self.v.dtype))
        return self.k, self.v

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class StaticLatentCache:
    """MLA's normalised KV latent and shared rope key in max_len fixed slots: [B, S, R] and [B, S, Dr]."""

    def __init__(self, layout: SlotLayout, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.layout = layout
        self.kv_latent = torch.zeros(layout.batch, layout.max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(layout.batch, layout.max_len, qk_rope_head_dim, dtype=dtype, device=device)

    def update(self, start_pos, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv_latent [B, T, R] and k_rope [B, T, Dr] to the layout's slots; return the whole cache."""
        self.kv_latent.index_copy_(1, self.layout.slots, kv_latent.to(self.kv_latent.dtype))
        self.k_rope.index_copy_(1, self.layout.slots, k_rope.to(self.k_rope.dtype))
        return self.kv_latent, self.k_rope

    def nbytes(self) -> int:
        return self.kv_latent.nbytes + self.k_rope.nbytes


def new_static_caches(model, batch: int, max_len: int, pad: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> tuple[SlotLayout, list]:
    """One static cache per layer of `model` (a Transformer), all sharing one SlotLayout.

    pad: [B] left-padding length of each row (None: no padding). Returns (layout, caches)."""
    weight = model.embed.weight
    dtype, device = dtype or weight.dtype, weight.device
    if max_len > model.config.max_seq_len:
        raise ValueError(f"a cache of {max_len} slots is longer than the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    layout = SlotLayout(batch, max_len, pad, device)
    caches = []
    for block in model.layers:
        attn = block.attn
        if hasattr(attn, "kv_lora_rank"):  # MLAttention
            caches.append(StaticLatentCache(layout, attn.kv_lora_rank, attn.qk_rope_head_dim, dtype, device))
        else:
            caches.append(StaticKVCache(layout, attn.n_kv_heads, attn.head_dim, dtype, device))
    return layout, caches
