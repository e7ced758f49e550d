"""Several processes (gloo on CPU): DDP and FSDP2 follow the 1-process run's loss curve."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vitkit.pretrained import WEIGHTS_FILE
from vitkit.train import TrainConfig, read_metrics, train
from vitkit.weights import read_state_dict

from test_train import make_shapes, tiny_config

# Same global batch and seed; no augmentation, dropout or mixup, so only the float summation
# order differs between one process and two.
SAME = dict(epochs=2, batch_size=16, augment="none", label_smoothing=0.0, drop_path=0.0, warmup_epochs=0.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=16, val_per_class=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(BaseException):
    pass


def _worker(rank: int, world: int, port: int, config: TrainConfig, stop_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if stop_at is not None:  # both ranks stop before the same step, as a crash of the job would
        import vitkit.train.loop as train_module

        real = train_module.lr_at

        def lr_at(step, **kw):
            if step == stop_at:
                raise _Stop
            return real(step, **kw)

        train_module.lr_at = lr_at
    try:
        train(config)
    except _Stop:
        pass


def _run_two(config: TrainConfig, stop_at: int | None = None) -> None:
    try:
        mp.start_processes(_worker, args=(2, _free_port(), config, stop_at), nprocs=2, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException:
        # A job stopped mid-run stands in for a crash; gloo's threads sometimes abort the process
        # on the way out ("terminate called without an active exception"), as a crash would.
        # What counts is the run directory it leaves, which the tests then check.
        if stop_at is None:
            raise


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]


@pytest.fixture(scope="module")
def single(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(tiny_config(shapes, out, **SAME))
    return out


@pytest.mark.parametrize("fsdp, accum", [(False, 1), (True, 1), (True, 2)], ids=["ddp", "fsdp", "fsdp-grad-accum"])
def test_two_processes_match_one(shapes, tmp_path, single, fsdp, accum):
    # With --grad-accum 2 the global batch of 16 is two micro-batches of 8: the same steps.
    out = tmp_path / "two"
    _run_two(tiny_config(shapes, out, fsdp=fsdp, **{**SAME, "batch_size": 16 // accum, "grad_accum": accum}))
    one, two = _losses(single), _losses(out)
    assert len(one) == len(two) == 6  # 48 images / 16 per step x 2 epochs
    assert two == pytest.approx(one, abs=1e-5)
    a = read_state_dict(single / "last" / WEIGHTS_FILE)
    b = read_state_dict(out / "last" / WEIGHTS_FILE)  # under FSDP gathered from the shards
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    state = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert state["progress"]["step"] == 6 and len(state["optimizer"]["state"]) == len(a)


def test_two_process_run_resumes_in_one_process(shapes, tmp_path, single):
    """The checkpoint holds full (gathered) states keyed by name: any process count resumes it."""
    out = tmp_path / "two"
    _run_two(tiny_config(shapes, out, **SAME), stop_at=4)  # stops after epoch 1 (3 steps) + 1 step
    assert torch.load(out / "last" / "train_state.pt", weights_only=True)["progress"]["step"] == 3
    train(TrainConfig(resume=str(out), progress=False))
    assert _losses(out) == pytest.approx(_losses(single), abs=1e-5)


def test_a_ddp_run_resumes_under_fsdp(shapes, tmp_path, single):
    # Full, unsharded checkpoints: the same run may continue sharded (e.g. on bigger inputs).
    out = tmp_path / "two"
    _run_two(tiny_config(shapes, out, **SAME), stop_at=4)
    _run_two(TrainConfig(resume=str(out), fsdp=True, progress=False))
    assert _losses(out) == pytest.approx(_losses(single), abs=1e-5)
    assert json.loads((out / "config.json").read_text())["fsdp"] is True


def _fp8_worker(rank: int, world: int, port: int, config: TrainConfig, stop_at: int | None, count_to: str) -> None:
    """_worker, counting the FP8 matmuls this rank ran (forward passes through Float8Linear)."""
    from vitkit.fp8 import _Float8Matmul

    real, calls = _Float8Matmul.forward, []

    def forward(ctx, *args):
        calls.append(1)
        return real(ctx, *args)

    _Float8Matmul.forward = staticmethod(forward)
    _worker(rank, world, port, config, stop_at)
    with open(f"{count_to}.{rank}", "w") as f:
        f.write(str(len(calls)))


def test_fp8_training_under_fsdp_follows_one_process(shapes, tmp_path):
    # Each process scales its FP8 casts by its own share's largest value, so the curves agree to
    # FP8 rounding, not to float summation order; ranks with an empty share of the last validation
    # batch still run the forward pass.
    one, two, counts = tmp_path / "one", tmp_path / "two", tmp_path / "fp8-calls"
    train(tiny_config(shapes, one, fp8=True, **SAME))
    config = tiny_config(shapes, two, fp8=True, fsdp=True, **SAME)
    mp.start_processes(_fp8_worker, args=(2, _free_port(), config, None, str(counts)), nprocs=2, join=True,
                       start_method="spawn")
    assert _losses(two) == pytest.approx(_losses(one), abs=0.02)
    assert all(int(open(f"{counts}.{rank}").read()) > 0 for rank in (0, 1))  # FSDP kept the FP8 layers


def _masks_worker(rank: int, world: int, port: int, config: TrainConfig, stop_at: int | None, masks_to: str) -> None:
    """_worker, saving the stochastic-depth masks this rank drew in training (which samples kept)."""
    from vitkit.layers import DropPath

    real, masks = DropPath.forward, []

    def forward(self, x):
        y = real(self, x)
        if self.training and self.p:
            masks.append(y.flatten(1).ne(0).any(1))
        return y

    DropPath.forward = forward
    try:
        _worker(rank, world, port, config, stop_at)
    finally:
        torch.save(masks, f"{masks_to}.{rank}")


def _masks_of_two(config: TrainConfig, masks_to, stop_at: int | None = None) -> list[list]:
    try:
        mp.start_processes(_masks_worker, args=(2, _free_port(), config, stop_at, str(masks_to)), nprocs=2,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException:
        if stop_at is None:  # as in _run_two
            raise
    return [torch.load(f"{masks_to}.{rank}") for rank in range(2)]


def test_ranks_draw_their_own_drop_path_masks_and_resume_them(shapes, tmp_path):
    # depth 2: the first block's drop rate is always 0. Each rank sees other samples, so the
    # same masks on every rank would drop the same positions of the batch in every process.
    config = dict(SAME, drop_path=0.5,
                  model_overrides={**tiny_config(shapes, tmp_path).model_overrides, "depth": 2})
    full = _masks_of_two(tiny_config(shapes, tmp_path / "full", **config), tmp_path / "full_masks")
    assert len(full[0]) == len(full[1]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(*full))
    # Stopped mid-epoch 2 and resumed from the epoch-1 checkpoint, each rank draws on where its
    # own stream left off, not rank 0's.
    out = tmp_path / "run"
    _masks_of_two(tiny_config(shapes, out, **config), tmp_path / "stopped_masks", stop_at=4)
    resumed = _masks_of_two(TrainConfig(resume=str(out), progress=False), tmp_path / "resumed_masks")
    for rank in range(2):
        assert 0 < len(resumed[rank]) < len(full[rank])
        for a, b in zip(resumed[rank], full[rank][-len(resumed[rank]):]):
            assert torch.equal(a, b), f"rank {rank}"


def test_errors_of_other_processes_are_labelled_by_rank(monkeypatch, capsys):
    # An error only one process meets (its shard of the data, its GPU) must be told; the label
    # says which process, and rank 0's line stays plain.
    from vitkit.cli import main

    for rank, prefix in (("1", "vitkit info: error [rank 1]: "), ("0", "vitkit info: error: ")):
        monkeypatch.setenv("RANK", rank)
        assert main(["info", "vit_bsae"]) == 2
        assert capsys.readouterr().err.startswith(prefix)
