"""Shared fixtures: every exported test model is built once per test session, in one cache (``model_cache``).

A torch export costs seconds of CPU (the dynamo exporter), so the test files never export the same module twice:
``export`` (the example models), ``hf_export`` (random-init transformers), ``zoo_export`` (``tests/_zoo.py``),
``channel_zoo_export`` (``tests/_channel_zoo.py``) and any file's own builders (``model_cache.get(key, make)``) all
store their files in the session's ``model_cache``. The cache lives in a temporary folder of the session, shared by
all pytest-xdist workers (the first worker to ask for a key builds it under a file lock; the others wait and reuse
its result): a clean checkout, as CI runs, builds everything once and nothing is kept between runs, so a change to
the export code is always tested. Tests read these files and never write to them.

Markers (registered in ``pyproject.toml``): ``slow`` for the zoo, the pretrained MiniLM, the Triton server and the
long benchmark-style tests (``pytest -m "not slow"`` is the contributor loop); ``kernels`` for the Triton kernels.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import os
import pickle
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pytest

# Kernel tests (marker `kernels`) run graphprune's Triton kernels on CPU tensors in Triton's interpreter. triton reads
# TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test imports graphprune.kernels.
# GRAPHPRUNE_KERNELS_CUDA=1 tests the compiled kernels on a GPU instead.
if os.environ.get("GRAPHPRUNE_KERNELS_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: `-n 2` on 2 cores) each worker keeps torch to one thread, so two workers do not fight
# over the cores (torch reads OMP_NUM_THREADS when it is first imported, after this file).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_finish(session) -> None:
    """Move everything alive after collection (torch, transformers, onnx and the test modules: about a million
    objects) out of the garbage collector's reach with ``gc.freeze``.

    graphprune calls ``gc.collect()`` before and between verification sessions
    (``backends.onnxruntime.return_freed_memory``). A full collection walks every tracked object, and in a test process
    that holds torch those are mostly the imports: 0.3 s or more per call, two calls per ``optimize``, hundreds of
    calls in the suite. A user's ``graphprune optimize`` process never imports torch. Objects made by the tests
    themselves are collected as before."""
    if os.environ.get("GRAPHPRUNE_TEST_GC_FREEZE", "1") != "0":
        gc.collect()
        gc.freeze()


class ModelCache:
    """Values built once per test run by key: ``get(key, make)`` calls ``make(folder)`` on the first request for
    ``key`` (``folder``: a new empty folder for that key) and returns its result to every request.

    Under pytest-xdist the folders are shared by the workers: the first worker to ask for a key builds it while
    holding that key's file lock, and stores the result (a path, or anything picklable) beside it; a worker that asks
    later waits for the lock and loads the stored result. A result that cannot be pickled is rebuilt by each worker
    that needs it, in a folder of its own.

    A ``make`` that raised is not retried: every request for that key fails with the first error (as ``pytest.fail``,
    naming the key), so each test that needs a model which cannot be exported reports it, at the cost of one export.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, shared_root: Path | None = None) -> None:
        self._factory = tmp_path_factory
        self._shared = shared_root
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable, make: Callable[[Path], Any]) -> Any:
        if key not in self._values:
            self._values[key] = self._build(key, make)
        value = self._values[key]
        if isinstance(value, _Failed):
            e = value.error
            pytest.fail(f"{key}: export failed: {type(e).__name__}: {e}")
        return value

    def _build(self, key: Hashable, make: Callable[[Path], Any]) -> Any:
        if self._shared is None:
            return _call(make, self._factory.mktemp("model", numbered=True))
        folder = self._shared / hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        stored = folder.with_suffix(".pickle")
        with open(folder.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if stored.exists():
                return pickle.loads(stored.read_bytes())
            if any(folder.iterdir()):  # built by another worker, but its result could not be stored
                return _call(make, self._factory.mktemp("model", numbered=True))
            value = _call(make, folder)
            try:
                data = pickle.dumps(value)
            except Exception:  # noqa: BLE001 - not picklable: each worker builds its own
                return value
            tmp = stored.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(stored)
            return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values


def _call(make: Callable[[Path], Any], folder: Path) -> Any:
    try:
        return make(folder)
    except Exception as e:  # noqa: BLE001 - remembered: each of the key's tests reports it
        return _Failed(e)


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __reduce__(self):  # the first error travels to the other workers as its type name and message
        return _Failed, (RuntimeError(f"{type(self.error).__name__}: {self.error}"),)


@pytest.fixture(scope="session", autouse=True)
def _one_export_registry():
    """Every torch export of the session, also the tests' direct ``torch.onnx.export`` calls, reuses one ATen → ONNX
    translation table (``graphprune.torch._registry``: the same translations, built once instead of per export)."""
    try:
        from graphprune.torch._registry import reused_registry
    except Exception:  # noqa: BLE001 - no torch: nothing is exported
        yield
        return
    with reused_registry():
        yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> ModelCache:
    """The test run's one cache of exported test models (see :class:`ModelCache`); shared by the pytest-xdist
    workers, whose temporary folders have one common parent."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent / "model_cache" if worker else None
    return ModelCache(tmp_path_factory, shared)


@pytest.fixture(scope="session")
def examples():
    """The ``examples/models.py`` module (model builders and ``export_model``)."""
    from examples import models

    return models


@pytest.fixture(scope="session")
def export(model_cache, examples):
    """``export(name, opset=18, **build_kwargs) -> Path``: build an example model and export it (cached)."""

    def _export(name: str, opset: int = 18, **kw) -> Path:
        def make(folder: Path) -> Path:
            model, args = examples.build(name, **kw)
            tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
            return examples.export_model(model, args, folder / f"{name}_op{opset}{'_' + tag if tag else ''}.onnx",
                                         opset=opset)

        return model_cache.get(("examples", name, opset, tuple(sorted(kw.items()))), make)

    return _export


@pytest.fixture(scope="session")
def hf_export(model_cache):
    """``hf_export(kind, opset) -> Path`` for a random-init transformers BertModel ("bert") or ViTModel ("vit")."""
    transformers = pytest.importorskip("transformers")

    def _export(kind: str, opset: int = 18, layers: int = 2, heads: int = 4) -> Path:
        if kind not in ("bert", "vit"):
            raise ValueError(kind)

        def make(folder: Path) -> Path:
            import torch

            torch.manual_seed(0)
            if kind == "bert":
                cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                                              intermediate_size=256, vocab_size=1000, max_position_embeddings=64)
                model = transformers.BertModel(cfg).eval()
                ids = torch.randint(0, 1000, (2, 16))
                mask = torch.ones(2, 16, dtype=torch.int64)
                mask[1, 10:] = 0
                args = (ids, mask)
                names = ["input_ids", "attention_mask"]
            else:
                cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=heads,
                                             intermediate_size=256, image_size=32, patch_size=8)
                model = transformers.ViTModel(cfg).eval()
                args = (torch.randn(2, 3, 32, 32),)
                names = ["pixel_values"]
            path = folder / f"hf_{kind}_op{opset}_l{layers}.onnx"
            with torch.no_grad():
                torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset, input_names=names,
                                  verbose=False)
            return path

        return model_cache.get(("hf", kind, opset, layers, heads), make)

    return _export


@pytest.fixture(scope="session")
def zoo_export(model_cache):
    """``zoo_export(name) -> Path``: the ``tests/_zoo.py`` model exported once per session (an export failure fails
    each test that asks for it)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import _zoo

    def _get(name: str) -> Path:
        return model_cache.get(("zoo", name), lambda folder: _zoo.export(_zoo.BY_NAME[name], folder))

    return _get


@pytest.fixture(scope="session")
def channel_zoo_export(model_cache):
    """``channel_zoo_export(name) -> Path``: the ``tests/_channel_zoo.py`` model exported once per session."""
    pytest.importorskip("torch")
    from tests import _channel_zoo

    def _get(name: str) -> Path:
        return model_cache.get(("channel_zoo", name), lambda folder: _channel_zoo.export(name, folder))

    return _get
