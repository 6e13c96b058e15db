"""Repository rules that keep the model library portable and the stdlib ``platform`` reachable.

A ``platform`` package at the repo root would shadow the stdlib module that torch and ray import
while loading, on every process that puts the root first on ``sys.path`` (``python -m``, Ray's
``working_dir``), failing far from its cause (docs/platform.md, Why platform/ is not a Python
package).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_AUNET = {"ray", "mlflow", "optuna", "yaml", "pandas"}
ALLOWED_IN_AUNET = {"torch", "numpy", "regex", "safetensors", "flash_attn", "tokenizers", "aunet"}
# The one exception: the converter reads the official lingua training YAML (lazily, in a function).
EXCEPTIONS = {"aunet/interop.py": {"yaml"}}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_aunet_imports_only_allowed_modules():
    files = sorted((ROOT / "aunet").rglob("*.py"))
    assert files, "aunet/ has no modules"
    allowed = ALLOWED_IN_AUNET | set(sys.stdlib_module_names)
    for path in files:
        rel = path.relative_to(ROOT)
        names = _imported_modules(path) - EXCEPTIONS.get(rel.as_posix(), set())
        assert not names & FORBIDDEN_IN_AUNET, f"{rel} imports {sorted(names & FORBIDDEN_IN_AUNET)}"
        assert names <= allowed, f"{rel} imports {sorted(names - allowed)}"


def test_import_scanner_sees_lazy_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("import os.path\ndef f():\n    from ray import train\n    import yaml as y\n")
    assert _imported_modules(probe) == {"os", "ray", "yaml"}


def test_platform_dir_is_not_a_package():
    assert not (ROOT / "platform.py").exists()
    assert not (ROOT / "conftest.py").exists()  # pytest would put the root on sys.path
    platform_dir = ROOT / "platform"
    if platform_dir.exists():
        modules = sorted(p.relative_to(ROOT) for p in platform_dir.rglob("*.py"))
        assert not modules, f"platform/ must hold no Python modules: {modules}"
        assert not (platform_dir / "__init__.py").exists()


def test_stdlib_platform_wins_from_repo_root():
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    code = "import platform; print(platform.__file__); platform.system()"
    for env_path in (None, str(ROOT)):  # plain `python -c`, and Ray working_dir's PYTHONPATH
        env = None if env_path is None else {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).resolve().parent == stdlib, out.stdout


def test_shadowing_check_can_fail(tmp_path):
    """Control: with a platform/__init__.py in the cwd, the probe above does see the shadow."""
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "__init__.py").write_text("")
    code = "import platform; print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert Path(out.stdout.strip()).resolve() == (tmp_path / "platform" / "__init__.py").resolve()


def test_packages_listed_explicitly():
    # No namespace discovery (`find`), which could pick up platform/ (tomllib is 3.11+: regex).
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = re.search(r"(?m)^\[tool\.setuptools\]\s*\npackages\s*=\s*\[([^\]]*)\]", text)
    assert listed, "pyproject.toml must list [tool.setuptools] packages explicitly"
    packages = set(re.findall(r'"([^"]+)"', listed.group(1)))
    assert {"aunet", "pipelines"} <= packages and "platform" not in packages
    assert "[tool.setuptools.packages.find]" not in text


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    extract = [line for line in ci if line.startswith("cmd=$(")]
    assert len(extract) == 1, "expected one cmd=$(...) line in .ci/run"
    assert 'eval "$cmd"' in ci
    # Run .ci/run's own extraction, and compare with README's indented command read here.
    out = subprocess.run(
        ["bash", "-c", f'{extract[0]}\nprintf %s "$cmd"'], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    commands = [ln[4:] for ln in readme if ln.startswith("    pip install") and "pytest" in ln]
    assert commands, "README.md has no indented `pip install ... pytest` command"
    assert out.stdout == commands[0]
    assert "pytest" in commands[0] and "tests" in commands[0]


def test_import_aunet_pulls_in_no_platform_dependency():
    code = "import sys, aunet; print(sorted(m for m in FORBIDDEN if m in sys.modules))"
    code = f"FORBIDDEN = {sorted(FORBIDDEN_IN_AUNET)!r}\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# The MLflow layer: the only modules of pipelines/ that may import mlflow (pipelines/tracking.py
# documents why there is one layer).
MLFLOW_LAYER = {"pipelines/tracking.py", "pipelines/tracking_run.py", "pipelines/tracking_model.py"}


def _mlflow_importers(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "pipelines").glob("*.py")
        if "mlflow" in _imported_modules(p)
    )


def test_only_the_mlflow_layer_imports_mlflow():
    found = _mlflow_importers(ROOT)
    assert set(found) & MLFLOW_LAYER, "the MLflow layer imports no mlflow: the scan is broken"
    outside = [f for f in found if f not in MLFLOW_LAYER]
    assert not outside, f"{outside} import mlflow: go through pipelines.tracking"


def test_mlflow_layer_check_can_fail(tmp_path):
    """Control: a pipelines module with a lazy ``from mlflow...`` import is found."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "tracking.py").write_text("import mlflow\n")
    (tmp_path / "pipelines" / "sweep.py").write_text("def f():\n    from mlflow import x\n")
    (tmp_path / "pipelines" / "data.py").write_text("import json\n")
    found = _mlflow_importers(tmp_path)
    assert found == ["pipelines/sweep.py", "pipelines/tracking.py"]
    assert [f for f in found if f not in MLFLOW_LAYER] == ["pipelines/sweep.py"]
