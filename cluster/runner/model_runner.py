"""Runs the model on one rank: owns its weights shard, its KV cache partition and (rank 0) sampling."""

from __future__ import annotations

import torch

from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.model.loader import finalize_weights, load_model, torch_dtype
from cluster.distributed.tp_group import TPGroup
from cluster.runner.worker_spec import WorkerSpec
from cluster.runner.kv_cache import allocate_kv_cache
from cluster.runner.decode_graphs import DecodeGraphs
from cluster.runner.model_input import build_model_input
from cluster.runner.matmul_warmup import cache_capacity, warm_matmuls
from cluster.sampling.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask
from cluster.sampling.sampler import Sampler, SamplingRequest, make_generator


class ModelRunner:
    """Executes scheduled steps. Every rank runs the forward pass; only the driver rank samples."""

    def __init__(self, spec: WorkerSpec, tp: TPGroup):
        """Load this rank's weights; call ``init_kv_cache`` before the first step."""
        self.tp = tp
        self.device = torch.device(spec.device)
        self.block_size = spec.block_size
        self.eos_token_ids = spec.eos_token_ids
        self.model = load_model(spec.model_path, spec.arch, spec.max_model_len, tp, spec.dtype).to(self.device)
        on_cpu = self.device.type == "cpu"
        self.kernels = _load_cpu_kernels() if spec.use_native_kernels and on_cpu else None
        # after the move: packing is device-specific
        finalize_weights(self.model, self.kernels, gguf_blocks=spec.gguf_blocks)
        self.spec = spec
        # a 16-bit cache under a float32 model (kv_cache_dtype) needs the decode kernel's widening
        # loads; without them attention runs in torch over widened copies (see attention_kernels)
        widened = torch_dtype(spec.kv_cache_dtype or spec.dtype) != torch_dtype(spec.dtype)
        self._attention_in_torch = self.kernels is not None and widened and not (
            self.kernels.has_widening_decode() and spec.arch.head_dim in (64, 128))
        self.varlen = spec.attention_backend == "triton"  # the Triton kernels read per-sequence metadata
        self.swiftkv = spec.arch.skips_prefill
        # oneDNN matmuls are built per row count: pad 16-bit CPU batches to buckets (padded_rows).
        # float32 stays unpadded: MKL builds nothing per row count, and gemv_f32 takes decode batches.
        self.pad_rows = on_cpu and not self.varlen and self.model.lm_head.weight.dtype in (torch.bfloat16,
                                                                                              torch.float16)
        if self.pad_rows:  # every bucket's matmuls built now, not in the steps that first meet them
            warm_matmuls(self.model, spec.max_num_batched_tokens, spec.max_logits_rows,
                         cache_capacity(spec.onednn_cache_capacity))
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA; see decode_graphs)
        self.sampler = Sampler(self.kernels)
        self._requests: dict[str, SamplingRequest] = {}  # driver only: what sampling needs per request
        self._grammar_compiler = None  # structured outputs: built on the first constrained request

    @property
    def attention_kernels(self):
        """The native kernels attention may use (None: torch's paths)."""
        return None if self._attention_in_torch else self.kernels

    def init_kv_cache(self) -> int:
        """Allocate this rank's KV partition (its heads, every block); return its bytes."""
        spec = self.spec
        self.kv_caches = allocate_kv_cache(spec.arch, spec.num_blocks, spec.block_size,
                                           torch_dtype(spec.kv_cache_dtype or spec.dtype), self.tp.tp_size, self.device)
        if spec.decode_graph_batch:
            self.enable_decode_graphs(spec.decode_graph_batch, capture=True)
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    def enable_decode_graphs(self, max_batch: int, capture: bool) -> None:
        """Run decode-only steps of up to ``max_batch`` sequences through ``DecodeGraphs`` (captured on
        CUDA; ``capture=False`` runs the same padded buckets eagerly, for tests without a GPU)."""
        if not self.varlen:
            raise ValueError("decode graphs need the triton attention backend")
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, self.spec.max_model_len, max_batch,
                                   self.device, capture=capture)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput | None:
        """Run one step; the driver returns sampled tokens, other ranks None."""
        self._update_requests(out)
        if out.is_empty:
            return RunnerOutput() if self.tp.is_driver else None
        if self.graphs is not None and self.graphs.fits(out.sequences):
            logits = self.model.compute_logits(self.graphs.run(out.sequences))
            return self._sample(logits, [s.request_id for s in out.sequences], out)
        batch = build_model_input(out, self.block_size, self.device, self.attention_kernels, swiftkv=self.swiftkv,
                                  varlen=self.varlen, pad=self.pad_rows)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, batch.tail)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        if logits is not None:
            logits = logits[: len(batch.sample_request_ids)]  # the padding rows' logits are dropped
        if logits is None or not batch.sample_request_ids:
            return RunnerOutput() if self.tp.is_driver else None
        return self._sample(logits, batch.sample_request_ids, out)

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_tokens: int | None = None) -> torch.Tensor | None:
        """Logits at every position of one sequence (driver rank; None elsewhere), float32 on CPU.

        Runs through a scratch KV cache of its own, so the engine's cache and state are untouched.
        ``chunk_tokens``: run the sequence in chunks of that many tokens, each attending to the
        earlier ones through the cache as serving does (what a lossy ``kv_cache_dtype`` changes);
        None: one pass.
        """
        spec = self.spec
        num_blocks = -(-len(token_ids) // self.block_size)
        caches = allocate_kv_cache(spec.arch, num_blocks, self.block_size,
                                   torch_dtype(spec.kv_cache_dtype or spec.dtype), self.tp.tp_size, self.device)
        step = chunk_tokens or len(token_ids)
        rows = []
        for start in range(0, len(token_ids), step):
            chunk = list(token_ids[start:start + step])
            blocks = list(range(-(-(start + len(chunk)) // self.block_size)))
            seq = ScheduledSequence("score", chunk, start, blocks, True, True)
            batch = build_model_input(SchedulerOutput([seq]), self.block_size, self.device, self.attention_kernels,
                                      swiftkv=self.swiftkv, keep_all=True, varlen=self.varlen)
            logits = self.model.compute_logits(self.model(batch.input_ids, batch.positions, caches, batch.meta,
                                                          batch.tail))
            if logits is None:
                return None
            rows.append(logits.float().cpu())
        return torch.cat(rows)

    def _update_requests(self, out: SchedulerOutput) -> None:
        if not self.tp.is_driver:
            return
        for rid in out.finished_request_ids:
            self._requests.pop(rid, None)
        for new in out.new_requests:
            params = new.sampling_params
            self._requests[new.request_id] = SamplingRequest(
                params=params,
                generator=make_generator(new.seed),
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=[],
                stop_token_ids_for_min_tokens=frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids),
                grammar=self._grammar(params),
            )

    def _grammar(self, params):
        """The request's grammar matcher, or None; a constraint that does not compile (the engine's
        input processor refuses those first) becomes a fault of that request's first step."""
        if params.structured_outputs is None:
            return None
        try:
            if self._grammar_compiler is None:
                from transformers import AutoTokenizer

                self._grammar_compiler = GrammarCompiler(AutoTokenizer.from_pretrained(self.spec.model_path),
                                                         self.spec.arch.vocab_size, self.eos_token_ids)
            return self._grammar_compiler.matcher(params.structured_outputs)
        except Exception as err:  # noqa: BLE001 - surfaced, pinned on this request, by _apply_grammars
            return BrokenGrammar(err)

    def _sample(self, logits: torch.Tensor, row_request_ids: list[str], out: SchedulerOutput) -> RunnerOutput:
        """Sample each request's rows: one token, or its verified drafts and one more."""
        drafts = {s.request_id: s.token_ids[-s.num_draft_tokens:] for s in out.sequences if s.num_draft_tokens}
        request_ids = row_request_ids
        if drafts:  # each request's rows are consecutive: one, or one per draft and one more
            request_ids, row = [], 0
            while row < len(row_request_ids):
                request_ids.append(row_request_ids[row])
                row += 1 + len(drafts.get(row_request_ids[row], ()))
        requests = [self._requests[rid] for rid in request_ids]
        grammars = [(i, req) for i, req in enumerate(requests) if req.grammar is not None]
        if grammars:
            logits = logits.float()  # a copy for 16-bit logits; masked in place below
            _apply_grammars(logits, grammars, [drafts.get(rid, []) for rid in request_ids], request_ids)
        # Sampled where they are: on a GPU a greedy batch copies back only its token ids, and a
        # sampled one only its noise goes over (drawn on the CPU from each request's own generator).
        if drafts:
            sampled = self.sampler.sample_groups(logits, requests, [drafts.get(rid, []) for rid in request_ids])
        else:  # no speculation this step: one row per request
            sampled = [([token], None if lp is None else [lp]) for token, lp in self.sampler(logits, requests)]
        if grammars:
            _advance_grammars(grammars, sampled, request_ids)
        result = RunnerOutput()
        for rid, req, (tokens, logprobs) in zip(request_ids, requests, sampled):
            req.output_token_ids.extend(tokens)
            result.sampled_token_ids[rid] = tokens
            if logprobs is not None:
                result.logprobs[rid] = logprobs
        return result


class BrokenGrammar:
    """A constraint that failed to compile on this worker: its request's rows raise."""

    def __init__(self, error: BaseException):
        self.error = error


def _apply_grammars(logits: torch.Tensor, grammars: list, drafts: list[list[int]], request_ids: list[str]) -> None:
    """Mask each constrained request's rows to the tokens its grammar allows there.

    A request's rows are its last token's and then one per draft (in order). Row j's mask holds
    after drafts 0..j-1, so those are accepted tentatively and rolled back: the matcher only moves
    on with the tokens actually sampled (``_advance_grammars``). Rows after a draft the grammar
    refuses stay unmasked: verification stops at that draft, whose own row forbids it.
    """
    starts, row = [], 0
    for draft in drafts:
        starts.append(row)
        row += 1 + len(draft)
    bitmask = allocate_bitmask(logits.shape[0], logits.shape[1])
    rows = []
    for i, req in grammars:
        grammar = req.grammar
        if isinstance(grammar, BrokenGrammar):
            raise RuntimeError(f"request {request_ids[i]!r}: its structured output did not compile: "
                               f"{grammar.error}") from grammar.error
        tentative = 0
        for j in range(len(drafts[i]) + 1):
            grammar.fill_bitmask(bitmask, starts[i] + j)
            rows.append(starts[i] + j)
            if j == len(drafts[i]) or not grammar.accept(drafts[i][j]):
                break
            tentative += 1
        grammar.rollback(tentative)
    apply_bitmask(logits, bitmask, rows)


def _advance_grammars(grammars: list, sampled: list, request_ids: list[str]) -> None:
    """Move each constrained request's matcher on by the tokens sampled for it. The masks make every
    one acceptable; if one is not, the step's advances are undone (the step may be re-run to pin
    the fault) and the step fails."""
    advanced = []
    for i, req in grammars:
        tokens = sampled[i][0]
        taken = 0
        for token in tokens:
            if not req.grammar.accept(token):
                break
            taken += 1
        advanced.append((req.grammar, taken))
        if taken < len(tokens):
            for grammar, n in advanced:
                grammar.rollback(n)
            raise RuntimeError(f"request {request_ids[i]!r}: sampled token {tokens[taken]} that its "
                               "structured output does not allow")


def _load_cpu_kernels():
    from cluster.kernels.loader import load

    return load()
