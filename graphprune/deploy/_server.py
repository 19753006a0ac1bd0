"""Find, start, watch and stop a real ``tritonserver`` on a model repository.

Which binary (:func:`find_server`), in this order:
  1. an explicit path (``graphprune serve --server PATH``);
  2. the one bundled in the ``nvidia-pytriton`` wheel (installed with ``--no-deps``: its numpy<2 pin is for its
     Python API, which graphprune never imports): tritonserver 2.51 with only the python backend;
  3. ``tritonserver`` on ``PATH`` (a Triton image: its own backends, in ``/opt/tritonserver/backends``).

The bundled binary needs three things, which :class:`TritonServer` sets up and removes again:
  * ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs``;
  * a backend folder whose ``python/`` holds the backend library, ``triton_python_backend_utils.py`` and the
    python-backend stub for this interpreter's Python version (the wheel keeps the stubs apart; here they are
    linked into a temporary folder, so the installed package is never written to);
  * numpy and onnxruntime for ``model.py``: the stub embeds an isolated interpreter that ignores ``PYTHONPATH``,
    so this environment's site-packages go in ``GRAPHPRUNE_TRITON_PYTHONPATH``, which graphprune's ``model.py``
    puts on ``sys.path``.

The server listens on 127.0.0.1 only, runs in its own process group (its python stubs are in that group too),
and is stopped with SIGTERM (Triton's graceful shutdown), then SIGKILL for the whole group after a bounded wait.
While it loads, its log lines give each model's state (Triton's HTTP endpoint opens only after loading); once
up, the repository index is the authority.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from graphprune.errors import GraphpruneError

HOW_TO_GET = ("no tritonserver binary found: pip install --no-deps nvidia-pytriton==0.7.0 (bundles tritonserver 2.51 "
              "with the python backend; --no-deps keeps your numpy), or put tritonserver on PATH, or pass --server PATH")
_LOADING = re.compile(r'"loading: ([^:"]+):(\d+)"')
_LOADED = re.compile(r"successfully loaded '([^']+)'")
_FAILED = re.compile(r"failed to load '([^']+)'(?: version (\d+))?: (.*)")


@dataclasses.dataclass(frozen=True)
class ServerBinary:
    """A tritonserver executable; ``bundled`` ones come with their libraries and python-backend stubs."""

    path: Path
    bundled: bool
    libs: Path | None = None
    python_backend: Path | None = None
    stubs: Path | None = None

    @property
    def backends(self) -> tuple[str, ...] | None:
        """Backends the binary has, when known (the bundled one: python only)."""
        return ("python",) if self.bundled else None


def _bundled() -> ServerBinary | None:
    try:
        spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    binary = root / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return ServerBinary(binary, True, libs=root.parent / "nvidia_pytriton.libs",
                        python_backend=root / "tritonserver" / "backends" / "python",
                        stubs=root / "tritonserver" / "python_backend_stubs")


def find_server(explicit: str | os.PathLike | None = None) -> ServerBinary:
    """The tritonserver to run (order in the module docstring); a one-line error when there is none."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise GraphpruneError(f"--server: {path} is not an executable file")
        bundled = _bundled()
        if bundled is not None and path.resolve() == bundled.path.resolve():
            return bundled
        return ServerBinary(path, False)
    bundled = _bundled()
    if bundled is not None:
        return bundled
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), False)
    raise GraphpruneError(HOW_TO_GET)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise GraphpruneError(f"port {port} on {host} is in use; choose another with {flag}") from None


def repository_models(repository: Path) -> dict[str, str]:
    """Model name → its backend (``python``, ``onnxruntime``, ``tensorrt``...) for each model in the repository."""
    if not repository.is_dir():
        raise GraphpruneError(f"model repository {repository} is not a folder")
    models = {}
    for d in sorted(repository.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        cfg = d / "config.pbtxt"
        if not cfg.is_file():
            continue
        text = cfg.read_text(errors="replace")
        backend = re.search(r'^\s*backend\s*:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform\s*:\s*"([^"]+)"', text, re.M)
        if backend:
            models[d.name] = backend.group(1)
        elif platform:
            models[d.name] = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}.get(platform.group(1),
                                                                                                 platform.group(1))
        else:
            models[d.name] = "unknown"
    if not models:
        raise GraphpruneError(f"{repository} holds no model (no NAME/config.pbtxt); write one with graphprune deploy")
    return models


def _site_paths() -> list[str]:
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(p for p in paths if os.path.isdir(p)))


def _check_stub(stub: Path) -> None:
    """Refuse a python-backend stub whose shared libraries (libpython3.X) cannot be found."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    try:
        res = subprocess.run([ldd, str(stub)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return
    missing = [line.split("=>")[0].strip() for line in res.stdout.splitlines() if "not found" in line
               and "cudart" not in line]
    if missing:
        raise GraphpruneError(f"the bundled python-backend stub {stub.name} needs {', '.join(missing)}, which is not "
                              f"installed (e.g. apt-get install libpython{sys.version_info[0]}.{sys.version_info[1]})")


class TritonServer:
    """A tritonserver process on ``repository``, bound to 127.0.0.1 (use as a context manager).

    ``on_log(line)`` receives every server log line (from a reader thread); the last ``keep_lines`` are kept in
    ``log_tail`` for error messages.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        server: ServerBinary | None = None,
        on_log: Callable[[str], None] | None = None,
        keep_lines: int = 400,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = "127.0.0.1"
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.server = server
        self.on_log = on_log
        self.log_tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.events: collections.deque[tuple[str, str, str, str]] = collections.deque()
        self._tmp: Path | None = None
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    # -- start -------------------------------------------------------------------------------------------------
    def _command_and_env(self, server: ServerBinary) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        cmd = [str(server.path), "--model-repository", str(self.repository),
               "--http-address", self.host, "--grpc-address", self.host, "--metrics-address", self.host,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--exit-on-error=false", "--strict-readiness=true",
               "--exit-timeout-secs", "20"]
        if server.bundled:
            assert server.python_backend is not None and server.stubs is not None and server.libs is not None
            version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            stub = server.stubs / version / "triton_python_backend_stub"
            if not stub.is_file():
                have = sorted(p.name for p in server.stubs.iterdir() if p.is_dir())
                raise GraphpruneError(f"the bundled tritonserver has no python-backend stub for Python {version} "
                                      f"(it has {', '.join(have)}); run graphprune under one of those")
            _check_stub(stub)
            self._tmp = Path(tempfile.mkdtemp(prefix="graphprune-triton-"))
            py = self._tmp / "backends" / "python"
            py.mkdir(parents=True)
            for f in server.python_backend.iterdir():
                if f.is_file():
                    (py / f.name).symlink_to(f)
            (py / stub.name).symlink_to(stub)
            cmd += ["--backend-directory", str(self._tmp / "backends")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(server.libs), env.get("LD_LIBRARY_PATH")) if p)
            env["GRAPHPRUNE_TRITON_PYTHONPATH"] = os.pathsep.join(_site_paths())
        return cmd + self.extra_args, env

    def start(self) -> TritonServer:
        """Start the server process (returns at once; see :meth:`wait_ready`)."""
        if self.proc is not None:
            raise RuntimeError("server already started")
        server = self.server or find_server()
        self.server = server
        models = repository_models(self.repository)
        if server.backends is not None:
            lacking = {m: b for m, b in models.items() if b not in server.backends}
            if lacking:
                m, b = next(iter(lacking.items()))
                raise GraphpruneError(
                    f"model {m!r} uses the {b} backend, which this tritonserver lacks (it has: "
                    f"{', '.join(server.backends)}); redeploy it with --backend python, or serve with a Triton image")
        for port, flag in ((self.http_port, "--http-port"), (self.grpc_port, "--grpc-port"),
                           (self.metrics_port, "--metrics-port")):
            _check_port(self.host, port, flag)
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise GraphpruneError("--http-port, --grpc-port and --metrics-port must differ")
        try:
            cmd, env = self._command_and_env(server)
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._cleanup()
            raise
        self._reader = threading.Thread(target=self._read, name="tritonserver-log", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        versions: dict[str, str] = {}
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log_tail.append(line)
            if m := _LOADING.search(line):
                versions[m.group(1)] = m.group(2)
                self.events.append((m.group(1), m.group(2), "LOADING", ""))
            elif m := _LOADED.search(line):
                self.events.append((m.group(1), versions.get(m.group(1), ""), "READY", ""))
            elif m := _FAILED.search(line):
                self.events.append((m.group(1), m.group(2) or "", "UNAVAILABLE", m.group(3).strip().strip('"')))
            if self.on_log is not None:
                self.on_log(line)

    # -- readiness ---------------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 180.0, on_state: Callable[[str, str, str, str], None] | None = None) -> list[dict]:
        """Wait until every model in the repository is READY; return the repository index.

        ``on_state(name, version, state, reason)`` is called for each change seen. Raises ``GraphpruneError``
        naming the model when one fails to load, when the server exits, or after ``timeout`` seconds.
        """
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        seen: dict[str, tuple[str, str]] = {}

        def report(name: str, version: str, state: str, reason: str) -> None:
            if seen.get(name) != (state, reason):
                seen[name] = (state, reason)
                if on_state is not None:
                    on_state(name, version, state, reason)

        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0, network_timeout=10.0)
        try:
            while True:
                while self.events:
                    report(*self.events.popleft())
                if self.proc.poll() is not None:
                    self._drain_reader()
                    while self.events:
                        report(*self.events.popleft())
                    raise GraphpruneError(f"tritonserver exited with code {self.proc.returncode} while starting: "
                                          f"{self.last_error() or 'see its log'}")
                try:
                    index = client.get_model_repository_index() if client.is_server_live() else None
                except (InferenceServerException, OSError, ConnectionError):
                    index = None
                except Exception:  # geventhttpclient raises its own errors while the port is not open yet
                    index = None
                if index is not None:
                    for m in index:
                        report(m["name"], str(m.get("version", "")), m.get("state", "UNKNOWN"), m.get("reason", ""))
                    failed = [m for m in index if m.get("state") == "UNAVAILABLE"]
                    if failed:
                        m = failed[0]
                        reason = (m.get("reason") or "").strip().splitlines()
                        raise GraphpruneError(f"model {m['name']!r} failed to load: {_short(reason)}")
                    if index and all(m.get("state") == "READY" for m in index):
                        return index
                if time.monotonic() > deadline:
                    raise GraphpruneError(f"models not ready after {timeout:.0f} s: " + ", ".join(
                        f"{n} {s}" for n, (s, _) in seen.items()) if seen else
                        f"tritonserver did not answer on {self.http_url} within {timeout:.0f} s")
                time.sleep(0.25)
        finally:
            client.close()

    def last_error(self) -> str:
        for line in reversed(self.log_tail):
            if line.startswith("E") or "error" in line.lower():
                return line.strip()[:300]
        return ""

    def _drain_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- stop --------------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the process group; returns the exit code."""
        proc = self.proc
        if proc is None:
            self._cleanup()
            return None
        try:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(proc)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._drain_reader()
            return proc.returncode
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the server's process group (stubs included), waiting briefly for it to go."""
    for _ in range(50):
        proc.poll()  # reap the server itself, so that its zombie does not keep the group alive
        if not group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after "pid (comm)": state, ppid, pgrp, ...
            return True
    return False


def _short(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines[:2] if line.strip())
    return text[:300] or "no reason given"
