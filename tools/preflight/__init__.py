"""The stages of tools/gpu_preflight.py. Each stage is a function of a `Context` returning table
rows (dicts); a row whose "ok" is False fails its stage, and `record` turns an exception inside
one row into such a row, so one broken kernel does not hide the rest of the table."""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Context:
    cpu: bool  # the Pallas interpreter at tiny shapes, timings not meaningful
    bench_args: tuple[str, ...] | None = None  # None: the defaults for the device

    @property
    def backend(self) -> str:
        return "pallas_interpret" if self.cpu else "pallas"

    @property
    def interpret(self) -> bool:
        return self.cpu


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def record(rows: list, fn, **row) -> dict:
    """Runs fn() -> dict of results into a row; its exception becomes the row's error."""
    t = time.perf_counter()
    try:
        row.update(fn())
        row.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - the report carries it; the stage fails on it
        row.update(ok=False, error=error_text(e), traceback=traceback.format_exc(limit=-8))
    row["seconds"] = round(time.perf_counter() - t, 3)
    rows.append(row)
    # a line per row as it ends: a run killed mid-stage still shows how far it got
    print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row.get('case', '')} {row.get('impl', '')} "
          f"({row['seconds']} s)", file=sys.stderr, flush=True)
    return row
