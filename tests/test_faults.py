"""Fault injection end to end (nanoseek/train/faults.py, nanoseek/diagnose.py, the guard path of trainer.py).

Every kind of injected fault must be caught before it touches the weights, explained (step, cause,
module), recovered from, and replayable later with `nanoseek diagnose`. Each faulted run is tiny
(MLA + MoE + MTP, 8 steps, the fault at step 3) and shared by every test that looks at it.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from nanoseek.cli import main as cli_main
from nanoseek.config import DataConfig, GuardConfig, RunConfig, TrainConfig
from nanoseek.diagnose import diagnose_run
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint
from nanoseek.train.faults import KINDS, FaultInjector, parse_fault
from nanoseek.train.locate import load_batch, replay
from nanoseek.train.optim import lr_factor
from nanoseek.train.trainer import Trainer
from tiny import tiny_model_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
STEPS, AT = 8, 3  # run length and the step every fault here fires at


# ---- tiny runs --------------------------------------------------------------------------------------


def tiny_config(corpus: Path, max_steps: int = STEPS, inject=(), train: dict | None = None,
                guard: dict | None = None) -> RunConfig:
    train = {"batch_size": 4, "warmup_steps": 2, "eval_batches": 2, "tensorboard": False,
             "eval_every": 10**6, "save_every": 10**6, **(train or {})}
    return RunConfig(model=tiny_model_config(), data=DataConfig(source=str(corpus), tokenizer="char", seq_len=16),
                     train=TrainConfig(max_steps=max_steps, **train),
                     guard=GuardConfig(inject=tuple(inject), **(guard or {})), device="cpu")


def state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Copies of every model tensor (parameters and persistent buffers such as the MoE balance bias)
    and every optimizer state tensor (Adam moments and step counts)."""
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for index, slots in trainer.optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                state[f"optimizer.{index}.{slot}"] = value.detach().clone()
    return state


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def watch_steps(trainer: Trainer) -> list[tuple[int, str]]:
    """Wrap `trainer.train_step`: after every step no NaN/Inf may be in the weights, buffers or optimizer
    state, and a step the guard did not accept must have left all of them bit-for-bit as they were
    (the fault was caught before anything was updated). Returns the (step, action) list it sees."""
    seen: list[tuple[int, str]] = []
    original = trainer.train_step

    def train_step():
        before, opt_step = state_tensors(trainer), trainer.opt_step
        verdict, values, batches = original()
        after = state_tensors(trainer)
        where = f"step {trainer.step - 1} ({verdict.action}: {verdict.cause})"
        assert not nonfinite(after), f"{where} left NaN/Inf in {nonfinite(after)[:5]}"
        if not verdict.ok:
            assert before.keys() == after.keys(), where
            changed = [name for name in before if not torch.equal(before[name], after[name])]
            assert not changed and trainer.opt_step == opt_step, f"{where} changed {changed[:5]}"
        seen.append((trainer.step - 1, verdict.action))
        return verdict, values, batches

    trainer.train_step = train_step
    return seen


@dataclass
class Run:
    run_dir: Path
    trainer: Trainer
    result: object
    seen: list

    def records(self, kind: str) -> list[dict]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("kind") == kind]

    def meta(self, step: int) -> dict:
        return json.loads((self.run_dir / "bad_batches" / f"step-{step:08d}" / "meta.json").read_text())


def run_training(cfg: RunConfig, run_dir: Path) -> Run:
    trainer = Trainer(cfg, run_dir, show_progress=False)
    seen = watch_steps(trainer)
    result = trainer.train()
    return Run(run_dir, trainer, result, seen)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def faulted(corpus, tmp_path_factory):
    """faulted(spec, **config) -> Run: one run per (spec, config) for the whole module."""
    cache: dict[str, Run] = {}

    def get(spec: str, **config) -> Run:
        key = f"{spec} {sorted(config.items())}"
        if key not in cache:
            cache[key] = run_training(tiny_config(corpus, inject=(spec,), **config), tmp_path_factory.mktemp("run"))
        return cache[key]
    return get


# ---- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nan-loss@0", "nan-grad@12", "inf-grad@3", "inf-act:layers.1.ffn.experts@5",
                                  "lr-spike:100@40", "lr-spike:0.5@3", "bad-batch@7"])
def test_parse_fault_round_trips(spec):
    fault = parse_fault(spec)
    assert str(fault) == spec and fault.kind in KINDS
    assert fault.step == int(spec.rpartition("@")[2])


def test_the_config_layer_parses_faults_without_importing_the_trainer():
    """`--inject` is checked when the config is built, from the config layer: config.py imports the fault
    spec, not train/faults.py (whose imports reach back to the model and the config)."""
    code = ("import sys; from nanoseek.config import GuardConfig; GuardConfig(inject=('nan-loss@3',)); "
            "print(sorted(m for m in sys.modules if m.startswith('nanoseek.train')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.strip()  # nanoseek/__init__ loads checkpoint reading; never the trainer or the injector
    assert "nanoseek.train.faults" not in loaded and "nanoseek.train.trainer" not in loaded, loaded
    with pytest.raises(ValueError, match="unknown kind"):
        GuardConfig(inject=("nan-los@3",))


@pytest.mark.parametrize("spec, why", [
    ("nan-loss", "missing @STEP"), ("nan-loss@", "missing @STEP"), ("nan-loss@x", "whole number"),
    ("nan-loss@-1", "whole number"), ("nan-loss@1.5", "whole number"),
    ("nan-losses@3", "unknown kind"), ("@3", "unknown kind"), ("NaN-loss@3", "unknown kind"),
    ("inf-act@3", "needs a module path"), ("inf-act:@3", "needs a module path"),
    ("lr-spike@3", "positive factor"), ("lr-spike:0@3", "positive factor"), ("lr-spike:-2@3", "positive factor"),
    ("lr-spike:abc@3", "positive factor"), ("lr-spike:nan@3", "positive factor"), ("lr-spike:inf@3", "positive factor"),
    ("nan-loss:5@3", "takes no argument"), ("bad-batch:all@3", "takes no argument"),
])
def test_parse_fault_rejects_bad_specs(spec, why):
    with pytest.raises(ValueError) as err:
        parse_fault(spec)
    message = str(err.value)
    assert repr(spec) in message and why in message and "\n" not in message


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_model_config(vocab_size=40))


@pytest.mark.parametrize("path, similar", [
    ("layers.7.attn", "layers.1.attn"),  # no such layer
    ("layers.1.ffn.expert", "layers.1.ffn.experts"),  # a letter short
    ("layers.1.atn", "layers.1.attn"),  # a typo in the last part
    ("mtp.0.blocks", "mtp.0.block"),
])
def test_unknown_module_lists_similar_names(model, path, similar):
    with pytest.raises(ValueError) as err:
        FaultInjector([f"inf-act:{path}@3"], model)
    message = str(err.value)
    assert f"no module {path!r}" in message and "similar:" in message
    assert similar in [name.strip() for name in message.split("similar:")[1].split(",")], message


def test_injector_fires_only_at_its_step(model):
    injector = FaultInjector(["nan-loss@3", "bad-batch@3", "lr-spike:100@3", "nan-grad@3", "inf-act:head@3"], model)
    loss = torch.tensor(2.5)
    assert injector.loss(2, loss) is loss and math.isnan(float(injector.loss(3, loss)))
    assert injector.lr_factor(2) == 1.0 and injector.lr_factor(3) == 100.0
    x = torch.randint(0, 40, (2, 8))
    assert injector.batch(4, x, 40) is x
    bad = injector.batch(3, x, 40)
    assert int(bad.max()) >= 40 and int(x.max()) < 40  # the loader's tensor is not written to
    assert injector.active(3) == ["nan-loss@3", "bad-batch@3", "lr-spike:100@3", "nan-grad@3", "inf-act:head@3"]
    assert injector.active(2) == []

    model.zero_grad(set_to_none=True)
    idx = torch.randint(0, 40, (2, 8))
    model(idx, torch.randint(0, 40, (2, 9))).loss.backward()
    injector.grads(2, model)
    assert not any(n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all())
    injector.grads(3, model)
    bad_grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert bad_grads == ["embed.weight"] and int(torch.isnan(model.embed.weight.grad).sum()) == 1
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        with injector.activations(2):
            assert torch.isfinite(model(idx).logits).all()
        with injector.activations(3):
            assert not torch.isfinite(model(idx).logits).all()
        assert torch.isfinite(model(idx).logits).all()  # the hook is gone after the step
    model.reset_expert_loads()


def test_replay_names_the_module_whose_backward_goes_non_finite():
    """A forward that stays finite while its gradient does not (d sqrt(u)/du at u = 0) is located in backward."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(vocab_size=40))
    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 9))
    assert replay(model, x, y).stage == "clean"
    ffn = model.layers[1].ffn
    finite_forward = ffn.forward
    ffn.forward = lambda h, *args: finite_forward(h, *args) + torch.sqrt((h - h.detach()) ** 2)  # adds 0; grad NaN
    finding = replay(model, x, y)
    assert (finding.stage, finding.module, finding.tensor) == ("backward", "layers.1.ffn", "grad_input")
    assert finding.detail["grad_output"]["nonfinite"] == 0 and finding.detail["grad_input"]["nonfinite"] > 0
    assert all(p.grad is None for p in model.parameters())  # the replay leaves no gradients behind


class TupleOut(nn.Module):
    """Returns (x, x transposed (non-contiguous), integer ids), like modules that return several tensors."""

    def forward(self, x):
        return x * 1.0, (x * 2.0).t(), torch.arange(3)


def test_inf_act_poisons_every_float_tensor_of_a_tuple_output():
    module = nn.Sequential(TupleOut())
    injector = FaultInjector(["inf-act:0@1"], module)
    x = torch.ones(3, 4)
    with injector.activations(1):
        a, b, ids = module(x)
    assert math.isinf(a[0, 0]) and math.isinf(b[0, 0]) and b.shape == (4, 3)
    assert int(torch.isinf(a).sum()) == 1 and int(torch.isinf(b).sum()) == 1
    assert torch.equal(ids, torch.arange(3)) and torch.equal(x, torch.ones(3, 4))


# ---- each kind, end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("spec, cause, module, bad_grads", [
    ("nan-loss@3", "non-finite loss", None, None),
    ("nan-grad@3", "non-finite gradient", "embed", ["embed.weight"]),
    ("inf-grad@3", "non-finite gradient", "embed", ["embed.weight"]),
    ("inf-act:layers.1.attn@3", "non-finite loss", "layers.1.attn", None),
    ("bad-batch@3", "bad batch", None, []),
])
def test_fault_is_caught_named_and_skipped(faulted, spec, cause, module, bad_grads):
    run = faulted(spec)
    assert run.result.status == "finished" and run.result.exit_code == 0
    result = run.result
    assert (result.step, result.opt_step, result.n_skips, result.n_rollbacks) == (STEPS, STEPS - 1, 1, 0)
    # watch_steps checked every step: finite state, and the faulted step left everything untouched.
    assert run.seen == [(step, "skip" if step == AT else "ok") for step in range(STEPS)]
    assert not nonfinite(state_tensors(run.trainer))
    events = run.records("event")
    assert [(e["step"], e["event"], e["action"]) for e in events] == [(AT, "skip", "skip")]
    assert events[0]["cause"].startswith(cause) and events[0]["module"] == module
    train = {r["step"]: r for r in run.records("train")}
    assert train[AT]["action"] == "skip" and train[AT]["skipped_steps"] == 1
    assert math.isfinite(run.result.val_loss) and math.isfinite(train[STEPS - 1]["loss"])

    meta = run.meta(AT)  # the bad batch is on disk with what was found
    assert meta["step"] == AT and meta["injected"] == [spec] and meta["module"] == module
    assert meta["cause"] == events[0]["cause"]
    if bad_grads is not None:  # a NaN loss makes every gradient NaN; a gradient fault hits one parameter
        assert meta["nonfinite_grads"] == bad_grads
    else:
        assert "embed.weight" in meta["nonfinite_grads"] and len(meta["nonfinite_grads"]) > 1
    batch = load_batch(run.run_dir / "bad_batches" / f"step-{AT:08d}")
    vocab = run.trainer.data.vocab_size
    assert (int(batch["x"].max()) >= vocab) == spec.startswith("bad-batch")
    saved_state = (run.run_dir / "bad_batches" / f"step-{AT:08d}" / "model.safetensors").exists()
    assert saved_state == cause.startswith("non-finite")  # kept for `nanoseek diagnose` replays

    final = read_checkpoint(latest_checkpoint(run.run_dir))
    assert not nonfinite(final.model_state) and not nonfinite(state_tensors(run.trainer))


def test_lr_spike_is_caught_and_rolled_back(faulted):
    # Spike detection is armed after `warmup` healthy steps, so this run arms it early. The spiked update
    # itself looks healthy when applied; the loss after it is what the guard sees (step 13), and the second
    # spike in a row means the weights are bad: roll back to a snapshot from before step 12.
    run = faulted("lr-spike:100@12", max_steps=20, train={"lr": 1e-2, "warmup_steps": 5},
                  guard={"warmup": 5, "snapshot_every": 4})
    assert run.result.status == "finished" and run.result.n_rollbacks == 1
    events = run.records("event")
    assert events and all(e["step"] in (13, 14) for e in events), events
    assert "spike" in events[0]["cause"] and events[0]["module"] is None
    rollback = [e for e in events if e["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["restored_step"] <= 12 and rollback[0]["lr_scale"] == 0.5
    train = {r["step"]: r for r in run.records("train")}
    base_lr = run.trainer.optimizer.param_groups[0]["base_lr"]
    cfg = run.trainer.cfg.train
    assert train[12]["lr"] == pytest.approx(100 * base_lr * lr_factor(12, cfg))  # the fault did fire
    after = [r for r in train.values() if r["step"] > rollback[0]["step"] and r["action"] == "ok"]
    assert after and all(r["lr"] == pytest.approx(0.5 * base_lr * lr_factor(r["opt_step"] - 1, cfg)) for r in after)
    assert run.trainer.guard.lr_scale == 0.5 and not nonfinite(state_tensors(run.trainer))


# ---- inf in a module's output: the locator names that module ----------------------------------------

SITES = [
    "layers.1.attn",  # MLA attention
    "layers.0.attn.kv_norm",  # the MLA latent norm
    "layers.1.attn.wkv_b",  # the latent up-projection
    "layers.1.ffn.gate",  # the router (its routing weights)
    "layers.1.ffn.experts",  # routed experts
    "layers.1.ffn.shared_experts",  # the shared expert
    "layers.1.ffn",  # the whole MoE
    "layers.0.ffn",  # a dense SwiGLU MLP
    "layers.0.attn_norm",  # a block norm
    "norm",  # the final norm
    "head",  # the output head (shared with MTP)
    "embed",
    "mtp.0",  # the MTP module (returns a tuple)
    "mtp.0.block",  # the MTP module's transformer block
    "mtp.0.block.ffn.experts",
]


@pytest.mark.parametrize("site", SITES)
def test_inf_act_is_located_at_the_injected_module(faulted, site):
    run = faulted(f"inf-act:{site}@{AT}")
    assert run.result.status == "finished" and run.result.opt_step == STEPS - 1
    assert run.seen == [(step, "skip" if step == AT else "ok") for step in range(STEPS)]
    events = run.records("event")
    assert [(e["step"], e["action"], e["cause"], e["module"]) for e in events] == \
        [(AT, "skip", "non-finite loss", site)]
    assert f"module {site!r}" in run.meta(AT)["finding"]


# ---- nanoseek diagnose --------------------------------------------------------------------------------


def test_diagnose_run_names_the_module(faulted):
    run = faulted(f"inf-act:layers.1.ffn.experts@{AT}")
    path, finding, meta = diagnose_run(run.run_dir)
    assert path == run.run_dir / "bad_batches" / f"step-{AT:08d}"
    assert (finding.stage, finding.module) == ("forward", "layers.1.ffn.experts")
    assert "'layers.1.ffn.experts'" in finding.line() and finding.detail["output"]["nonfinite"] >= 1
    assert meta["injected"] == [f"inf-act:layers.1.ffn.experts@{AT}"] and meta["step"] == AT
    assert diagnose_run(run.run_dir, step=AT)[1].module == "layers.1.ffn.experts"
    with pytest.raises(ValueError, match="at step 4"):
        diagnose_run(run.run_dir, step=4)


def test_diagnose_run_names_the_parameter_of_a_gradient_fault(faulted):
    _, finding, _ = diagnose_run(faulted(f"nan-grad@{AT}").run_dir)
    assert (finding.stage, finding.module) == ("grad", "embed") and "embed.weight" in finding.tensor


def test_diagnose_run_without_a_bad_batch_is_a_clear_error(faulted, tmp_path, capsys):
    with pytest.raises(ValueError, match="no bad batch .*bad_batches"):
        diagnose_run(tmp_path)
    # A bad-batch fault saves the batch but no model state: there is nothing non-finite to replay.
    with pytest.raises(ValueError, match="no bad batch with a saved model state"):
        diagnose_run(faulted(f"bad-batch@{AT}").run_dir)
    capsys.readouterr()  # drop what a training run above may have printed
    assert cli_main(["diagnose", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanoseek: error: no bad batch"), err


def test_diagnose_cli_subprocess(faulted):
    run = faulted(f"inf-act:layers.1.ffn.experts@{AT}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "diagnose", str(run.run_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "module 'layers.1.ffn.experts'" in proc.stdout and f"step {AT}" in proc.stdout
    assert f"inf-act:layers.1.ffn.experts@{AT}" in proc.stdout
