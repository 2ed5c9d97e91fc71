"""A reversible chain under DistributedDataParallel and FSDP2 (gloo, 2 CPU processes) and torch.compile.

The distributed tests share two spawned processes; every rank builds the same model from one seed, runs
its half of a global batch, and compares its synchronised gradients (DTensor shards gathered) with
those of single-process plain autograd on the whole batch (fp64, 1e-10). The nets hold no BatchNorm:
its statistics would be per rank, and the gradients would legitimately differ.

FSDP2 is tested sharded as large models are, block by block (``fully_shard`` on each block, the
chain and the model; ``reshard_after_forward`` True and False; sub-networks sharded inside blocks),
over two optimizer steps; with dropout against plain autograd under the same FSDP2; with gradient
accumulation (``set_requires_gradient_sync``); with a check that fails on one rank only (the ranks
correct, or raise, together); the chain run as its inverse; and an unsupported option refused.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import TOL, assert_rel_close, plain_chain, rel_error
from torch import nn

import revgrad

WORLD = 2
GLOBAL_BATCH = 8
CHANNELS = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_net(c: int, dropout: float = 0.0) -> nn.Module:
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Conv2d(c, 6, 3, padding=1), nn.Tanh(), *drop, nn.Conv2d(6, c, 3, padding=1))


def make_chain(check: str = "correct", seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """4 additive couplings of small conv nets and one affine coupling, fp64, BatchNorm-free."""
    torch.manual_seed(seed)
    half = CHANNELS // 2
    blocks: list[nn.Module] = [
        revgrad.AdditiveCoupling(small_net(half, dropout), small_net(half, dropout)) for _ in range(4)
    ]
    blocks.insert(2, revgrad.AffineCoupling(nn.Conv2d(half, 2 * half, 3, padding=1), "bounded"))
    return revgrad.reversible(blocks, check=check).double()


class Model(nn.Module):
    """A stem, the reversible chain, a head: the chain runs inside an ordinary model."""

    def __init__(self, check: str = "correct", seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.chain = make_chain(check, seed, dropout)
        torch.manual_seed(seed + 100)
        self.stem = nn.Conv2d(2, CHANNELS, 1).double()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(CHANNELS * 16, 3)).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logdet = self.chain(self.stem(x))
        return self.head(h), logdet


class PlainModel(Model):
    """The same model run with plain autograd (the chain's blocks called in order): the reference."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logdet = plain_chain(list(self.chain), self.stem(x))
        return self.head(h), logdet


def make_model(check: str = "correct", seed: int = 0) -> Model:
    return Model(check, seed)


class Drifting(nn.Module):
    """A per-channel affine map whose inverse is off by ``drift`` (relative). Set on one rank only, that
    rank's rebuilt input fails its check while the other rank's passes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(c, 1, 1))
        self.shift = nn.Parameter(0.1 * torch.randn(c, 1, 1))
        self.drift = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = self.log_scale.sum() * x[0, 0].numel()
        return x * self.log_scale.exp() + self.shift, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) * (-self.log_scale).exp() * (1.0 + self.drift)


def make_drift_chain(check: str) -> nn.Module:
    """6 blocks, anchors at 0 and 3 (check="correct"): correcting block 2 (Drifting, a two-step block)
    runs blocks 0 and 1 again, which FSDP2 must all-gather on every rank."""
    torch.manual_seed(7)
    half = CHANNELS // 2
    blocks: list[nn.Module] = [revgrad.AdditiveCoupling(small_net(half), small_net(half)) for _ in range(5)]
    blocks.insert(2, Drifting(CHANNELS))
    blocks[4] = revgrad.AffineCoupling(nn.Conv2d(half, 2 * half, 3, padding=1), "bounded")
    return revgrad.reversible(blocks, check=check).double()


def chain_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randn(GLOBAL_BATCH, CHANNELS, 4, 4, generator=g, dtype=torch.float64)


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


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a DTensor (a collective: every rank gathers the same tensors in the same order)."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def train_two_steps(model: nn.Module, batch: torch.Tensor, seed: int | None = None) -> dict[str, dict]:
    """Two steps of SGD with momentum on ``batch``: the gradients of each step and the parameters after
    the first, as whole tensors by name. ``seed`` seeds each step's random numbers (dropout)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    got: dict[str, dict] = {}
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed + step)
        mean_loss(model(batch)).backward()
        got[f"grad{step}"] = {n: _full(p.grad) for n, p in model.named_parameters()}
        if step == 1:
            opt.step()
            got["param1"] = {n: _full(p.detach()) for n, p in model.named_parameters()}
    return got


def reference_steps() -> dict[str, dict]:
    """Single-process plain autograd on the global batch, two steps (every check gives these)."""
    return train_two_steps(PlainModel(), global_batch())


def _compare(got: dict[str, dict], expected: dict[str, dict]) -> dict[str, float]:
    return {
        f"{kind} {name}": float("nan") if t is None else rel_error(t, expected[kind][name])
        for kind, tensors in got.items() for name, t in tensors.items()
    }


def _plain_grads(model: nn.Module, loss) -> dict[str, torch.Tensor]:
    loss(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A collective that one rank misses (ranks that disagree on a correction) fails instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


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


def _shard_blocks(model: Model, reshard: bool = True, nested: bool = False, **options) -> None:
    """As large models are sharded: each block (and, ``nested``, its sub-networks first), the chain,
    the model."""
    from torch.distributed.fsdp import fully_shard

    for block in model.chain:
        if nested:
            for sub in block.children():
                fully_shard(sub, reshard_after_forward=reshard, **options)
        fully_shard(block, reshard_after_forward=reshard, **options)
    fully_shard(model.chain, reshard_after_forward=reshard)
    fully_shard(model)


def _fsdp2_blocks(rank: int, ref: dict, reshard: bool, check: str, nested: bool = False) -> dict:
    model = Model(check)
    _shard_blocks(model, reshard, nested)
    got = train_two_steps(model, _local_batch(rank))
    report = model.chain.last_report
    assert report is not None and report.check == check
    return {"errors": _compare(got, ref["steps"]), "evaluations": report.evaluations}


def _fsdp2_dropout(rank: int) -> dict:
    """revgrad and plain autograd under the same per-block FSDP2, same seeds: the same dropout masks."""
    got = {}
    for cls in (Model, PlainModel):
        model = cls("correct", dropout=0.3)
        _shard_blocks(model)
        got[cls] = train_two_steps(model, _local_batch(rank), seed=1000 + rank)
    return {"errors": _compare(got[Model], got[PlainModel])}


def _fsdp2_accumulate(rank: int, steps: dict[str, dict]) -> dict:
    """Two micro-batches, the first without gradient sync (and without resharding after backward, so
    the second call finds the blocks' parameters unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    model = Model("correct")
    _shard_blocks(model)
    model.set_reshard_after_backward(False)
    micro = _local_batch(rank).chunk(2)
    for k, batch in enumerate(micro):
        model.set_requires_gradient_sync(k == len(micro) - 1)
        (mean_loss(model(batch)) / len(micro)).backward()
    for module in model.modules():  # register the sharded parameters (which hold the gradients) again
        if isinstance(module, FSDPModule):
            module.reshard()
    return {"errors": _errors(model, steps["grad1"])}


def _fsdp2_one_rank_drifts(rank: int, check: str, expected: dict[str, torch.Tensor]) -> dict:
    from torch.distributed.fsdp import fully_shard

    chain = make_drift_chain(check)
    chain[2].drift = 1e-6 if rank == 0 else 0.0  # float64 tolerance 1e-9: rank 0's check fails
    for block in chain:
        fully_shard(block)
    fully_shard(chain)
    try:
        mean_loss(chain(chain_batch().chunk(WORLD)[rank])).backward()
    except revgrad.ReconstructionError as exc:
        return {"raised": str(exc)}
    return {"errors": _errors(chain, expected), "corrected": chain.last_report.corrected}


def _inverse_loss(x: torch.Tensor) -> torch.Tensor:
    return x.square().flatten(1).sum(1).mean()


def _plain_inverse(chain: nn.Module, z: torch.Tensor) -> torch.Tensor:
    for block in reversed(list(chain)):
        z = block.inverse(z)
    return z


def _fsdp2_inverse(rank: int, expected: dict[str, torch.Tensor]) -> dict:
    """The chain run as its inverse (``block.inverse`` in forward, which FSDP2's hooks do not see)."""
    from torch.distributed.fsdp import fully_shard

    chain = make_chain("correct")
    for block in chain:
        fully_shard(block)
    _inverse_loss(chain.inverse(chain_batch().chunk(WORLD)[rank])).backward()
    return {"errors": _errors(chain, expected)}


def _fsdp2_refused(rank: int) -> str:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = Model("correct")
    _shard_blocks(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    try:
        model(_local_batch(rank))
    except revgrad.BlockError as exc:
        return str(exc)
    return "no error"


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
    **{
        f"fsdp2-blocks-{'reshard' if reshard else 'keep'}-{check}": functools.partial(
            _fsdp2_blocks, reshard=reshard, check=check
        )
        for reshard in (True, False) for check in ("correct", "off")
    },
    "fsdp2-blocks-nested": functools.partial(_fsdp2_blocks, reshard=True, check="correct", nested=True),
    "fsdp2-blocks-dropout": lambda rank, ref: _fsdp2_dropout(rank),
    "fsdp2-blocks-accumulate": lambda rank, ref: _fsdp2_accumulate(rank, ref["steps"]),
    "fsdp2-blocks-one-rank-corrects": lambda rank, ref: _fsdp2_one_rank_drifts(rank, "correct", ref["drift"]),
    "fsdp2-blocks-one-rank-detects": lambda rank, ref: _fsdp2_one_rank_drifts(rank, "detect", ref["drift"]),
    "fsdp2-blocks-inverse": lambda rank, ref: _fsdp2_inverse(rank, ref["inverse"]),
    "fsdp2-blocks-refused": lambda rank, ref: _fsdp2_refused(rank),
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    results: dict[str, object] = {}
    try:
        ref = {check: reference_grads(check) for check in ("off", "detect", "correct")}
        ref["steps"] = reference_steps()
        x = chain_batch()
        ref["drift"] = _plain_grads(make_drift_chain("correct"), lambda m: mean_loss(plain_chain(list(m), x)))
        ref["inverse"] = _plain_grads(make_chain("correct"), lambda m: _inverse_loss(_plain_inverse(m, x)))
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


def _results(distributed_results, name: str) -> list:
    results, _ = distributed_results
    return [per_rank[name] for per_rank in results]


def _assert_scenario(distributed_results, name: str) -> None:
    results, _ = distributed_results
    for rank, per_rank in enumerate(results):
        errors = per_rank[name]
        assert isinstance(errors, dict), f"rank {rank}: {name} failed: {errors}"
        errors = errors.get("errors", errors)
        assert errors, f"rank {rank}: {name}: no parameters"
        bad = {n: e for n, e in errors.items() if not e <= TOL[torch.float64]}  # NaN: missing gradient
        assert not bad, f"rank {rank}: {name}: gradients differ from the single-process full batch: {bad}"


@pytest.mark.parametrize("check", ["off", "detect", "correct"])
def test_ddp_gradients_equal_single_process_full_batch(distributed_results, check):
    _assert_scenario(distributed_results, f"ddp-{check}")


@pytest.mark.parametrize("where", ["root", "chain"])
def test_fsdp2_gradients_equal_single_process_full_batch(distributed_results, where):
    """``fully_shard`` on the whole model, or on the ReversibleSequential and the model."""
    _assert_scenario(distributed_results, f"fsdp2-{where}")


@pytest.mark.parametrize("check", ["correct", "off"])
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fsdp2_per_block_two_steps_equal_single_process(distributed_results, reshard, check):
    """``fully_shard`` on every block, the chain and the model, as large models are sharded: the
    engine unshards each block around its evaluations in backward (inverse, fused VJP, probes) and
    hands the gradients to FSDP2's reduce-scatter. Every rank's gathered gradients of both steps and
    its parameters after the optimizer step equal single-process plain autograd on the global batch;
    the couplings keep their fused one-evaluation backward (FSDP2's own hooks do not count as hooks)."""
    name = f"fsdp2-blocks-{'reshard' if reshard else 'keep'}-{check}"
    _assert_scenario(distributed_results, name)
    for rank, result in enumerate(_results(distributed_results, name)):
        assert result["evaluations"] == 5, f"rank {rank}: {result['evaluations']} evaluations for 5 fused blocks"


def test_fsdp2_sub_networks_sharded_inside_blocks(distributed_results):
    """``fully_shard`` on the couplings' sub-networks, then on the blocks: every FSDP2 state inside a
    block is driven by the block's step."""
    _assert_scenario(distributed_results, "fsdp2-blocks-nested")


def test_fsdp2_per_block_dropout_equals_plain_autograd_under_fsdp2(distributed_results):
    """With dropout, each rank's revgrad gradients and parameters equal plain autograd's under the same
    per-block FSDP2 and seeds (the masks are per rank, so the single-process run is no reference)."""
    _assert_scenario(distributed_results, "fsdp2-blocks-dropout")


def test_fsdp2_per_block_gradient_accumulation_without_sync(distributed_results):
    """``set_requires_gradient_sync(False)`` on a first micro-batch: its gradients wait unsharded and
    are reduce-scattered with the second's."""
    _assert_scenario(distributed_results, "fsdp2-blocks-accumulate")


def test_fsdp2_ranks_correct_together(distributed_results):
    """Only rank 0's rebuild of block 2 fails its check; the correction all-gathers blocks 0 and 1, so
    both ranks correct (the decision is agreed): no collective mismatch, exact gradients."""
    _assert_scenario(distributed_results, "fsdp2-blocks-one-rank-corrects")
    for rank, result in enumerate(_results(distributed_results, "fsdp2-blocks-one-rank-corrects")):
        assert 2 in result["corrected"], f"rank {rank}: corrected {result['corrected']}"


def test_fsdp2_ranks_raise_together_with_detect(distributed_results):
    """With ``check="detect"`` every rank raises (rank 1 names the other rank's failure): none is left
    waiting in a collective."""
    results = _results(distributed_results, "fsdp2-blocks-one-rank-detects")
    for rank, result in enumerate(results):
        assert "raised" in result, f"rank {rank}: no ReconstructionError: {result}"
        assert "block 2 (FSDPDrifting)" in result["raised"], result["raised"]
    assert "another rank" not in results[0]["raised"] and "another rank" in results[1]["raised"]


def test_fsdp2_per_block_chain_run_as_its_inverse(distributed_results):
    """``chain.inverse(z)`` calls ``block.inverse`` in forward, wrapped in the blocks' FSDP2 hooks."""
    _assert_scenario(distributed_results, "fsdp2-blocks-inverse")


def test_fsdp2_unsupported_option_is_refused_clearly(distributed_results):
    for rank, message in enumerate(_results(distributed_results, "fsdp2-blocks-refused")):
        assert "MixedPrecisionPolicy(param_dtype=torch.float32)" in message, f"rank {rank}: {message}"
        assert "block 0 (FSDPAdditiveCoupling)" in message, message


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
