"""Typed errors keep their type, field and message through pickling (Ray ships them between actors)."""

from __future__ import annotations

import pickle

import pytest

from cluster.errors import InvalidConfigError, InvalidRequestError, ModelLoadError


@pytest.mark.parametrize("error", [InvalidRequestError("temperature", "must be >= 0, got -1"),
                                   InvalidConfigError("dtype", "must be one of ..."),
                                   ModelLoadError("cannot read weights"),
                                   ModelLoadError("bad shard", field="model.safetensors")])
def test_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.field == error.field and str(copy) == str(error)
