"""Faults a long run meets on a cluster: a corrupt newest checkpoint, a rank that dies, a restart
with another number of ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from look.engine.trainer import pretrain
from tests.ddp import free_port

from .test_trainer import TINY, tiny_config, train_losses


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    pretrain(tiny_config(), tmp_path / "full")
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=5"), run)  # checkpoints at steps 4 and 5
    newest = run / "checkpoints" / "ckpt-000000005.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write
    with pytest.warns(RuntimeWarning, match="ckpt-000000005.pt"):
        pretrain(tiny_config(), run)
    assert train_losses(run) == train_losses(tmp_path / "full")


def _torchrun(run_dir: Path, nproc: int, *extra: str) -> subprocess.Popen[bytes]:
    overrides = [o for o in TINY if not o.startswith("data.synthetic_num_samples")]
    overrides += ["data.synthetic_num_samples=960", "train.ddp_timeout_s=30", *extra]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "look",
        "pretrain",
        "--output",
        str(run_dir),
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.ddp
def test_dead_rank_stops_the_job_and_it_resumes_with_fewer_ranks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _torchrun(run, 2)
    manifest = run / "checkpoints" / "checkpoints.json"
    deadline = time.time() + 180
    while not manifest.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, job.stdout.read().decode()  # type: ignore[union-attr]
    workers = _children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    output = job.communicate(timeout=120)[0].decode()
    assert job.returncode != 0, output
    assert time.time() - start < 90, "the surviving rank must not hang"
    # Resume the same run directory with one process: the global batch is unchanged, the sampler
    # re-shards the rest of the epoch, and the memory bank is restored from the checkpoint.
    resumed = _torchrun(run, 1)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resuming" in output
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, max(losses) + 1))


def test_a_checkpoint_with_rank_0s_random_state_only_still_resumes(tmp_path: Path) -> None:
    # Checkpoints written before every rank's state was kept hold "rng" (rank 0's) alone.
    from look.engine.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    pretrain(tiny_config(), tmp_path / "full")
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=5"), run)
    state = load_checkpoint(checkpoint_path(run / "checkpoints", 5))
    (state["rng"],) = state.pop("rng_per_rank")
    save_checkpoint(run / "checkpoints", 5, state)
    pretrain(tiny_config(), run)
    assert train_losses(run) == train_losses(tmp_path / "full")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM"])
def test_a_signal_to_torchrun_stops_every_rank_at_one_checkpointed_step(
    tmp_path: Path, name: str
) -> None:
    # torchrun passes a SIGTERM on to its workers (and SIGKILLs them 30 s later): each worker
    # finishes the step, the ranks agree on it, rank 0 saves it and each exits with status 75.
    # (Not SIGUSR1: torchrun dies of it, and in this test with TORCHELASTIC_SIGNALS_TO_HANDLE
    # naming it the workers did not stop either.)
    run = tmp_path / "run"
    job = _torchrun(run, 2, "optim.epochs=100", "train.checkpoint_every_steps=1000")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while (
        time.time() < deadline
        and job.poll() is None
        and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
    ):
        time.sleep(0.05)
    assert job.poll() is None, job.stdout.read().decode()  # type: ignore[union-attr]
    started = time.time()
    os.kill(job.pid, getattr(signal, name))
    output = job.communicate(timeout=120)[0].decode()
    assert time.time() - started < 25, "the workers must stop before torchrun kills them"
    assert job.returncode != 0, output  # torchrun itself ends with its SignalException
    stopped = [line for line in output.splitlines() if "stopped on" in line]
    assert len(stopped) == 1 and f"stopped on {name} at step" in stopped[0], output
    step = int(stopped[0].split(" at step ")[1].split()[0])
    assert max((run / "checkpoints").glob("ckpt-*.pt")).name == f"ckpt-{step:09d}.pt"
    assert max(train_losses(run)) == step
