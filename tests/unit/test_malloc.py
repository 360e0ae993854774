"""The replicas' malloc choice: validated where the config is built, preloaded through Ray."""

from __future__ import annotations

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
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"LD_PRELOAD": str(lib)}}
    assert "runtime_env" not in model_server_options(ServingConfig(malloc_library="glibc"))["ray_actor_options"]
    assert malloc.resolve(str(lib)) == str(lib)


def test_auto_without_jemalloc_falls_back_to_glibc(tmp_path, monkeypatch):
    monkeypatch.setattr(malloc, "candidates", lambda: [str(tmp_path / "missing.so")])
    assert malloc.runtime_env("auto") == {}


@pytest.mark.parametrize("value", ["", "/no/such/libjemalloc.so.2", 3, None])
def test_bad_values_are_refused_naming_the_field(value):
    with pytest.raises(InvalidConfigError, match="malloc_library"):
        ServingConfig(malloc_library=value)
