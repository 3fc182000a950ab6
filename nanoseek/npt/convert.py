"""Turn a frozen base Transformer into an NPT student in place, keeping a Teacher view of the original blocks.

The two share every weight (nothing is copied), so a model that does not fit twice in memory still distils."""

import dataclasses

import torch
from torch import nn

from nanoseek.model import Transformer
from nanoseek.model.moe import Gate
from nanoseek.model.npt import NPTAdapter, NPTBlock
from nanoseek.npt.config import AdapterConfig


class Teacher:
    """The base model as it was before conversion: embed -> original blocks -> norm -> head.

    Not an nn.Module on purpose: its weights belong to the student (moving the student moves them), and it must
    never appear in the student's parameters, state dict or optimizer."""

    def __init__(self, model: Transformer):
        self.embed, self.norm, self.head, self.blocks = model.embed, model.norm, model.head, list(model.layers)

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, layer_ids: tuple[int, ...], with_logits: bool = False
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """idx [B, T] -> ({layer id: that block's output [B, T, dim]} for layer_ids, logits [B, T, V] or None)."""
        x = self.embed(idx)
        hidden = {}
        last = len(self.blocks) - 1 if with_logits else max(layer_ids)  # the layers above are not compared
        for i, block in enumerate(self.blocks[:last + 1]):
            x = block(x)
            if i in layer_ids:
                hidden[i] = x
        return hidden, (self.head(self.norm(x)) if with_logits else None)


def convert_to_npt(model: Transformer, cfg: AdapterConfig) -> Teacher:
    """Freeze `model` and replace the blocks named by cfg.layers with NPTBlocks, in place. Returns the Teacher;
    `model` is now the student, whose only trainable parameters are the adapters'."""
    if any(isinstance(block, NPTBlock) for block in model.layers):
        raise ValueError("the model already carries NPT adapters; convert the base model, not an NPT student")
    if cfg.layers[-1] >= len(model.layers):  # cfg.layers ascends
        raise ValueError(f"adapter layer {cfg.layers[-1]} does not exist (the model has {len(model.layers)} layers); "
                         "the adapters were trained on a different base")
    teacher = Teacher(model)
    model.requires_grad_(False)
    for module in model.modules():  # aux-loss-free balancing would move a frozen base's routing (a buffer) each step
        if isinstance(module, Gate):
            module.balance_rate = 0.0
    for i in cfg.layers:
        model.layers[i] = NPTBlock(model.layers[i], cfg.rank, cfg.safe_mode)
    model.npt_config = cfg
    # Recorded in the model config, so that checkpoints say what to build: Transformer(config) makes these blocks.
    model.config = dataclasses.replace(model.config, npt_layers=cfg.layers, npt_rank=cfg.rank,
                                       npt_safe_mode=cfg.safe_mode)
    return teacher


def adapters(model: nn.Module) -> dict[int, NPTAdapter]:
    return {i: block.adapter for i, block in enumerate(model.layers) if isinstance(block, NPTBlock)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone, under their names in the student's state dict (layers.I.adapter.*)."""
    return {f"layers.{i}.adapter.{name}": tensor for i, adapter in adapters(model).items()
            for name, tensor in adapter.state_dict().items()}
