"""Trials as Ray tasks; the Optuna study on the driver stays the single source of truth (ask/tell).

Why ask/tell and not Ray Tune with its Optuna searcher: the study then lives in Optuna storage exactly as a local
run's does (``--resume``, the RDB URL shared between machines, the report read from it), one code path decides and
records every trial, and a Ray run differs from a local one only in where ``Runner.run`` executes. Tune would add
its own trial bookkeeping, result folders and scheduler beside the study.

The :class:`~graphprune.search.trial.Setup` (the model as ONNX bytes, calibration feeds, selection samples) goes
into the object store once; each worker process builds its ``Runner`` from it on its first task (loading the
original and its reference outputs) and keeps it. Each task measures latency on its worker, against the original
there, with ``threads`` ORT threads (default 1: one per task's CPU). The calibration cache is a folder in the
report directory, shared by workers on the driver's machine; workers elsewhere compute their own.
"""

from __future__ import annotations

from typing import Any

from graphprune.errors import ConfigError


def _run(setup: Any, entries: list[dict]) -> dict:
    from graphprune.search.trial import runner_for

    return runner_for(setup).run(entries)


def reachable(address: str) -> None:
    """Fail fast (one line) when nothing listens at ``address`` (``ray.init`` would wait a minute)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--ray: cannot reach a Ray cluster at {address} ({e.strerror or e}); run without --ray "
                          "to search on this machine, or start one there with `ray start --head`") from None


class RayPool:
    """``map(pipelines) -> results`` on a Ray cluster (``address`` None: a local one)."""

    def __init__(self, setup: Any, address: str | None, num_cpus: int | None = None) -> None:
        import ray

        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = num_cpus
        if address:
            reachable(address)
        self.owned = not ray.is_initialized()
        try:
            if self.owned:
                ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts, bad address format
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--ray: cannot reach a Ray cluster at {address}: {msg[:160]}; run without --ray to "
                              "search on this machine, or start one with `ray start --head`") from None
        self.ray = ray
        self.ref = ray.put(setup)
        self.task = ray.remote(num_cpus=1)(_run)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, pipelines: list[list[dict]]) -> list[dict]:
        return self.ray.get([self.task.remote(self.ref, p) for p in pipelines])

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
