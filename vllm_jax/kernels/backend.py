"""Which kernels run: the one place the backend is chosen, for paged attention and for the
quantized matmuls, each on its own or both by one name.

  pallas            GPUs (the Triton lowering of Pallas)
  cpu               the C++ kernels through XLA FFI (kernels/cpu.py), where they build
  xla               plain XLA: Metal, a CPU without a C++ compiler, and the tests' reference
  pallas_interpret  the Pallas kernels run by the interpreter (tests on the CPU)

A Pallas kernel that fails to lower or compile never stops the engine: before its first use at
a shape it is compiled on its own (`pallas_runs`); the first failure logs one warning and
that kernel runs on the XLA path from then on. Inside `lowering_only()` (exporting for another
platform) nothing is compiled, so the kernels are lowered as chosen.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import jax

log = logging.getLogger("vllm_jax")

BACKENDS = ("auto", "xla", "cpu", "pallas", "pallas_interpret")


@dataclass(frozen=True)
class Backends:
    """The backend of each kernel family; a plain name anywhere a Backends goes means both (and
    float32 activations). cpu_activations: what the C++ quantized matmul multiplies the packed
    weights by, int8 per 32 (integer dots, llama.cpp's arithmetic) or float32 (cpu.qmatmul)."""
    attention: str = "auto"
    matmul: str = "auto"
    cpu_activations: str = "f32"


def attention_of(backend: str | Backends) -> str:
    return backend.attention if isinstance(backend, Backends) else backend


def activations_of(backend: str | Backends) -> str:
    return backend.cpu_activations if isinstance(backend, Backends) else Backends.cpu_activations


def matmul_of(backend: str | Backends) -> str:
    return backend.matmul if isinstance(backend, Backends) else backend


def resolve(name: str = "auto") -> str:
    """A backend name -> the backend that runs: "auto" is pallas on GPUs, cpu on the CPU where
    the C++ kernels build, xla elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    platform = jax.default_backend()
    if platform == "gpu":
        return "pallas"
    if platform == "cpu":
        from vllm_jax.kernels import cpu

        if cpu.available():
            return "cpu"
    return "xla"


# -- the fallback to XLA --------------------------------------------------------------------------

_fallen_back: set[str] = set()  # kernels that failed to compile once: XLA from then on
_compiled: set[tuple] = set()  # (kernel, static arguments, argument shapes) that compiled
_lowering_only = False


@contextlib.contextmanager
def lowering_only():
    """Kernels are lowered as chosen, not compiled here first (exporting for another platform)."""
    global _lowering_only
    before, _lowering_only = _lowering_only, True
    try:
        yield
    finally:
        _lowering_only = before


def fallen_back() -> list[str]:
    """The kernels that failed to compile and run on the XLA path."""
    return sorted(_fallen_back)


def pallas_runs(name: str, kernel: str, fn, args: tuple, static: tuple = ()) -> bool:
    """Whether the Pallas `kernel` runs on resolved backend `name` ("pallas" or
    "pallas_interpret") at the shapes of `args`: the interpreter always does; the Triton kernel
    where `fn(*args)` (the kernel closed over its `static` arguments) compiles. The first failure
    of `kernel` logs one warning and answers False for every shape from then on. Callable while
    tracing: only shapes and dtypes are used."""
    if name == "pallas_interpret" or _lowering_only:
        return True
    if kernel in _fallen_back:
        return False
    avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    key = (kernel, static, jax.tree.structure(avals), tuple(jax.tree.leaves(avals)))
    if key in _compiled:
        return True
    try:
        jax.jit(fn).lower(*avals).compile()
    except Exception as e:  # any lowering or compiler error: the XLA path still runs
        _fallen_back.add(kernel)
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        log.warning("the Pallas %s kernel failed to compile (%s: %s); %s runs on the XLA path "
                    "from now on", kernel, type(e).__name__, reason, kernel)
        return False
    _compiled.add(key)
    return True
