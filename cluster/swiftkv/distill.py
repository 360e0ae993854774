"""``llm-cluster swiftkv distill``: self-distil a model's SwiftKV parameters.

The teacher is the same model with SwiftKV off. Only ``norm_swiftkv`` and the ``*_swiftkv``
projections train, initialised from the model's own (``DenseSwiftKVModel.init_from_base``). The
loss is KL(teacher || student) at temperature T (times T^2) plus MSE between the two final
hidden states. Layers below the split are identical for both, so they run once per batch.

Data never comes from the network: by default the teacher writes the training text itself, from
the prompt set shipped in ``cluster/swiftkv/data/train_prompts.txt``; ``--corpus`` trains on a
local text file instead. Evaluation uses text not trained on: the teacher's answers to
``heldout_prompts.txt`` and, with ``--eval-corpus``, a local text file.

Checkpoints (``state.pt`` in ``--work-dir``) hold parameters, optimiser and data order; a rerun
with the same ``--work-dir`` resumes from the last one.

``--dtype auto`` (the default) computes under bfloat16 autocast where the CPU runs bfloat16
natively (AMX, AVX512-BF16) and in float32 elsewhere: an AVX2-only CPU emulates every bfloat16
matmul, several times slower than float32 (``cluster.config.resolve_dtype``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from cluster.config import resolve_dtype
from cluster.swiftkv.checkpoint import SwiftKVParams, save_params
from cluster.swiftkv.dense_model import DenseSwiftKVModel, from_checkpoint

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
DTYPES = ("auto", "bfloat16", "float32")


def compute_dtype(dtype: str) -> str:
    """The dtype the student and teacher compute in: ``dtype`` with "auto" resolved for this CPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolve_dtype(dtype, "cpu")


def _autocast(dtype: str):
    """bfloat16 autocast for a bfloat16 run; float32 runs as the weights are."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if compute_dtype(dtype) == "bfloat16" else contextlib.nullcontext()


# ---- data ------------------------------------------------------------------------------------

def teacher_corpus(model: str, prompts_path: str, max_tokens: int, seed: int, cache_path: str,
                   max_prompts: int | None = None, samples_per_prompt: int = 1, dtype: str = "auto") -> list[list[int]]:
    """Chat prompts + the teacher's sampled answers (``samples_per_prompt`` each, differently
    seeded), as token ids (cached in ``cache_path``)."""
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            return json.load(f)
    from cluster.llm import LLM
    from cluster.sampling_params import SamplingParams

    with open(prompts_path) as f:
        prompts = [line.strip() for line in f if line.strip()][:max_prompts]
    llm = LLM(model=model, dtype=compute_dtype(dtype), swiftkv=False, max_num_seqs=64)
    processor = llm.engine.input_processor
    ids = [processor.chat_token_ids([{"role": "user", "content": p}]) for p in prompts]
    ids = [p for p in ids for _ in range(samples_per_prompt)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=seed + i)
              for i in range(len(ids))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=True)
    sequences = [p + list(o.outputs[0].token_ids) for p, o in zip(ids, outputs)]
    llm.engine.shutdown()
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    with open(cache_path, "w") as f:
        json.dump(sequences, f)
    return sequences


def text_corpus(model_dir: str, path: str) -> list[list[int]]:
    """A local text file as token ids, one sequence per blank-line-separated paragraph group."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [tokenizer.encode(text, add_special_tokens=False)]


def pack(sequences: list[list[int]], seq_len: int, separator: int) -> torch.Tensor:
    """Concatenate (separated by ``separator``) and cut into rows of ``seq_len`` tokens."""
    stream: list[int] = []
    for seq in sequences:
        stream += seq + [separator]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one row of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


# ---- loss and evaluation -----------------------------------------------------------------------

@torch.no_grad()
def teacher_side(model: DenseSwiftKVModel, ids: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream entering the split (shared by teacher and student) and the teacher's final
    normed hidden state, for a batch of rows."""
    split_state = model.base_layers(model.embed(ids), 0, model.split, cos_sin)
    teacher_hidden = model.final_norm(model.base_layers(split_state, model.split, model.arch.num_layers, cos_sin))
    return split_state, teacher_hidden


class TeacherCache:
    """Each training row's ``teacher_side``, kept after its first use, so that later epochs run
    only the student; at most ``max_bytes`` of it (rows past that are recomputed each time).
    Caching changes nothing but speed: the frozen teacher gives the same tensors every epoch."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, model: DenseSwiftKVModel, rows: torch.Tensor, ids: torch.Tensor, cos_sin
            ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = rows.tolist()
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if missing:  # the teacher runs only for the rows not kept yet
            split_state, teacher_hidden = teacher_side(model, ids[missing], cos_sin)
            for j, i in enumerate(missing):
                fresh[keys[i]] = (split_state[j], teacher_hidden[j])
                size = (split_state[j].numel() * split_state.element_size()
                        + teacher_hidden[j].numel() * teacher_hidden.element_size())
                if self.bytes + size <= self.max_bytes:
                    self.rows[keys[i]] = (split_state[j].clone(), teacher_hidden[j].clone())
                    self.bytes += size
        parts = [self.rows.get(k) or fresh[k] for k in keys]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


class _TemperedKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(teacher / t) || softmax(student / t)), and the number of rows
    where the two argmaxes agree. Forward and backward share one pass over the logits, a few rows
    at a time, so each chunk's float32 temporaries stay in cache instead of streaming
    [tokens, vocab] tensors through memory five times; the student's gradient,
    (softmax(student / t) - softmax(teacher / t)) / t, is kept from that pass."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, t: float, chunk: int):
        s, q = student.detach().flatten(0, -2), teacher.detach().flatten(0, -2)
        grad = torch.empty_like(s)
        total, agree = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        for i in range(0, s.shape[0], chunk):
            log_s = F.log_softmax(s[i:i + chunk].float() / t, -1)
            log_q = F.log_softmax(q[i:i + chunk].float() / t, -1)
            p_q = log_q.exp()
            total += torch.vdot(p_q.flatten(), (log_q - log_s).flatten()).double()
            agree += (log_s.argmax(-1) == log_q.argmax(-1)).sum()
            grad[i:i + chunk] = log_s.exp_().sub_(p_q).div_(t)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        ctx.mark_non_differentiable(agree)
        return total.to(torch.float32), agree

    @staticmethod
    def backward(ctx, grad_total, _grad_agree):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype)).view(ctx.shape), None, None, None


def tempered_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over tokens of KL(teacher || student) at ``temperature``, times its square (the
    distillation loss), and the fraction of tokens whose argmax agrees."""
    total, agree = _TemperedKL.apply(student_logits, teacher_logits, temperature, chunk)
    tokens = student_logits.shape[:-1].numel()
    return total * (temperature * temperature / tokens), agree.float() / tokens


def distillation_loss(model: DenseSwiftKVModel, ids: torch.Tensor, temperature: float, hidden_weight: float,
                      teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """KL(teacher || student) at ``temperature`` (times its square) + ``hidden_weight`` x MSE of the
    final hidden states. ``teacher`` is ``teacher_side(model, ids)`` when the caller has it."""
    cos_sin = model.rotary(ids.shape[1], torch.float32)
    split_state, teacher_hidden = teacher if teacher is not None else teacher_side(model, ids, cos_sin)
    with torch.no_grad():
        teacher_logits = model.logits(teacher_hidden)
    student_hidden = model.final_norm(model.swiftkv_layers(split_state, cos_sin))
    kl, agree = tempered_kl(model.logits(student_hidden), teacher_logits, temperature)
    mse = F.mse_loss(student_hidden.float(), teacher_hidden.float())
    return kl + hidden_weight * mse, {"kl": kl.item(), "mse": mse.item(), "agree": agree.item()}


@torch.no_grad()
def evaluate(model: DenseSwiftKVModel, rows: torch.Tensor, batch_size: int = 4, dtype: str = "auto") -> dict:
    """Next-token agreement of SwiftKV with the base model, and both models' perplexity, on ``rows``
    (computed in ``dtype``, "auto" resolved as ``compute_dtype`` does)."""
    agree = nll_student = nll_base = count = 0.0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start:start + batch_size]
        with _autocast(dtype):
            base = model(ids, swiftkv=False).float()
            student = model(ids, swiftkv=True).float()
        targets = ids[:, 1:]
        agree += (base.argmax(-1) == student.argmax(-1)).float().sum().item()
        nll_base += F.cross_entropy(base[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
        nll_student += F.cross_entropy(student[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += ids.numel()
    predicted = count - rows.shape[0]
    return {"agreement": agree / count, "ppl_swiftkv": math.exp(nll_student / predicted),
            "ppl_base": math.exp(nll_base / predicted), "tokens": int(count)}


# ---- the run ---------------------------------------------------------------------------------

def run_distill(args) -> int:
    from tqdm.auto import tqdm

    from cluster.config import ModelConfig
    from cluster.model.source import resolve_model

    torch.manual_seed(args.seed)
    dtype = compute_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, ModelConfig(cache_dir=args.cache_dir).resolved_cache_dir()).path
    os.makedirs(args.work_dir, exist_ok=True)
    model = from_checkpoint(model_dir, args.num_key_value_layers, args.key_value_group_size)
    model.init_from_base()  # a llama_swiftkv checkpoint's own parameters are ignored: we train fresh ones
    separator = (model.arch.eos_token_ids or (0,))[0]

    if args.corpus:
        train_sequences, train_source = text_corpus(model_dir, args.corpus), f"local corpus {args.corpus}"
    else:
        train_sequences = teacher_corpus(args.model, args.prompts, args.teacher_max_tokens, args.seed,
                                         os.path.join(args.work_dir, "teacher_train.json"), args.max_prompts,
                                         args.samples_per_prompt, dtype)
        train_source = (f"teacher answers to {os.path.relpath(args.prompts)} ({len(train_sequences)} answers, "
                        f"{args.samples_per_prompt} sampled per prompt)")
    heldout = teacher_corpus(args.model, args.heldout_prompts, args.teacher_max_tokens, args.seed + 1,
                             os.path.join(args.work_dir, "teacher_heldout.json"), dtype=dtype)
    train_rows = pack(train_sequences, args.seq_len, separator)
    eval_sets = {f"teacher answers to {os.path.relpath(args.heldout_prompts)}": pack(heldout, args.seq_len, separator)}
    if args.eval_corpus:
        eval_sets[f"local text {args.eval_corpus}"] = pack(text_corpus(model_dir, args.eval_corpus), args.seq_len,
                                                           separator)[: args.eval_rows]

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    state_path = os.path.join(args.work_dir, "state.pt")
    step, history, segments = 0, [], []
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=False)
        step, history, before = state["step"], state["history"], state.get("before") or {}
        segments = state.get("segments", [])
        # An evaluation set added on resume gets its "before" from the undistilled weights too.
        before.update({name: evaluate(model, rows, dtype=dtype) for name, rows in eval_sets.items() if name not in before})
        model.load_published(state["swiftkv"])
        optimizer.load_state_dict(state["optimizer"])
        print(f"resuming from step {step} ({state_path})")
    else:
        before = {name: evaluate(model, rows, dtype=dtype) for name, rows in eval_sets.items()}
    command = "llm-cluster swiftkv distill " + " ".join(getattr(args, "argv", []))
    # Each invocation is one segment; a run extended with a larger --steps restarts its cosine
    # schedule at that step's point on the longer horizon, so the recipe lists every segment.
    if step < args.steps and (not segments or segments[-1]["command"] != command):
        segments.append({"command": command, "from_step": step, "to_step": args.steps})

    def lr_at(s: int) -> float:
        warm = max(1, args.steps // 20)
        if s < warm:
            return args.lr * (s + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))

    def save_state() -> None:
        torch.save({"swiftkv": model.published_tensors(), "optimizer": optimizer.state_dict(),
                    "step": step, "history": history, "before": before, "segments": segments}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    order = torch.Generator().manual_seed(args.seed)
    epoch_perm = torch.randperm(train_rows.shape[0], generator=order)
    cache = TeacherCache(int(args.teacher_cache_gb * (1 << 30)))
    cos_sin = model.rotary(args.seq_len, torch.float32)
    bar = tqdm(total=args.steps, initial=step, desc="distilling SwiftKV", unit="step")
    started = time.monotonic()
    while step < args.steps:
        index = (step * args.batch_size) % train_rows.shape[0]
        if index + args.batch_size > train_rows.shape[0]:  # next epoch: a fresh order
            epoch_perm = torch.randperm(train_rows.shape[0], generator=order)
            index = 0
        batch_rows = epoch_perm[index:index + args.batch_size]
        ids = train_rows[batch_rows]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with _autocast(dtype):
            teacher = cache.get(model, batch_rows, ids, cos_sin)
            loss, parts = distillation_loss(model, ids, args.temperature, args.hidden_loss_weight, teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), **parts})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{parts['kl']:.4f}", agree=f"{parts['agree']:.3f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_state()
    bar.close()
    after = {name: evaluate(model, rows, dtype=dtype) for name, rows in eval_sets.items()}
    recipe = {"base_model": args.model, "num_key_value_layers": args.num_key_value_layers,
              "key_value_group_size": args.key_value_group_size, "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "dtype": dtype, "lr": args.lr, "temperature": args.temperature,
              "hidden_loss_weight": args.hidden_loss_weight, "seed": args.seed, "train_data": train_source,
              "train_tokens_seen": step * args.batch_size * args.seq_len, "eval_before": before, "eval_after": after,
              "command": command, "segments": segments}
    save_params(args.out, SwiftKVParams(args.num_key_value_layers, args.key_value_group_size,
                                        model.published_tensors(), recipe))
    with open(os.path.join(args.work_dir, "report.json"), "w") as f:
        json.dump({**recipe, "history": history, "seconds_this_run": time.monotonic() - started}, f, indent=1)
    print(json.dumps({"before": before, "after": after, "out": args.out}, indent=1))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="self-distil SwiftKV parameters (teacher = the model with SwiftKV off)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-key-value-layers", type=int, default=15, help="the split layer l")
    p.add_argument("--key-value-group-size", type=int, default=1, help="AcrossKV: layers sharing one K/V")
    p.add_argument("--out", required=True, help="the SwiftKV parameter file to write (.safetensors)")
    p.add_argument("--work-dir", required=True, help="checkpoints, teacher text and report; reruns resume")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hidden-loss-weight", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--prompts", default=os.path.join(DATA_DIR, "train_prompts.txt"))
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--samples-per-prompt", type=int, default=8, help="teacher answers sampled per training prompt")
    p.add_argument("--heldout-prompts", default=os.path.join(DATA_DIR, "heldout_prompts.txt"))
    p.add_argument("--teacher-max-tokens", type=int, default=192)
    p.add_argument("--corpus", default=None, help="train on this local text file instead of teacher text")
    p.add_argument("--eval-corpus", default=None, help="also evaluate on this local text file")
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--teacher-cache-gb", type=float, default=4.0,
                   help="memory for the teacher's outputs per training row, reused in later epochs")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 autocast where this CPU computes it natively, else float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_distill)
