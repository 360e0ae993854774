"""A build of the CPU kernels killed mid-way (torch's lock file left behind) must not hang every
later load: the loader takes an flock and clears the stale lock."""

from __future__ import annotations

import os
import subprocess
import sys

from cluster.kernels import loader


def test_a_stale_torch_lock_does_not_hang_the_next_load():
    """A killed build leaves torch's ``lock`` file, on which torch's own loader waits forever; ours
    removes it (under its flock) and loads. In this checkout's real build directory: a copy of the
    build elsewhere made ninja rebuild it (new paths), 50-107 s of the suite for a file check."""
    script = ("import os; from cluster.kernels import loader; d = loader.build_directory(); "
              "open(os.path.join(d, 'lock'), 'w').close(); "  # what a killed build leaves
              "m = loader.load(); "
              "print('loaded' if m is not None else 'none', os.path.exists(os.path.join(d, 'lock')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["loaded", "False"], (out.stdout, out.stderr[-2000:])


def test_removing_the_lock_reports_whether_there_was_one(tmp_path):
    assert not loader.remove_stale_torch_lock(str(tmp_path))
    (tmp_path / "lock").write_text("")
    assert loader.remove_stale_torch_lock(str(tmp_path)) and not (tmp_path / "lock").exists()


def test_each_checkout_builds_in_its_own_directory(tmp_path, monkeypatch):
    """Two checkouts sharing one build directory rebuilt over each other (ninja sees new source paths)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = loader.build_directory()
    monkeypatch.setattr(loader.os.path, "abspath", lambda p: "/elsewhere/cluster/kernels/loader.py")
    elsewhere = loader.build_directory()
    assert here != elsewhere and os.path.dirname(here) == os.path.dirname(elsewhere)
    assert os.path.isdir(here) and os.path.isdir(elsewhere)


def test_each_cpu_builds_in_its_own_directory(tmp_path, monkeypatch):
    """-march=native builds: another CPU's build may not run here (an AMX build on an AVX2-only CPU)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = loader.build_directory()
    assert loader.build_directory() == here
    monkeypatch.setattr(loader, "cpu_flags", lambda: "avx avx2 fma")
    assert loader.build_directory() != here
