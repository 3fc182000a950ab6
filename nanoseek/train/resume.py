"""Resume from what the checkpoint says, and start a run only where nothing else would be mixed in.

On `--resume` the checkpoint's own config is the base and the flags given now apply on top (listed), as in
OLMo-core and the HF Trainer; what cannot continue the run (the model's shape, the tokenizer, the data or its
order, the optimizer kind) is refused in one line. Checkpoints after a `--resume-from` are moved aside, not deleted."""

import json
import os
import re
import time
from pathlib import Path

from nanoseek.config import RunConfig
from nanoseek.rundir import LOCK_FILE, check_folder_path
from nanoseek.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, list_checkpoints, step_of
from nanoseek.train.metrics import WANDB_ID_FILE

CONFIG_TOML = "config.toml"
ABANDONED_PREFIX = "abandoned-"

# What a continued run cannot change: the tensors' shapes, what the ids mean, which tokens come next, and
# what the optimizer state is (Lion keeps one moment, AdamW two plus a step count, Muon its own groups).
FIXED = {f"model.{name}" for name in (
    "vocab_size", "dim", "n_layers", "n_heads", "attention", "n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "inter_dim", "n_dense_layers", "n_routed_experts",
    "n_shared_experts", "moe_inter_dim", "mtp_depth", "mtp_kind", "tie_embeddings", "qk_norm")} | {
    "data.source", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.val_fraction", "data.hf_split",
    "data.hf_text_field", "train.optimizer", "seed"}
IGNORED = {"out", "preset", "model.kv_head_ratio", "model.embd_scale"}  # where the run lives; derived values

# What a run directory may hold before a new run starts in it (from a run stopped before its first checkpoint,
# or the data `heal` copies in first).
RUN_FILES = {CONFIG_TOML, "metrics.jsonl", "data", "tb", "samples.txt", "conversion.json", "heal.json", "npt.json",
             "adapters", "bad_batches", WANDB_ID_FILE, "report.png", "report.html", CHECKPOINTS_DIR, LOCK_FILE}


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) for every setting that differs, in a stable order."""
    old, new = _flat(saved), _flat(now)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in IGNORED and old.get(key) != new.get(key)]


def check_continuation(saved: dict, now: dict, source: str) -> list[str]:
    """Refuse (ValueError, one line) what cannot continue the run saved as `saved`; return the overrides."""
    changes = config_changes(saved, now)
    fixed = [c for c in changes if c[0] in FIXED]
    if fixed:
        what = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in fixed[:3])
        raise ValueError(f"--resume: {what} cannot change within a run ({source} was saved with the former); drop "
                         "those flags to continue it, or start a new run with --out NEW (--preset/--model.* give it "
                         "new weights)")
    return [f"{key} {old!r} -> {new!r}" for key, old, new in changes]


def find_checkpoint(run_dir: str | Path, resume_from: str | None = None) -> Path | None:
    """The latest complete checkpoint (None: none yet), or `resume_from`: step-N, N, or one of this run's."""
    run_dir = Path(run_dir)
    if resume_from is None:
        return latest_checkpoint(run_dir)
    found = list_checkpoints(run_dir)
    match = re.fullmatch(r"(?:step-)?(\d+)", str(resume_from))
    if match:
        chosen = next((p for p in found if step_of(p) == int(match.group(1))), None)
    else:
        path = Path(resume_from).expanduser()
        inside = path.resolve().parent == (run_dir / CHECKPOINTS_DIR).resolve()
        if path.exists() and not inside:
            raise ValueError(f"--resume-from {resume_from}: not a checkpoint of {run_dir}; a run continues from its "
                             "own checkpoints (to start a new run from other weights, load them into a new --out)")
        chosen = next((p for p in found if p.resolve() == path.resolve()), None)
    if chosen is None:
        have = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"--resume-from {resume_from}: no complete checkpoint of that name in "
                         f"{run_dir / CHECKPOINTS_DIR} (complete ones: {have})")
    return chosen


def saved_config(run_dir: str | Path, resume_from: str | None = None) -> RunConfig:
    """The config a resumed run continues with: its checkpoint's own, else (no checkpoint yet) config.toml."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume: {run_dir} does not exist (or is not a directory); point --out at the run to "
                         "continue, or start a new run without --resume")
    path = find_checkpoint(run_dir, resume_from)
    if path is not None:
        try:
            return RunConfig.from_dict(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"checkpoint {path} has an unreadable config.json ({err}); pass --resume-from with "
                             "an earlier checkpoint") from None
    if (run_dir / CONFIG_TOML).is_file():
        return RunConfig.load_toml(run_dir / CONFIG_TOML)
    raise ValueError(f"--resume: {run_dir} has no complete checkpoint and no {CONFIG_TOML}; it holds no run to "
                     "continue: start without --resume (or point --out at the run to continue)")


def set_aside_later(run_dir: str | Path, chosen: Path) -> Path | None:
    """Move the checkpoints after `chosen` to checkpoints/abandoned-TIME/ (kept, never resumed); that folder or None."""
    later = [p for p in list_checkpoints(run_dir) if step_of(p) > step_of(chosen)]
    if not later:
        return None
    aside = Path(run_dir) / CHECKPOINTS_DIR / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-from-{chosen.name}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    return aside


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    """A run to resume must exist. A new one starts only where there is no run with checkpoints, nobody's other
    files, and no run stopped before its first checkpoint with other settings, whose data would be mixed in."""
    if resume:
        if not run_dir.is_dir():
            raise ValueError(f"--resume: {run_dir} does not exist; point --out at the run to continue, "
                             "or start a new run without --resume")
        return
    if latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run with checkpoints; continue it with --resume, "
                         "or choose a new --out")
    refuse_foreign_files(run_dir)
    now, toml = cfg.to_dict(), run_dir / CONFIG_TOML
    if toml.is_file():
        try:
            changes = config_changes(RunConfig.load_toml(toml).to_dict(), now)
        except ValueError:
            changes = [(CONFIG_TOML, "unreadable", "")]
        changes = [c for c in changes if c[0] != "model.vocab_size"]  # set from the data once it is prepared
        if changes:
            key, old, new = changes[0]
            raise ValueError(f"--out {run_dir} holds a run that stopped before its first checkpoint, with other "
                             f"settings ({key} {old!r} -> {new!r}); continue it as it was with --resume, or start "
                             "this one in a new --out")
    _refuse_other_data(run_dir, now["data"])


def refuse_foreign_files(run_dir: str | Path) -> None:
    """Refuse (one line) an --out that is a file, or a directory holding files no nanoseek run writes."""
    run_dir = Path(run_dir)
    check_folder_path(run_dir)
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith(".data."))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"--out {run_dir} already holds files that are not a nanoseek run ({shown}); nothing was "
                         "changed: choose a new or empty --out")


def _refuse_other_data(run_dir: Path, data: dict) -> None:
    """A run killed while preparing its data left RUN_DIR/data, which is reused as it is: only by the same settings."""
    meta_path = run_dir / "data" / "meta.json"
    if not meta_path.is_file() or Path(data["source"]).expanduser().resolve() == meta_path.parent.resolve():
        return
    try:
        meta = json.loads(meta_path.read_text())
        saved = {"source": meta["source"], "tokenizer": meta["tokenizer"]["requested"], "seq_len": meta["seq_len"],
                 "val_fraction": meta["split"]["val_fraction"]}
    except (OSError, ValueError, KeyError, TypeError):
        saved = {"source": "unreadable meta.json"}
    key = next((key for key, value in saved.items() if data.get(key) != value), None)
    if key is not None:
        raise ValueError(f"--out {run_dir} holds data prepared from other settings (data.{key} {saved[key]!r}, now "
                         f"{data.get(key)!r}) by a run that stopped before its first checkpoint; continue it with "
                         "the same settings, or start this one in a new --out")


def restart_without_checkpoint(run_dir: Path, cfg: RunConfig) -> str:
    """--resume of a run stopped before its first checkpoint starts it again on its own data and config.toml
    (returns the note saying so); never a default config over someone's data, nor another over this run's."""
    saved = saved_config(run_dir).to_dict()
    saved["model"]["vocab_size"] = cfg.model.vocab_size  # set from the prepared data, like the run's own
    check_continuation(saved, cfg.to_dict(), str(run_dir / CONFIG_TOML))
    return f"{run_dir} has no checkpoint yet: starting it again from step 0 on its own data and {CONFIG_TOML}"
