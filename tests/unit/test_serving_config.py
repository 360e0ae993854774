"""ServingConfig's engine-core choice: a child process per replica by default at tp 1, in-process
on request, refused at tp > 1 (the workers are already processes of their own)."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidConfigError
from cluster.serving.config import ServingConfig


def test_replicas_run_their_core_in_a_child_process_by_default_at_tp1():
    assert ServingConfig(engine={"model": "smollm2-135m"}).uses_core_process
    assert not ServingConfig(engine={"model": "smollm2-135m"}, engine_core_process=False).uses_core_process
    tp2 = ServingConfig.from_dict({"model": "smollm2-135m", "tensor_parallel_size": 3})
    assert not tp2.uses_core_process


@pytest.mark.parametrize("args", [{"engine_core_process": "yes"},
                                  {"engine_core_process": True, "tensor_parallel_size": 3}])
def test_a_bad_core_choice_fails_naming_the_field(args):
    with pytest.raises(InvalidConfigError) as err:
        ServingConfig.from_dict({"model": "smollm2-135m", **args})
    assert err.value.field == "engine_core_process"
