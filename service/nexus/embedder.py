"""Server-side embeddings (``NEXUS_EMBEDDER``), computed offline on the CPU.

``wordllama``: the static 256-dimensional model that ships inside the
``wordllama`` wheel (the ``wordllama`` extra). Its loader looks for the bundled
tokenizer under ``wordllama/tokenizer/`` while the wheel holds it in
``wordllama/tokenizers/``, and then tries to download it; so the tokenizer is
handed to it through a cache folder of our own, with downloads disabled. The
weights are found in the wheel as they are.

Importing wordllama calls ``logging.basicConfig`` (a no-op once ``nexus``
has configured logging, as the CLI does before the server starts).

Embedding a sentence takes microseconds, but it is CPU work: calls made in
the same event-loop turn are embedded as one batch, in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("nexus.embedder")


class Model(Protocol):
    def embed(self, texts: list[str], norm: bool = ...) -> Any: ...


def load_wordllama() -> Model:
    """The wheel's model, with no network access."""
    import wordllama
    from wordllama import WordLlama

    bundled = Path(wordllama.__file__).parent / "tokenizers"
    with tempfile.TemporaryDirectory(prefix="nexus-wordllama-") as cache:
        shutil.copytree(bundled, Path(cache) / "tokenizers")
        # The tokenizer is read into memory here; the folder is not needed after.
        return WordLlama.load(config="l2_supercat", dim=256, cache_dir=cache, disable_download=True)


class Embedder:
    """Turns texts into unit-length embeddings of ``dim`` floats."""

    def __init__(self, model: Model, dim: int) -> None:
        self._model = model
        self.dim = dim
        self._pending: list[tuple[str, asyncio.Future[list[float] | None]]] = []

    def embed_batch(self, texts: Sequence[str]) -> list[list[float] | None]:
        """Blocking. None for a text the model has no tokens for (it would
        embed as zeros, which no distance can rank)."""
        import numpy  # with the wordllama extra

        with numpy.errstate(invalid="ignore", divide="ignore"):  # a text without tokens: zeros / 0
            vectors = self._model.embed(list(texts), norm=True)
        result: list[list[float] | None] = []
        for vector in vectors.tolist():
            usable = len(vector) == self.dim and all(math.isfinite(x) for x in vector) and any(vector)
            result.append(vector if usable else None)
        return result

    async def embed(self, text: str) -> list[float] | None:
        future: asyncio.Future[list[float] | None] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await future

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            vectors = await asyncio.to_thread(self.embed_batch, [text for text, _ in batch])
        except Exception as exc:  # every waiting call gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), vector in zip(batch, vectors, strict=True):
            if not future.done():  # the call may have been cancelled meanwhile
                future.set_result(vector)


def from_config(name: str) -> Embedder | None:
    """The configured embedder, loaded (None for "none")."""
    if name == "none":
        return None
    if name == "wordllama":
        try:
            model = load_wordllama()
        except ImportError as exc:
            raise RuntimeError(
                "NEXUS_EMBEDDER=wordllama needs the wordllama extra: pip install 'nexus-service[wordllama]'"
            ) from exc
        log.info("event=embedder_loaded name=wordllama dim=256")
        return Embedder(model, 256)
    raise ValueError(f"unknown embedder {name!r}")
