"""The suite's private Ray start (tests/conftest.py): a start the loaded box spoiled is retried.

Ray itself is replaced by a recorder here: the point is which starts are retried, not Ray.
"""

from __future__ import annotations

import pytest
import ray

from tests import conftest


class FakeRay:
    def __init__(self, init_errors=(), dashboards=()):
        self.init_errors, self.dashboards = list(init_errors), list(dashboards)
        self.inits, self.shutdowns, self.up = [], 0, False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        error = self.init_errors.pop(0) if self.init_errors else None
        if error is not None:
            raise error
        self.up = True

    def shutdown(self):
        self.shutdowns += 1
        self.up = False


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs):
        fake_ray = FakeRay(**kwargs)
        monkeypatch.setattr(ray, "init", fake_ray.init)
        monkeypatch.setattr(ray, "shutdown", fake_ray.shutdown)
        monkeypatch.setattr(ray, "is_initialized", lambda: fake_ray.up)
        monkeypatch.setattr(conftest, "_dashboard_registered",
                            lambda: fake_ray.dashboards.pop(0) if fake_ray.dashboards else True)
        return fake_ray
    return install


def test_a_start_without_its_dashboard_is_retried(fake):
    fake_ray = fake(dashboards=[False, True])
    conftest.start_local_ray(num_cpus=8)
    assert len(fake_ray.inits) == 2 and fake_ray.up
    assert fake_ray.inits[1] == {"address": "local", "log_to_driver": False, "num_cpus": 8}


def test_a_dashboard_that_never_starts_fails_the_start_after_the_last_attempt(fake):
    fake_ray = fake(dashboards=[False] * conftest.RAY_START_ATTEMPTS)
    with pytest.raises(RuntimeError, match="dashboard did not start"):
        conftest.start_local_ray(num_cpus=8)
    assert len(fake_ray.inits) == conftest.RAY_START_ATTEMPTS


def test_a_start_without_a_dashboard_asked_for_is_not_checked(fake):
    fake_ray = fake(dashboards=[False] * conftest.RAY_START_ATTEMPTS)
    conftest.start_local_ray(num_cpus=4, include_dashboard=False)
    assert len(fake_ray.inits) == 1 and fake_ray.up


def test_a_slow_raylet_is_retried_and_other_errors_are_not(fake):
    fake_ray = fake(init_errors=[Exception("The current node timed out during startup.")])
    conftest.start_local_ray(num_cpus=8)
    assert len(fake_ray.inits) == 2 and fake_ray.up
    fake_ray = fake(init_errors=[ValueError("bad option")])
    with pytest.raises(ValueError):
        conftest.start_local_ray(num_cpus=8)
    assert len(fake_ray.inits) == 1
