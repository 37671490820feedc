"""Config validation that needs no database."""

from __future__ import annotations

import argparse

import pytest

from nexus.config import POSTGRES_INTEGER_MAX, env_var, from_sources


@pytest.mark.parametrize("name", ["search_exact_max_memories", "vector_index_max_users"])
def test_an_integer_setting_must_fit_a_postgres_integer(name: str) -> None:
    """They reach SQL as integer parameters: one beyond would fail every call that sends it."""
    assert getattr(from_sources(environ={env_var(name): str(POSTGRES_INTEGER_MAX)}), name) == POSTGRES_INTEGER_MAX
    with pytest.raises(ValueError, match=name):
        from_sources(environ={env_var(name): str(POSTGRES_INTEGER_MAX + 1)})


def test_every_command_prints_its_help() -> None:
    """argparse formats help texts with %: a setting's help may still say "80%"."""
    from nexus.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert "--port" in command.format_help(), name
