"""LoRA under torch.distributed, on CPU: 2 processes, gloo backend.

- DDP: adapters identical on every rank, base bit-for-bit unchanged, only the
  adapter's numbers all-reduced, and the result equal to single-process training
  on the concatenated batch. The adapter is saved by rank 0 and loaded on every rank.
- FSDP2 (fully_shard): a frozen, sharded base; the adapter trained and gathered
  with lora_state_dict as full tensors, equal to the single-process run; merging a
  sharded weight raises a clear error.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import lora_min as L

WORLD = 2
STEPS = 4
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


class TokensConvHead(nn.Module):
    """Every LoRA layer type in one model: an embedding, a 1-d convolution, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.head = nn.Embedding(10, 6), nn.Conv1d(6, 16, 3, padding=1), nn.Linear(16, 3)

    def forward(self, tokens):  # (N, T) -> (N, 3)
        h = torch.relu(self.conv(self.embed(tokens).transpose(1, 2)))  # (N, 16, T)
        return self.head(h.mean(-1))


def make_model(kind="linear"):
    """The same LoRA model on every process: seeded base, A, and a nonzero B."""
    torch.manual_seed(0)
    if kind == "linear":
        model = L.add_lora(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), r=2)
    else:
        model = L.add_lora(TokensConvHead(), r=2, target_modules=["embed", "conv", "head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    return model


def global_batches(kind="linear"):
    g = torch.Generator().manual_seed(123)
    inputs = (lambda: torch.randn(8, 6, generator=g)) if kind == "linear" else (lambda: torch.randint(0, 10, (8, 5), generator=g))
    return [(inputs(), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def train(model, rank=0, world=1, kind="linear"):
    """SGD on the adapter; each rank takes rows rank::world of every global batch."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for x, y in global_batches(kind):
        loss = F.cross_entropy(model(x[rank::world]), y[rank::world])  # equal shards: mean of means = mean
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def single_process_adapter(kind="linear"):
    model = make_model(kind)
    train(model, kind=kind)
    return L.lora_state_dict(model)


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def init(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)


def finish(rank, tmp, name, results):
    """Leave this rank's results where the test collects them, and leave the group."""
    torch.save(results, f"{tmp}/{name}_rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # done: skip the interpreter's teardown, where gloo's threads once aborted a finished worker


def run_workers(worker, tmp_path, name, *args):
    """Run worker(rank, tmp, *args) on WORLD processes; returns each rank's results."""
    mp.spawn(worker, args=(str(tmp_path), *args), nprocs=WORLD)
    return [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]


# --- DDP -------------------------------------------------------------------------------------


def ddp_worker(rank, tmp):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(rank, tmp)
    model = make_model()
    base = base_state(model)
    ddp = DDP(model)
    reduced = []  # numbers all-reduced, per bucket

    def counting_allreduce(state, bucket):
        reduced.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    train(ddp, rank, WORLD)

    # Rank 0 saves the adapter; every rank loads it into a fresh model.
    path = f"{tmp}/adapter.pt"
    if rank == 0:
        L.save_adapter(model, path)
    dist.barrier()
    fresh = L.add_lora(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), r=2)
    fresh.load_state_dict(model.state_dict())  # same base
    with torch.no_grad():
        for _, layer in L.lora_layers(fresh):
            layer.lora_B.zero_()
    L.load_adapter(fresh, path)
    probe = torch.randn(5, 6)
    finish(rank, tmp, "ddp", {
        "lora": L.lora_state_dict(model),
        "base_unchanged": all(torch.equal(v, base[k]) for k, v in base_state(model).items()),
        "reduced_per_step": sum(reduced) / STEPS,
        "adapter_loaded": torch.equal(fresh(probe), model(probe)),
    })


@pytest.mark.slow
def test_ddp_trains_only_the_adapter_and_matches_single_process(tmp_path):
    ranks = run_workers(ddp_worker, tmp_path, "ddp")
    adapter_numel = sum(v.numel() for v in ranks[0]["lora"].values())
    assert adapter_numel == 2 * ((6 + 16) + (16 + 16) + (16 + 3))
    for r in ranks:
        assert r["base_unchanged"] and r["adapter_loaded"]
        assert r["reduced_per_step"] == adapter_numel  # the adapter's gradients, nothing else
        for k, v in r["lora"].items():
            assert torch.equal(v, ranks[0]["lora"][k])  # identical on every rank
    reference = single_process_adapter()
    initial = L.lora_state_dict(make_model())
    for k, v in reference.items():
        assert not torch.equal(v, initial[k])  # training moved it
        torch.testing.assert_close(ranks[0]["lora"][k], v, rtol=1e-5, atol=1e-6)


# --- FSDP2 -------------------------------------------------------------------------------------


def find_fully_shard():
    """FSDP2's fully_shard where it runs on CPU: public in torch.distributed.fsdp since
    torch 2.6. Returns (fully_shard or None, why not)."""
    try:
        from torch.distributed.fsdp import fully_shard
        return fully_shard, ""
    except ImportError:
        pass
    try:  # torch 2.4, 2.5 keep it here, but it creates CUDA streams even for CPU tensors
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        return None, f"torch {torch.__version__} has no FSDP2 (fully_shard)"
    if not torch.cuda.is_available():
        return None, (f"torch {torch.__version__}'s FSDP2 (torch.distributed._composable.fsdp) needs CUDA "
                      "streams; on CPU it runs from torch 2.6")
    return fully_shard, ""


def fsdp_worker(rank, tmp, kind):
    fully_shard, _ = find_fully_shard()
    init(rank, tmp)
    model = make_model(kind)
    base = base_state(model)
    for _, layer in L.lora_layers(model):
        fully_shard(layer)
    fully_shard(model)
    train(model, rank, WORLD, kind)
    adapter = L.lora_state_dict(model)  # a collective: full tensors gathered from the shards
    layer = next(layer for _, layer in L.lora_layers(model))
    try:
        layer.merge()
        merge_error = ""
    except RuntimeError as e:
        merge_error = str(e)
    try:
        L.merge_and_unload(model)
    except RuntimeError as e:
        merge_error += " | " + str(e)
    full_base = {k: v.full_tensor() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = {k: v.clone() for k, v in adapter.items()}
    L.load_lora_state_dict(model, {k: torch.zeros_like(v) for k, v in adapter.items()})  # into the shards
    zeroed = all(torch.count_nonzero(v) == 0 for v in L.lora_state_dict(model).values())
    L.load_lora_state_dict(model, adapter)
    reloaded = all(torch.equal(v, adapter[k]) for k, v in L.lora_state_dict(model).items())
    finish(rank, tmp, "fsdp", {
        "lora": adapter,
        "load_into_shards": zeroed and reloaded,
        "is_plain_tensor": all(type(v) is torch.Tensor for v in adapter.values()),
        "base_unchanged": all(torch.equal(full_base[k], base[k]) for k in base),
        "merge_error": merge_error,
    })


@pytest.mark.slow
@pytest.mark.skipif(find_fully_shard()[0] is None, reason=find_fully_shard()[1])
@pytest.mark.parametrize("kind", ["linear", "embedding, conv and linear"])
def test_fsdp2_sharded_frozen_base_trains_adapter(tmp_path, kind):
    ranks = run_workers(fsdp_worker, tmp_path, "fsdp", kind)
    reference = single_process_adapter(kind)
    for r in ranks:
        assert r["is_plain_tensor"] and r["base_unchanged"] and r["load_into_shards"]
        assert "merge() on sharded" in r["merge_error"] and "merge_and_unload() on sharded" in r["merge_error"]
        assert set(r["lora"]) == set(reference)
        for k, v in reference.items():
            torch.testing.assert_close(r["lora"][k], v, rtol=1e-5, atol=1e-6)


# --- the demo under torchrun ---------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_demo_under_torchrun_matches_single_process(tmp_path):
    import json
    import subprocess
    import sys

    import mnist_demo
    from test_mnist_demo import synthetic_mnist

    data = synthetic_mnist(tmp_path / "data")
    args = ["--data-dir", str(data), "--no-cache", "--quiet", "--lora-steps", "10"]
    single = tmp_path / "single.json"
    assert mnist_demo.main(args + ["--json", str(single)]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "mnist_demo.py", *args, "--json", str(tmp_path / "ddp.json")],
                          capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Proofs:") == 1  # only rank 0 prints
    ddp, one = json.loads((tmp_path / "ddp.json").read_text()), json.loads(single.read_text())
    assert ddp["processes"] == 2 and all(ddp["proofs"].values())
    assert ddp["ddp_allreduced_numbers_per_step"] == {"pretraining": 2_807_010, "fine-tuning": 6_794}
    for state in mnist_demo.STATES:  # the same global batches: the same result, up to float rounding
        assert abs(ddp["results"][state]["accuracy"] - one["results"][state]["accuracy"]) <= 0.03
