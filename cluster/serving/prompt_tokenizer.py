"""The ingress's tokenizer: text and chat prompts become token ids before a request is routed.

Tokenizing once, in the ingress, lets the router name a prompt's blocks with the replicas' own
prefix-cache hashes, and spares the replicas (whose cores are busy with the model) the work. The
ingress holds no checkpoint: it asks a replica once for its tokenizer files
(``ModelServer.tokenizer_files``) and loads them with transformers, as the replica does, so both
produce the same ids and the same typed errors (``InputProcessor``).

transformers imports torch when it finds it installed, though a tokenizer needs none of it; the
ingress keeps torch out of its process by hiding it while transformers is first imported there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from cluster.engine.input_processor import InputProcessor
from cluster.serving.engine_request import EngineRequest

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".npz")
_MAX_FILE_BYTES = 32 << 20  # a tokenizer.json of a 250k vocabulary is about 20 MB


def tokenizer_files(path: str) -> dict[str, bytes]:
    """The small files of a checkpoint directory (tokenizer, its config, chat template): no weights."""
    files = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.endswith(_WEIGHT_SUFFIXES) and os.path.getsize(full) <= _MAX_FILE_BYTES:
            with open(full, "rb") as f:
                files[name] = f.read()
    return files


@contextlib.contextmanager
def _torch_hidden(hide: bool):
    """While transformers is first imported, make torch look absent (``importlib.util.find_spec``
    answers None for a ``sys.modules`` entry of None), so transformers does not load it; it then
    keeps that answer for the process. Only where neither is loaded yet: a process that has torch
    (a test, the replica) keeps using it."""
    if not hide or "torch" in sys.modules or "transformers" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if sys.modules.get("torch", ()) is None:
            del sys.modules["torch"]


def load_tokenizer(files: dict[str, bytes], hide_torch: bool = False):
    """A transformers tokenizer built from ``tokenizer_files()``' answer."""
    directory = tempfile.mkdtemp(prefix="llm-cluster-tokenizer-")
    try:
        for name, data in files.items():
            with open(os.path.join(directory, os.path.basename(name)), "wb") as f:
                f.write(data)
        with _torch_hidden(hide_torch):
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # its "PyTorch was not found" notice is expected here
            return AutoTokenizer.from_pretrained(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class TokenizerLoadError(Exception):
    """The tokenizer files arrived but do not load here (not worth retrying)."""


class PromptTokenizer:
    """Turns an ``EngineRequest``'s text or chat prompt into checked token ids."""

    def __init__(self, tokenizer, model_info: dict):
        self.processor = InputProcessor(tokenizer, model_info["vocab_size"], model_info["max_model_len"],
                                        model_info["max_cache_tokens"])

    @classmethod
    def from_files(cls, files: dict[str, bytes], model_info: dict, hide_torch: bool = False) -> "PromptTokenizer":
        try:
            return cls(load_tokenizer(files, hide_torch), model_info)
        except Exception as err:
            raise TokenizerLoadError(f"cannot load the replicas' tokenizer here: {err!r}") from err

    def tokenize(self, request: EngineRequest) -> EngineRequest:
        """The request with ``prompt_token_ids`` set (unchanged if it has them); raises
        ``InvalidRequestError`` naming the field for a prompt the replica would refuse."""
        if request.prompt_token_ids is not None:
            return request
        return replace(request, prompt_token_ids=self.token_ids(request.prompt, request.messages))

    def token_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        return self.processor.prompt_token_ids(prompt, messages)


class SharedTokenizer:
    """The ingress's one ``PromptTokenizer``, fetched when a request first needs it.

    Concurrent first requests share one fetch. The fetch runs as a task of its own, in a fresh
    context: in a request's context, Serve would cancel its handle calls when that request is
    cancelled (a client's deadline), and every request after it would then await a cancelled fetch
    (measured: each one ``CANCELLED`` at once, for good). A fetch that fails or is cancelled leaves
    requests untokenized (the replica tokenizes them) and is tried again after ``retry_s``; files
    that do not load are not fetched again.
    """

    def __init__(self, fetch: Callable[[], Awaitable[PromptTokenizer]], retry_s: float = 5.0):
        self._fetch = fetch
        self.retry_s = retry_s
        self.tokenizer: PromptTokenizer | None = None
        self._task: asyncio.Task | None = None
        self._retry_at = 0.0  # monotonic; inf once the files proved unloadable

    async def get(self) -> PromptTokenizer | None:
        """The tokenizer, or None while it cannot be had (raises only if this caller is cancelled)."""
        if self.tokenizer is not None or time.monotonic() < self._retry_at:
            return self.tokenizer
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._fetch(), context=contextvars.Context())
        task = self._task
        try:
            self.tokenizer = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # this caller was cancelled, not the fetch: it goes on for the others
                raise
            self._failed(task, "the fetch was cancelled", permanent=False)
        except Exception as err:  # noqa: BLE001 - requests go untokenized meanwhile
            self._failed(task, repr(err), permanent=isinstance(err, TokenizerLoadError))
        return self.tokenizer

    def _failed(self, task: asyncio.Task, why: str, permanent: bool) -> None:
        if self._task is not task:  # another caller has handled it already
            return
        self._task = None
        self._retry_at = float("inf") if permanent else time.monotonic() + self.retry_s
        logger.warning("no tokenizer in the ingress (%s); replicas tokenize%s", why,
                       "" if permanent else f"; trying again in {self.retry_s:g} s")
