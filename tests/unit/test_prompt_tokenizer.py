"""The ingress's tokenizer: built from the files a replica sends, without torch in its process, it
gives the same token ids as the engine's own tokenizer and the same typed errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.errors import InvalidRequestError
from cluster.serving.engine_request import EngineRequest
from cluster.serving.prompt_tokenizer import PromptTokenizer, tokenizer_files

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
        "from cluster.serving.prompt_tokenizer import PromptTokenizer, tokenizer_files\n"
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
