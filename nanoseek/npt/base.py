"""The frozen base model an NPT run adapts, and the tokenizer its data must use: a nanoseek run or
checkpoint directory, or a transformers Llama folder (loaded by nanoseek.interop.source)."""

from __future__ import annotations

from pathlib import Path

from nanoseek.interop.source import SourceModel, load_source_model
from nanoseek.model.npt import NPTBlock

BaseModel = SourceModel  # model, kind ("nanoseek" | "hf"), tokenizer spec, prepared_data, preset


def load_base(path: str | Path) -> BaseModel:
    """Load the base at `path` on CPU in fp32, in eval mode (its weights will be frozen)."""
    base = load_source_model(path, "--base")
    if any(isinstance(block, NPTBlock) for block in base.model.layers):
        raise ValueError(f"--base {str(path)!r} is itself an NPT run; pass the base it was trained on")
    return base
