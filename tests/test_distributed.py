"""A reversible chain under DistributedDataParallel and FSDP2 (gloo, 2 CPU processes) and torch.compile.

Each distributed test spawns two processes; every rank builds the same model from one seed, runs one
step on its half of a global batch, and compares its synchronised gradients with those of a
single-process step on the whole batch (fp64, 1e-10). The nets hold no BatchNorm: its statistics
would be per rank, and the gradients would legitimately differ.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import TOL, assert_rel_close, rel_error
from torch import nn

import revgrad

WORLD = 2
GLOBAL_BATCH = 8
CHANNELS = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_net(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, c, 3, padding=1))


def make_chain(check: str = "correct", seed: int = 0) -> nn.Module:
    """4 additive couplings of small conv nets and one affine coupling, fp64, BatchNorm-free."""
    torch.manual_seed(seed)
    half = CHANNELS // 2
    blocks: list[nn.Module] = [revgrad.AdditiveCoupling(small_net(half), small_net(half)) for _ in range(4)]
    blocks.insert(2, revgrad.AffineCoupling(nn.Conv2d(half, 2 * half, 3, padding=1), "bounded"))
    return revgrad.reversible(blocks, check=check).double()


class Model(nn.Module):
    """A stem, the reversible chain, a head: the chain runs inside an ordinary model."""

    def __init__(self, check: str = "correct", seed: int = 0) -> None:
        super().__init__()
        self.chain = make_chain(check, seed)
        torch.manual_seed(seed + 100)
        self.stem = nn.Conv2d(2, CHANNELS, 1).double()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 16, 3)).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logdet = self.chain(self.stem(x))
        return self.head(h), logdet


def make_model(check: str = "correct", seed: int = 0) -> Model:
    return Model(check, seed)


def global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g, dtype=torch.float64)


def mean_loss(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A per-sample loss averaged over the (local) batch, so DDP's averaging gives the global mean."""
    y, logdet = out
    w = torch.linspace(-1.0, 2.0, y[0].numel(), dtype=y.dtype).reshape(y.shape[1:])
    per_sample = (y * w).flatten(1).sum(1) + 0.5 * y.square().flatten(1).sum(1) - 0.3 * logdet
    return per_sample.mean()


def reference_grads(check: str) -> dict[str, torch.Tensor]:
    model = make_model(check)
    mean_loss(model(global_batch())).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _local_batch(rank: int) -> torch.Tensor:
    return global_batch().chunk(WORLD)[rank]


def _errors(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every parameter gradient (full tensors; DTensor shards are gathered)."""
    errors = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()  # a collective: every rank walks the same parameters in the same order
        errors[name] = float("nan") if g is None else rel_error(g, expected[name])
    return errors


def _ddp(check: str, rank: int, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    model = make_model(check)
    ddp = nn.parallel.DistributedDataParallel(model)
    mean_loss(ddp(_local_batch(rank))).backward()
    report = model.chain.last_report
    assert report is not None and report.check == check
    return _errors(model, expected)


def _fsdp2(where: str, rank: int, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    from torch.distributed.fsdp import fully_shard

    model = make_model("correct")
    if where == "chain":
        fully_shard(model.chain)
    fully_shard(model)
    mean_loss(model(_local_batch(rank))).backward()
    return _errors(model, expected)


def _local_only(rank: int, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """The control: the same step on the half batch without synchronisation."""
    model = make_model("correct")
    mean_loss(model(_local_batch(rank))).backward()
    return _errors(model, expected)


SCENARIOS = {
    "local-only": lambda rank, ref: _local_only(rank, ref["correct"]),
    "ddp-off": lambda rank, ref: _ddp("off", rank, ref["off"]),
    "ddp-detect": lambda rank, ref: _ddp("detect", rank, ref["detect"]),
    "ddp-correct": lambda rank, ref: _ddp("correct", rank, ref["correct"]),
    "fsdp2-root": lambda rank, ref: _fsdp2("root", rank, ref["correct"]),
    "fsdp2-chain": lambda rank, ref: _fsdp2("chain", rank, ref["correct"]),
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    results: dict[str, object] = {}
    try:
        ref = {check: reference_grads(check) for check in ("off", "detect", "correct")}
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank, ref)
            except Exception as exc:  # reported per scenario by the tests below
                results[name] = f"{type(exc).__name__}: {exc}"
            dist.barrier()
    finally:
        dist.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> tuple[list[dict[str, object]], float]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("distributed")
    start = time.perf_counter()
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    elapsed = time.perf_counter() - start
    results = []
    for rank in range(WORLD):
        with open(out_dir / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results, elapsed


def _assert_scenario(distributed_results, name: str) -> None:
    results, _ = distributed_results
    for rank, per_rank in enumerate(results):
        errors = per_rank[name]
        assert isinstance(errors, dict), f"rank {rank}: {name} failed: {errors}"
        assert errors, f"rank {rank}: {name}: no parameters"
        bad = {n: e for n, e in errors.items() if not e <= TOL[torch.float64]}  # NaN: missing gradient
        assert not bad, f"rank {rank}: {name}: gradients differ from the single-process full batch: {bad}"


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
def test_ddp_gradients_equal_single_process_full_batch(distributed_results, check):
    _assert_scenario(distributed_results, f"ddp-{check}")


@pytest.mark.parametrize("where", ["root", "chain"])
def test_fsdp2_gradients_equal_single_process_full_batch(distributed_results, where):
    """``fully_shard`` on the whole model, or on the ReversibleSequential and the model.

    Sharding each block separately is not supported: the engine calls ``block.inverse`` in backward,
    which FSDP2's hooks do not see (its parameters are still sharded DTensors).
    """
    _assert_scenario(distributed_results, f"fsdp2-{where}")


def test_unsynchronised_half_batch_gradients_differ(distributed_results):
    """The comparison is sensitive: without DDP, each rank's half-batch gradients are not the global ones."""
    results, _ = distributed_results
    for rank, per_rank in enumerate(results):
        errors = per_rank["local-only"]
        assert isinstance(errors, dict), f"rank {rank}: {errors}"
        assert max(errors.values()) > 1e-3


# -- torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_matches_eager(backend):
    """A model holding a reversible chain compiles (with graph breaks around the engine) and gives
    eager's values and gradients, over two steps (the second reuses the compiled graphs)."""
    torch._dynamo.reset()
    eager = make_model("correct")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend)
    x = global_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's notes on lru_cache in the fingerprint code
        for _ in range(2):
            eager.zero_grad()
            model.zero_grad()
            out_ref = eager(x)
            mean_loss(out_ref).backward()
            out = compiled(x)
            mean_loss(out).backward()
            assert_rel_close(out[0], out_ref[0], name="output")
            assert_rel_close(out[1], out_ref[1], name="logdet")
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                assert_rel_close(p.grad, q.grad, name=name)
    assert model.chain.last_report is not None  # the engine ran (not plain autograd)
    torch._dynamo.reset()
