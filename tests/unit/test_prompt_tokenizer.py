"""The ingress's tokenizer: built from the files a replica sends, without torch in its process, it
gives the same token ids as the engine's own tokenizer and the same typed errors; fetched once for
every request, and never left cancelled by one request's cancellation."""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import sys

import pytest

from cluster.errors import InvalidRequestError
from cluster.serving.engine_request import EngineRequest
from cluster.serving.prompt_tokenizer import PromptTokenizer, SharedTokenizer, TokenizerLoadError, tokenizer_files

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour. Ünïcode ✓"}]
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcode ✓ 12345"
INFO = {"vocab_size": 49152, "max_model_len": 64, "max_cache_tokens": 4096}


def test_the_files_are_the_tokenizers_not_the_weights(smollm2_path):
    files = tokenizer_files(smollm2_path)
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert not [name for name in files if name.endswith(".safetensors")]
    assert sum(len(data) for data in files.values()) < 8 << 20


def test_a_fresh_process_tokenizes_without_loading_torch_and_agrees_with_the_engine(smollm2_path, smollm2_tokenizer):
    script = (
        "import json, sys\n"
        "from cluster.serving.prompt_tokenizer import PromptTokenizer, SharedTokenizer, TokenizerLoadError, tokenizer_files\n"
        f"tok = PromptTokenizer.from_files(tokenizer_files({smollm2_path!r}), {INFO!r}, hide_torch=True)\n"
        f"out = {{'text': tok.token_ids({TEXT!r}), 'chat': tok.token_ids(messages={CHAT!r}),\n"
        "       'torch_loaded': 'torch' in sys.modules}\n"
        "import torch  # hidden only while transformers was first imported\n"
        "out['torch_after'] = torch.tensor([1]).item()\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch_loaded"] is False and out["torch_after"] == 1
    assert out["text"] == smollm2_tokenizer.encode(TEXT, add_special_tokens=True)
    rendered = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert out["chat"] == smollm2_tokenizer.encode(rendered, add_special_tokens=False)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> PromptTokenizer:
    return PromptTokenizer.from_files(tokenizer_files(smollm2_path), INFO)


def test_requests_gain_token_ids_and_keep_the_rest(tokenizer):
    chat = tokenizer.tokenize(EngineRequest("c", messages=CHAT))
    assert chat.prompt_token_ids == tokenizer.token_ids(messages=CHAT) and chat.messages == CHAT
    ids = EngineRequest("i", prompt_token_ids=[5, 6])
    assert tokenizer.tokenize(ids) is ids


@pytest.mark.parametrize("request_, field", [
    (EngineRequest("long", prompt="word " * 200), "prompt"),  # over max_model_len 64
    (EngineRequest("role", messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (EngineRequest("empty", messages=[]), "messages"),
    (EngineRequest("none"), "prompt"),
])
def test_bad_prompts_get_the_engines_typed_errors(tokenizer, request_, field):
    with pytest.raises(InvalidRequestError) as err:
        tokenizer.tokenize(request_)
    assert err.value.field == field


# ---- SharedTokenizer: one fetch for every request, never poisoned by one request's cancellation ----

REQUEST = contextvars.ContextVar("request", default=None)


class Fetch:
    """A scripted fetch: each call does the next of ``plan`` ("ok", "cancel", "fail", "unloadable")
    once ``release`` is set; records the context variable it saw."""

    def __init__(self, *plan: str):
        self.plan, self.calls, self.seen = list(plan), 0, []
        self.release = asyncio.Event()

    async def __call__(self):
        self.calls += 1
        self.seen.append(REQUEST.get())
        await self.release.wait()
        step = self.plan.pop(0)
        if step == "cancel":  # what Serve does to a handle call whose request was cancelled
            raise asyncio.CancelledError()
        if step == "fail":
            raise ConnectionError("no replica")
        if step == "unloadable":
            raise TokenizerLoadError("bad files")
        return f"tokenizer {self.calls}"


def test_concurrent_first_requests_share_one_fetch_run_outside_any_requests_context():
    async def main():
        fetch = Fetch("ok")
        shared = SharedTokenizer(fetch)

        async def request(i):
            REQUEST.set(f"request {i}")
            return await shared.get()

        waiting = [asyncio.create_task(request(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        fetch.release.set()
        assert await asyncio.gather(*waiting) == ["tokenizer 1"] * 5
        assert fetch.calls == 1 and fetch.seen == [None]

    asyncio.run(main())


def test_a_cancelled_caller_leaves_the_fetch_running_for_the_others():
    async def main():
        fetch = Fetch("ok")
        shared = SharedTokenizer(fetch)
        first = asyncio.create_task(shared.get())
        await asyncio.sleep(0.01)
        first.cancel()  # its client's deadline passed
        with pytest.raises(asyncio.CancelledError):
            await first
        fetch.release.set()
        assert await shared.get() == "tokenizer 1" and fetch.calls == 1

    asyncio.run(main())


def test_a_cancelled_or_failed_fetch_falls_back_and_is_tried_again():
    async def main():
        fetch = Fetch("cancel", "fail", "ok")
        fetch.release.set()
        shared = SharedTokenizer(fetch, retry_s=0.0)
        assert await shared.get() is None  # no exception for the caller: the replica tokenizes
        assert await shared.get() is None
        assert await shared.get() == "tokenizer 3"
        shared_later = SharedTokenizer(Fetch("fail", "ok"), retry_s=3600)
        shared_later._fetch.release.set()
        assert await shared_later.get() is None and await shared_later.get() is None  # waits out retry_s
        assert shared_later._fetch.calls == 1

    asyncio.run(main())


def test_files_that_do_not_load_are_not_fetched_again():
    async def main():
        fetch = Fetch("unloadable", "ok")
        fetch.release.set()
        shared = SharedTokenizer(fetch, retry_s=0.0)
        assert await shared.get() is None and await shared.get() is None and fetch.calls == 1

    asyncio.run(main())


def test_a_chat_template_that_refuses_the_turns_is_the_callers_error_naming_messages():
    """Many templates raise (``raise_exception``) on turns that do not alternate; that is bad input
    (INVALID_ARGUMENT / 400), never an internal error."""
    from jinja2 import TemplateError

    from cluster.engine.input_processor import InputProcessor

    class Strict:
        chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"

        def apply_chat_template(self, messages, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant")

        def encode(self, text, **kwargs):
            return [1]

    processor = InputProcessor(Strict(), 100, 64, 4096)
    with pytest.raises(InvalidRequestError) as err:
        processor.prompt_token_ids(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert err.value.field == "messages" and "alternate" in str(err.value)
