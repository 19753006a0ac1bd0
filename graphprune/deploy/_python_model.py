"""Triton python-backend model that runs ``model.onnx`` in an ONNX Runtime session.

``graphprune deploy --backend python`` copies this file into the version folder as ``model.py``. It runs inside
Triton's python-backend stub, which embeds its own interpreter in isolated mode (``PYTHONPATH`` is ignored); the
paths in the environment variable ``GRAPHPRUNE_TRITON_PYTHONPATH`` are put first on ``sys.path`` so that numpy
and onnxruntime come from the environment that ``graphprune serve`` runs in. In a Triton image that has numpy and
onnxruntime installed, the variable is not needed.

Settings come from the model config's ``parameters`` (string values):
  ``model_file`` (default ``model.onnx``), ``providers`` (``cpu`` or ``cuda,cpu``), ``intra_op_threads``
  (0 = ONNX Runtime's default), ``inter_op_threads``, ``graph_optimization_level`` (disable|basic|extended|all).

Batching: Triton's dynamic batcher hands ``execute`` several requests at once, but the python backend does not
join them. With ``max_batch_size > 0`` the requests whose inputs agree on every axis but the first are
concatenated along axis 0, run once, and the outputs split back by each request's batch size. A request that is
missing an input or that ONNX Runtime rejects gets an error response of its own; the others are answered.
"""

import json
import os
import sys

sys.path[:0] = [p for p in os.environ.get("GRAPHPRUNE_TRITON_PYTHONPATH", "").split(os.pathsep)
                if p and p not in sys.path]

import numpy as np  # noqa: E402

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


#: Under numpy 2 the bundled stub (tritonserver 2.51) misreads numpy arrays: ``pb_utils.Tensor(name, array)``
#: sends an empty output and a request input's ``as_numpy()`` returns wrong values (it was built for numpy 1).
#: DLPack moves the same memory without the stub's numpy calls; bool outputs keep the constructor.
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


def _in_array(tensor) -> np.ndarray:
    if _NUMPY2 and hasattr(tensor, "__dlpack__"):
        return np.from_dlpack(tensor)
    return tensor.as_numpy()


def _out_tensor(pb_utils, name: str, array: np.ndarray):
    if _NUMPY2 and array.dtype != np.bool_:
        return pb_utils.Tensor.from_dlpack(name, array)
    return pb_utils.Tensor(name, array)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def plan_groups(feeds: list, batched: bool) -> list[list[int]]:
    """Indices of ``feeds`` (dicts of arrays) that can run as one batch: same names, dtypes and non-batch dims."""
    if not batched:
        return [[i] for i in range(len(feeds))]
    groups: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        key = tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feed.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_group(run, feeds: list, names: list) -> list:
    """Run the feeds of one group as a single batch; return per feed its outputs (list) or an exception.

    ``run(names, feed) -> list of arrays``. A batch that fails, or whose outputs do not keep the batch on axis 0,
    is run again one feed at a time, so one bad request cannot fail the others.
    """
    if len(feeds) > 1:
        sizes = [next(iter(f.values())).shape[0] for f in feeds]
        try:
            joined = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
            outs = run(names, joined)
            if all(o.ndim > 0 and o.shape[0] == sum(sizes) for o in outs):
                cuts = np.cumsum(sizes)[:-1]
                parts = [np.split(o, cuts, axis=0) for o in outs]
                return [[p[j] for p in parts] for j in range(len(feeds))]
        except Exception:  # fall back to one run per request to isolate the bad one
            pass
    results = []
    for f in feeds:
        try:
            results.append(run(names, f))
        except Exception as e:  # reported to that request's client
            results.append(e)
    return results


class TritonPythonModel:
    """The python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        so.inter_op_num_threads = int(params.get("inter_op_threads", "0") or 0)
        level = params.get("graph_optimization_level", "all")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS.get(level, "ORT_ENABLE_ALL"))
        so.log_severity_level = 3
        providers = []
        for p in params.get("providers", "cpu").split(","):
            p = p.strip().lower()
            if p == "cuda":
                providers.append(("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
            elif p:
                providers.append(_PROVIDERS.get(p, p))
        self.session = ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _run(self, names, feed):
        return self.session.run(names, feed)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = [None] * len(requests)
        feeds, owners = [], []
        for i, request in enumerate(requests):
            feed = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"input {name!r} is missing"))
                    break
                feed[name] = _in_array(tensor)
            else:
                feeds.append(feed)
                owners.append(i)
        for group in plan_groups(feeds, self.batched):
            for j, result in zip(group, run_group(self._run, [feeds[j] for j in group], self.outputs)):
                i = owners[j]
                if isinstance(result, Exception):
                    error = pb_utils.TritonError(f"onnxruntime: {_first_line(result)}")
                    responses[i] = pb_utils.InferenceResponse(error=error)
                    continue
                wanted = set(requests[i].requested_output_names() or self.outputs)
                tensors = [_out_tensor(pb_utils, n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, result)
                           if n in wanted]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self):
        self.session = None
