"""``llm-cluster bench-spec``: speculative decoding off vs n-gram vs suffix, in one run.

Workloads, the same token ids for every method:

- **extraction**: seeded synthetic documents of purchase records (500-1,500 tokens) and a chat
  question asking for fields that occur in them, answered greedily until EOS (at most
  ``--max-tokens``): "copy" asks for the records' lines (single stream: requests one after
  another, each alone; and ``--streams`` requests at once), "json" asks for the same fields as
  JSON objects (single stream). The answers copy spans of the document, which the drafters exploit.
- **random**: prompts of random token ids, ``--max-tokens`` tokens each (ignore_eos), sampled at
  temperature 1 (seeded), single stream: output that does not repeat, where speculation can only
  cost (greedy decoding of random prompts makes this model loop, which drafts would predict).

Greedy speculation is lossless: in float32 every method produces the very same tokens. In bfloat16
a verify pass computes a token's logits in another kernel and shape than a decode step, so a near-tie
may round the other way and the outputs part from there; the "same" column counts the requests whose
tokens equal the baseline's. The figures are decode tokens/s after the first token (single stream) or after the last request's
first token (batched), and the acceptance rate (accepted / drafted tokens). Each figure is the
median over ``--repeats`` runs; each repeat uses fresh documents (the same for every method) and
the methods take turns within a repeat, so drift on a noisy machine hits them alike.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

METHODS = ("off", "ngram", "suffix")

_SUPPLIERS = ("Northwind Traders", "Contoso Pharmaceuticals", "Fabrikam Industrial Supply", "Litware Systems",
              "Adventure Works Cycles", "Tailspin Logistics", "Wide World Importers", "Proseware Analytics",
              "Blue Yonder Freight", "Coho Vineyard Holdings", "Alpine Ski House", "Graphic Design Institute")
_ITEMS = ("steel fasteners", "laboratory reagents", "office chairs", "server racks", "bicycle frames",
          "shipping containers", "printer toner", "safety gloves", "network switches", "wine barrels")
_CITIES = ("Rotterdam", "Lyon", "Denver", "Osaka", "Gdansk", "Porto", "Calgary", "Leipzig", "Austin", "Turin")
_CURRENCIES = ("EUR", "USD", "GBP", "CHF")
# Two ways to ask for the same fields: quoting the document's lines (what a small model does well
# and what extraction answers mostly are), and re-writing them as JSON (SmolLM2-135M then writes
# code-like JSON that copies far less).
QUESTIONS = {
    "copy": "Copy the supplier, invoice number and total amount lines of every record above.",
    "json": ("From the document above, list every record's supplier, invoice number and total amount, "
             "one JSON object per line with the keys \"supplier\", \"invoice\" and \"amount\"."),
}


def _record(rng: random.Random, index: int) -> str:
    supplier = rng.choice(_SUPPLIERS)
    return (f"Record {index}\n"
            f"Supplier: {supplier} ({rng.choice(_CITIES)})\n"
            f"Invoice number: INV-{rng.randint(2019, 2026)}-{rng.randint(10000, 99999)}\n"
            f"Date: {rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\n"
            f"Items: {rng.randint(2, 900)} x {rng.choice(_ITEMS)}\n"
            f"Total amount: {rng.randint(100, 99999):,}.{rng.randint(0, 99):02d} {rng.choice(_CURRENCIES)}\n"
            f"Contact: {supplier.split()[0].lower()}.billing@example.com\n\n")


def extraction_prompt(tokenizer, rng: random.Random, question: str = QUESTIONS["copy"], min_tokens: int = 500,
                      max_tokens: int = 1500) -> list[int]:
    """One chat prompt: a document of records (its length drawn in [min_tokens, max_tokens]) and
    the question, through the model's chat template."""
    target = rng.randint(min_tokens, max_tokens)
    doc, n = "Purchase ledger, exported from the accounts system.\n\n", 1
    while True:
        longer = doc + _record(rng, n)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": longer + question}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if len(ids) > target and n > 1:
            return best
        doc, best, n = longer, ids, n + 1


@dataclass
class Run:
    """One method's figures over one repeat."""

    decode_tok_s: float
    tokens: list[list[int]] = field(repr=False)
    drafted: int = 0
    accepted: int = 0
    same_as_base: int | None = None  # requests whose tokens equal the baseline method's


def _spec_stats(engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats["spec_drafted_tokens"], stats["spec_accepted_tokens"]


def single_stream(llm, prompts: list[list[int]], params) -> Run:
    """Each prompt alone, one after another: decode tokens/s over all of them (tokens after each
    request's first, over the time after its first)."""
    engine, tokens, decode_tokens, decode_time = llm.engine, [], 0, 0.0
    d0, a0 = _spec_stats(engine)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"spec-single-{i}", {"prompt_token_ids": prompt}, params)
        first, out_tokens = None, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                out_tokens = out.outputs[0].token_ids
            if first is None and out_tokens:
                first, at_first = time.perf_counter(), len(out_tokens)
        decode_time += time.perf_counter() - first
        decode_tokens += len(out_tokens) - at_first
        tokens.append(list(out_tokens))
    d1, a1 = _spec_stats(engine)
    return Run(decode_tokens / decode_time, tokens, d1 - d0, a1 - a0)


def batched(llm, prompts: list[list[int]], params) -> Run:
    """All prompts at once: decode tokens/s from the moment the last request has its first token."""
    engine = llm.engine
    d0, a0 = _spec_stats(engine)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"spec-batch-{i}", {"prompt_token_ids": prompt}, params)
    latest: dict[str, list[int]] = {}
    start = at_start = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            latest[out.request_id] = out.outputs[0].token_ids
        if start is None and len(latest) == len(prompts) and all(latest.values()):
            start, at_start = time.perf_counter(), sum(len(t) for t in latest.values())
    elapsed = time.perf_counter() - start
    tokens = [list(latest[f"spec-batch-{i}"]) for i in range(len(prompts))]
    d1, a1 = _spec_stats(engine)
    return Run((sum(map(len, tokens)) - at_start) / max(elapsed, 1e-9), tokens, d1 - d0, a1 - a0)


def run_spec_bench(args) -> int:
    from transformers import AutoTokenizer

    from cluster import LLM, SamplingParams
    from cluster.bench import _cache_dir, cpu_summary
    from cluster.model.source import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model, _cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    methods = [m for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    llms = {}
    for m in methods:
        spec = None if m == "off" else {"method": m, "num_tokens": args.num_tokens}
        llms[m] = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
                      enable_prefix_caching=False, speculative=spec)
    print(f"CPU: {cpu_summary()}; torch threads {torch.get_num_threads()}; dtype {args.dtype}; "
          f"drafts of up to {args.num_tokens} tokens; prefix caching off", flush=True)

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    fixed = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    vocab = len(tokenizer)
    for llm in llms.values():  # warm-up: kernels, allocator, the decode paths
        single_stream(llm, [tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog.")], fixed)

    scenarios = ("copy lines, single stream", f"copy lines, {args.streams} streams", "as JSON, single stream",
                 "random tokens, sampled, single")
    results: dict[str, dict[str, list[Run]]] = {s: {m: [] for m in methods} for s in scenarios}
    for r in range(args.repeats):
        rng = random.Random(args.seed + r)
        lo, hi = args.prompt_tokens
        singles = [extraction_prompt(tokenizer, rng, QUESTIONS["copy"], lo, hi) for _ in range(args.single_requests)]
        batch = [extraction_prompt(tokenizer, rng, QUESTIONS["copy"], lo, hi) for _ in range(args.streams)]
        as_json = [extraction_prompt(tokenizer, rng, QUESTIONS["json"], lo, hi) for _ in range(args.single_requests)]
        noise = [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.single_requests)]
        # Random prompts decoded greedily make this model loop (drafts then all accepted); sampled at
        # temperature 1 its output does not repeat, which is the case where speculation can only cost.
        sampled = SamplingParams(temperature=1.0, seed=args.seed + r, max_tokens=args.max_tokens, ignore_eos=True)
        for m in methods:
            results[scenarios[0]][m].append(single_stream(llms[m], singles, greedy))
            results[scenarios[1]][m].append(batched(llms[m], batch, greedy))
            results[scenarios[2]][m].append(single_stream(llms[m], as_json, greedy))
            results[scenarios[3]][m].append(single_stream(llms[m], noise, sampled))
        for s in scenarios[:3]:  # lossless: each greedy request's tokens against the baseline's
            ref = results[s][methods[0]][-1].tokens
            for m in methods[1:]:
                run = results[s][m][-1]
                run.same_as_base = sum(a == b for a, b in zip(run.tokens, ref))
        print(f"repeat {r + 1}/{args.repeats} done: "
              + "; ".join(f"{s}: " + ", ".join(f"{m} {results[s][m][-1].decode_tok_s:.1f}" for m in methods)
                          for s in scenarios), flush=True)

    base = methods[0]
    print(f"\nmedians of {args.repeats} runs (decode tokens/s; ratio against {base}; acceptance = accepted / drafted)")
    print(f"{'scenario':32s} {'method':7s} {'tok/s':>8s} {'ratio':>7s} {'accept':>7s} {'out tok':>8s} "
          f"{'same':>7s}")
    for s in scenarios:
        base_tps = statistics.median([run.decode_tok_s for run in results[s][base]])
        for m in methods:
            runs = results[s][m]
            tps = statistics.median([run.decode_tok_s for run in runs])
            drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
            rate = f"{accepted / drafted:.2f}" if drafted else "-"
            out = statistics.median([sum(map(len, run.tokens)) for run in runs])
            same = "-" if m == base or runs[0].same_as_base is None else \
                f"{sum(r.same_as_base for r in runs)}/{sum(len(r.tokens) for r in runs)}"
            print(f"{s:32s} {m:7s} {tps:8.1f} {tps / base_tps:6.2f}x {rate:>7s} {out:8.0f} {same:>7s}")
    if not args.skip_structured:
        structured_overhead(llms[base], tokenizer, args)
    for llm in llms.values():
        llm.engine.shutdown()
    return 0


# ---- structured outputs -------------------------------------------------------------------------

RECORD_SCHEMA = {"type": "object", "properties": {
    "supplier": {"type": "string", "maxLength": 40}, "invoice": {"type": "string", "pattern": "^INV-[0-9]{4}-[0-9]{5}$"},
    "amount": {"type": "number"}, "currency": {"enum": ["EUR", "USD", "GBP", "CHF"]}},
    "required": ["supplier", "invoice", "amount", "currency"], "additionalProperties": False}


def _decode_step_s(llm, prompts: list[list[int]], params) -> tuple[float, int]:
    """Seconds per decode step once every request has its first token, and the tokens produced."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"so-{i}", {"prompt_token_ids": prompt}, params)
    latest: dict[str, int] = {}
    start = end = None
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        for out in outs:
            latest[out.request_id] = len(out.outputs[0].token_ids)
        if start is None:
            if len(latest) == len(prompts) and all(latest.values()):
                start = time.perf_counter()
        elif len(latest) == len(prompts) and engine.scheduler.num_running == len(prompts):
            steps += 1
            end = time.perf_counter()
    if not steps:
        raise RuntimeError("no decode step ran with the whole batch: raise the token budget")
    return (end - start) / steps, sum(latest.values())


def structured_overhead(llm, tokenizer, args) -> None:
    """Per-step cost of the grammar masks at batch 1 and ``--streams``, against the same requests
    unconstrained; and the compile time of distinct schemas."""
    from cluster.sampling.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask
    from cluster.sampling_params import SamplingParams
    from cluster.structured_outputs import StructuredOutputs

    rng = random.Random(args.seed)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Invent purchase record number {i} as JSON."}], add_generation_prompt=True,
        tokenize=True) for i in range(args.streams)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    tokens = 48
    constrained = SamplingParams(temperature=0.0, max_tokens=tokens, structured_outputs={"json": RECORD_SCHEMA})
    free = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    print(f"\nstructured outputs (JSON schema of 4 fields; {tokens} tokens at most; medians of {args.repeats} runs)")
    print(f"{'batch':>5s} {'free step ms':>13s} {'schema step ms':>15s} {'overhead':>9s} {'mask ms/step':>13s}")
    compiler = GrammarCompiler(tokenizer, llm.engine.arch.vocab_size, llm.engine.eos_token_ids)
    for batch in (1, args.streams):
        free_s = statistics.median([_decode_step_s(llm, prompts[:batch], free)[0] for _ in range(args.repeats)])
        so_s = statistics.median([_decode_step_s(llm, prompts[:batch], constrained)[0] for _ in range(args.repeats)])
        # The masks alone: fill every row's bitmask and apply it to a [batch, V] logits tensor.
        grammars = [compiler.matcher(StructuredOutputs(json=RECORD_SCHEMA)) for _ in range(batch)]
        path = tokenizer.encode('{"supplier": "Northwind Traders", "invoice": "INV-2024-12345", "amount": 1')
        logits = torch.zeros(batch, llm.engine.arch.vocab_size)
        timings = []
        for token in path:
            begin = time.perf_counter()
            bitmask = allocate_bitmask(batch, logits.shape[1])
            for row, grammar in enumerate(grammars):
                grammar.fill_bitmask(bitmask, row)
            apply_bitmask(logits, bitmask, list(range(batch)))
            for grammar in grammars:
                grammar.accept(token)
            timings.append(time.perf_counter() - begin)
        mask_ms = 1e3 * statistics.median(timings)
        print(f"{batch:5d} {1e3 * free_s:13.2f} {1e3 * so_s:15.2f} {so_s / free_s - 1:8.1%} {mask_ms:13.3f}")
    compile_ms = []
    for i in range(20):  # distinct schemas: nothing cached
        schema = json.loads(json.dumps(RECORD_SCHEMA))
        schema["properties"][f"field_{i}"] = {"type": "integer", "maximum": rng.randint(10, 10**6)}
        begin = time.perf_counter()
        compiler.compile(StructuredOutputs(json=schema))
        compile_ms.append(1e3 * (time.perf_counter() - begin))
    begin = time.perf_counter()
    compiler.compile(StructuredOutputs(json=RECORD_SCHEMA))
    cached_ms = 1e3 * (time.perf_counter() - begin)
    print(f"schema compile: median {statistics.median(compile_ms):.1f} ms, max {max(compile_ms):.1f} ms over 20 distinct "
          f"schemas; a cached one {cached_ms:.3f} ms")
