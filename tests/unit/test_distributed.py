"""torchrun DDP on CPU (gloo, 2 processes): gradients match a single process, and a real
two-process training run completes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from model.config import ModelConfig
from model.discriminator import Discriminator
from model.reenactor import Reenactor
from training.distributed import DistInfo, average_gradients
from training.synthetic import SynthConfig, generate

pytestmark = pytest.mark.slow
CFG = ModelConfig.preset("tiny-64", num_labels=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.rand(4, 2, 3, 64, 64, generator=g),
        torch.rand(4, 3, 64, 64, generator=g),
        torch.tensor([0, 1, 1, 0]),
    )


def models() -> tuple[Reenactor, Discriminator]:
    torch.manual_seed(0)
    net, disc = Reenactor(CFG), Discriminator(CFG)
    net.pose_encoder.eval()  # no dropout: both sides must draw the same masks
    return net, disc


def step_grads(net: torch.nn.Module, disc: Discriminator, part: slice) -> dict[str, torch.Tensor]:
    ids, drivers, labels = make_batch()
    out = net(ids[part], drivers[part])
    disc(out.masked_rgb, labels[part]).score.mean().backward()
    return {
        **{f"g.{k}": p.grad.clone() for k, p in net.named_parameters()},
        **{f"d.{k}": p.grad.clone() for k, p in disc.named_parameters()},
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    net, disc = models()
    ddp = DistributedDataParallel(net)
    grads = step_grads(ddp, disc, slice(2 * rank, 2 * rank + 2))
    average_gradients(disc, DistInfo(rank, 2, rank))
    grads.update({f"d.{k}": p.grad.clone() for k, p in disc.named_parameters()})
    grads = {k.replace("g.module.", "g."): v for k, v in grads.items()}
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_two_process_gradients_match_single_process(tmp_path: Path) -> None:
    """DDP averages per-rank gradients; BatchNorm sees each rank's half, so the reference
    is the mean of single-process gradients over the same two halves."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    halves, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: same kernels, same rounding
    for part in (slice(0, 2), slice(2, 4)):
        net, disc = models()
        halves.append(step_grads(net, disc, part))
    torch.set_num_threads(threads)
    for key, value in ddp.items():
        expected = (halves[0][key] + halves[1][key]) / 2
        torch.testing.assert_close(
            value, expected, rtol=1e-3, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_torchrun_training_run(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    generate(SynthConfig(out=data, identities=4, clips=1, frames=4, size=64, seed=2))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "training.train",
        f"data.root={data}", "data.k=2", f"run_dir={tmp_path / 'run'}", "steps=2",
        "batch_size=1", "losses.vgg19=0", "losses.vggface=0", "log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "last.safetensors").exists()
