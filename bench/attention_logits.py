"""The largest attention logit of each layer of trained models, on the same text: the scale the guard's
attention-logit limit (`--guard.attn-logit-limit`) is set against.

    python bench/attention_logits.py SMOL RUN_DIR ...     # any model `nanoseek generate --ckpt` accepts

Each model reads the first 512 tokens of this repository's README (tokenized with the first model's
tokenizer folder, `--tokenizer`), one forward with stat tracking on; per layer the max over heads and
positions of q.k * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from nanoseek.interop.any_model import load_any_model

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass
class Args:
    models: tyro.conf.Positional[tuple[str, ...]]
    """Transformers folders, GGUF files or nanoseek runs."""
    tokenizer: str | None = None
    """A transformers folder whose tokenizer reads the text (default: the first model)."""
    tokens: int = 512


def main(args: Args) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.models[0])
    ids = tokenizer(README.read_text()[:16 * args.tokens], return_tensors="pt").input_ids[:, :args.tokens]
    for path in args.models:
        model = load_any_model(path).model
        model.set_stat_tracking(True)
        with torch.no_grad():
            model(ids)
        per_layer = [v for k, v in model.health_stats().items() if k.startswith("attn_logit_max/")]
        print(f"{path}: max {max(per_layer):.1f}; per layer {[round(v, 1) for v in per_layer]}")


if __name__ == "__main__":
    main(tyro.cli(Args))
