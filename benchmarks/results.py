"""The result files behind the generated benchmark tables of ``docs/`` (``benchmarks/results/NAME.json``).

One file holds one table and says, once, how it was measured::

    {"name": "token_speed",                      # the file's stem; docs place it with <!-- generated:NAME -->
     "command": "python -m benchmarks.bench_token_drop --reps 3 --runs 6",
     "date": "2026-12-02",                       # UTC; a time may follow
     "machine": "2-core shared CPU VM",
     "versions": {"onnxruntime": "1.32.0", ...},  # what the figures were measured with
     "description": "markdown: the setup, what a column means",
     "columns": ["opset", "method", ...],
     "rows": [["18", "cls_attention", ...], ...], # cells as printed (strings)
     "notes": "markdown after the table (optional)"}

A benchmark prints its markdown table through :class:`Table` and, given ``--result PATH``, writes this file with
:meth:`Table.save`: the command line, the date, the machine and the installed versions are filled in. Then
``python -m benchmarks.report`` writes the table into the docs. Nothing here measures anything.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("name", "command", "date", "machine", "versions", "description", "columns", "rows", "notes")
#: Packages whose versions a result records when they are installed.
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnx", "onnx-ir", "numpy", "torch", "transformers", "tritonclient",
            "nvidia-pytriton")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def split_row(line: str) -> list[str]:
    """The cells of one markdown table line ``| a | b |`` (``\\|`` stays inside a cell)."""
    text = line.strip()
    if not (text.startswith("|") and text.endswith("|")):
        raise ValueError(f"not a markdown table row: {line!r}")
    return [c.strip() for c in _CELL_SPLIT.split(text[1:-1])]


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """``columns`` and ``rows`` as a markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def installed_versions() -> dict[str, str]:
    """Versions of the :data:`PACKAGES` installed here."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return found


def this_machine() -> str:
    """A short description of this machine (``GRAPHPRUNE_BENCH_MACHINE`` overrides it, e.g. "shared 2-core VM")."""
    return os.environ.get("GRAPHPRUNE_BENCH_MACHINE") or (
        f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, Python {platform.python_version()}")


def this_command() -> str:
    """The command line that is running, as ``python -m benchmarks.NAME ARGS`` for a benchmark script."""
    script = Path(sys.argv[0])
    head = f"python -m benchmarks.{script.stem}" if script.parent.name == "benchmarks" else f"python {sys.argv[0]}"
    return " ".join([head, shlex.join(sys.argv[1:])]).strip()


def validate(result: dict, where: str = "result") -> dict:
    """Check one result's keys and shape; returns it. Raises ``ValueError`` naming the problem."""
    missing = [k for k in ("name", "command", "date", "machine", "versions", "columns", "rows") if k not in result]
    unknown = [k for k in result if k not in KEYS]
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    width = len(result["columns"])
    for i, row in enumerate(result["rows"]):
        if len(row) != width or not all(isinstance(c, str) for c in row):
            raise ValueError(f"{where}: row {i} has {len(row)} cells (all strings expected), the columns {width}")
    return result


def load(name: str, folder: Path = RESULTS) -> dict:
    """The result ``folder/NAME.json``, validated."""
    path = folder / f"{name}.json"
    result = validate(json.loads(path.read_text(encoding="utf-8")), str(path))
    if result["name"] != name:
        raise ValueError(f"{path}: its name is {result['name']!r}, not the file's stem")
    return result


def load_all(folder: Path = RESULTS) -> dict[str, dict]:
    """Every result in ``folder``, by name."""
    return {p.stem: load(p.stem, folder) for p in sorted(folder.glob("*.json"))}


def write_result(path: str | Path, columns: list[str], rows: list[list[str]], *, description: str = "",
                 notes: str = "", command: str | None = None, machine: str | None = None,
                 versions: dict[str, str] | None = None, date: str | None = None) -> Path:
    """Write one result file (atomically); unset fields describe this run. Returns the path."""
    path = Path(path)
    result = {"name": path.stem, "command": command or this_command(),
              "date": date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine or this_machine(),
              "versions": installed_versions() if versions is None else versions,
              "description": description, "columns": list(columns), "rows": [list(map(str, r)) for r in rows]}
    if notes:
        result["notes"] = notes
    validate(result, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of the first markdown table in ``markdown`` (its separator line skipped)."""
    lines = [ln for ln in markdown.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("|")), None)
    if start is None:
        raise ValueError("no markdown table in the text")
    block = []
    for ln in lines[start:]:
        if not ln.strip().startswith("|"):
            break
        block.append(ln)
    return split_row(block[0]), [split_row(ln) for ln in block[2:]]


def save_markdown(path: str | Path | None, markdown: str, **fields) -> Path | None:
    """With a path (a ``--result`` option), write the first table of ``markdown`` as a result file there."""
    if path is None:
        return None
    columns, rows = parse_table(markdown)
    out = write_result(path, columns, rows, **fields)
    print(f"result written to {out}", file=sys.stderr)
    return out


class Table:
    """A markdown table printed row by row, as the benchmarks print it, and kept for :meth:`save`."""

    def __init__(self, header: str | list[str]):
        self.columns = split_row(header) if isinstance(header, str) else list(header)
        self.rows: list[list[str]] = []
        print("| " + " | ".join(self.columns) + " |")
        print("|" + "---|" * len(self.columns), flush=True)

    def add(self, row: str | list) -> None:
        """Print one row (a markdown line ``| a | b |`` or a list of cells) and keep it."""
        cells = split_row(row) if isinstance(row, str) else [str(c) for c in row]
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, the table {len(self.columns)}: {cells}")
        self.rows.append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)

    def save(self, path: str | Path | None, **fields) -> Path | None:
        """With a path (a ``--result`` option), write the result file there; ``fields`` as :func:`write_result`."""
        if path is None:
            return None
        out = write_result(path, self.columns, self.rows, **fields)
        print(f"result written to {out}", file=sys.stderr)
        return out


def add_result_option(parser) -> None:
    """The ``--result PATH`` option every table-printing benchmark takes."""
    parser.add_argument("--result", default=None, metavar="PATH",
                        help="also write the table as a result file (benchmarks/results/NAME.json: command, date, "
                        "machine, versions, rows) for `python -m benchmarks.report`")
