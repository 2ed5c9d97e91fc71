"""``ReversibleSequential`` and ``revgrad.reversible``: the public way into the engine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from .anchors import AdaptiveAnchors
from .arguments import NO_ARGS, CallArgs
from .backprop import CheckMode, EngineConfig, _InverseWithLogdet, _is_int, _plain, run_chain, run_plain
from .graph_budget import GraphBudget
from .protocol import BlockError, is_block, require_blocks, split_output
from .report import BackwardReport
from .sensitivity import DEFAULT_PROBE_EVERY, Sensitivity

__all__ = ["DEFAULT_CHECK", "PlainSequential", "ReversibleSequential", "last_reports", "reversible"]

DEFAULT_CHECK: CheckMode = "correct"


def _validated(
    check, tol, anchor_every, preserve_rng_state, warn, adaptive_budget, release_after, graph_budget=0,
    probe_every=DEFAULT_PROBE_EVERY,
) -> EngineConfig:
    config = EngineConfig(check, tol, anchor_every, preserve_rng_state, warn, graph_budget, probe_every)
    if not _is_int(release_after) or release_after < 1:
        raise ValueError(f"revgrad: release_after must be a positive integer, got {release_after!r}")
    if adaptive_budget is not None and (not _is_int(adaptive_budget) or adaptive_budget < 0):
        raise ValueError(f"revgrad: adaptive_budget must be None or a number of bytes >= 0, got {adaptive_budget!r}")
    return config


class ReversibleSequential(nn.Sequential):
    """An ``nn.Sequential`` whose runs of consecutive blocks train with memory-saving backprop.

    Children keep their names (``"0"``, ``"1"``, ...), so parameters, ``state_dict`` keys and
    indexing are exactly those of the ``nn.Sequential`` it replaces. A child that is not a block
    (a downsampling layer between RevNet stages) runs with plain autograd between the runs.

    Args:
        *modules: the children, in order.
        check: ``"correct"`` (default): rebuilt inputs are checked against fingerprints and replaced
            by exact recomputations from anchors when they drifted; ``"detect"``: a drifted input
            raises :class:`revgrad.ReconstructionError`; ``"off"``: classic reversible backprop.
        tol: relative reconstruction error allowed (``None``: a default per compute dtype).
        anchor_every: ``None`` (default): forward stores only the chain's input; a correction lays
            anchors every ``ceil(sqrt(N))`` blocks as it recomputes. ``k``: forward stores every k-th
            block input (``"correct"`` only): memory held for cheaper corrections.
        preserve_rng_state: replay random numbers (dropout) exactly in backward.
        warn: warn and log on each correction.
        adaptive_budget: bytes that adaptive and drift anchors may hold together (``None``: twice
            what the regular anchors would); ``0`` disables both.
        release_after: clean steps after which an adaptive anchor is released (its rebuild is
            measured every ``release_after // 10`` steps); uses after which a drift anchor is (one at
            a time).
        graph_budget: bytes of autograd graphs the last blocks may hold instead of being recomputed
            in backward (faster; measured per block in backward, kept from the next step on; see
            :mod:`revgrad.engine.graph_budget`). 0 (default): every block is reversible.
        probe_every: gradient-aware checks (``check != "off"``): in the first backward and then every
            ``probe_every`` backward passes (twice as late after each probe that found the chain stable,
            up to ``8 * probe_every``), measure how much each block's VJP moves with the activation
            it is computed from, and tighten that activation's tolerance to ``tol / sensitivity``
            (:mod:`revgrad.engine.sensitivity`). 0: activations are checked against ``tol`` only.

    Shapes: ``forward(x: [B, ...], *args, **kwargs) -> y`` or ``(y, logdet: [B])`` when any block
    returns a logdet; ``inverse(y, *args, **kwargs) -> x`` (every child must be a block). Extra
    arguments (a condition ``c``, an attention mask) go to every block's ``forward`` and ``inverse``
    and to every evaluation in backward; their tensors that require grad receive gradients (summed
    over the blocks). Children that are not blocks get only the tensor.

    After each backward, :attr:`last_report` holds a :class:`revgrad.BackwardReport`.
    """

    chain_of_blocks = True  # a container of blocks, not a block (revgrad.is_block)

    def __init__(
        self,
        *modules: nn.Module,
        check: CheckMode = DEFAULT_CHECK,
        tol: float | None = None,
        anchor_every: int | None = None,
        preserve_rng_state: bool = True,
        warn: bool = False,
        adaptive_budget: int | None = None,
        release_after: int = 100,
        graph_budget: int = 0,
        probe_every: int = DEFAULT_PROBE_EVERY,
    ) -> None:
        super().__init__(*modules)
        self.configure(
            check=check, tol=tol, anchor_every=anchor_every, preserve_rng_state=preserve_rng_state,
            warn=warn, adaptive_budget=adaptive_budget, release_after=release_after, graph_budget=graph_budget,
            probe_every=probe_every,
        )

    def configure(
        self,
        *,
        check: CheckMode = DEFAULT_CHECK,
        tol: float | None = None,
        anchor_every: int | None = None,
        preserve_rng_state: bool = True,
        warn: bool = False,
        adaptive_budget: int | None = None,
        release_after: int = 100,
        graph_budget: int = 0,
        probe_every: int = DEFAULT_PROBE_EVERY,
    ) -> ReversibleSequential:
        """Set the engine options (see the class docstring); returns ``self``. Validates first."""
        config = _validated(
            check, tol, anchor_every, preserve_rng_state, warn, adaptive_budget, release_after, graph_budget,
            probe_every,
        )
        self.config = config
        self._graphs = GraphBudget(graph_budget) if graph_budget else None
        self.kept_blocks: list[int] = []
        self._adaptive_budget = adaptive_budget
        self._release_after = release_after
        self._adaptive: dict[int, AdaptiveAnchors] = {}
        self._sensitivity: dict[int, Sensitivity] = {}
        self._reports: dict[int, BackwardReport] = {}
        return self

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        if isinstance(item, ReversibleSequential):  # a slice: keep this chain's engine options
            cfg = self.config
            item.configure(
                check=cfg.check, tol=cfg.tol, anchor_every=cfg.anchor_every,
                preserve_rng_state=cfg.preserve_rng_state, warn=cfg.warn,
                adaptive_budget=self._adaptive_budget, release_after=self._release_after,
                graph_budget=cfg.graph_budget, probe_every=cfg.probe_every,
            )
        return item

    def extra_repr(self) -> str:
        cfg = self.config
        parts = [f"check={cfg.check!r}"]
        if cfg.tol is not None:
            parts.append(f"tol={cfg.tol:g}")
        if cfg.anchor_every is not None:
            parts.append(f"anchor_every={cfg.anchor_every}")
        return ", ".join(parts)

    # -- runs of blocks ---------------------------------------------------------------------------

    def _runs(self) -> list[tuple[int, list[nn.Module], bool]]:
        runs: list[tuple[int, list[nn.Module], bool]] = []
        for i, child in enumerate(self):
            kind = is_block(child)
            if runs and runs[-1][2] == kind:
                runs[-1][1].append(child)
            else:
                runs.append((i, [child], kind))
        return runs

    def _sensitivity_for(self, start: int) -> Sensitivity | None:
        if self.config.probe_every == 0:
            return None
        state = self._sensitivity.get(start)
        if state is None:
            state = self._sensitivity[start] = Sensitivity(self.config.probe_every)
        return state

    def _adaptive_for(self, start: int) -> AdaptiveAnchors | None:
        if self._adaptive_budget == 0:
            return None
        state = self._adaptive.get(start)
        if state is None:
            state = self._adaptive[start] = AdaptiveAnchors(self._adaptive_budget, self._release_after)
        return state

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        call = CallArgs(args, kwargs) if args or kwargs else NO_ARGS
        logdet = None
        h = x

        def take(out):
            nonlocal h, logdet
            if isinstance(out, tuple):
                h, ld = out
                logdet = ld if logdet is None else logdet + ld
            else:
                h = out

        runs = self._runs()
        self.kept_blocks = []
        for n, (start, modules, blocks) in enumerate(runs):
            if not blocks:
                for module in modules:
                    h = module(h)
                continue
            labels = list(range(start, start + len(modules)))
            shape = tuple(h.shape)
            graphs = self._graphs if n == len(runs) - 1 else None  # the top run keeps graphs
            kept = graphs.keep_count(labels, shape) if graphs is not None and torch.is_grad_enabled() else 0
            cut = len(modules) - kept
            if cut:
                take(run_chain(
                    modules[:cut], h, self.config, owner=_RunReporter(self, start),
                    adaptive=self._adaptive_for(start), name=type(self).__name__, labels=labels[:cut],
                    graphs=graphs, shape=shape, kept_above=labels[cut:], sensitivity=self._sensitivity_for(start),
                    call=call,
                ))
            elif kept:
                self._reports.pop(start, None)  # no engine backward for this run: no report
            if kept:  # the top blocks whose graphs fit in graph_budget: plain autograd, no recompute
                self.kept_blocks = labels[cut:]
                take(run_plain(modules[cut:], labels[cut:], h, call))
        return h if logdet is None else (h, logdet)

    def inverse(
        self, y: torch.Tensor, *args, with_logdet: bool = False, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the chain backwards, ``x = f_0^-1(... f_{N-1}^-1(y))``, with the same memory saving.

        Extra arguments are given to every block's ``inverse``, as in :meth:`forward`.

        ``with_logdet=True`` returns ``(x, logdet: [B])``, ``logdet = log|det dx/dy|``, the sum of the
        blocks' inverse log-determinants (zeros when every block is volume-preserving), differentiated
        like forward's: a block whose ``inverse`` returns ``(x, logdet)`` gives that one; a block whose
        inverse returns ``x`` only (revgrad's couplings and layers, :class:`revgrad.FrEIABlock`) gives
        minus its forward's logdet at the rebuilt ``x``, at the cost of one more forward evaluation of
        it (in the pass and in each recomputation in backward; in training mode it draws its own dropout
        masks, so the logdet of a block with dropout is that evaluation's). ``with_logdet`` is this method's
        keyword, not passed to the blocks."""
        require_blocks(self, f"revgrad: {type(self).__name__}.inverse", "child", BlockError)
        n = len(self)
        out = run_chain(
            list(self)[::-1], y, self.config, direction="inverse", name=f"{type(self).__name__}.inverse",
            labels=list(range(n - 1, -1, -1)), call=CallArgs(args, kwargs) if args or kwargs else NO_ARGS,
            with_logdet=with_logdet,
        )
        return _with_logdet(out) if with_logdet else out

    # -- reports ----------------------------------------------------------------------------------

    @property
    def last_report(self) -> BackwardReport | None:
        """What the last backward measured and did, indexed by child position (None before any)."""
        if not self._reports:
            return None
        if len(self._reports) == 1 and 0 in self._reports and len(self._reports[0].errors) == len(self):
            return self._reports[0]
        merged = BackwardReport(errors=[float("nan")] * len(self), num_blocks=0)
        for start, rep in sorted(self._reports.items()):
            merged.errors[start : start + len(rep.errors)] = rep.errors
            merged.corrected += [start + i for i in rep.corrected]
            merged.from_adaptive += [start + i for i in rep.from_adaptive]
            merged.drifted += [start + i for i in rep.drifted]
            merged.anchors += [start + i for i in rep.anchors]
            merged.evaluations += rep.evaluations
            merged.correction_evaluations += rep.correction_evaluations
            merged.deferred |= rep.deferred
            merged.rerun |= rep.rerun
            merged.probed |= rep.probed
            if rep.sensitivity:
                if not merged.sensitivity:
                    merged.sensitivity = [float("nan")] * len(self)
                merged.sensitivity[start : start + len(rep.sensitivity)] = rep.sensitivity
            merged.check, merged.tol = rep.check, rep.tol
            merged.num_blocks += len(rep.errors)
        return merged


class _RunReporter:
    """Where the engine publishes the report of one run of blocks."""

    __slots__ = ("owner", "start")

    def __init__(self, owner: ReversibleSequential, start: int) -> None:
        self.owner = owner
        self.start = start

    @property
    def last_report(self) -> BackwardReport | None:
        return self.owner._reports.get(self.start)

    @last_report.setter
    def last_report(self, report: BackwardReport) -> None:
        self.owner._reports[self.start] = report


class PlainSequential(nn.Sequential):
    """A :class:`ReversibleSequential` without the engine: the same children, names and call
    semantics (extra arguments go to every block, logdets are summed, other children get only the
    tensor), trained with plain autograd. The baseline of a model built with ``memory_saving=False``;
    :func:`reversible` converts it in place like an ``nn.Sequential``.

    Shapes: ``forward(x: [B, ...], *args, **kwargs) -> y`` or ``(y, logdet: [B])``;
    ``inverse(y, *args, **kwargs) -> x``.
    """

    chain_of_blocks = True  # a container of blocks, not a block (revgrad.is_block)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logdet = None
        h = x
        for i, child in enumerate(self):
            if not is_block(child):
                h = child(h)
                continue
            h, ld = split_output(child(h, *args, **kwargs), i, child, h)
            if ld is not None:
                logdet = ld if logdet is None else logdet + ld
        return h if logdet is None else (h, logdet)

    def inverse(
        self, y: torch.Tensor, *args, with_logdet: bool = False, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`ReversibleSequential.inverse` (``with_logdet=True``: ``(x, logdet)``), plain autograd."""
        require_blocks(self, f"revgrad: {type(self).__name__}.inverse", "child", BlockError)
        if with_logdet:
            n = len(self)
            call = CallArgs(args, kwargs) if args or kwargs else NO_ARGS
            return _with_logdet(_plain(list(self)[::-1], list(range(n - 1, -1, -1)), _InverseWithLogdet, y, call))
        for i in reversed(range(len(self))):
            y = _first(self[i].inverse(y, *args, **kwargs))
        return y


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_logdet(out) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain's ``x`` or ``(x, logdet)`` as ``(x, logdet)``: zeros ``[B]`` when no block has a logdet."""
    if isinstance(out, tuple):
        return out
    return out, out.new_zeros(out.shape[0])


def _convert_in_place(module: nn.Module, options: dict) -> int:
    """Turn every plain ``nn.Sequential`` (or :class:`PlainSequential`) below ``module`` that holds blocks
    into a ReversibleSequential."""
    converted = 0
    for child in module.children():
        if is_block(child):
            continue  # a block is atomic: its sub-networks are not chains
        converted += _convert_in_place(child, options)
    if type(module) in (nn.Sequential, PlainSequential, ReversibleSequential) and any(is_block(c) for c in module):
        # Swapping the class keeps child names, hooks and every outside reference to the container.
        module.__class__ = ReversibleSequential
        ReversibleSequential.configure(module, **options)
        converted += 1
    return converted


def reversible(
    module: nn.Module | Iterable[nn.Module],
    *,
    check: Literal["off", "detect", "correct"] = DEFAULT_CHECK,
    tol: float | None = None,
    anchor_every: int | None = None,
    preserve_rng_state: bool = True,
    warn: bool = False,
    adaptive_budget: int | None = None,
    release_after: int = 100,
    graph_budget: int = 0,
    probe_every: int = DEFAULT_PROBE_EVERY,
) -> nn.Module:
    """Make a network of blocks train with memory-saving, checked reversible backprop.

    One rule: **a module is converted in place and returned** (``reversible(m) is m``), so calling it
    for its effect (``revgrad.reversible(self.body)``) works. Every ``nn.Sequential`` inside it (at any
    depth, itself included) that holds blocks becomes a :class:`ReversibleSequential` (same object,
    children, names, ``state_dict`` keys and hooks), and each maximal run of consecutive blocks runs
    through the engine; a ``ReversibleSequential`` already is one and takes the new options.

    What cannot be converted in place, because it cannot run a chain itself: a list, tuple or
    ``nn.ModuleList`` of blocks, or a single block. For those a new :class:`ReversibleSequential`
    over the same block modules (same parameters, same order) is returned, and the argument is left
    as it was: use the result.

    Each chain's last backward report is ``chain.last_report``; :func:`last_reports` collects those
    of every chain inside a model.

    A whole normflows model (``normflows.NormalizingFlow`` and its relatives) is refused with a
    ``TypeError``: its methods call its flows one by one, so it cannot be converted in place, and as one
    block it would save nothing. ``reversible(normflows_blocks(model))`` is the chain of its flows
    (:func:`revgrad.normflows_blocks`).

    Raises ``TypeError`` when a list holds a non-block, or when no block is found. Keyword options are
    those of :class:`ReversibleSequential`.
    """
    options = dict(
        check=check, tol=tol, anchor_every=anchor_every, preserve_rng_state=preserve_rng_state,
        warn=warn, adaptive_budget=adaptive_budget, release_after=release_after, graph_budget=graph_budget,
        probe_every=probe_every,
    )
    _validated(**options)  # before touching anything

    if isinstance(module, (list, tuple, nn.ModuleList)):
        items = require_blocks(module, "revgrad.reversible")
        if not items:
            raise TypeError("revgrad.reversible: got an empty list; a chain needs blocks (modules with an inverse)")
        return ReversibleSequential(*items, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"revgrad.reversible expects an nn.Module or a list of blocks, got {type(module).__name__}")
    if _is_normflows_model(module):
        raise TypeError(_normflows_message(module, ""))
    if is_block(module):
        return ReversibleSequential(module, **options)
    if _convert_in_place(module, options) == 0:
        nested = next(((n, m) for n, m in module.named_modules() if _is_normflows_model(m)), None)
        raise TypeError(
            f"revgrad.reversible: found no block in {type(module).__name__}; a block is an nn.Module with "
            "forward(x) and inverse(y) (inside an nn.Sequential when it is part of a larger model)"
            + ("" if nested is None else "; " + _normflows_message(nested[1], nested[0]))
        )
    return module


def _is_normflows_model(module: nn.Module) -> bool:
    """A normflows model (``NormalizingFlow``, ``ConditionalNormalizingFlow``, ``ClassCondFlow``,
    ``MultiscaleFlow``): its ``log_prob``, ``sample`` and ``forward_kld`` loop over its ``flows``
    themselves, calling each flow directly, so no container inside it can be made a chain."""
    return type(module).__module__.split(".")[0] == "normflows" and isinstance(
        getattr(module, "flows", None), nn.ModuleList
    )


def _normflows_message(module: nn.Module, name: str) -> str:
    where = f" ({name!r})" if name else ""
    return (
        f"revgrad.reversible: {type(module).__name__}{where} is a whole normflows model, not a chain: its "
        "log_prob, sample and forward_kld call its flows one by one, which revgrad cannot reroute in place "
        "(as one block it would save no memory). Build a chain of its flows instead (same parameters): "
        "chain = revgrad.reversible(revgrad.normflows_blocks(model)); z, logdet = chain(x) runs the "
        "normalizing direction, log_prob = model.q0.log_prob(z) + logdet; "
        "x, ld = chain.inverse(z, with_logdet=True) samples, log_q = log_q0 - ld"
    )


def last_reports(model: nn.Module) -> dict[str, BackwardReport]:
    """The last backward report of every chain inside ``model`` (itself included), by module name
    (``""`` for ``model`` itself); chains that have not run backward yet are left out."""
    reports = {}
    for name, module in model.named_modules():
        if isinstance(module, ReversibleSequential) and module.last_report is not None:
            reports[name] = module.last_report
    return reports
