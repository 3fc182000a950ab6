"""End-to-end training on CPU: the loss falls, resume is bit-exact (and the test can tell when it is
not), runs are not overwritten, checkpoints load back, and the CLI works from a clean directory."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from nanoseek.train.trainer import Trainer
from tiny import TINY_MODEL

SMALL_MODEL = TINY_MODEL


def make_config(corpus: Path, out: Path, max_steps: int = 20, **train) -> RunConfig:
    train = {"batch_size": 4, "eval_every": 10, "save_every": 10, "eval_batches": 2, "tensorboard": False,
             "warmup_steps": 3, "lr": 3e-3, "ema_decay": 0.9, **train}
    return RunConfig(model=ModelConfig.from_preset("tiny", **SMALL_MODEL),
                     data=DataConfig(source=str(corpus), tokenizer="char", seq_len=16),
                     train=TrainConfig(max_steps=max_steps, **train), guard=GuardConfig(), device="cpu", out=str(out))


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_thirty_steps_lower_the_loss(corpus, tmp_path):
    trainer = Trainer(make_config(corpus, tmp_path / "run", max_steps=30), tmp_path / "run", show_progress=False)
    initial = trainer.evaluate()["ce"]
    result = trainer.train()
    losses = train_losses(tmp_path / "run")
    assert result.status == "finished" and result.step == 30
    assert sum(losses[s] for s in range(25, 30)) < sum(losses[s] for s in range(5)) * 0.9
    assert result.val_loss < initial - 0.5


class Interrupted(Exception):
    pass


class InterruptedTrainer(Trainer):
    """Stops (as a killed process would) when step 10 is about to start; step 10 was checkpointed."""

    def train_step(self):
        if self.step == 10:
            raise Interrupted
        return super().train_step()


def test_resume_is_bit_exact_and_the_test_would_notice_otherwise(corpus, tmp_path):
    full = Trainer(make_config(corpus, tmp_path / "full"), tmp_path / "full", show_progress=False)
    full.train()

    def resumed(name: str, tamper=None) -> Trainer:
        run = tmp_path / name
        with pytest.raises(Interrupted):  # killed right after the step-10 checkpoint
            InterruptedTrainer(make_config(corpus, run), run, show_progress=False).train()
        if tamper is not None:
            ckpt = read_checkpoint(latest_checkpoint(run))
            tamper(ckpt.trainer_state)
            save_checkpoint(run, ckpt.step, ckpt.model_state, ckpt.trainer_state, ckpt.config, ckpt.val_loss,
                            ckpt.ema_state)
        trainer = Trainer(make_config(corpus, run, max_steps=20), run, resume=True, show_progress=False)
        trainer.train()
        return trainer

    exact = resumed("exact")
    assert {s: l for s, l in train_losses(tmp_path / "exact").items() if s >= 10} == \
        {s: l for s, l in train_losses(tmp_path / "full").items() if s >= 10}
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, exact.model.state_dict()[name]), name
    for name, tensor in full.ema.state_dict().items():
        assert torch.equal(tensor, exact.ema.state_dict()[name]), name
    assert exact.guard.state_dict() == full.guard.state_dict()

    # Negative controls: drop the data cursor, or the schedule position, and equality must break.
    def drop_cursor(state):
        state["loader"] = {**state["loader"], "epoch": 0, "position": 0}  # as if the cursor were not saved

    no_cursor = resumed("no-cursor", drop_cursor)
    no_schedule = resumed("no-schedule", lambda state: state.update(opt_step=0))
    full_losses = train_losses(tmp_path / "full")
    for run in ("no-cursor", "no-schedule"):
        losses = train_losses(tmp_path / run)
        assert any(losses[s] != full_losses[s] for s in range(10, 20)), run
    assert not torch.equal(no_cursor.model.head.weight, full.model.head.weight)
    assert not torch.equal(no_schedule.model.head.weight, full.model.head.weight)


def test_runs_are_never_overwritten_and_resume_needs_a_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(make_config(corpus, run, max_steps=2), run, resume=True, show_progress=False)
    assert not run.exists()  # refused before anything was written
    run.mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        Trainer(make_config(corpus, run, max_steps=2), run, resume=True, show_progress=False)
    Trainer(make_config(corpus, run, max_steps=2), run, show_progress=False).train()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(make_config(corpus, run, max_steps=2), run, show_progress=False)
    changed = make_config(corpus, run, max_steps=4)
    changed.model = ModelConfig.from_preset("tiny", **{**SMALL_MODEL, "dim": 48})
    with pytest.raises(ValueError, match=r"model.dim 32 -> 48 cannot change within a run"):
        Trainer(changed, run, resume=True, show_progress=False)


def test_a_failed_start_leaves_no_run_directory(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(corpus, run, max_steps=2)
    cfg.guard = GuardConfig(inject=("inf-act:no.such.module@1",))
    with pytest.raises(ValueError, match="no.such.module"):
        Trainer(cfg, run, show_progress=False)
    assert not run.exists()


class CtrlCTrainer(Trainer):
    """Receives SIGINT (once, or twice) in the middle of step 7, as from a user pressing Ctrl-C."""

    presses = 1

    def train_step(self):
        if self.step == 7:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)
        return super().train_step()


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(corpus, tmp_path):
    full = Trainer(make_config(corpus, tmp_path / "full"), tmp_path / "full", show_progress=False)
    full.train()
    run = tmp_path / "stopped"
    result = CtrlCTrainer(make_config(corpus, run), run, show_progress=False).train()
    assert result.status == "interrupted" and result.step == 8 and result.exit_code == 130
    assert latest_checkpoint(run).name == "step-00000008"
    resumed = Trainer(make_config(corpus, run), run, resume=True, show_progress=False)
    assert resumed.train().status == "finished"
    assert {s: l for s, l in train_losses(run).items() if s >= 8} == \
        {s: l for s, l in train_losses(tmp_path / "full").items() if s >= 8}
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back

    twice = tmp_path / "twice"
    CtrlCTrainer.presses = 2
    try:
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            CtrlCTrainer(make_config(corpus, twice), twice, show_progress=False).train()
    finally:
        CtrlCTrainer.presses = 1


def test_load_checkpoint_gives_the_trained_model(corpus, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(make_config(corpus, run, max_steps=4), run, show_progress=False)
    trainer.train()
    model, config = nanoseek.load_checkpoint(run)
    assert config == trainer.cfg.model
    idx = torch.randint(0, config.vocab_size, (2, 12))
    trainer.model.eval()
    assert torch.equal(model(idx).logits, trainer.model(idx).logits)


@pytest.mark.parametrize("train", [{"precision": "bf16"}, {"grad_accum": 2}, {"optimizer": "lion", "lr": 3e-4},
                                   {"optimizer": "muon"}, {"schedule": "wsd"}, {"schedule": "cyclic", "cycle_steps": 4},
                                   {"activation_checkpointing": True}, {"grad_noise": 0.01}])
def test_training_options_run_and_learn(corpus, tmp_path, train):
    trainer = Trainer(make_config(corpus, tmp_path / "run", max_steps=12, **train), tmp_path / "run", show_progress=False)
    initial = trainer.evaluate()["ce"]
    result = trainer.train()
    assert result.status == "finished" and result.n_skips == 0
    assert result.val_loss < initial
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_early_stopping(corpus, tmp_path):
    cfg = make_config(corpus, tmp_path / "run", max_steps=40, lr=1e-9, eval_every=2, early_stop_patience=1)
    result = Trainer(cfg, tmp_path / "run", show_progress=False).train()
    assert result.status == "early-stopped" and result.step < 40


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


SMALL_FLAGS = ["--model.dim", "32", "--model.n-heads", "2", "--model.n-layers", "2", "--model.kv-lora-rank", "16",
               "--model.qk-nope-head-dim", "8", "--model.qk-rope-head-dim", "8", "--model.v-head-dim", "8",
               "--model.inter-dim", "64", "--model.moe-inter-dim", "16", "--model.n-routed-experts", "4",
               "--model.max-seq-len", "32", "--data.tokenizer", "char", "--data.seq-len", "16",
               "--train.batch-size", "4", "--train.eval-every", "3", "--train.save-every", "3",
               "--train.no-tensorboard", "--train.sample-tokens", "20"]


def test_cli_end_to_end(corpus, tmp_path):
    done = run_cli("train", "--data", str(corpus), "--out", "run", "--max-steps", "6", "--seed", "1",
                   "--device", "cpu", *SMALL_FLAGS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--- sample ---" in done.stdout
    run = tmp_path / "run"
    assert (run / "config.toml").exists() and list(run.glob("checkpoints/step-*/COMPLETE"))
    resumed = run_cli("train", "--resume", "--out", "run", "--max-steps", "9", "--no-sample", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(train_losses(run)) == list(range(9))
    generated = run_cli("generate", "--ckpt", "run", "--max-new-tokens", "10", cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    (tmp_path / "prompts.txt").write_text("alpha beta\n\nriver \n")
    greedy = ["--prompt-file", "prompts.txt", "--max-new-tokens", "12", "--temperature", "0"]
    plain = run_cli("generate", "--ckpt", "run", *greedy, cwd=tmp_path)
    drafted = run_cli("generate", "--ckpt", "run", *greedy, "--speculative", cwd=tmp_path)
    assert plain.returncode == 0 and drafted.returncode == 0, plain.stderr + drafted.stderr
    assert plain.stdout.startswith("alpha beta") and "\nriver " in plain.stdout  # each prompt, continued in order
    assert plain.stderr.count("tokens/s") == 1 and "2 prompts in one batch" in plain.stderr
    # One left-padded batch gives what speculative decoding gives each prompt alone.
    assert drafted.stdout == plain.stdout and "drafts accepted" in drafted.stderr
    half = run_cli("generate", "--ckpt", "run", *greedy, "--dtype", "bf16", cwd=tmp_path)
    assert half.returncode == 0 and half.stdout.startswith("alpha beta"), half.stderr
    scored = run_cli("eval", "--ckpt", "run", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["tokens"] > 0 and math.isfinite(result["bits_per_byte"])
    assert result["weights"] == "raw"  # this run keeps no EMA (train.ema_decay 0)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "does/not/exist.txt", "--max-steps", "1"], "does/not/exist.txt"),
    (["train", "--preset", "tiny-gqa", "--model.n-kv-heads", "3"], "n_kv_heads"),
    (["train", "--inject", "garbage", "--max-steps", "1", "--data.tokenizer", "char"], "garbage"),
    (["train", "--resume", "--out", "no-such-run"], "does not exist"),
])
def test_cli_bad_input_is_one_clean_line(tmp_path, args, message):
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and message in done.stderr, done.stderr


def test_help_lists_the_documented_flags(tmp_path):
    done = run_cli("train", "--help", cwd=tmp_path)
    assert done.returncode == 0
    for flag in ("--max-steps", "--resume", "--data", "--out", "--seed", "--device", "--inject", "--preset"):
        assert flag in done.stdout
    for sub in ("prepare", "generate", "diagnose", "export"):
        assert run_cli(sub, "--help", cwd=tmp_path).returncode == 0
