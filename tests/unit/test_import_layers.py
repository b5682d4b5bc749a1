"""The import invariants of docs/ARCHITECTURE.md, checked on the source (no module is run).

* only `deployments/` imports `ray.serve` at module top (app/ is the Ray-free core);
* only `app/ray_compat.py` touches private Ray APIs;
* `app/rollout/` never imports `app/serving/` or `deployments/`;
* nothing under `app/` imports `deployments/` except `app/ops/` and `app/builder.py`;
* nothing imports `app/ops/` except `app/ops/` itself (and tests, bench, scripts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_RAY = (
    "ray._private",
    "ray.experimental.internal_kv",
    "ray.autoscaler._private",
    "ray.serve._private",
)
PRIVATE_NAMES = {"_get_global_client", "_internal_kv_get", "_internal_kv_put", "_internal_kv_del"}


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, set[str], int]]:
    """(module, names imported from it, line) for every import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, set(), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, {alias.name for alias in node.names}, node.lineno))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_deployments_import_ray_serve_at_module_top():
    offenders = [
        f"{_rel(path)}:{line} imports {module}"
        for path in _modules("app")
        for module, _, line in _imports(path, top_level_only=True)
        if _under(module, "ray")
    ]
    assert not offenders, offenders


def test_only_ray_compat_touches_private_ray_apis():
    offenders = []
    for path in _modules("app", "deployments", "bench", "scripts", "tests"):
        if _rel(path) in ("app/ray_compat.py", "tests/unit/test_import_layers.py"):
            continue
        for module, names, line in _imports(path):
            if module.startswith(PRIVATE_RAY) or names & PRIVATE_NAMES:
                offenders.append(f"{_rel(path)}:{line} imports {module} {sorted(names)}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "_by_reference" for k in node.keywords):
                offenders.append(
                    f"{_rel(path)}:{node.lineno} sets the handle's _by_reference option"
                )
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("app/rollout", ("app.serving", "deployments")),
        (
            "app/config",
            ("app.serving", "app.rollout", "app.observability", "app.ops", "deployments"),
        ),
        ("app/serving", ("app.rollout", "app.ops", "deployments")),
        ("app/observability", ("app.rollout", "app.serving", "app.ops", "deployments")),
        ("app/adapters", ("app.rollout", "app.serving", "app.ops", "deployments")),
        ("deployments", ("app.ops",)),
    ],
)
def test_layers_import_downward_only(folder, forbidden):
    offenders = [
        f"{_rel(path)}:{line} imports {module}"
        for path in _modules(folder)
        for module, _, line in _imports(path)
        if any(_under(module, package) for package in forbidden)
    ]
    assert not offenders, offenders


def test_app_imports_deployments_only_from_ops_and_the_builder_shim():
    offenders = [
        f"{_rel(path)}:{line} imports {module}"
        for path in _modules("app")
        if not _rel(path).startswith("app/ops/") and _rel(path) != "app/builder.py"
        for module, _, line in _imports(path)
        if _under(module, "deployments")
    ]
    assert not offenders, offenders


def test_the_checker_sees_imports():
    """Guard against a checker that passes because it finds nothing."""
    router = _imports(ROOT / "deployments" / "router.py", top_level_only=True)
    assert any(module == "ray" for module, _, _ in router)
    assert any(_under(module, "app.serving") for module, _, _ in router)
