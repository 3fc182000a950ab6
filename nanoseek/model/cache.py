"""Decoding caches (GQA's keys and values, MLA's latent and rope key), dynamic or static.

A dynamic cache returns the prefix so far, a new shape every token. A static one (given a `SlotLayout`) hands
attention all `max_len` slots under a mask and writes slot indices held in a tensor, so a decode step has one
graph at every position and compiles once. Ragged batches are left-padded: row b's prompt starts at slot
pad[b], slot s sits at RoPE position s - pad[b] (as if decoded alone), and a query in slot t sees pad[b]..t."""

import torch


class SlotLayout:
    """Where the next forward writes and what it sees, for every layer's cache at once; the caller moves it with
    `advance(start, T)` before each forward. Then slots [T] (cache slots written), positions [B, T] (RoPE
    positions, per row), mask [B, 1, T, S] (True: the query may attend to that slot)."""

    def __init__(self, batch: int, max_len: int, pad: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad
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


class _Cache:
    """Two [B, ...] tensors of max_len positions along `seq_dim`; `update` writes at start_pos and returns the
    prefix so far, or with a layout writes its slots (start_pos unused) and returns them all."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device, layout: SlotLayout | None):
        self.tensors = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
        self.layout = layout

    def update(self, start_pos: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.layout is not None:
            for cached, part in zip(self.tensors, new):
                cached.index_copy_(self.seq_dim, self.layout.slots, part.to(cached.dtype))
            return self.tensors
        end, max_len = start_pos + new[0].shape[self.seq_dim], self.tensors[0].shape[self.seq_dim]
        if end > max_len:
            raise ValueError(f"{type(self).__name__} holds {max_len} positions; position {end - 1} does not fit")
        for cached, part in zip(self.tensors, new):
            cached.narrow(self.seq_dim, start_pos, end - start_pos).copy_(part)
        return tuple(cached.narrow(self.seq_dim, 0, end) for cached in self.tensors)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_per_token(self) -> int:
        first = self.tensors[0]
        return self.nbytes() // (first.shape[0] * first.shape[self.seq_dim])


class KVCache(_Cache):
    """GQA's full keys and values, each [B, n_kv_heads, max_len, head_dim]."""

    seq_dim = 2

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 layout: SlotLayout | None):
        super().__init__([(batch, n_kv_heads, max_len, head_dim)] * 2, dtype, device, layout)


class LatentCache(_Cache):
    """MLA's cache (DeepSeek-V2 section 2.1.2): only the normalised KV latent [B, max_len, kv_lora_rank] and the
    rope key shared by all heads [B, max_len, qk_rope_head_dim], whatever the number of heads."""

    seq_dim = 1

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype, device,
                 layout: SlotLayout | None):
        super().__init__([(batch, max_len, kv_lora_rank), (batch, max_len, qk_rope_head_dim)], dtype, device, layout)


def new_static_caches(model, batch: int, max_len: int, pad: torch.Tensor | None = None) -> tuple[SlotLayout, list]:
    """(layout, caches): a static cache per layer of `model` sharing one SlotLayout; pad: [B] left-padding lengths."""
    if max_len > model.config.max_seq_len:
        raise ValueError(f"a cache of {max_len} slots is longer than the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    layout = SlotLayout(batch, max_len, pad, model.embed.weight.device)
    return layout, model.new_caches(batch, max_len, layout=layout)
