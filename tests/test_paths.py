"""Paths and URIs: a stdlib-only leaf, so that the spec reader and the runtime share it without
importing each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from pipelines import paths

ROOT = Path(__file__).resolve().parents[1]


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "pipelines" / f"{module}.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):  # lazy and TYPE_CHECKING imports count too
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_paths_is_a_stdlib_leaf_and_runtime_does_not_import_spec():
    tops = {name.split(".")[0] for name in _imports("paths")}
    assert tops <= set(sys.stdlib_module_names) | {"__future__"}, tops
    assert not {
        n for n in _imports("runtime") if n.startswith(("pipelines.spec", "pipelines.schema"))
    }
    assert not {n for n in _imports("schema") if n.startswith("pipelines")}


def test_uris_and_paths(tmp_path):
    assert paths.is_uri("s3://b/x") and paths.is_uri("sqlite:///m.db")
    assert not paths.is_uri("out/s3://x") and not paths.is_uri("/abs/path")
    cwd = str(tmp_path)
    assert paths.absolute_path("a/../b", cwd) == f"{cwd}/b"
    assert paths.absolute_path("gs://b/a/../c", cwd) == "gs://b/a/../c"
    assert paths.join_path("s3://b/runs/", "d", "x") == "s3://b/runs/d/x"
    assert paths.redact("https://bob:s3cret@host/x") == "https://***@host/x"


def test_resolve_tracking_uri(tmp_path):
    cwd = str(tmp_path)
    assert paths.resolve_tracking_uri("sqlite:///m.db", cwd, {}) == f"sqlite:///{cwd}/m.db"
    assert paths.resolve_tracking_uri("mlruns", cwd, {}) == f"file://{cwd}/mlruns"
    assert paths.resolve_tracking_uri("databricks", cwd, {}) == "databricks"
    env = {"MLFLOW_TRACKING_URI": "sqlite:///env.db"}
    assert paths.resolve_tracking_uri("http://h:5000", cwd, env) == f"sqlite:///{cwd}/env.db"
    assert paths.resolve_tracking_uri("http://h:5000", cwd, {"MLFLOW_TRACKING_URI": ""}) == (
        "http://h:5000"  # an empty variable is unset
    )
