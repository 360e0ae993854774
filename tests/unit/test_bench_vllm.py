"""The vLLM side of `llm-cluster bench --against vllm`, without vLLM: the runner and its driver run
end to end in a throwaway venv whose `vllm` is a small stand-in with vLLM's offline interface, so
the job/result plumbing, the counting and the failure path are checked in `make test`."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from cluster.bench_vllm import _cpu_list, run_vllm, vllm_env, vllm_python
from cluster.errors import InvalidConfigError

FAKE_VLLM = textwrap.dedent('''
    """A stand-in for vLLM's offline API: one token per request per step, token i is i."""
    import os

    __version__ = "0.0-fake"
    if os.environ.get("FAKE_VLLM_FAIL"):
        raise RuntimeError("fake vLLM refuses to start")


    class SamplingParams:
        def __init__(self, temperature, max_tokens, ignore_eos):
            assert ignore_eos and temperature == 0.0
            self.max_tokens = max_tokens


    class _Completion:
        def __init__(self, token_ids):
            self.token_ids = token_ids


    class _Output:
        def __init__(self, request_id, token_ids, finished):
            self.request_id, self.outputs, self.finished = request_id, [_Completion(token_ids)], finished


    class _Engine:
        def __init__(self):
            self.live = {}

        def add_request(self, request_id, prompt, params):
            assert prompt["prompt_token_ids"], "empty prompt"
            self.live[request_id] = [params.max_tokens, []]

        def has_unfinished_requests(self):
            return bool(self.live)

        def step(self):
            outs = []
            for rid, (n, ids) in list(self.live.items()):
                ids.append(len(ids))
                done = len(ids) == n
                outs.append(_Output(rid, list(ids), done))
                if done:
                    del self.live[rid]
            return outs


    class LLM:
        def __init__(self, model, dtype, max_model_len, enable_prefix_caching, seed):
            assert os.path.isdir(model) and dtype == "bfloat16" and not enable_prefix_caching
            assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
            self.llm_engine = _Engine()

        def generate(self, inputs, params, use_tqdm):
            short = 1 if os.environ.get("FAKE_VLLM_SHORT") else 0
            return [_Output(str(i), list(range(p.max_tokens - short)), True) for i, p in enumerate(params)]
''')
FAKE_INPUTS = "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n"


@pytest.fixture(scope="module")
def fake_vllm_venv(tmp_path_factory) -> str:
    venv = tmp_path_factory.mktemp("fake-vllm") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = list(venv.glob("lib/python*/site-packages"))
    package = site / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "inputs.py").write_text(FAKE_INPUTS)
    return str(venv)


def _job(model_dir: str) -> dict:
    return {"model": model_dir, "dtype": "bfloat16", "max_model_len": 2048, "repeats": 2,
            "workload": {"prompts": [[5, 6, 7], [8, 9]], "output_lens": [4, 6]},
            "single": {"prompt": [1, 2, 3], "tokens": 8},
            "burst": {"prompts": [[1] * 20, [2] * 30, [3] * 10], "output_lens": [2, 3, 1]}}


def test_runner_measures_the_job_it_is_given(fake_vllm_venv, tmp_path):
    result = run_vllm(_job(str(tmp_path)), fake_vllm_venv, timeout_s=120)
    assert result["vllm_version"] == "0.0-fake" and result["startup_s"] >= 0
    for key in ("throughput", "ttft", "decode", "burst_throughput"):
        assert len(result[key]) == 2 and all(v > 0 for v in result[key]), key
    assert [len(run) for run in result["burst_ttft"]] == [3, 3]  # one time to first token per request
    assert all(t > 0 for run in result["burst_ttft"] for t in run)


def test_a_relative_venv_path_works_from_the_runners_temp_folder(fake_vllm_venv, tmp_path, monkeypatch):
    venv = pathlib.Path(fake_vllm_venv)
    monkeypatch.chdir(venv.parent)  # as `make bench-vllm` passes .venv-vllm, relative to the repository
    assert run_vllm(_job(str(tmp_path)), venv.name, timeout_s=120)["vllm_version"] == "0.0-fake"


def test_a_failing_vllm_run_raises_with_its_log(fake_vllm_venv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(RuntimeError, match="vLLM run failed"):
        run_vllm(_job(str(tmp_path)), fake_vllm_venv, timeout_s=120)
    assert "fake vLLM refuses to start" in capsys.readouterr().err


def test_a_run_that_produces_fewer_tokens_than_asked_fails(fake_vllm_venv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_SHORT", "1")  # the stand-in stops every request one token early
    with pytest.raises(RuntimeError, match="vLLM run failed"):
        run_vllm(_job(str(tmp_path)), fake_vllm_venv, timeout_s=120)
    assert "vLLM produced 60 tokens, expected 64" in capsys.readouterr().err  # the warm-up: 4 x 16 asked for


def test_missing_venv_is_a_typed_error_naming_the_setting(tmp_path):
    with pytest.raises(InvalidConfigError, match="vllm_venv") as err:
        vllm_python(str(tmp_path / "nowhere"))
    assert "make vllm-install" in str(err.value)


def test_environment_binds_every_core_reserves_none_and_preloads_what_exists(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libtcmalloc_minimal.so.4").write_bytes(b"")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/of/ours")
    env = vllm_env(str(tmp_path), "/tmp/scratch", [0, 1])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["LD_PRELOAD"] == str(lib / "libtcmalloc_minimal.so.4")  # libiomp5 absent: not preloaded
    assert "PYTHONPATH" not in env
    assert all(env[k].startswith("/tmp/scratch") for k in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"))


@pytest.mark.parametrize("cpus, expected", [([0], "0"), ([0, 1], "0-1"), ([3, 0, 1, 2, 7, 9, 10], "0-3,7,9-10")])
def test_cpu_list_uses_vllms_range_syntax(cpus, expected):
    assert _cpu_list(cpus) == expected
