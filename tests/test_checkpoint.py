"""Atomic checkpoints (nanoseek/train/checkpoint.py): exact round trips, pruning, and kill -9 safety."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nanoseek.train.checkpoint import (best_checkpoint, latest_checkpoint, list_checkpoints, read_checkpoint,
                                       save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def assert_same(a, b, where="state"):
    """Exact equality of nested dicts/lists/tuples of tensors, numpy arrays and plain values."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


def _trainer_state(model: nn.Module) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    random.seed(3)
    np.random.seed(3)
    return {
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "data": {"position": 1234, "epoch": 2, "order": np.arange(10, dtype=np.uint32)},
        "guard": {"losses": [2.5, float("nan"), float("inf")], "skips": 1, "lr_scale": np.float64(0.5)},
        "scaler": None,
        "dtype": torch.bfloat16,
    }


def _save(run_dir, step, model_state=None, val_loss=None, **kw):
    model_state = model_state if model_state is not None else {"w": torch.full((2, 3), float(step))}
    return save_checkpoint(run_dir, step, model_state, {"step": step}, {"name": "test"}, val_loss=val_loss, **kw)


# ---- round trips ------------------------------------------------------------------------------


def test_round_trip_is_exact_including_tied_and_odd_tensors(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    state = dict(model.state_dict())
    base = torch.arange(24.0).reshape(4, 6)
    state.update({
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "counts": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "slice": base[1:3],  # a view into a larger buffer
        "transposed": base.t(),  # a non-contiguous view of the same buffer
        "scalar": torch.tensor(3.5),
    })
    trainer_state = _trainer_state(model)
    ema = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path, 7, state, trainer_state, {"model": {"dim": 6}}, val_loss=1.25, ema_state=ema)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "config.json", "ema.safetensors", "meta.json",
                                                      "model.safetensors", "trainer_state.pt"]
    loaded = read_checkpoint(path)
    assert (loaded.step, loaded.val_loss, loaded.config, loaded.path) == (7, 1.25, {"model": {"dim": 6}}, path)
    assert_same({k: v.detach() for k, v in state.items()}, loaded.model_state)
    assert_same(trainer_state, loaded.trainer_state)
    assert_same(ema, loaded.ema_state)
    # The tie survives: both names are one tensor, and loading into a tied model keeps it tied.
    assert loaded.model_state["head.weight"] is loaded.model_state["embed.weight"]
    fresh = Tied()
    fresh.load_state_dict({k: loaded.model_state[k] for k in model.state_dict()})
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)


def test_run_dir_reads_latest_and_missing_ema_is_none(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=5)
    loaded = read_checkpoint(tmp_path)
    assert loaded.step == 3 and loaded.ema_state is None
    assert torch.equal(loaded.model_state["w"], torch.full((2, 3), 3.0))
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_nonfinite_val_loss_round_trips_and_is_never_best(tmp_path):
    _save(tmp_path, 1, val_loss=float("nan"), keep_last=5)
    _save(tmp_path, 2, val_loss=3.0, keep_last=5)
    assert read_checkpoint(tmp_path / "checkpoints" / "step-00000001").val_loss != read_checkpoint(tmp_path).val_loss
    assert best_checkpoint(tmp_path).name == "step-00000002"
    meta = json.loads((tmp_path / "checkpoints" / "step-00000001" / "meta.json").read_text())
    assert meta["val_loss"] == "nan"


def test_trainer_state_that_would_not_load_safely_is_refused_at_save(tmp_path):
    with pytest.raises(ValueError, match=r"trainer_state\['guard'\]\['seen'\] is a set"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"guard": {"seen": {1, 2}}}, {})
    with pytest.raises(ValueError, match="not a tensor"):
        save_checkpoint(tmp_path, 1, {"w": 1.0}, {}, {})
    assert list_checkpoints(tmp_path) == [] and not any((tmp_path / "checkpoints").iterdir())


# ---- pruning ----------------------------------------------------------------------------------


def test_keep_last_and_keep_best(tmp_path):
    for step, loss in zip(range(1, 7), [5.0, 1.0, 4.0, 3.0, None, 2.0]):
        _save(tmp_path, step, val_loss=loss, keep_last=2, keep_best=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000005", "step-00000006"]
    assert best_checkpoint(tmp_path).name == "step-00000002"
    _save(tmp_path, 7, keep_last=1, keep_best=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000007"]
    assert best_checkpoint(tmp_path) is None


def test_saving_an_existing_step_replaces_it(tmp_path):
    _save(tmp_path, 5, {"w": torch.zeros(2)})
    _save(tmp_path, 5, {"w": torch.ones(2)})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    assert torch.equal(read_checkpoint(tmp_path).model_state["w"], torch.ones(2))


# ---- broken checkpoints -----------------------------------------------------------------------


def test_dir_without_complete_is_ignored_and_refused(tmp_path):
    _save(tmp_path, 1)
    partial = tmp_path / "checkpoints" / "step-00000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert read_checkpoint(tmp_path).step == 1
    with pytest.raises(ValueError, match=r"incomplete \(no COMPLETE.*use the previous checkpoint .*step-00000001"):
        read_checkpoint(partial)
    # A save at that step replaces the partial directory.
    _save(tmp_path, 2)
    assert read_checkpoint(partial).step == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_missing_or_corrupt_file_is_a_clear_error(tmp_path, damage):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    for name in ("model.safetensors", "trainer_state.pt"):
        file = path / name
        data = file.read_bytes()
        if damage == "truncate":
            file.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            file.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
        else:
            file.unlink()
        with pytest.raises(ValueError, match=rf"{name}.*use the previous checkpoint .*step-00000001") as err:
            read_checkpoint(path)
        assert "\n" not in str(err.value)
        file.write_bytes(data)
    assert read_checkpoint(path).step == 2


def test_corrupt_safetensors_is_caught_without_verify(tmp_path):
    path = _save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="model.safetensors.*no earlier complete checkpoint"):
        read_checkpoint(path, verify=False)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a checkpoint dir"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        read_checkpoint(tmp_path)


def test_stale_tmp_dirs_are_ignored_then_removed(tmp_path):
    path = _save(tmp_path, 1)
    stale = tmp_path / "checkpoints" / ".tmp-step-00000002"
    stale.mkdir()
    (stale / "COMPLETE").write_text("2\n")  # even a finished-looking temp dir is not a checkpoint
    assert list_checkpoints(tmp_path) == [path]
    _save(tmp_path, 3)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


# ---- kill -9 during saves ---------------------------------------------------------------------

# The saver: imports torch once, then forks one saving child per line read from stdin (so five trials pay
# the ~2 s torch import once), prints each child's pid, and after stdin closes reports how each one ended.
# No torch op runs before a fork, so no thread pool is forked half-alive.
SAVER = """
import os
import sys
import torch
sys.path.insert(0, {repo!r})
from nanoseek.train.checkpoint import save_checkpoint


def make_state(seed):
    g = torch.Generator().manual_seed(seed)
    model = {{"embed.weight": torch.randn(512, 1024, generator=g), "layers.0.w": torch.randn(1024, 512, generator=g),
              "norm.weight": torch.randn(512, generator=g)}}
    model["head.weight"] = model["embed.weight"]  # tied
    trainer = {{"seed": seed, "moments": torch.randn(256, 1024, generator=g), "cursor": seed % 977}}
    return model, trainer


def checksum(model):
    return float(sum(t.double().sum() for t in model.values()))


def save_forever(run_dir, trial):
    step = 0
    for attempt in range(10**6):
        step += attempt % 3 != 2  # every third save re-saves the same step (the replace path)
        seed = trial * 10**6 + attempt
        model, trainer = make_state(seed)
        trainer["checksum"] = checksum(model)
        save_checkpoint(run_dir, step, model, trainer, {{"seed": seed}}, val_loss=(seed * 7919 % 101) / 10,
                        keep_last=2, keep_best=1)


if __name__ == "__main__":
    children = []
    for line in sys.stdin:
        run_dir, trial = line.split()
        pid = os.fork()
        if pid == 0:
            save_forever(run_dir, int(trial))
            os._exit(0)
        children.append(pid)
        print(pid, flush=True)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saver forks its trials")
def test_kill_9_during_saves_never_leaves_a_half_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(repo=str(REPO)))
    saver = {}
    exec(compile(script.read_text(), str(script), "exec"), saver)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Saves of ~8 MB take tens of ms (several fsyncs), so kills at these delays land at arbitrary points of a
    # save: while writing a file, between fsyncs, between the renames of a replace, during pruning.
    rng = random.Random(0)
    delays = sorted(rng.uniform(0.1, 1.2) for _ in range(5))
    run_dirs, pids = [], []
    for trial in range(len(delays)):
        run_dirs.append(tmp_path / f"run{trial}")
        proc.stdin.write(f"{run_dirs[-1]} {trial}\n")
        proc.stdin.flush()
        pids.append(int(proc.stdout.readline()))
    start = time.perf_counter()
    for pid, delay in zip(pids, delays):
        time.sleep(max(0.0, start + delay - time.perf_counter()))
        os.kill(pid, signal.SIGKILL)
    proc.stdin.close()
    assert [int(proc.stdout.readline()) for _ in pids] == [signal.SIGKILL] * len(pids)
    assert proc.wait(timeout=30) == 0

    found_total = 0
    for run_dir, delay in zip(run_dirs, delays):
        found = list_checkpoints(run_dir)
        assert len(found) <= 4, (delay, found)  # keep_last 2 + best 1 + one killed before its prune
        for path in found:
            loaded = read_checkpoint(path)
            model, trainer = saver["make_state"](loaded.trainer_state["seed"])
            assert loaded.step == int(path.name.split("-")[1])
            assert loaded.config == {"seed": loaded.trainer_state["seed"]}
            assert loaded.trainer_state["checksum"] == saver["checksum"](loaded.model_state)
            assert_same(model, loaded.model_state)
            assert loaded.model_state["head.weight"] is loaded.model_state["embed.weight"]
            assert_same({**trainer, "checksum": loaded.trainer_state["checksum"]}, loaded.trainer_state)
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            assert read_checkpoint(run_dir).path == latest
        found_total += len(found)
        # The next save (a resumed run) clears whatever the kill left half-written.
        save_checkpoint(run_dir, 10**6, {"w": torch.ones(1)}, {}, {})
        assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    assert found_total > 0, "no trial completed a save before its kill: the test checked nothing"
