"""Writes docs/configuration.md from the fields of ``nexus.config.Config``.

The dataclass is the one source of every setting (name, type, default, help);
this script renders it as the reference table, and tests/unit/test_docs.py
fails when the committed document differs from what it renders.

    .venv/bin/python scripts/gen_config_doc.py            # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_doc.py --check    # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nexus.config import Config, env_var

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/gen_config_doc.py"

TYPE_NAMES = {"str": "text", "int": "integer", "float": "number", "bool": "true / false", "Path": "path"}

HEADER = f"""\
# Configuration

<!-- Generated from service/nexus/config.py by scripts/gen_config_doc.py: edit the
     fields' metadata there, then run `{COMMAND}`. -->

Every setting is an environment variable and a flag of every `nexus` command
(`nexus serve --help` lists them); a flag wins over the environment, and an
empty variable counts as unset. Every flag takes a value, booleans too
(`--reuse-port true`; `1`/`0`, `yes`/`no` and `on`/`off` work as well).
`make serve` passes its environment on to `nexus serve`, so
`NEXUS_PORT=50052 make serve` works. A value that is out of range stops the
command with `nexus: configuration error: ...` and exit status 2.

The client commands (`nexus health`, `nexus seed`, `nexus token`) read the same
settings to find the server, its TLS and its JWT secret; the `tls_ca_file`,
`tls_client_*` and `tls_server_name` settings are theirs alone.

"""


def _default(f: dataclasses.Field[object]) -> str:
    if "default_doc" in f.metadata:
        return str(f.metadata["default_doc"])
    value = f.default
    if value is dataclasses.MISSING:
        raise ValueError(f"Config.{f.name} computes its default: describe it in metadata['default_doc']")
    if value == "":
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    rows = ["| environment variable | flag | type | default | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        meaning = f.metadata["help"] + (" " + f.metadata["doc"] if "doc" in f.metadata else "")
        flag = "--" + f.name.replace("_", "-")
        rows.append(
            f"| `{env_var(f.name)}` | `{flag}` | {TYPE_NAMES[kind]} | {_cell(_default(f))} | {_cell(meaning)} |"
        )
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 when docs/configuration.md is stale.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"docs/configuration.md is stale: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
