"""Shared fixtures: the real SmolLM2 checkpoint, its transformers twin, tiny random checkpoints.

Tiny checkpoints keep SmolLM2's tokenizer (and so its 49,152-token vocabulary) but shrink
everything else, so the engine loads them in milliseconds and compares against transformers
token for token. They are built once per session, deterministically (fixed seed).
"""

from __future__ import annotations

import os
import socket
import shutil

import pytest
import torch

from cluster.config import ModelConfig
from cluster.model.source import resolve_model
from cluster.serving.serve_start import prepare_environment, start_serve

# `make test` runs the suite in two pytest-xdist workers on the 2-core box: each takes one core's
# worth of torch threads. Run alone (plain `pytest`), a process takes both.
NUM_THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2
torch.set_num_threads(NUM_THREADS)

# Without a GPU the Triton kernels (cluster/kernels/triton_attention.py) run under Triton's
# interpreter; it is chosen when a kernel is defined, so this must precede their import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every local cluster a test starts inherits this environment: Serve's proxies get a minute to start.
prepare_environment()

SMOLLM2_EOS_ID = 2  # <|im_end|>
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Tiny Llama-family shapes: GQA (4 query heads over 2 KV heads), a few layers, SmolLM2's vocab.
_TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=49152, rms_norm_eps=1e-5, bos_token_id=1,
                   eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_EOS_ID, initializer_range=0.1)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}

# variant -> (config class name, extra config kwargs, save_pretrained kwargs)
TINY_VARIANTS = {
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, max_position_embeddings=512), {}),
    "llama_deep": ("LlamaConfig", dict(num_hidden_layers=6, tie_word_embeddings=True, max_position_embeddings=512),
                   {}),  # SwiftKV tests: room for a split and AcrossKV groups
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False, max_position_embeddings=512), {}),
    "llama_long": ("LlamaConfig", dict(tie_word_embeddings=True, max_position_embeddings=4096), {}),  # long outputs
    "llama3_rope": ("LlamaConfig", dict(tie_word_embeddings=False, max_position_embeddings=1024,
                                        rope_scaling=_LLAMA3_ROPE), {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, max_position_embeddings=512,
                                  use_sliding_window=False), {}),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, max_position_embeddings=512, sliding_window=None), {}),
    # Attention limited to the last 16 positions: the engine must honour it or refuse the checkpoint.
    "mistral_sliding_window": ("MistralConfig", dict(tie_word_embeddings=False, max_position_embeddings=512,
                                                     sliding_window=16), {}),
    # A RoPE scaling the engine does not implement: it must be refused, naming the right field.
    "llama_linear_rope": ("LlamaConfig", dict(max_position_embeddings=512,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0}), {}),
    "sharded": ("LlamaConfig", dict(tie_word_embeddings=False, max_position_embeddings=512),
                {"max_shard_size": "4MB"}),
}


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2-135M safetensors directory (converted once, then cached)."""
    return resolve_model("smollm2-135m", ModelConfig().resolved_cache_dir()).path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own SmolLM2 in float32: the reference the engine must match."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
    """Copy the tokenizer files the engine's AutoTokenizer.from_pretrained needs."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), dst_dir)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give norms and biases non-trivial values, so loading them wrongly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))


def build_tiny_checkpoint(variant: str, out_dir: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Save a tiny random-weight checkpoint of ``variant`` (see TINY_VARIANTS) into ``out_dir``."""
    import transformers

    config_class, extra, save_kwargs = TINY_VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**_TINY_SHAPE, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_path):
    """Factory: ``tiny_llama_dir(variant)`` -> a tiny checkpoint directory, built once per session.

    Variants: llama_tied, llama_untied, llama3_rope, qwen2 (random q/k/v biases), mistral,
    mistral_sliding_window (sliding_window=16), sharded (several safetensors files and an index json).
    """
    built: dict[str, str] = {}

    def make(variant: str = "llama_tied") -> str:
        if variant not in built:
            out = str(tmp_path_factory.mktemp(f"tiny-{variant}"))
            built[variant] = build_tiny_checkpoint(variant, out, smollm2_path)
        return built[variant]

    return make


@pytest.fixture(scope="session")
def hf_tiny_model(tiny_llama_dir):
    """Factory: ``hf_tiny_model(variant)`` -> the transformers model of that tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    loaded: dict[str, torch.nn.Module] = {}

    def load(variant: str):
        if variant not in loaded:
            loaded[variant] = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(variant),
                                                                   dtype=torch.float32).eval()
        return loaded[variant]

    return load


def assert_no_leak(llm_or_engine) -> None:
    """Every KV block is back in the free queue and no request is left in the engine."""
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    assert not engine.has_unfinished_requests(), "requests left in the engine"
    assert engine.num_free_blocks == engine.num_blocks, (
        f"leaked KV blocks: {engine.num_blocks - engine.num_free_blocks} of {engine.num_blocks} still referenced"
    )
    engine.block_manager.check_invariants()


def record_preemptions(llm) -> list[str]:
    """Wrap the engine's scheduler so every preempted request id is appended to the returned list."""
    preempted: list[str] = []
    schedule = llm.engine.scheduler.schedule

    def spy_schedule():
        out = schedule()
        preempted.extend(out.preempted_request_ids)
        return out

    llm.engine.scheduler.schedule = spy_schedule
    return preempted


@pytest.fixture
def check_no_leak():
    """``check_no_leak(llm)``: assert the engine holds no blocks and no requests (call after a run)."""
    return assert_no_leak


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, **generate_options) -> list[int]:
    """transformers' greedy continuation, cut after its first EOS (inclusive) as the engine stops there.

    ``generate_options`` go to ``generate`` (e.g. ``min_new_tokens``, ``repetition_penalty``).
    """
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=SMOLLM2_EOS_ID,
                             **generate_options)
    tokens = out[0, len(prompt_ids):].tolist()
    if SMOLLM2_EOS_ID in tokens:
        tokens = tokens[: tokens.index(SMOLLM2_EOS_ID) + 1]
    return tokens


# ---- SmolLM2 prompts and their transformers references ---------------------------------------

def _long_text(num_paragraphs: int = 37) -> str:
    """Over 1,000 tokens of varied, repetitive-but-not-identical prose ending in a question."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    animals = ["fox", "owl", "whale", "tiger", "rabbit", "falcon", "otter", "camel", "lynx"]
    places = ["Paris", "Kyoto", "Lima", "Oslo", "Cairo", "Sydney", "Toronto"]
    lines = [
        f"Entry {i}: the {colors[i % len(colors)]} {animals[i % len(animals)]} travelled from "
        f"{places[i % len(places)]} to {places[(i * 3 + 1) % len(places)]} in {i + 2} days, "
        f"carrying {i * 7 % 23 + 1} books about {animals[(i + 4) % len(animals)]}s."
        for i in range(num_paragraphs)
    ]
    return "Travel log.\n" + "\n".join(lines) + "\nQuestion: which animal travelled in Entry 5? Answer:"


def smollm2_prompt_ids(tokenizer) -> dict[str, list[int]]:
    """Varied prompts as token ids: name -> ids (the engine gets exactly these ids)."""
    texts = {
        "english": "The capital of France is",
        "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "list": "Here is my shopping list:\n1. Apples\n2. Bread\n3.",
        "question": "Question: Why is the sky blue?\nAnswer: The sky",
        "quiz": "Q: How many legs does a spider have?\nA:",  # ends with EOS after a few tokens
        "eos_first": "Question: Why is the sky blue?\nAnswer:",  # EOS is the very first token
        "multilingual": "Le chat est sur la table. Die Katze ist auf dem Tisch. El gato",
        "long": _long_text(),
    }
    ids = {name: tokenizer.encode(text) for name, text in texts.items()}
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer in one word."}],
                                         tokenize=False, add_generation_prompt=True)
    ids["chat"] = tokenizer.encode(chat, add_special_tokens=False)
    ids["short3"] = tokenizer.encode("Once upon a time there was")[:3]
    return ids


SMOLLM2_MAX_TOKENS = 24  # greedy tokens per reference (fewer where transformers hits EOS first)


@pytest.fixture(scope="session")
def smollm2_prompts(smollm2_tokenizer) -> dict[str, list[int]]:
    prompts = smollm2_prompt_ids(smollm2_tokenizer)
    assert len(prompts["long"]) > 1000 and len(prompts["short3"]) == 3
    return prompts


@pytest.fixture(scope="session")
def smollm2_references(hf_smollm2, smollm2_prompts) -> dict[str, list[int]]:
    """transformers' greedy tokens for every SmolLM2 prompt (computed once per session)."""
    return {name: hf_greedy(hf_smollm2, ids, SMOLLM2_MAX_TOKENS) for name, ids in smollm2_prompts.items()}


# ---- Ray ----------------------------------------------------------------------------------------

RAY_START_ATTEMPTS = 3


_RAY_SLOW_START = ("timed out during startup", "Timed out waiting for file")  # a start the load delayed


def start_local_ray(**options) -> None:
    """``ray.init(address="local", ...)`` of a private cluster (any connection is shut down first).

    Ray gives a starting raylet a fixed 30 s to register with its GCS (``ray/_private/node.py``),
    which a loaded 2-core box can miss while the other test worker keeps a core busy (seen twice
    in 2 runs of `make test` with two workers, never with one). That start is retried: what
    the tests measure begins once the cluster is up. The same load also showed as the GCS server
    not writing its port file in time ("Timed out waiting for file .../gcs_server_port_..."):
    retried alike. So is a start whose dashboard never registered: ``ray.init`` gives the dashboard
    60 s and then goes on without it (seen once in a clean clone's `make test`: no dashboard log at
    all), and every later state-API call (``list_actors``) fails with "Could not read 'dashboard'
    from GCS".
    """
    import ray

    want_dashboard = options.get("include_dashboard", None) is not False
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(address="local", log_to_driver=False, **options)
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this timeout
            slow_start = any(sign in str(err) for sign in _RAY_SLOW_START)
            if not slow_start or attempt == RAY_START_ATTEMPTS:
                raise
            ray.shutdown()  # stops whatever half of the cluster did start
            continue
        if not want_dashboard or _dashboard_registered():
            return
        if attempt == RAY_START_ATTEMPTS:
            raise RuntimeError(f"Ray's dashboard did not start in {RAY_START_ATTEMPTS} attempts: the state API needs it")
        ray.shutdown()


def _dashboard_registered() -> bool:
    """Whether the connected cluster's dashboard wrote its address to the GCS (``ray.init`` has
    already waited for it, so no wait here)."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get("dashboard", namespace="dashboard") is not None


class SharedCluster:
    """One private Ray cluster (8 logical CPUs on the 2-core box) with Serve on free ports, shared by
    the serial modules that need nothing of their own (``local_ray``, ``serve_cluster``): starting and
    stopping Ray and Serve took ~9 s a module on an idle box, more under the suite's load. Started
    on first use; started again when a module that runs its own cluster has shut it down."""

    def __init__(self):
        self.gcs_address: str | None = None
        self.addresses: tuple[str, str] | None = None

    def is_up(self) -> bool:
        import ray

        return self.gcs_address is not None and ray.is_initialized() and \
            ray.get_runtime_context().gcs_address == self.gcs_address

    def ensure(self) -> tuple[str, str]:
        """Connected to the shared cluster; returns (grpc address, http base url)."""
        import ray
        from ray.serve.config import HTTPOptions, gRPCOptions

        from cluster.serving.app import GRPC_SERVICER_FUNCTIONS

        if not self.is_up():
            metrics_port = free_port()
            start_local_ray(num_cpus=8, _metrics_export_port=metrics_port)
            os.environ["LLM_CLUSTER_TEST_METRICS_PORT"] = str(metrics_port)  # read by the metrics test
            grpc_port, http_port = free_port(), free_port()
            start_serve(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
            self.gcs_address = ray.get_runtime_context().gcs_address
            self.addresses = (f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
        return self.addresses

    def release(self) -> None:
        """A module is done: delete the Serve applications it left, so the next starts clean."""
        from ray import serve

        if self.is_up():
            for name in list(serve.status().applications):
                serve.delete(name)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if self.is_up():
            serve.shutdown()
            ray.shutdown()
        self.gcs_address = self.addresses = None


@pytest.fixture(scope="session")
def shared_cluster():
    cluster = SharedCluster()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray(shared_cluster):
    """The shared private Ray cluster (``SharedCluster``), for one test module."""
    import ray

    shared_cluster.ensure()
    yield ray
    shared_cluster.release()


def state_address() -> str:
    """The connected cluster's address for Ray's state API, which otherwise discovers one and
    fails when other Ray clusters run on the same machine."""
    import ray

    return ray.get_runtime_context().gcs_address


def live_actor_ids(class_name: str) -> set[str]:
    """Ids of the ALIVE (or starting) actors of one class, from Ray's state API."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=state_address(), filters=[("class_name", "=", class_name)], limit=1000,
                                            raise_on_missing_output=False)
            if a.state != "DEAD"}


def placement_group_state(placement_group_id: str) -> str:
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=state_address(), filters=[("placement_group_id", "=", placement_group_id)],
                                   raise_on_missing_output=False)
    return groups[0].state if groups else "UNKNOWN"


# ---- Ray Serve ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_cluster(shared_cluster):
    """Ray + Serve with our gRPC servicers (the shared cluster); yields (grpc address, http base url)."""
    yield shared_cluster.ensure()
    shared_cluster.release()


# ---- scheduling over xdist workers --------------------------------------------------------------

# `make test` runs two xdist workers (`-n 2 --dist loadscope`), each taking whole modules (their
# module fixtures are built once). The modules below start Ray clusters or Serve apps: they run one
# after another, all in one worker, so two clusters never contend for the same cores beyond what
# their timing bounds were measured under; every other module runs beside them. A test that asks
# for a Ray fixture, or is marked `serial`, must be in one of these modules (checked at collection).
SERIAL_MODULES = frozenset(f"tests/integration/test_{name}.py" for name in (
    "autoscaling", "core_process_served", "fuzz_served", "multinode", "overload", "prefix_router_serve",
    "security", "serve_config_file", "serving", "serving_cluster", "tensor_parallel")) | {"tests/gpu/test_gpu.py"}
SERIAL_FIXTURES = {"local_ray", "serve_cluster", "multinode_ray", "serve_on_private_ray"}
SHARED_CLUSTER_FIXTURES = {"local_ray", "serve_cluster"}


def pytest_collection_modifyitems(session, config, items):
    """The serial modules first (xdist hands out scopes in collection order: the longest one should
    start at once); among them those that start clusters of their own, then those on the shared
    cluster, so the shared one starts once and never runs beside another."""
    shared_modules = {item.nodeid.split("::", 1)[0] for item in items
                      if SHARED_CLUSTER_FIXTURES & set(item.fixturenames)}

    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return 2 if module not in SERIAL_MODULES else 1 if module in shared_modules else 0

    items.sort(key=rank)  # stable: each module's own order, and the other modules', unchanged


def pytest_itemcollected(item):
    serial = item.get_closest_marker("serial") is not None or bool(SERIAL_FIXTURES & set(item.fixturenames))
    if serial and item.nodeid.split("::", 1)[0] not in SERIAL_MODULES:
        raise pytest.UsageError(f"{item.nodeid} starts Ray or Serve: add its module to SERIAL_MODULES in tests/conftest.py")


def pytest_xdist_make_scheduler(config, log):
    """loadscope, with the SERIAL_MODULES as one scope (xdist's own xdist_group marker no longer
    groups under pytest 9: it renames node ids, which pytest 9 derives and ignores)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SerialModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "serial" if module in SERIAL_MODULES else module

    return SerialModulesTogether(config, log)
