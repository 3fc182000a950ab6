"""Atomic checkpoints: a crash or kill -9 at any moment leaves only whole checkpoints behind.

RUN_DIR/checkpoints/step-00000123/ holds model.safetensors (tied tensors stored once), ema.safetensors (optional),
trainer_state.pt (the trainer's nested dict: optimizer, scaler, RNG, data cursor, guard...), config.json,
meta.json (step, val_loss, time, each file's size and sha256) and COMPLETE. Saving follows the
commit-marker-last scheme of PyTorch DCP and OLMo-core: write into `.tmp-step-N`, fsync, write COMPLETE, fsync,
rename to `step-N` (atomic on POSIX). Readers only see `step-N` holding COMPLETE, and deletion renames to
`.tmp-delete-*` first: a plain `torch.save` killed at random leaves a corrupt file. One writer per run
directory (rank 0); readers may run at any time. trainer_state loads with `torch.load(weights_only=True)` (no
code runs on load) with numpy arrays and scalars allowed, so `np.random.get_state()` round-trips; saving
refuses, naming the key, anything that would not load that way."""

import errno
import json
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.data.shards import file_sha256
from nanoseek.rundir import fsync_path, swap_in
from nanoseek.train.metrics import jsonable
from nanoseek.train.writes import torch_save

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINER_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# safetensors metadata keys (values must be strings): tied names and the original key order.
_ALIASES_KEY = "nanoseek_aliases"
_ORDER_KEY = "nanoseek_order"


@dataclass
class Checkpoint:
    """A checkpoint read back from disk; tensors are on `map_location`."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    trainer_state: dict
    config: dict
    val_loss: float | None
    ema_state: dict[str, torch.Tensor] | None


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest step first (dirs without COMPLETE are skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_FILE).is_file()), key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return next(reversed(list_checkpoints(run_dir)), None)


def checkpoint_val_loss(path: Path) -> float | None:
    """The finite validation loss recorded in a checkpoint's meta.json, else None."""
    try:
        value = float(json.loads((path / META_FILE).read_text())["val_loss"])  # None (not recorded): TypeError
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return value if math.isfinite(value) else None


def _ranked_by_val_loss(found: list[Path]) -> list[Path]:
    """Checkpoints with a finite val_loss, best (lowest) first; ties go to the newer one."""
    losses = {p: checkpoint_val_loss(p) for p in found}
    return sorted((p for p in found if losses[p] is not None), key=lambda p: (losses[p], -step_of(p)))


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the lowest val_loss, or None if none recorded one."""
    return next(iter(_ranked_by_val_loss(list_checkpoints(run_dir))), None)


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict,
                    config: dict, val_loss: float | None = None, ema_state: dict[str, torch.Tensor] | None = None,
                    keep_last: int = 2, keep_best: int = 1) -> Path:
    """Write RUN_DIR/checkpoints/step-{step:08d}/ atomically (replacing one of that step), then prune.

    model_state / ema_state: name -> tensor (any device; tied or overlapping tensors are fine).
    trainer_state: nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings, None.
    Pruning keeps the newest `keep_last`, the `keep_best` with the lowest finite val_loss, and this one."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be an int >= 0")
    if keep_last < 1 or keep_best < 0:
        raise ValueError(f"keep_last={keep_last}, keep_best={keep_best}: need keep_last >= 1 and keep_best >= 0")
    _check_weights_only_loadable(trainer_state, "trainer_state")
    if not isinstance(config, dict):
        raise ValueError(f"config is a {type(config).__name__}; pass a dict (e.g. RunConfig.to_dict())")
    try:
        config_json = json.dumps(config, indent=2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config is not JSON-serialisable ({err}); pass numbers, strings, lists and dicts") from None
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    _check_free_space(root)
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    tmp.mkdir()
    try:
        _write_safetensors(tmp / MODEL_FILE, model_state, "model_state")
        if ema_state is not None:
            _write_safetensors(tmp / EMA_FILE, ema_state, "ema_state")
        torch_save(trainer_state, tmp / TRAINER_FILE)  # a failed write is the OSError it is (train/writes.py)
        (tmp / CONFIG_FILE).write_text(config_json, encoding="utf-8")
        files = {}
        for path in sorted(tmp.iterdir()):
            fsync_path(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        meta = {"step": step, "val_loss": jsonable(val_loss), "time": time.time(), "files": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        fsync_path(tmp / META_FILE)
        (tmp / COMPLETE_FILE).write_text(f"{step}\n", encoding="utf-8")
        fsync_path(tmp / COMPLETE_FILE)
        fsync_path(tmp)
        swap_in(tmp, final, root / f"{TMP_PREFIX}replaced-{final.name}")  # replaces an earlier save of this step
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last, keep_best, keep=final)
    return final


def _check_free_space(root: Path) -> None:
    """Refuse before writing when the disk cannot hold another checkpoint the size of the latest one (the one
    case where the size is known in advance); an unforeseen full disk still fails cleanly mid-write."""
    latest = latest_checkpoint(root.parent)
    if latest is None:
        return
    try:
        needed = sum(int(info["bytes"]) for info in json.loads((latest / META_FILE).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{free:,} bytes free, the latest checkpoint took {needed:,}", str(root))


def _prune(root: Path, keep_last: int, keep_best: int, keep: Path) -> None:
    found = list_checkpoints(root.parent)
    kept = {keep, *found[-keep_last:], *_ranked_by_val_loss(found)[:keep_best]}
    for path in found:
        if path not in kept:
            trash = root / f"{TMP_PREFIX}delete-{path.name}"
            os.replace(path, trash)
            fsync_path(root)
            shutil.rmtree(trash, ignore_errors=True)
    _remove_stale_tmp(root)


def _remove_stale_tmp(root: Path) -> None:
    for path in root.glob(f"{TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _split_shared(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, aliases {name: stored name}), as safetensors refuses tensors that share memory: a tied
    weight becomes an alias, read back as the same tensor object; an overlap or a view is stored as a copy."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    used_storages: set[tuple] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}[{name!r}] is a {type(tensor).__name__}, not a tensor; pass "
                             "model.state_dict() (keep other values in trainer_state)")
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if storage in used_storages or not whole:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            used_storages.add(storage)
        if tensor.numel():
            seen[view] = name
        tensors[name] = tensor.cpu()
    return tensors, aliases


def _write_safetensors(path: Path, state: dict[str, torch.Tensor], what: str) -> None:
    tensors, aliases = _split_shared(state, what)
    metadata = {"format": "pt", _ORDER_KEY: json.dumps(list(state))}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # an I/O failure inside the Rust writer: re-raise it as the OSError it is
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


_PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only_loadable(value: Any, where: str) -> None:
    """Raise ValueError naming the first value that `torch.load(weights_only=True)` would refuse."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_weights_only_loadable(key, f"{where} key {key!r}")
            _check_weights_only_loadable(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_weights_only_loadable(item, f"{where}[{i}]")
    elif isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise ValueError(f"{where} is a numpy array of Python objects; store a numeric array or a list")
    elif not (isinstance(value, (torch.Tensor, np.ndarray, np.generic)) or type(value) in _PLAIN_TYPES):
        raise ValueError(f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; "
                         "store it as dicts/lists/tuples of tensors, numpy arrays, numbers, strings or None")


def _numpy_safe_globals() -> list:
    """What pickled numpy arrays and scalars reference, for `torch.serialization.safe_globals`."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read a checkpoint dir (RUN/checkpoints/step-N) or a run dir (its latest complete checkpoint).

    verify: check every file's size and sha256 against meta.json first (one extra read). An incomplete
    checkpoint, or a missing or corrupt file, is a one-line ValueError naming the previous checkpoint to use."""
    path = _resolve(Path(path))
    if not (path / COMPLETE_FILE).is_file():
        raise ValueError(_broken(path, "is incomplete (no COMPLETE marker: its save was interrupted)"))
    try:
        meta = json.loads((path / META_FILE).read_text())
        step, files, val_loss = int(meta["step"]), dict(meta["files"]), meta.get("val_loss")
        val_loss = None if val_loss is None else float(val_loss)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(_broken(path, f"has a missing or corrupt {META_FILE} ({type(err).__name__})")) from None
    if verify:
        for name, info in files.items():
            file = path / name
            if not file.is_file():
                raise ValueError(_broken(path, f"is missing {name}"))
            if file.stat().st_size != info["bytes"] or file_sha256(file) != info["sha256"]:
                raise ValueError(_broken(path, f"has a corrupt {name} (size or sha256 differs from {META_FILE})"))
    for name in (MODEL_FILE, TRAINER_FILE, CONFIG_FILE):
        if name not in files or not (path / name).is_file():
            raise ValueError(_broken(path, f"has no {name}"))
    model_state = _read_safetensors(path, MODEL_FILE, str(map_location))
    ema_state = _read_safetensors(path, EMA_FILE, str(map_location)) if EMA_FILE in files else None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            trainer_state = torch.load(path / TRAINER_FILE, map_location=map_location, weights_only=True)
        config = json.loads((path / CONFIG_FILE).read_text())
    except Exception as err:  # any unpickling / zip / JSON failure means the same thing: a corrupt file
        raise ValueError(_broken(path, f"has a corrupt {TRAINER_FILE} or {CONFIG_FILE} ({type(err).__name__}: "
                                       f"{str(err).splitlines()[0] if str(err) else ''})")) from None
    return Checkpoint(path, step, model_state, trainer_state, config, val_loss, ema_state)


def _resolve(path: Path) -> Path:
    """A checkpoint dir as given, or the latest complete checkpoint of a run dir."""
    if not path.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist; pass RUN_DIR or RUN_DIR/checkpoints/step-N")
    if _STEP_DIR.match(path.name):
        return path
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"run dir {str(path)!r} has no complete checkpoint in {CHECKPOINTS_DIR}/; "
                             "train with save_every set, or pass a checkpoint dir")
        return latest
    raise ValueError(f"{str(path)!r} is neither a checkpoint dir (step-N) nor a run dir with {CHECKPOINTS_DIR}/; "
                     "pass RUN_DIR or RUN_DIR/checkpoints/step-N")


def _broken(path: Path, reason: str) -> str:
    """One line: which checkpoint is unusable, why, and which earlier one to use instead."""
    earlier = []
    if _STEP_DIR.match(path.name):
        earlier = [p for p in list_checkpoints(path.parent.parent) if step_of(p) < step_of(path)]
    fix = (f"use the previous checkpoint {str(earlier[-1])!r} (nanoseek train --resume-from {earlier[-1].name})"
           if earlier else "no earlier complete checkpoint exists; restart training without resuming")
    return f"checkpoint {str(path)!r} {reason}; {fix}"


def _read_safetensors(path: Path, name: str, device: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path / name), framework="pt", device=device) as file:
            metadata = file.metadata() or {}
            stored = {key: file.get_tensor(key) for key in file.keys()}
    except (OSError, SafetensorError) as err:
        raise ValueError(_broken(path, f"has a corrupt {name} ({err})")) from None
    aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    order = json.loads(metadata.get(_ORDER_KEY, "null")) or list(stored)
    return {key: stored[aliases.get(key, key)] for key in order}
