"""Data parallelism on CPU: two gloo processes under DDP and FSDP2 follow the single-process run with the
same global batch, a NaN on rank 1 alone is skipped by both ranks before it reaches the weights, and a
checkpoint written by two processes resumes in one.

The two processes are spawned once for the module and run four short jobs in one process group (DDP,
FSDP, an FSDP rollback, DDP in fp16), so the file pays for two Python + torch start-ups once; the
documented torchrun command line is a test of its own.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.data import prepare_data
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint
from nanoseek.train.distributed import Distributed
from nanoseek.train.faults import FaultInjector, parse_fault
from nanoseek.train.trainer import Trainer
from tiny import TINY_MODEL

WORLD = 2
STEPS = 10
NAN_AT = 5
PER_RANK_BATCH = 2
GRAD_ACCUM = 2  # so gradients skip the sync on the first micro-batch (DDP no_sync, FSDP set_requires_gradient_sync)
SMALL_MODEL = TINY_MODEL
# fp32 throughout. The runs differ only in the order of floating-point sums: the all-reduce adds two
# half-batch gradients where one process sums the whole batch at once, and the loss is a mean of two
# half-batch means. Measured: 2.4e-7 (one fp32 ulp at a loss of ~3) over 10 steps. The bound leaves room
# for AdamW to amplify such rounding over the steps (it divides by the root of small second moments),
# and is still far below what a rank on the wrong data or a step applied by one rank only does to the
# loss. Per-rank state that must agree (weights, MoE balance biases, the fp16 loss scale) is compared
# across ranks exactly.
LOSS_TOL = 1e-5
# Three faults in a row, each on one rank: an out-of-range batch (no rank may start a forward), a NaN
# loss, a NaN gradient. The third escalates to a rollback.
ROLLBACK_FAULTS = ["bad-batch@2:rank1", "nan-loss@3:rank1", "nan-grad@4:rank0"]
SPAWN_TIMEOUT_S = 120


class RecordingTrainer(Trainer):
    """Records every rank's own view of each step: (step, action, loss)."""

    def __init__(self, *args, **kwargs):
        self.seen: list[tuple[int, str, float]] = []
        super().__init__(*args, **kwargs)

    def _log_step(self, values, verdict):
        self.seen.append((self.step - 1, verdict.action, values["loss"]))
        super()._log_step(values, verdict)


def run_config(data_dir: Path, out: Path, batch_size: int, dist_mode: str = "none", inject=(),
               max_steps: int = STEPS, **train) -> RunConfig:
    train = TrainConfig(max_steps=max_steps, batch_size=batch_size, eval_every=5, save_every=5, eval_batches=2,
                        tensorboard=False, warmup_steps=3, lr=3e-3, sample_tokens=0, dist=dist_mode,
                        **{"grad_accum": GRAD_ACCUM, **train})
    return RunConfig(model=ModelConfig.from_preset("tiny", **SMALL_MODEL),
                     data=DataConfig(source=str(data_dir), tokenizer="char", seq_len=16),
                     train=train, guard=GuardConfig(inject=tuple(inject), max_skips=3), device="cpu", out=str(out))


def train(cfg: RunConfig, resume: bool = False) -> RecordingTrainer:
    trainer = RecordingTrainer(cfg, cfg.out, resume=resume, show_progress=False)
    trainer.result = trainer.train()
    return trainer


def _rank_main(rank: int, port: int, jobs: list[tuple[str, dict]], out_dir: str) -> None:
    """One spawned process: join a gloo group of WORLD, run each job, write what this rank saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, cfg_dict in jobs:
            trainer = train(RunConfig.from_dict(cfg_dict))
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            torch.save(state, Path(out_dir) / f"{name}-rank{rank}.pt")
            record = {"seen": trainer.seen, "status": trainer.result.status, "val_loss": trainer.result.val_loss,
                      "opt_step": trainer.result.opt_step, "loss_scale": trainer.scaler.get_scale()}
            (Path(out_dir) / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def spawn(jobs: list[tuple[str, dict]], out_dir: Path) -> None:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank_main, args=(port, jobs, str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):  # raises with the child's traceback if a rank failed
        if time.monotonic() > deadline:  # a collective that some rank never joined: a hang, not a pass
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process run did not finish within {SPAWN_TIMEOUT_S} s (a deadlock?)")


def train_losses(run_dir: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: float(r[key]) for r in records if r["kind"] == kind}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Single-process references (global batch 4) and the 2-process jobs (2 ranks x batch 2): DDP and
    FSDP with a NaN gradient at step 5 (rank 1 only; everywhere in the reference), an FSDP run whose
    one-rank faults end in a rollback, and a DDP fp16 run with an inf gradient on rank 1."""
    root = tmp_path_factory.mktemp("dist")
    data_dir = root / "data"
    prepare_data(DataConfig(source=str(corpus), tokenizer="char", seq_len=16), data_dir, progress=False)

    started = time.monotonic()
    reference = train(run_config(data_dir, root / "single", WORLD * PER_RANK_BATCH, inject=[f"nan-grad@{NAN_AT}"]))
    single_faults = [f.split(":rank")[0] for f in ROLLBACK_FAULTS]
    train(run_config(data_dir, root / "single-rollback", WORLD * PER_RANK_BATCH, inject=single_faults, max_steps=7,
                     activation_checkpointing=True))
    jobs = [(mode, run_config(data_dir, root / mode, PER_RANK_BATCH, mode, [f"nan-grad@{NAN_AT}:rank1"]).to_dict())
            for mode in ("ddp", "fsdp")]
    jobs.append(("fsdp-rollback", run_config(data_dir, root / "fsdp-rollback", PER_RANK_BATCH, "fsdp", ROLLBACK_FAULTS,
                                             max_steps=7, activation_checkpointing=True).to_dict()))
    jobs.append(("ddp-fp16", run_config(data_dir, root / "ddp-fp16", PER_RANK_BATCH, "ddp", ["inf-grad@3:rank1"],
                                        max_steps=6, precision="fp16").to_dict()))
    spawn(jobs, root)
    print(f"references + {WORLD}-process jobs: {time.monotonic() - started:.1f} s")
    ranks = {mode: [json.loads((root / f"{mode}-rank{r}.json").read_text()) for r in range(WORLD)]
             for mode in ("ddp", "fsdp", "fsdp-rollback", "ddp-fp16")}
    states = {mode: [torch.load(root / f"{mode}-rank{r}.pt") for r in range(WORLD)]
              for mode in ("ddp", "fsdp", "ddp-fp16")}
    return dict(root=root, data_dir=data_dir, reference=reference, ranks=ranks, states=states)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_loss_curve_matches_one_process_with_the_same_global_batch(runs, mode):
    reference = train_losses(runs["root"] / "single")
    distributed = train_losses(runs["root"] / mode)
    assert sorted(distributed) == sorted(reference) == list(range(STEPS))
    finite = [s for s in range(STEPS) if s != NAN_AT]
    diffs = {s: abs(distributed[s] - reference[s]) for s in finite}
    print(f"{mode}: max |loss - single-process loss| over {len(finite)} steps = {max(diffs.values()):.2e}")
    assert max(diffs.values()) < LOSS_TOL, diffs
    # The curve moves (so agreeing with it means something), and eval agrees too.
    assert reference[STEPS - 1] < reference[0] - 0.3
    val_ref = train_losses(runs["root"] / "single", "eval", "val_loss")
    val = train_losses(runs["root"] / mode, "eval", "val_loss")
    assert sorted(val) == sorted(val_ref) == [5, 10]
    assert all(abs(val[s] - val_ref[s]) < LOSS_TOL for s in val)
    # The final weights: the same on both ranks, finite, and close to the single process's.
    ref_state = runs["reference"].model.state_dict()
    rank0, rank1 = runs["states"][mode]
    for name, tensor in ref_state.items():
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.isfinite(rank0[name]).all(), name
    weight_diff = max(float((rank0[name] - tensor).abs().max()) for name, tensor in ref_state.items())
    print(f"{mode}: max |weight - single-process weight| after {STEPS} steps = {weight_diff:.2e}")
    assert weight_diff < 1e-5  # AdamW moves each weight by ~lr = 3e-3 a step; rounding is far below that


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nan_on_rank1_only_is_skipped_on_every_rank(runs, mode):
    for rank, seen in enumerate(runs["ranks"][mode]):
        actions = {step: action for step, action, _ in seen["seen"]}
        assert actions == {s: "skip" if s == NAN_AT else "ok" for s in range(STEPS)}, (rank, actions)
        assert seen["opt_step"] == STEPS - 1 and seen["status"] == "finished"
    events = [json.loads(line) for line in (runs["root"] / mode / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e["kind"] == "event"]
    assert [(e["step"], e["action"], e["cause"]) for e in skips] == [(NAN_AT, "skip", "non-finite gradient")]
    # The bad-batch record names rank 1's injection and the parameter it poisoned.
    meta = json.loads((runs["root"] / mode / "bad_batches" / f"step-{NAN_AT:08d}" / "meta.json").read_text())
    assert meta["injected"] == [f"nan-grad@{NAN_AT}:rank1"] and meta["rank"] == 1
    assert meta["nonfinite_grads"] and meta["nonfinite_grads"][0].startswith("embed")


@pytest.mark.parametrize("mode, resume_mode", [("ddp", "none"), ("fsdp", "none"), ("fsdp", "fsdp")])
def test_two_process_checkpoint_resumes_in_one_process(runs, mode, resume_mode, tmp_path):
    """Resume both the 2-process run and the reference for two more steps in one process (global batch 4;
    `fsdp`: a sharded group of one, loading through set_model/optimizer_state_dict): they continue alike,
    so the full-state checkpoint carried weights, optimizer, guard and data cursor."""
    import shutil

    def resume(src: Path, name: str, dist_mode: str = "none") -> RecordingTrainer:
        run = tmp_path / name
        shutil.copytree(src, run)
        cfg = run_config(runs["data_dir"], run, WORLD * PER_RANK_BATCH, dist_mode, max_steps=STEPS + 2)
        return train(cfg, resume=True)

    ckpt = read_checkpoint(latest_checkpoint(runs["root"] / mode))
    assert ckpt.step == STEPS and ckpt.trainer_state["world_size"] == WORLD
    resumed = resume(runs["root"] / mode, "resumed", resume_mode)
    reference = resume(runs["root"] / "single", "reference")
    assert resumed.result.status == "finished" and resumed.result.step == STEPS + 2
    got, want = train_losses(tmp_path / "resumed"), train_losses(tmp_path / "reference")
    for step in (STEPS, STEPS + 1):
        assert abs(got[step] - want[step]) < LOSS_TOL, (step, got[step], want[step])
    assert resumed.train_loader.state_dict() == reference.train_loader.state_dict()
    assert resumed.guard.state_dict()["n_skips"] == 1


def test_one_process_is_world_size_one_with_no_op_reductions():
    ctx = Distributed.setup("none", torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active) == (0, 1, True, False)
    values, norm = [torch.tensor(2.0)], torch.tensor(float("nan"))
    assert ctx.reduce_step(values, norm) == (values, norm)  # the very same tensors back
    loads = torch.tensor([1.0, 3.0])
    ctx.sum_(loads)
    assert loads.tolist() == [1.0, 3.0] and ctx.all_ok(False) is False and ctx.gather_objects(7) == [7]


def test_rank_selected_faults_parse_and_fire_on_their_rank_only():
    assert str(parse_fault("nan-grad@5:rank1")) == "nan-grad@5:rank1"
    assert parse_fault("inf-act:layers.1.attn@3:rank0").rank == 0 and parse_fault("nan-loss@3").rank is None
    model = torch.nn.Linear(2, 2)
    on_rank0 = FaultInjector(["nan-loss@5:rank1", "nan-grad@5"], model, rank=0, world_size=2)
    on_rank1 = FaultInjector(["nan-loss@5:rank1", "nan-grad@5"], model, rank=1, world_size=2)
    assert on_rank0.active(5) == ["nan-grad@5"] and on_rank1.active(5) == ["nan-loss@5:rank1", "nan-grad@5"]
    assert math.isfinite(float(on_rank0.loss(5, torch.tensor(1.0))))
    assert math.isnan(float(on_rank1.loss(5, torch.tensor(1.0))))
    with pytest.raises(ValueError, match="no rank 2 in a run of 2"):
        FaultInjector(["nan-grad@5:rank2"], model, rank=0, world_size=2)
    for spec, message in [("nan-grad@5:r1", "must be rankN"), ("lr-spike:10@5:rank1", "every rank alike")]:
        with pytest.raises(ValueError, match=message):
            parse_fault(spec)


def test_fsdp_rollback_restores_the_shards_on_every_rank(runs):
    """Skips on alternating ranks escalate to a rollback; each rank restores its own shards of the
    snapshot (DTensors rebuilt from CPU copies) and the run then follows the single-process one."""
    for rank, seen in enumerate(runs["ranks"]["fsdp-rollback"]):
        actions = [action for _, action, _ in seen["seen"]]
        assert actions == ["ok", "ok", "skip", "skip", "rollback", "ok", "ok"], (rank, actions)
    for step, rank, cause in [(2, 1, "bad batch"), (3, 1, "non-finite loss"), (4, 0, "non-finite gradient")]:
        record = runs["root"] / "fsdp-rollback" / "bad_batches" / f"step-{step:08d}" / "meta.json"
        meta = json.loads(record.read_text())
        assert (meta["rank"], meta["injected"]) == (rank, [ROLLBACK_FAULTS[step - 2]]) and cause in meta["cause"], meta
    reference = train_losses(runs["root"] / "single-rollback")
    distributed = train_losses(runs["root"] / "fsdp-rollback")
    for step in (0, 1, 5, 6):
        assert abs(distributed[step] - reference[step]) < LOSS_TOL, (step, distributed[step], reference[step])


def test_fp16_overflow_on_one_rank_backs_off_every_ranks_loss_scale(runs):
    """An inf gradient on rank 1 alone is a GradScaler overflow on both ranks: both halve the scale (from
    the default 2**16), so the replicas keep one loss scale and identical weights."""
    for rank, seen in enumerate(runs["ranks"]["ddp-fp16"]):
        assert [action for _, action, _ in seen["seen"]] == ["ok"] * 3 + ["overflow"] + ["ok"] * 2, rank
        assert seen["loss_scale"] == 2.0 ** 15, rank
    rank0, rank1 = runs["states"]["ddp-fp16"]
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dist_mode_in_one_process_equals_no_dist_exactly(runs, mode, tmp_path):
    """--dist ddp|fsdp without torchrun is a process group of one: the same numbers, bit for bit."""
    plain = train(run_config(runs["data_dir"], tmp_path / "plain", PER_RANK_BATCH, max_steps=4))
    grouped = train(run_config(runs["data_dir"], tmp_path / mode, PER_RANK_BATCH, mode, max_steps=4))
    assert not dist.is_initialized()  # the run started the group, so it also left it
    assert train_losses(tmp_path / mode) == train_losses(tmp_path / "plain")
    assert grouped.dist.mode == "none"  # after training: an ordinary one-process trainer
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(grouped.model.state_dict()[name], tensor), name


def test_a_trainer_that_fails_leaves_the_process_group(runs, tmp_path):
    cfg = run_config(runs["data_dir"], tmp_path / "taken", PER_RANK_BATCH, "ddp", max_steps=2)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run"):  # started the group, then refused --out
        RecordingTrainer(cfg, cfg.out, show_progress=False)
    assert not dist.is_initialized()

    class Failing(RecordingTrainer):
        def train_step(self):
            raise KeyboardInterrupt  # Ctrl-C mid-run

    failing = Failing(run_config(runs["data_dir"], tmp_path / "failing", PER_RANK_BATCH, "ddp"), tmp_path / "failing",
                      show_progress=False)
    assert dist.is_initialized()
    with pytest.raises(KeyboardInterrupt):
        failing.train()
    assert not dist.is_initialized()


@pytest.mark.parametrize("train_fields, message", [
    (dict(optimizer="muon"), "Muon orthogonalises whole matrices"),
    (dict(ema_decay=0.9), "EMA copy is not sharded"),
    (dict(precision="fp16"), "GradScaler"),
    (dict(precision="bf16", fp8=True), "float8"),
    (dict(grad_noise=0.01), "drawn per whole gradient"),
])
def test_what_fsdp_cannot_do_is_refused_with_the_fix(train_fields, message):
    with pytest.raises(ValueError, match=rf"does not work with dist='fsdp'.*{message}.*use --train\."):
        TrainConfig(dist="fsdp", **train_fields)
    assert TrainConfig(dist="ddp", **train_fields).dist == "ddp"  # DDP runs them all


def test_unknown_dist_and_fsdp_with_qk_clip_are_refused():
    with pytest.raises(ValueError, match="dist='zero3': must be one of 'none', 'ddp', 'fsdp'"):
        TrainConfig(dist="zero3")
    with pytest.raises(ValueError, match="QK-clip .* use --train.dist ddp"):
        RunConfig(model=ModelConfig(qk_clip_threshold=50.0), train=TrainConfig(dist="fsdp"))
    assert RunConfig(model=ModelConfig(qk_clip_threshold=50.0), train=TrainConfig(dist="ddp")).train.dist == "ddp"


def test_torchrun_command_line(runs, tmp_path):
    """The documented launch, `torchrun --nproc_per_node=2 -m nanoseek train ...` (torchrun is
    `python -m torch.distributed.run`): without --dist it picks DDP and says so, rank 0 alone prints,
    and every rank exits 0."""
    import subprocess
    import sys

    model = [f"--model.{key.replace('_', '-')}={value}" for key, value in SMALL_MODEL.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoseek",
               "train", "--data", str(runs["data_dir"]), "--data.seq-len=16", "--train.batch-size=2", "--max-steps=3",
               "--device=cpu", "--no-progress", "--train.sample-tokens=8", "--train.no-tensorboard",
               "--out", str(tmp_path / "run"), *model]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes and train.dist='none': using DDP" in done.stdout
    assert done.stdout.count("nanoseek train: preset tiny") == 1 and done.stdout.count("--- sample ---") == 1
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
