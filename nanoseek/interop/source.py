"""A model to start from, with the tokenizer its data must use: a nanoseek run (or checkpoint) directory, or
a transformers folder. `nanoseek convert` / `heal` (the dense source, the teacher) and `nanoseek npt` (the
frozen base) all load through `load_source_model`.

A nanoseek run's weights come through nanoseek.train.loading and its tokenizer from the run's data/; a
transformers folder (detected by its config.json) through import_hf, its tokenizer from its tokenizer.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import RunConfig
from nanoseek.interop.importer import import_hf, is_hf_folder, load_hf_tokenizer
from nanoseek.model import Transformer
from nanoseek.train.loading import load_model, load_run_tokenizer, run_dir_of


@dataclass
class SourceModel:
    model: Transformer  # fp32, on CPU, in eval mode
    kind: str  # "nanoseek" | "hf"
    tokenizer: str  # what DataConfig.tokenizer takes: a tokenizer.json path, "byte", or "char"
    prepared_data: Path | None = None  # a char-tokenizer run's own prepared data (its table covers only that text)
    preset: str = "tiny-gqa"  # only supplies defaults when a run config is read back; every field is stored


def load_source_model(path: str | Path, flag: str) -> SourceModel:
    """Load the model at `path`; `flag` (e.g. "--from") names the option in errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{flag} {str(path)!r} does not exist; pass a nanoseek run/checkpoint directory or a "
                         "transformers folder (with config.json)")
    if is_hf_folder(path):
        if load_hf_tokenizer(path) is None:
            raise ValueError(f"{flag} {str(path)!r} has no tokenizer.json; save the model's fast tokenizer there "
                             "(tokenizer.save_pretrained(folder)) so text is tokenised as the model expects")
        return SourceModel(import_hf(path).eval(), "hf", str(path / "tokenizer.json"))


    model, _ = load_model(path)
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise ValueError(f"{flag} {str(path)!r}: no run directory (with data/ and config.toml) at or above it, so "
                         "its tokenizer is unknown; pass the run directory")
    tok = load_run_tokenizer(run_dir)
    preset = _preset_of(run_dir)
    if tok.kind == "byte":
        return SourceModel(model.eval(), "nanoseek", "byte", preset=preset)
    if tok.kind == "char":
        return SourceModel(model.eval(), "nanoseek", "char", prepared_data=run_dir / "data", preset=preset)
    return SourceModel(model.eval(), "nanoseek", str(run_dir / "data" / "tokenizer.json"), preset=preset)


def _preset_of(run_dir: Path) -> str:
    try:
        return RunConfig.load_toml(run_dir / "config.toml").preset
    except ValueError:
        return "tiny-gqa"
