"""Stage 1: what the run stands on: versions, devices (compute capability, memory), the kernel
backend and dtype the engine would choose, and the modules the later stages import.

Imports only the standard library and jax at module level: a missing dependency (gguf and
llguidance are not preinstalled on the GPU machine) must become a row of this stage, not an
ImportError before any report is written.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform

NEEDED = ("numpy", "flax", "gguf", "yaml", "llguidance", "tokenizers", "jinja2", "safetensors")
WHEELS_HINT = ("install the carried wheels first: pip install --no-index --no-deps wheels/*.whl "
               "(BUILD.md, 'First run on a GPU')")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cuda_plugins() -> str:
    names = sorted({d.metadata["Name"] for d in md.distributions()
                    if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")})
    return ", ".join(f"{n} {_version(n)}" for n in names) or "none"


def _module_row(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported, with how to fix it
        return dict(item=f"import {name}", ok=False, error=f"{type(e).__name__}: {e}; "
                                                           f"{WHEELS_HINT}")
    return dict(item=f"import {name}", value=getattr(mod, "__version__", "ok"), ok=True)


def _device_rows(jax) -> list[dict]:
    rows = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - some platforms keep no statistics
            stats = {}
        cc = getattr(d, "compute_capability", None)
        rows.append(dict(item=f"device {d.id}", value=d.device_kind, platform=d.platform,
                         compute_capability=cc, ok=True,
                         memory_gib=round(stats.get("bytes_limit", 0) / 2**30, 2) or None))
    return rows


def _choice_rows(jax, cpu: bool) -> list[dict]:
    from vllm_jax.kernels import backend
    from vllm_jax.loader.host import to_dtype

    platform_name = jax.default_backend()
    auto = backend.resolve("auto")
    on_gpu = platform_name == "gpu"
    why = None if cpu or on_gpu else "jax sees no GPU (pass --cpu to run interpreted)"
    return [dict(item="jax default backend", value=platform_name, ok=why is None, error=why),
            dict(item="kernel backend (auto)", value=auto, ok=cpu or auto == "pallas",
                 error=None if cpu or auto == "pallas" else "auto did not choose pallas"),
            dict(item="compute dtype (auto)", value=str(to_dtype("auto").dtype), ok=True)]


def environment(ctx) -> list[dict]:
    rows = [dict(item="python", value=platform.python_version(), ok=True),
            *(dict(item=d, value=_version(d), ok=True) for d in ("jax", "jaxlib", "flax", "numpy")),
            dict(item="cuda plugins", value=_cuda_plugins(), ok=True)]
    import jax

    rows += _device_rows(jax)
    rows += [_module_row(m) for m in NEEDED]
    rows.append(_module_row("jax.experimental.pallas.triton"))
    if all(r["ok"] for r in rows):
        rows += _choice_rows(jax, ctx.cpu)
    return [{k: v for k, v in r.items() if v is not None} for r in rows]
