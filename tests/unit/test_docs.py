"""The Markdown of the repository renders as written, and the configuration
reference is what its generator makes of ``Config``.

Each Markdown file is parsed with markdown-it-py (CommonMark). A code fence
that is never closed swallows the rest of its document (or list item); one
closed too late swallows the sections in between, which shows as a line
inside it that opens a fence of its own (```` ```sh ````). Relative links and
images must name files that exist, and an anchor into a Markdown file one of
its headings."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".venv", ".git", "node_modules", ".citus-build", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def markdown_files() -> list[Path]:
    """The repository's Markdown files: tracked, or new and not ignored."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()
        paths = [ROOT / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked source tree)
        paths = list(ROOT.rglob("*.md"))
    return sorted(p for p in paths if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts))


def fence_problems(text: str) -> list[str]:
    """Fences left open, or open past a line that starts another fence."""
    lines = text.splitlines()
    problems = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        marker = token.markup
        closing = re.compile(rf"^{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$")
        last = _unquoted(lines[end - 1]) if end - 1 > start else ""
        if not closing.match(last):
            problems.append(f"line {start + 1}: the code fence {marker!r} opened here is never closed")
            continue
        opening = re.compile(rf"^{re.escape(marker)}{re.escape(marker[0])}*[ \t]*[^\s{re.escape(marker[0])}]")
        for number in range(start + 1, end - 1):
            if opening.match(_unquoted(lines[number])):
                problems.append(
                    f"line {start + 1}: the code fence opened here runs past line {number + 1}, which opens another "
                    "(a fence closed too late, or not at all before it)"
                )
                break
    return problems


def _unquoted(line: str) -> str:
    """A line without its indentation and blockquote markers."""
    return re.sub(r"^(?:[ \t]*>)*[ \t]*", "", line)


def _links(tokens: list[Token], line: int | None = None) -> Iterator[tuple[int | None, str]]:
    for token in tokens:
        if token.map is not None:
            line = token.map[0] + 1
        if token.type == "link_open":
            yield line, str(token.attrs.get("href", ""))
        elif token.type == "image":
            yield line, str(token.attrs.get("src", ""))
        if token.children:
            yield from _links(token.children, line)


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links and images whose file does not exist (anchors and queries stripped;
    links with a scheme, such as https: or mailto:, are not checked)."""
    problems = []
    for line, target in _links(MarkdownIt("commonmark").parse(text)):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:
            continue
        relative = unquote(parts.path)
        resolved = ROOT / relative.lstrip("/") if relative.startswith("/") else path.parent / relative
        if not resolved.exists():
            problems.append(f"line {line}: link to {target!r}: no such file {os.path.relpath(resolved, ROOT)}")
        elif parts.fragment and resolved.suffix == ".md" and parts.fragment not in heading_anchors(resolved.read_text()):
            problems.append(f"line {line}: link to {target!r}: no heading of {os.path.relpath(resolved, ROOT)} has that anchor")
    return problems


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation
    dropped, spaces as hyphens, a repeated one numbered (-1, -2 ...)."""
    anchors: set[str] = set()
    tokens = MarkdownIt("commonmark").parse(text)
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open":
            slug = re.sub(r"[^\w\- ]", "", inline.content.lower()).replace(" ", "-")
            anchor, number = slug, 0
            while anchor in anchors:
                number += 1
                anchor = f"{slug}-{number}"
            anchors.add(anchor)
    return anchors


FILES = markdown_files()


def test_the_repository_has_its_documents() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "docs/configuration.md", "bench/README.md"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_markdown_fences_are_balanced(path: Path) -> None:
    problems = fence_problems(path.read_text(encoding="utf-8"))
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_relative_links_name_files_that_exist(path: Path) -> None:
    problems = broken_links(path, path.read_text(encoding="utf-8"))
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_fence_problems_are_found() -> None:
    assert fence_problems("# t\n\n```sh\nmake\n```\n\ntext\n") == []
    assert fence_problems("# t\n\n- item\n\n  ```sh\n  make\n  ```\n") == []
    assert fence_problems("````md\n```sh\nx\n```\n````\n") == []  # a fence shown inside a longer one
    assert fence_problems("text\n\n```sh\nmake\n")  # never closed
    assert fence_problems("- item\n\n  ```sh\n  make\n\nafter the list\n")  # never closed in its list item
    assert fence_problems("```\nx\n```\n```\n\n## Swallowed\n\n```sh\nmake\n```\n")  # closed too late


def test_broken_links_are_found() -> None:
    page = ROOT / "docs" / "page.md"
    assert broken_links(page, "[a](../README.md) [b](../README.md#words) [c](https://x.invalid/y) [d](#here)") == []
    assert broken_links(page, "[e](mailto:someone@example.com) ![f](../docs)") == []
    assert broken_links(page, "[g](missing.md)")
    assert broken_links(page, "![h](../nowhere.png)")
    assert broken_links(page, "[i][ref]\n\n[ref]: ./missing.md#top\n")
    assert broken_links(page, "[j](../README.md#no-such-heading)")
    assert heading_anchors("# A `first` call\n\n## 7. Testing, on a cluster\n\n## Words\n\n## Words\n") == {
        "a-first-call", "7-testing-on-a-cluster", "words", "words-1"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_is_generated_from_config() -> None:
    generator = _generator()
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == generator.render(), (
        f"docs/configuration.md is stale: regenerate it with `{generator.COMMAND}` (from service/nexus/config.py)"
    )
