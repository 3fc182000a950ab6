"""Resume from what the checkpoint says; SIGTERM/SIGUSR1 save at a step boundary; 0 means 0; settings that
cannot work are refused; NaN weights are never saved; a crafted pickle in a run directory never runs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import GuardConfig
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from nanoseek.train.guard import StabilityGuard
from nanoseek.train.safety import NonFiniteWeights
from nanoseek.train.trainer import Trainer
from safety_helpers import FLAGS, assert_one_line_failure, fingerprint, popen_cli
from test_train_run import make_config


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def checkpoint_config(run: Path) -> dict:
    return json.loads((latest_checkpoint(run) / "config.json").read_text())


# ---- preemption ---------------------------------------------------------------------------------------


def test_sigterm_mid_run_saves_that_step_and_resume_continues_bit_exactly(corpus, tmp_path, capsys):
    constant = ["--train.schedule", "constant"]  # so a longer --max-steps leaves every step's LR the same
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "full"), "--max-steps", "18", *FLAGS,
                 *constant]) == 0
    job = popen_cli("train", "--data", corpus, "--out", "run", "--max-steps", "100000", *FLAGS, *constant,
                    cwd=tmp_path)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)  # what SLURM, Kubernetes and spot instances send before killing a job
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    stopped = read_checkpoint(latest_checkpoint(tmp_path / "run")).step
    assert f"SIGTERM: stopped at step {stopped}, checkpoint saved" in err and 3 <= stopped < 18
    assert sorted(train_losses(tmp_path / "run")) == list(range(stopped))

    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "18", "--no-progress"]) == 0
    assert "train.max_steps 100000 -> 18" in capsys.readouterr().out  # an override on resume is shown
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "full")  # bit-exact, every step
    ours, theirs = read_checkpoint(tmp_path / "run"), read_checkpoint(tmp_path / "full")
    assert all(torch.equal(ours.model_state[k], theirs.model_state[k]) for k in theirs.model_state)


class SignalAtStep(Trainer):
    signum, at = signal.SIGUSR1, 4

    def train_step(self):
        if self.step == self.at:
            os.kill(os.getpid(), self.signum)
        return super().train_step()


def test_sigusr1_saves_at_the_next_step_boundary_and_exits_138(corpus, tmp_path):
    run = tmp_path / "run"
    result = SignalAtStep(make_config(corpus, run, max_steps=20), run, show_progress=False).train()
    assert result.status == "interrupted" and result.step == 5 and result.exit_code == 128 + signal.SIGUSR1
    assert latest_checkpoint(run).name == "step-00000005"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ---- resume from the checkpoint's own config ----------------------------------------------------------


def test_resume_uses_the_checkpoint_config_when_config_toml_is_gone(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "6", "--train.lr", "0.002",
                 *FLAGS]) == 0
    (run / "config.toml").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "9", "--no-progress"]) == 0
    assert "train.max_steps 6 -> 9" in capsys.readouterr().out
    saved = checkpoint_config(run)
    assert latest_checkpoint(run).name == "step-00000009"
    assert saved["train"]["lr"] == 0.002 and saved["model"]["dim"] == 32 and saved["data"]["tokenizer"] == "char"


@pytest.mark.parametrize("new", ["adamw", "muon"])
def test_switching_the_optimizer_on_resume_is_refused_in_one_line(new, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", "--train.optimizer", "lion",
                 "--train.lr", "3e-4", *FLAGS]) == 0
    before = fingerprint(tmp_path)
    capsys.readouterr()
    code = main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--train.optimizer", new])
    assert_one_line_failure(code, capsys.readouterr().err, f"train.optimizer 'lion' -> '{new}' cannot change")
    assert fingerprint(tmp_path) == before


def test_resume_from_an_earlier_checkpoint_keeps_the_later_ones_aside(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "9", "--train.keep-last", "3",
                 *FLAGS]) == 0
    original = read_checkpoint(run)  # step 9
    assert main(["train", "--out", str(run), "--resume-from", "step-3", "--max-steps", "9", "--no-progress"]) == 0
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000006", "step-00000009"]
    again = read_checkpoint(run)
    assert again.step == 9 and all(torch.equal(again.model_state[k], v) for k, v in original.model_state.items())
    code = main(["train", "--out", str(run), "--resume-from", "step-4"])
    assert_one_line_failure(code, capsys.readouterr().err, "step-4", "step-00000003")


def test_a_run_that_stopped_before_its_first_checkpoint_is_never_mixed(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_config(corpus, run, max_steps=3)
    Trainer(cfg, run, show_progress=False).logger.close()  # data prepared, config.toml written, then a crash
    assert latest_checkpoint(run) is None
    other = tmp_path / "other.txt"
    other.write_text("completely different text, another alphabet: XYZ 0123456789\n" * 300)
    before = fingerprint(tmp_path)
    capsys.readouterr()
    code = main(["train", "--data", str(other), "--out", str(run), "--max-steps", "3", *FLAGS])
    assert_one_line_failure(code, capsys.readouterr().err, "stopped before its first checkpoint", "--resume")
    assert fingerprint(tmp_path) == before
    config_toml = (run / "config.toml").read_text()
    (run / "config.toml").unlink()  # killed even earlier: while or right after its data was prepared
    code = main(["train", "--data", str(other), "--out", str(run), "--max-steps", "3", *FLAGS])
    assert_one_line_failure(code, capsys.readouterr().err, "data prepared from other settings", "data.source")
    (run / "config.toml").write_text(config_toml)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # its own data and config
    assert checkpoint_config(run)["data"]["source"] == str(corpus) and latest_checkpoint(run).name == "step-00000003"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", "--out", str(empty), "--resume"])
    assert_one_line_failure(code, capsys.readouterr().err, "no complete checkpoint and no config.toml")


# ---- 0 means 0; values that cannot work --------------------------------------------------------------


def test_max_steps_zero_trains_zero_steps(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "0", *FLAGS]) == 0
    assert train_losses(run) == {} and latest_checkpoint(run).name == "step-00000000"


def test_heal_steps_zero_heals_zero_steps(safety_runs, tmp_path):
    out = tmp_path / "healed"
    assert main(["heal", "--ckpt", str(safety_runs["conv"]), "--out", str(out), "--steps", "0", "--device", "cpu",
                 "--no-progress", "--eval-tokens", "64"]) == 0
    record = json.loads((out / "heal.json").read_text())
    assert record["steps"] == 0 and record["after"]["kl"] == pytest.approx(record["before"]["kl"], abs=1e-6)
    assert train_losses(out) == {}


def test_eval_max_tokens_zero_is_refused_not_read_as_all(safety_runs, capsys):
    code = main(["eval", "--ckpt", str(safety_runs["mla"]), "--max-tokens", "0", "--device", "cpu"])
    assert_one_line_failure(code, capsys.readouterr().err, "--max-tokens 0: must be >= 2")
    assert main(["eval", "--ckpt", str(safety_runs["mla"]), "--max-tokens", "40", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 39  # every token after the first of 40


@pytest.mark.parametrize("flag, value", [("--train.lr", "inf"), ("--train.lr", "nan"), ("--train.eps", "0"),
                                         ("--guard.spike-sigma", "nan"), ("--model.rope-factor", "nan"),
                                         ("--max-steps", "-1")])
def test_values_that_cannot_work_are_refused_before_anything_runs(flag, value, corpus, tmp_path, capsys):
    code = main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), flag, value, *FLAGS])
    name = flag.split(".")[-1].replace("-", "_").lstrip("_")
    assert_one_line_failure(code, capsys.readouterr().err, name)
    assert not (tmp_path / "run").exists()


def test_the_guard_refuses_an_lr_that_is_not_a_finite_float32():
    assert StabilityGuard(GuardConfig()).check_update(0, [1e-3, 2e-2]) is None
    for lr in (math.inf, math.nan, 1e39):
        verdict = StabilityGuard(GuardConfig()).check_update(1, [1e-3, lr])
        assert verdict.action == "skip" and "non-finite learning rate" in verdict.cause


def test_an_lr_spike_to_beyond_float32_is_skipped_and_the_weights_stay_finite(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(corpus, run, max_steps=8, ema_decay=0.0)
    cfg.guard = GuardConfig(inject=("lr-spike:1e300@4",))
    trainer = Trainer(cfg, run, show_progress=False)
    result = trainer.train()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = [e for e in events if e["kind"] == "event"]
    assert [(e["step"], e["action"]) for e in events] == [(4, "skip")] and "learning rate" in events[0]["cause"]
    assert result.status == "finished" and all(torch.isfinite(p).all() for p in trainer.model.parameters())


class PoisonAfterStep(Trainer):
    def train_step(self):
        out = super().train_step()
        if self.step == 2:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = math.nan  # an update that went wrong unseen
        return out


def test_nan_weights_are_never_saved_as_a_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(corpus, run, max_steps=6, save_every=3, eval_every=100, ema_decay=0.0)
    cfg.guard = GuardConfig(enabled=False)  # nothing else would stop it
    with pytest.raises(NonFiniteWeights, match="step 3"):
        PoisonAfterStep(cfg, run, show_progress=False).train()
    assert list_checkpoints(run) == []


# ---- no pickle ever runs --------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command (what an adversary would put in a run directory)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_a_run_directory_never_executes(corpus, tmp_path, monkeypatch, capsys):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "4", "--inject", "nan-loss@2",
                 *FLAGS]) == 0
    bad = run / "bad_batches" / "step-00000002"
    assert (bad / "batch.safetensors").is_file() and not list(bad.glob("*.pt"))  # nothing pickled is written
    (bad / "batch.safetensors").unlink()
    torch.save(Payload(marker), bad / "batch.pt")  # the legacy name, which is still read
    ckpt = latest_checkpoint(run)
    torch.save(Payload(marker), ckpt / "trainer_state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())  # the adversary fixes the checksums too
    payload = (ckpt / "trainer_state.pt").read_bytes()
    meta["files"]["trainer_state.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))

    for hostile in (False, True):
        if hostile:  # what once made torch.load unpickle anything (and is the default on torch < 2.6)
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
            with pytest.warns(UserWarning):  # the payload is live: a plain torch.load runs it now
                torch.load(bad / "batch.pt")
            assert marker.exists()
            marker.unlink()
        for args in (["diagnose", str(run)], ["train", "--out", str(run), "--resume", "--max-steps", "6"]):
            capsys.readouterr()
            code = main(args)
            assert_one_line_failure(code, capsys.readouterr().err, "trainer_state.pt" if "train" in args else "batch.pt")
            assert not marker.exists(), (args, hostile)
