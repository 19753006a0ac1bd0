"""The test run's model cache (``conftest.ModelCache``) as pytest-xdist workers share it: two caches on one shared
folder stand for two workers."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import ModelCache


class _Factory:
    def __init__(self, root):
        self.root, self.n = root, 0

    def mktemp(self, name, numbered=True):
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir(parents=True)
        return path


def _caches(tmp_path):
    shared = tmp_path / "shared"
    return (ModelCache(_Factory(tmp_path / "w0"), shared), ModelCache(_Factory(tmp_path / "w1"), shared))


def test_second_worker_reuses_the_first_workers_file(tmp_path):
    a, b = _caches(tmp_path)
    calls = []

    def make(folder):
        calls.append(folder)
        (folder / "m.onnx").write_bytes(b"model")
        return folder / "m.onnx"

    first = a.get(("k", 1), make)
    second = b.get(("k", 1), make)
    assert len(calls) == 1 and first == second and second.read_bytes() == b"model"
    assert b.get(("k", 2), make) != first and len(calls) == 2  # another key is built


def test_concurrent_requests_build_once(tmp_path):
    a, b = _caches(tmp_path)
    calls, results = [], []

    def make(folder):
        calls.append(folder)
        threading.Event().wait(0.2)  # long enough for the other request to queue on the lock
        (folder / "m").write_text("x")
        return folder / "m"

    threads = [threading.Thread(target=lambda c=c: results.append(c.get("k", make))) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]


def test_a_failed_build_fails_every_worker_with_its_message(tmp_path):
    a, b = _caches(tmp_path)

    def make(folder):
        raise ValueError("no exporter for this op")

    with pytest.raises(pytest.fail.Exception, match="no exporter for this op"):
        a.get("bad", make)
    with pytest.raises(pytest.fail.Exception, match="ValueError: no exporter for this op"):
        b.get("bad", lambda folder: pytest.fail("must not be rebuilt"))


def test_an_unpicklable_result_is_rebuilt_by_each_worker_in_its_own_folder(tmp_path):
    a, b = _caches(tmp_path)
    calls = []

    def make(folder):
        calls.append(folder)
        (folder / "f").write_text("x")
        return lambda: folder  # not picklable

    fa, fb = a.get("u", make)(), b.get("u", make)()
    assert len(calls) == 2 and fa != fb and fb.parent.name == "w1"
