"""Checks are tests: the proto lint, the generated-code drift check, ruff, mypy and
the committed schema's drift check run here, so CI cannot forget them."""

from __future__ import annotations

import difflib
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


TYPED_PATHS = ["service/nexus", "devtools", "bench"]  # what mypy checks


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    assert buf, "buf is not installed (pip install buf-bin, part of the dev extra)"
    result = run([buf, "lint"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "scripts/gen_protos.py", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=120)
    fresh = tmp_path / "nexus" / "v1"
    committed = ROOT / "service" / "nexus" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix != ".pyc")
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with: python scripts/gen_protos.py ({mismatch + errors})"


def test_schema_sql_matches_the_migrations(pg_admin_url: str, tmp_path: Path) -> None:
    """db/schema.sql is what the migrations make of an empty database, as dumped by
    scripts/dump_schema.py (the embedded PostgreSQL's pg_dump)."""
    fresh = tmp_path / "schema.sql"
    run([sys.executable, "scripts/dump_schema.py", "--url", pg_admin_url, "--out", str(fresh)]).check_returncode()
    committed = (ROOT / "db" / "schema.sql").read_text(encoding="utf-8").splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(committed, fresh.read_text(encoding="utf-8").splitlines(keepends=True),
                                        "db/schema.sql", "after all migrations", n=1))
    assert not diff, f"db/schema.sql is stale: regenerate with `make schema`\n{diff[:4000]}"


def test_ruff_passes() -> None:
    """Lint rules and import order of every Python file but the generated code (pyproject.toml)."""
    result = run([str(BIN / "ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nmost fix themselves: .venv/bin/ruff check --fix ."


def test_mypy_passes() -> None:
    result = run([sys.executable, "-m", "mypy", *TYPED_PATHS])
    assert result.returncode == 0, result.stdout + result.stderr
