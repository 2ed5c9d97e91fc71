"""The package's shape: the public API stays where it was, no import cycles, ``import revgrad`` stays light."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import revgrad

# What users import today: every name stays importable from the same place.
PUBLIC = [
    "ActNorm", "AdaptiveAnchors", "AdditiveCoupling", "AffineCoupling", "BackwardReport", "BlockError",
    "BlockStability", "EngineConfig", "FrEIABlock", "FusedBlock", "InvertibleConv1x1", "PenaltySchedule",
    "ReconstructionError", "Reverse", "ReversibleSequential", "Shuffle", "Squeeze", "StabilityReport",
    "__version__", "default_tol", "diagnostics", "fingerprint", "finite_difference_penalty", "freia_blocks",
    "is_block", "lipschitz_bound", "models", "ood_probes", "regularizers", "reversible", "run_chain",
    "stability_report", "MemoryProbe", "RandomReplayError",
]
MODELS = [
    "GlowClassifier", "RevDownsample", "RevNet", "glow_classifier", "revnet38", "revnet110", "revnet164",
    "revnet_bottleneck_branch", "revnet_branch",
]

ROOT = pathlib.Path(revgrad.__file__).parent


def test_public_names_import_from_the_same_place():
    missing = [name for name in PUBLIC if not hasattr(revgrad, name)]
    assert not missing, missing
    assert set(PUBLIC) - {"MemoryProbe"} <= set(revgrad.__all__)
    missing = [name for name in MODELS if not hasattr(revgrad.models, name)]
    assert not missing, missing
    assert callable(revgrad.fingerprint) and revgrad.diagnostics.stability_report is revgrad.stability_report


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Every revgrad module ``name`` imports, at module level or inside functions (a lazy import is a
    dependency too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(prefix + ([node.module] if node.module else []))
            targets = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    for name in _modules():
        importlib.import_module(name)


def test_import_revgrad_stays_light():
    """``import revgrad`` loads the engine, blocks, models and analysis, not the tools, Triton or plotting."""
    code = (
        "import sys, revgrad; heavy = [m for m in ('revgrad.tools.benchmark', 'revgrad.tools.memory', "
        "'revgrad.kernels', 'triton', 'matplotlib', 'sklearn') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
