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

import contextlib
import logging
import os
import shutil
import sys
import tempfile
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


class PromptTokenizer:
    """Turns an ``EngineRequest``'s text or chat prompt into checked token ids."""

    def __init__(self, tokenizer, model_info: dict):
        self.processor = InputProcessor(tokenizer, model_info["vocab_size"], model_info["max_model_len"],
                                        model_info["max_cache_tokens"])

    @classmethod
    def from_files(cls, files: dict[str, bytes], model_info: dict, hide_torch: bool = False) -> "PromptTokenizer":
        return cls(load_tokenizer(files, hide_torch), model_info)

    def tokenize(self, request: EngineRequest) -> EngineRequest:
        """The request with ``prompt_token_ids`` set (unchanged if it has them); raises
        ``InvalidRequestError`` naming the field for a prompt the replica would refuse."""
        if request.prompt_token_ids is not None:
            return request
        return replace(request, prompt_token_ids=self.token_ids(request.prompt, request.messages))

    def token_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        return self.processor.prompt_token_ids(prompt, messages)
