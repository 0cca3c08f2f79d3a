"""Distributed training and sharded evaluation on 2 gloo processes on the CPU.

Processes are started with torch.multiprocessing (a free local port) or with torchrun itself; each
rank writes what it ended with to a file and the test process compares: ranks against each other,
and sharded runs against the single-process run.
"""

import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from scoreprior.cli import _log_probs, main
from scoreprior.data import gaussian_field, sample_gaussian
from scoreprior.density import ODEOptions, ScorePrior
from scoreprior.distributed import (
    broadcast_from_rank0, gather_ordered, init_from_env, item_seed, map_sharded, rank_and_world, shard,
)
from scoreprior.nets import UNet
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.checkpoints import load_checkpoint
from scoreprior.training import TrainConfig, dsm_loss, train_score_model
from test_training import FAST, gaussian_vectors, make_mlp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for a worker."""
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world))


def _entry(rank, worker, world, port, args):
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    with init_from_env("cpu") as process:
        assert (process.rank, process.world) == (rank, world)
        worker(process.rank, *args)


def spawn(worker, *args):
    """Run worker(rank, *args) on WORLD gloo processes inside `init_from_env`."""
    mp.spawn(_entry, args=(worker, WORLD, free_port(), args), nprocs=WORLD, join=True)


@pytest.fixture
def one_thread():
    """One intra-op thread here too, as in the workers, so that float reductions run in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _worker(rank, out):
    ends = {"helpers": _helpers_worker(rank), "logp": _logp_worker(rank), **_train_worker(rank, out)}
    torch.save(ends, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(folder, [what rank r ended with for r in 0, 1]) of one 2-process run of every scenario below."""
    out = tmp_path_factory.mktemp("ranks")
    spawn(_worker, out)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("n", [0, 1, 2, 5, 11, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_hold_every_item_once_and_balance(n, world):
    shards = [shard(n, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_helpers_validate_their_arguments():
    with pytest.raises(ValueError, match="n_items"):
        shard(-1, 0, 2)
    with pytest.raises(ValueError, match="world"):
        shard(4, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)
    with pytest.raises(ValueError, match="index"):
        item_seed(0, -1)
    with pytest.raises(ValueError, match="twice"):
        gather_ordered(["a", "b"], [0, 0], 2)
    with pytest.raises(ValueError, match="missing, first \\[1\\]"):
        gather_ordered(["a"], [0], 2)
    with pytest.raises(ValueError, match="outside"):
        gather_ordered(["a"], [3], 2)
    with pytest.raises(ValueError, match="distributed"):
        train_score_model(make_mlp(), VPSDE(), gaussian_vectors(8)[0], TrainConfig(steps=1), distributed=True)


def test_item_seeds_are_distinct_for_a_cpu_generator_and_keep_item_zero():
    assert item_seed(7, 0) == 7
    seeds = [item_seed(7, i) for i in range(10000)]
    assert len({s % 2**32 for s in seeds}) == 10000  # a CPU generator keeps the low 32 bits
    assert all(0 <= s < 2**64 for s in seeds + [item_seed(-1, 3)])
    torch.Generator().manual_seed(item_seed(2**64 - 1, 5))


def test_without_a_process_group_everything_runs_here():
    assert rank_and_world() == (0, 1)
    assert map_sharded(lambda i: i * i, 5) == [0, 1, 4, 9, 16]
    assert map_sharded(str.upper, ["a", "b"], to_all=True) == ["A", "B"]
    assert gather_ordered(["b", "a"], [1, 0], 2) == ["a", "b"]
    assert broadcast_from_rank0(lambda: 3) == 3
    with init_from_env("cpu") as process:  # WORLD_SIZE unset: nothing to initialise
        assert (process.rank, process.world, process.device) == (0, 1, torch.device("cpu"))
        assert not torch.distributed.is_initialized()


def _helpers_worker(rank):
    results = {
        "map": map_sharded(lambda i: (i, rank), 5),
        "map_all": map_sharded(lambda i: (i, rank), 5, to_all=True),
        "fewer_items_than_ranks": map_sharded(lambda x: x + 1, [10], to_all=True),
        "broadcast": broadcast_from_rank0(lambda: f"from {rank}"),
    }
    try:
        gather_ordered([rank], [0], 2)  # both ranks claim item 0
    except ValueError as err:
        results["duplicate"] = str(err)

    def fails():
        raise ValueError("only rank 0 ran this")

    try:
        broadcast_from_rank0(fails)
    except ValueError as err:
        results["broadcast_error"] = str(err)
    return results


def test_map_sharded_gathers_in_order_on_two_ranks(two_ranks):
    r0, r1 = (ends["helpers"] for ends in two_ranks[1])
    assert r0["map"] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)] and r1["map"] is None
    assert r0["map_all"] == r1["map_all"] == r0["map"]
    assert r0["fewer_items_than_ranks"] == r1["fewer_items_than_ranks"] == [11]
    assert r0["broadcast"] == r1["broadcast"] == "from 0"
    assert "item 0 was computed twice" in r0["duplicate"] and "duplicate" not in r1
    assert r0["broadcast_error"] == r1["broadcast_error"] == "only rank 0 ran this"


# -------------------------------------------------------------------------------------------- training

CONFIG = dict(FAST, batch_size=8, warmup=2, seed=0)


def _train_worker(rank, out):
    data, truth = gaussian_vectors(64)
    sde = truth.sde
    ends = {}
    # Each rank starts from other weights: DDP must start everyone from rank 0's.
    whole = make_mlp(seed=rank)
    result = train_score_model(whole, sde, data, TrainConfig(steps=6, **CONFIG), progress=False)
    ends["whole"] = (whole.state_dict(), result.loss_history, result.ema.shadow)

    path = out / "part.pt"
    train_score_model(make_mlp(seed=rank), sde, data, TrainConfig(steps=3, checkpoint_every=2, **CONFIG),
                      checkpoint=path, progress=False)
    resumed = make_mlp(seed=20 + rank)
    result = train_score_model(resumed, sde, data, TrainConfig(steps=6, **CONFIG), checkpoint=path,
                               progress=False)
    ends["resumed"] = (resumed.state_dict(), result.loss_history, result.ema.shadow)

    one = make_mlp()
    result = train_score_model(one, sde, data, TrainConfig(steps=1, **{**CONFIG, "grad_clip": None}),
                               progress=False)
    ends["one_step"] = (one.state_dict(), result.loss_history)

    called_with = set()

    def loss_fn(model, x0, generator):
        called_with.add(type(model).__name__)
        return dsm_loss(model, sde, x0, generator=generator, eps=1e-3)

    hooked = make_mlp()
    result = train_score_model(hooked, sde, data, TrainConfig(steps=2, **CONFIG), loss_fn=loss_fn, progress=False)
    ends["loss_fn"] = (hooked.state_dict(), result.loss_history, called_with)
    return ends


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_ranks_end_with_identical_weights(two_ranks):
    _, (r0, r1) = two_ranks
    for run in ("whole", "resumed", "one_step", "loss_fn"):
        assert_same_tensors(r0[run][0], r1[run][0])
        assert r0[run][1] == r1[run][1]
    assert_same_tensors(r0["whole"][2], r1["whole"][2])
    starts = [next(make_mlp(seed=rank).parameters()) for rank in range(WORLD)]
    assert not torch.equal(*starts)  # the ranks did start from different weights


def test_ddp_passes_the_wrapped_network_to_loss_fn(two_ranks):
    _, ranks = two_ranks
    for ends in ranks:
        assert ends["loss_fn"][2] == {"DistributedDataParallel"}
        assert not torch.equal(ends["loss_fn"][0]["out.weight"], make_mlp().state_dict()["out.weight"])


def test_ddp_resume_equals_the_uninterrupted_run(two_ranks):
    out, ranks = two_ranks
    for ends in ranks:
        assert_same_tensors(ends["whole"][0], ends["resumed"][0])
        assert_same_tensors(ends["whole"][2], ends["resumed"][2])
        assert ends["whole"][1] == ends["resumed"][1]
    checkpoint = load_checkpoint(out / "part.pt")
    assert checkpoint["step"] == 6 and len(checkpoint["loss_history"]) == 6
    states = checkpoint["rank_generators"]
    assert len(states) == WORLD and not torch.equal(states[0], states[1])
    assert torch.equal(checkpoint["generator"], states[0])
    assert sorted(p.name for p in out.iterdir()) == ["part.pt", "rank0.pt", "rank1.pt"]
    data, truth = gaussian_vectors(64)
    with pytest.raises(ValueError, match="written by 2 process"):
        train_score_model(make_mlp(), truth.sde, data, TrainConfig(steps=8, **CONFIG), checkpoint=out / "part.pt",
                          progress=False)


def test_ddp_step_is_a_step_on_the_ranks_batches_together(two_ranks):
    """Rank r draws from item_seed(seed, r); one step equals Adam on the mean of the ranks' losses."""
    _, (r0, _) = two_ranks
    data, truth = gaussian_vectors(64)
    net = make_mlp()
    losses = []
    for rank in range(WORLD):
        g = torch.Generator().manual_seed(item_seed(CONFIG["seed"], rank))
        idx = torch.randint(data.shape[0], (CONFIG["batch_size"],), generator=g)
        losses.append(dsm_loss(net, truth.sde, data[idx], generator=g))
    loss = torch.stack(losses).mean()
    optimizer = torch.optim.Adam(net.parameters(), lr=CONFIG["lr"] / CONFIG["warmup"])
    loss.backward()
    optimizer.step()
    assert r0["one_step"][1] == pytest.approx([loss.item()], rel=1e-6)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(r0["one_step"][0][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_one_process_ddp_is_bitwise_the_plain_run(tmp_path, monkeypatch):
    """Through DDP, world 1: the same draws (item_seed(seed, 0) = seed), the same arithmetic."""
    data, truth = gaussian_vectors(64)
    config = TrainConfig(steps=5, checkpoint_every=2, **CONFIG)
    plain = make_mlp()
    expected = train_score_model(plain, truth.sde, data, config, progress=False)
    for key, value in torchrun_env(0, 1, free_port()).items():
        monkeypatch.setenv(key, value)
    with init_from_env("cpu") as process:
        assert torch.distributed.is_initialized() and process.world == 1
        ddp = make_mlp()
        result = train_score_model(ddp, truth.sde, data, config, checkpoint=tmp_path / "c.pt", progress=False)
    assert not torch.distributed.is_initialized()
    assert_same_tensors(plain.state_dict(), ddp.state_dict())
    assert result.loss_history == expected.loss_history
    assert len(load_checkpoint(tmp_path / "c.pt")["rank_generators"]) == 1


# ------------------------------------------------------------------------------------------ log-density

LOGP_OPTIONS = ODEOptions(divergence="hutchinson", n_probes=2, rtol=1e-4, atol=1e-4)


def gaussian_prior_and_images(n=11):
    sde = VPSDE()
    mean, cov = gaussian_field(4, 4)
    truth = GaussianScore(mean, cov, sde)
    images = sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(0))
    return ScorePrior(truth, sde, t0=1e-3), images


def _logp_worker(rank):
    prior, images = gaussian_prior_and_images()
    return _log_probs(prior, images, batch_size=4, desc=None, seed=3, options=LOGP_OPTIONS)


def test_sharded_log_probs_equal_the_single_process_ones(two_ranks, one_thread):
    # 11 images in batches of 4: batches (4, 4, 3), two on rank 0 and one on rank 1.
    prior, images = gaussian_prior_and_images()
    logp, nfes = _log_probs(prior, images, batch_size=4, desc=None, seed=3, options=LOGP_OPTIONS)
    (logp0, nfes0), (logp1, nfes1) = (ends["logp"] for ends in two_ranks[1])
    assert logp.shape == (11,) and len(nfes) == 3
    assert torch.equal(logp0, logp) and nfes0 == nfes
    assert logp1 is None and nfes1 is None


def test_log_probs_of_one_batch_use_the_seed_itself():
    """Per-batch seeding keeps the probes of a run that fits in one batch: generator seed = item_seed(seed, 0)."""
    prior, images = gaussian_prior_and_images(3)
    logp, _ = _log_probs(prior, images, batch_size=3, desc=None, seed=3, options=LOGP_OPTIONS)
    torch.testing.assert_close(logp, prior.log_prob(images, LOGP_OPTIONS, generator=torch.Generator().manual_seed(3)),
                               rtol=0, atol=0)


def test_logprob_command_under_torchrun_writes_the_single_process_table(tmp_path, one_thread):
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16))
    images = sample_gaussian(*gaussian_field(4, 4), 64, generator=torch.Generator().manual_seed(0)).float()
    ckpt = tmp_path / "prior.pt"
    train_score_model(net, VPSDE(), images, TrainConfig(steps=3, batch_size=8), checkpoint=ckpt, progress=False)
    np.save(tmp_path / "images.npy", images[:11, 0].numpy())
    args = ["logprob", str(ckpt), str(tmp_path / "images.npy"), "--divergence", "hutchinson", "--n-probes", "2",
            "--rtol", "1e-2", "--atol", "1e-2", "--batch-size", "4", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "single.csv")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                          "-m", "scoreprior.cli", *args, "--out", str(tmp_path / "sharded.csv")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1  # rank 0 only
    with (tmp_path / "single.csv").open() as f:
        single = list(csv.DictReader(f))
    assert len(single) == 11
    assert (tmp_path / "sharded.csv").read_text() == (tmp_path / "single.csv").read_text()
