"""A bounded load test of models on a running Triton server, through tritonclient's asyncio clients.

For each concurrency level ``c`` and each model, ``c`` workers send requests back to back (each waits for its
answer before sending the next) for ``duration`` seconds, split into ``windows`` windows. With two models the
windows interleave, A B then B A, so that both meet the same machine load; compare ratios from one run, not
across runs.

Bounds: a window sends no new request after its deadline or after ``max_requests`` requests, whichever comes
first, and ends when the requests in flight have been answered (its time, used for ``rps``, includes them); every
request has a ``timeout``; warm-up is a fixed number of requests. Nothing is sent anywhere but the given address.

Per level and model: completed requests per second (``rps``; ``items_per_s`` = rps × batch), latency p50 / p90 /
p99 / mean in ms over the completed requests, and the number of errors (an error response, a timeout or a
broken connection) with the first few messages.

Inputs: ``data`` (name → array, the whole request tensor) or, by default, generated from the model's metadata:
axis 0 of a batching model is ``batch``, other dynamic axes ``dynamic_dim``; floats are standard normal, integer
inputs named ``*mask*`` are ones and other integers uniform in [0, 100), bools True.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphprune.errors import ConfigError, GraphpruneError

PROTOCOLS = ("http", "grpc")


def parse_target(target: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"target {target!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--concurrency: expected comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 or c > 256 for c in levels):
        raise ConfigError(f"--concurrency: levels must be between 1 and 256, got {text!r}")
    return levels


@dataclasses.dataclass
class _Tally:
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    samples: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self, batch: int) -> dict[str, Any]:
        n = len(self.latencies)
        ms = np.asarray(self.latencies) * 1e3
        pct = (lambda q: round(float(np.percentile(ms, q)), 3)) if n else (lambda q: None)
        rps = n / self.seconds if self.seconds > 0 else 0.0
        return {"requests": n, "errors": self.errors, "seconds": round(self.seconds, 3), "rps": round(rps, 3),
                "items_per_s": round(rps * batch, 3), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
                "mean_ms": round(float(ms.mean()), 3) if n else None, "error_samples": self.samples}


class _Client:
    """One asyncio tritonclient for the protocol, and the request tensors prepared once per model."""

    def __init__(self, protocol: str, url: str, timeout: float) -> None:
        if protocol == "http":
            import tritonclient.http as mod
            import tritonclient.http.aio as aio

            self.client = aio.InferenceServerClient(url, conn_limit=512, conn_timeout=timeout)
        else:
            import tritonclient.grpc as mod
            import tritonclient.grpc.aio as aio

            self.client = aio.InferenceServerClient(url)
        self.mod, self.protocol, self.timeout = mod, protocol, timeout

    async def metadata(self, model: str) -> tuple[dict, int]:
        if self.protocol == "http":
            meta = await self.client.get_model_metadata(model)
            config = await self.client.get_model_config(model)
        else:
            meta = await self.client.get_model_metadata(model, as_json=True)
            config = (await self.client.get_model_config(model, as_json=True)).get("config", {})
        return meta, int(config.get("max_batch_size", 0) or 0)

    def request(self, feeds: Mapping[str, np.ndarray], meta: dict) -> tuple[list, list]:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, arr in feeds.items():
            t = self.mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            if self.protocol == "http":
                t.set_data_from_numpy(arr, binary_data=True)
            else:
                t.set_data_from_numpy(arr)
            inputs.append(t)
        if self.protocol == "http":
            outputs = [self.mod.InferRequestedOutput(o["name"], binary_data=True) for o in meta.get("outputs", [])]
        else:
            outputs = [self.mod.InferRequestedOutput(o["name"]) for o in meta.get("outputs", [])]
        return inputs, outputs

    async def infer(self, model: str, inputs: list, outputs: list) -> Any:
        return await asyncio.wait_for(self.client.infer(model, inputs, outputs=outputs), self.timeout)

    async def close(self) -> None:
        await self.client.close()


def synthetic_feeds(meta: dict, max_batch_size: int, batch: int, dynamic_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Request tensors generated from a model's metadata (rules in the module docstring)."""
    from tritonclient.utils import triton_to_np_dtype

    if max_batch_size > 0 and batch > max_batch_size:
        raise ConfigError(f"--batch {batch} is above model {meta.get('name')!r}'s max_batch_size {max_batch_size}")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in meta.get("inputs", []):
        dtype = triton_to_np_dtype(spec["datatype"])
        if dtype is None or spec["datatype"] == "BYTES":
            raise ConfigError(f"input {spec['name']!r} is {spec['datatype']}; pass --data with its values")
        shape = [int(d) for d in spec["shape"]]
        if max_batch_size > 0:
            shape[0] = batch
        shape = [dynamic_dim if d < 0 else d for d in shape]
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype=bool)
        elif "mask" in spec["name"].lower():
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = rng.integers(0, 100, size=shape).astype(dtype)
        feeds[spec["name"]] = arr
    return feeds


def _check_data(data: Mapping[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    from tritonclient.utils import np_to_triton_dtype

    wanted = {s["name"]: s for s in meta.get("inputs", [])}
    missing = sorted(set(wanted) - set(data))
    if missing:
        raise ConfigError(f"--data has no array for input {missing[0]!r} of model {meta.get('name')!r}")
    feeds = {}
    for name, spec in wanted.items():
        arr = np.ascontiguousarray(data[name])
        if np_to_triton_dtype(arr.dtype) != spec["datatype"]:
            raise ConfigError(f"--data: input {name!r} is {arr.dtype}, model {meta.get('name')!r} takes {spec['datatype']}")
        feeds[name] = arr
    return feeds


async def _window(client: _Client, model: str, request: tuple[list, list], concurrency: int, seconds: float,
                  max_requests: int, tally: _Tally) -> None:
    budget = [max_requests]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                await client.infer(model, *request)
            except Exception as e:  # an error response, a timeout or a broken connection: counted, not raised
                tally.errors += 1
                if len(tally.samples) < 3:
                    tally.samples.append(f"{type(e).__name__}: {str(e).strip()[:200]}")
                continue
            tally.latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.seconds += time.perf_counter() - t0


async def _run(host: str, port: int, models: Sequence[str], levels: Sequence[int], duration: float, protocol: str,
               data: Mapping[str, np.ndarray] | None, batch: int, dynamic_dim: int, windows: int, warmup: int,
               max_requests: int, timeout: float, progress: Callable[[str], None] | None) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    url = f"{host}:{port}"
    client = _Client(protocol, url, timeout)
    try:
        try:
            live = await asyncio.wait_for(client.client.is_server_live(), timeout)
        except Exception as e:  # connection refused, timeout, not a Triton server
            raise GraphpruneError(f"no Triton server answers at {url} over {protocol}: "
                                  f"{type(e).__name__}: {str(e).strip()[:160]}") from None
        if not live:
            raise GraphpruneError(f"the Triton server at {url} is not live")
        requests, batches = {}, {}
        for m in models:
            try:
                ready = await client.client.is_model_ready(m)
            except InferenceServerException as e:
                raise GraphpruneError(f"model {m!r} at {url}: {e.message()}") from None
            if not ready:
                raise GraphpruneError(f"model {m!r} is not ready at {url} (is it in the repository?)")
            meta, mbs = await client.metadata(m)
            feeds = _check_data(data, meta) if data is not None else synthetic_feeds(meta, mbs, batch, dynamic_dim)
            batches[m] = int(next(iter(feeds.values())).shape[0]) if mbs > 0 and feeds else 1
            requests[m] = client.request(feeds, meta)
            for _ in range(warmup):
                try:
                    await client.infer(m, *requests[m])
                except Exception as e:
                    raise GraphpruneError(f"model {m!r} answered a warm-up request with an error: "
                                          f"{str(e).strip()[:200]}") from None
        per_window = duration / windows
        results = []
        for c in levels:
            tallies = {m: _Tally() for m in models}
            for w in range(windows):
                order = list(models) if w % 2 == 0 else list(reversed(models))
                for m in order:
                    if progress is not None:
                        progress(f"concurrency {c}: {m} window {w + 1}/{windows}")
                    await _window(client, m, requests[m], c, per_window, max_requests, tallies[m])
            level: dict[str, Any] = {"concurrency": c, "models": {m: tallies[m].summary(batches[m]) for m in models}}
            if len(models) == 2:
                a, b = (level["models"][m]["rps"] for m in models)
                level["ratio"] = round(a / b, 4) if b else None
            results.append(level)
    finally:
        await client.close()
    return {"target": url, "protocol": protocol, "models": list(models), "batch": batches,
            "window_s": round(per_window, 3), "windows": windows, "duration_s": duration, "levels": results}


def load_test(
    target: str,
    model: str,
    *,
    compare: str | None = None,
    concurrency: Sequence[int] = (1, 2, 4, 8),
    duration: float = 10.0,
    protocol: str = "http",
    data: Mapping[str, np.ndarray] | None = None,
    batch: int = 1,
    dynamic_dim: int = 32,
    windows: int = 2,
    warmup: int = 3,
    max_requests: int = 100_000,
    timeout: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load-test ``model`` (and ``compare``, interleaved) at ``target``; returns the result dict.

    ``duration`` is the time per model and level, split into ``windows`` windows; ``ratio`` (with ``compare``)
    is rps(model) / rps(compare). See the module docstring for the rules and bounds.
    """
    host, port = parse_target(target)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: {protocol!r} is not http or grpc")
    if not 0 < duration <= 3600:
        raise ConfigError(f"--duration: must be in (0, 3600] seconds, got {duration}")
    if windows < 1 or batch < 1 or dynamic_dim < 1 or max_requests < 1 or warmup < 0 or timeout <= 0:
        raise ConfigError("--windows, --batch, --dynamic-dim and --max-requests must be at least 1, --warmup at least 0")
    if compare is not None and compare == model:
        raise ConfigError("--compare: give a different model than --model")
    try:
        import tritonclient.utils  # noqa: F401
    except ImportError:
        raise GraphpruneError("loadtest needs tritonclient: pip install 'graphprune[serve]'") from None
    models = [model] + ([compare] if compare else [])
    return asyncio.run(_run(host, port, models, list(concurrency), duration, protocol, data, batch, dynamic_dim,
                            windows, warmup, max_requests, timeout, progress))
