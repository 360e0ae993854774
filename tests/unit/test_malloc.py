"""The replicas' malloc choice: validated where the config is built, preloaded through Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.errors import InvalidConfigError
from cluster.serving import malloc
from cluster.serving.app import model_server_options
from cluster.serving.config import ServingConfig


def test_auto_preloads_the_first_jemalloc_found_and_glibc_preloads_nothing(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(malloc, "candidates", lambda: [str(tmp_path / "missing.so"), str(lib)])
    config = ServingConfig(engine={"model": "smollm2-135m"})
    options = model_server_options(config)
    assert options["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"LD_PRELOAD": str(lib), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}}
    assert "runtime_env" not in model_server_options(ServingConfig(malloc_library="glibc"))["ray_actor_options"]
    assert malloc.resolve(str(lib)) == str(lib)


def test_auto_without_jemalloc_falls_back_to_glibc(tmp_path, monkeypatch):
    monkeypatch.setattr(malloc, "candidates", lambda: [str(tmp_path / "missing.so")])
    assert malloc.runtime_env("auto") == {}


@pytest.mark.parametrize("value", ["", "/no/such/libjemalloc.so.2", 3, None])
def test_bad_values_are_refused_naming_the_field(value):
    with pytest.raises(InvalidConfigError, match="malloc_library"):
        ServingConfig(malloc_library=value)


def test_an_operators_malloc_conf_comes_after_ours_so_it_wins(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("MALLOC_CONF", "prof:true,dirty_decay_ms:5000")
    env = malloc.runtime_env(str(lib))["env_vars"]
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1,prof:true,dirty_decay_ms:5000"


def test_jemalloc_with_our_conf_stops_refaulting_freed_pages():
    """The preload as a replica gets it: a process that frees and reallocates 16 MB buffers (as a
    step's activations) faults their pages once, not on every reuse as jemalloc's default does."""
    library = malloc.resolve("auto")
    if library is None or "jemalloc" not in library:
        pytest.skip("jemalloc not installed (make install puts it in the venv)")
    script = ("import resource, torch\n"
              "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "torch.ones(4 << 20)\n"
              "start = faults()\n"
              "for i in range(200):\n"
              "    torch.ones((4 << 20) + 1024 * (i % 7))\n"
              "print(faults() - start)\n")

    def faults(env_vars: dict) -> int:
        env = {**{k: v for k, v in os.environ.items() if k != "MALLOC_CONF"}, **env_vars}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    ours = faults(malloc.runtime_env("auto")["env_vars"])
    default = faults({"LD_PRELOAD": library})
    # 200 x 16 MB is 800k pages if every reuse faults (jemalloc's default: 820k measured), 4k with ours
    assert ours < 40_000 < 400_000 < default, (ours, default)
