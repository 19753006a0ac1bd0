"""The zoo table: every model of ``tests/_zoo.py`` × {inspect, token_drop, sparse_attention, channel_prune}.

``python -m benchmarks.zoo_table [--models bert vit ...] [--out table.md]`` exports each model (into a temporary
folder), runs ``inspect`` and each pass family at its CLI-shortcut defaults, classifies every result with the zoo
contract (``tests/_zoo.py``; the same code ``tests/test_zoo.py`` asserts) and prints the markdown table of the
zoo table of docs/benchmarks.md, then one line per failing pair with its full problem list.

Cells: ``FLOPs ×0.71`` (changed; the pass's own FLOPs ratio, ``(verify failed)`` when verification on synthetic
inputs missed a threshold), ``refused: <reason>``, ``error: <one-line user error>``, ``FAIL: <first problem>``.
The inspect cell gives the FLOPs at batch 1 and the attention blocks found (and the expected count when it differs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import add_result_option, save_markdown
from tests import _zoo


def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def inspect_cell(model: _zoo.ZooModel, path: Path) -> tuple[str, bool]:
    try:
        info = _zoo.inspect(path)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"FAIL: {_zoo._short(f'{type(e).__name__}: {e}', 90)}", False
    found = len(info["attention_blocks"])
    ok = found == model.blocks if model.blocks is not None else (found > 0 or not model.attention)
    text = f"{_fmt(info['flops'])} FLOPs, {found} attention blocks"
    return (text if ok else f"FAIL: {found} attention blocks found, {model.blocks or '> 0'} expected ({_fmt(info['flops'])} FLOPs)"), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="zoo model names (default: all)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    add_result_option(ap)
    args = ap.parse_args(argv)
    models = [_zoo.BY_NAME[n] for n in args.models] if args.models else _zoo.ZOO
    rows, failures = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo_") as tmp:
        folder = Path(tmp)
        for m in models:
            t = time.perf_counter()
            try:
                path = _zoo.export(m, folder)
            except Exception as e:  # noqa: BLE001 - an export failure is one row
                rows.append(f"| {m.name} | {m.source} | FAIL: export: {_zoo._short(str(e), 80)} | | | |")
                failures.append(f"{m.name} × export: {type(e).__name__}: {e}")
                continue
            cell, ok = inspect_cell(m, path)
            if not ok:
                failures.append(f"{m.name} × inspect: {cell}")
            cells = [cell]
            for fam in _zoo.FAMILIES:
                o = _zoo.run_family(m.name, path, fam, folder)
                cells.append(o.cell())
                if o.status == "fail":
                    failures.append(f"{m.name} × {fam}: " + " | ".join(o.problems))
            rows.append(f"| {m.name} | {m.source} | " + " | ".join(cells) + " |")
            print(f"  {m.name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    head = ["| model | source | inspect | token_drop | sparse_attention | channel_prune |",
            "|---|---|---|---|---|---|"]
    table = "\n".join(head + rows)
    print(table)
    n_pairs = len(models) * (1 + len(_zoo.FAMILIES))
    print(f"\n{n_pairs - len(failures)} of {n_pairs} (model, step) pairs meet the contract; "
          f"{time.perf_counter() - t0:.0f} s")
    for f in failures:
        print(f"- {f}")
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(table + "\n")
        os.replace(tmp, args.out)  # atomic: a reader never sees half a table
    save_markdown(args.result, table, notes=f"**{n_pairs - len(failures)} of {n_pairs} (model, step) pairs meet the contract.**")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
