"""Converting a GGUF checkpoint once, even when several loaders ask for it at the same moment
(replicas starting together on a fresh node, the test workers of `make test`)."""

from __future__ import annotations

import os
import threading

from cluster.model import source


def test_concurrent_loaders_convert_once_and_all_get_the_finished_directory(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    writes, inside = [], threading.Event()
    release = threading.Event()

    def slow_write(gguf_path, out_dir):  # stands in for transformers' GGUF conversion
        writes.append(out_dir)
        inside.set()
        assert release.wait(30)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(source, "_write_safetensors_dir", slow_write)
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(source._convert_gguf(str(gguf), str(tmp_path), "k")))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: results.append(source._convert_gguf(str(gguf), str(tmp_path), "k")))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second loader must wait for the conversion under way"
    release.set()
    first.join(30)
    second.join(30)
    target = str(tmp_path / "models" / "k")
    assert results == [target, target]
    assert len(writes) == 1, "converted twice"
    assert os.path.isfile(os.path.join(target, "config.json"))
    assert os.path.isfile(os.path.join(target, source._DONE_MARKER))
    assert sorted(os.listdir(tmp_path / "models")) == ["k", "k.lock"], "no staging directory left behind"
