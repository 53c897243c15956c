"""The layering is checked by a tool (SPEC 11): import-linter's contracts in
pyproject.toml hold for the tree, and each one fails when a wrong import is added."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import BIN, ROOT

PACKAGES = ("shared", "api", "worker", "cli", "emulator")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )


def test_the_tree_keeps_every_contract() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("shared/domain/rules.py", "import shared.adapters.db", "over the domain"),
        ("shared/domain/models.py", "import api.refunds", "over the domain"),
        ("shared/adapters/metrics.py", "import shared.services.refunds", "over the domain"),
        ("worker/tasks.py", "import api.errors", "over the domain"),
        ("cli/main.py", "import worker.tasks", "over the domain"),
        ("shared/services/processing.py", "import emulator.store", "test emulator"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, bad_import: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "static", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # the wrong import\n")

    result = _lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], result.stdout
