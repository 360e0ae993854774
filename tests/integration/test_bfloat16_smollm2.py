"""The real SmolLM2-135M in bfloat16 against transformers in bfloat16.

bfloat16 sums round differently from one implementation to the next (oneDNN's blocking, our
native kernels, row-bucket padding), so token-for-token equality is not the bar over long
generations; the bar is: the first 8 greedy tokens of every prompt equal transformers', and over
teacher-forced positions the two models' top-1 tokens agree at least 97% of the time. Where the
model itself cannot tell two tokens apart at bfloat16's precision, either token is right, and the
comparison of that prompt ends there: the exact (float32) model puts our token within two bfloat16
steps of its top. Seen: the "quiz" prompt's 7th token (33 and 34 both 35.25 in transformers'
bfloat16; float32 prefers 34 by 0.1) and the "chat" prompt's 5th (float32: 11355 at 31.369, 67 at
31.296, 344 at 31.280; transformers' bfloat16 31.625 / 31.5 / 31.375; ours 31.5 for both 11355 and
344), which one is picked moving with the day's machine. At most two prompts may end on such a
near-tie; a prompt where transformers' own bfloat16 logits of the two tokens are equal (its argmax
took the lower id) is not counted: there its token is arbitrary. Seen on an AVX2-only CPU (no
oneDNN bfloat16, every bfloat16 matmul emulated): "quiz" and "chat" exact ties in transformers (both
ours the float32 model's top) and "multilingual"'s 2nd token one bfloat16 step apart (253 vs 838:
float32 20.121 vs 20.329, transformers 20.375 vs 20.5).
"""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.conftest import NUM_THREADS, hf_greedy

pytestmark = pytest.mark.slow

FIRST_TOKENS = 8
TEACHER_FORCED_POSITIONS = 64


@pytest.fixture(scope="module")
def hf_bf16(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def engine_bf16(smollm2_path) -> LLM:
    return LLM(smollm2_path, dtype="bfloat16", num_threads=NUM_THREADS, num_blocks=400)


def test_first_greedy_tokens_equal_transformers_bfloat16(engine_bf16, hf_bf16, hf_smollm2, smollm2_prompts):
    names = [n for n in smollm2_prompts if n != "eos_first"][:8]  # eos_first: a single EOS, nothing to compare
    assert len(names) == 8
    # One batch: decodes and the long prompt's chunks share steps, rows are padded to buckets.
    outputs = engine_bf16.generate([{"prompt_token_ids": smollm2_prompts[n]} for n in names],
                                   SamplingParams(temperature=0.0, max_tokens=FIRST_TOKENS))
    near_ties = 0
    for name, out in zip(names, outputs):
        ours, expected = out.outputs[0].token_ids, hf_greedy(hf_bf16, smollm2_prompts[name], FIRST_TOKENS)
        if ours == expected:
            continue
        i = next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)
        context = torch.tensor([smollm2_prompts[name] + ours[:i]])
        with torch.no_grad():  # the exact model's view of the two candidates, and the reference's own
            logits = hf_smollm2(context).logits[0, -1]
            reference = hf_bf16(context).logits[0, -1]
        top = logits.max()
        step = 2.0 ** (torch.floor(torch.log2(top.abs())).item() - 7)  # one bfloat16 step at that size
        assert logits[ours[i]] >= top - 2 * step, f"{name}: token {i} is {ours[i]}, transformers' {expected[i]} " \
                                                  f"(float32 logits {logits[ours[i]].item():.3f} vs {top.item():.3f})"
        near_ties += bool(reference[ours[i]] != reference[expected[i]])  # equal there: its pick was arbitrary
    assert near_ties <= 2, f"{near_ties} of 8 prompts ended on a bfloat16 near-tie"


def test_teacher_forced_top1_agrees_with_transformers_bfloat16(engine_bf16, hf_bf16, smollm2_prompts):
    ids = smollm2_prompts["long"]
    ours = engine_bf16.engine.executor.worker.score(ids)  # [len(ids), vocab] float32
    with torch.no_grad():  # the head over the compared positions only
        theirs = hf_bf16(torch.tensor([ids]), logits_to_keep=TEACHER_FORCED_POSITIONS).logits[0].float()
    tail = slice(len(ids) - TEACHER_FORCED_POSITIONS, len(ids))
    agree = (ours[tail].argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.97, f"top-1 agreement {agree:.3f} over the last {TEACHER_FORCED_POSITIONS} positions"
