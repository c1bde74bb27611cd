"""Which kernels run: the one place the backend is chosen, for the quantized matmuls and for
paged attention alike.

  pallas            GPUs (the Triton lowering of Pallas)
  cpu               the C++ kernels through XLA FFI (kernels/cpu.py), where they build
  xla               plain XLA: Metal, a CPU without a C++ compiler, and the tests' reference
  pallas_interpret  the Pallas kernels run by the interpreter (tests on the CPU)
"""
from __future__ import annotations

BACKENDS = ("auto", "xla", "cpu", "pallas", "pallas_interpret")


def resolve(name: str = "auto") -> str:
    """A backend name -> the backend that runs: "auto" is pallas on GPUs, cpu on the CPU where
    the C++ kernels build, xla elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    import jax

    platform = jax.default_backend()
    if platform == "gpu":
        return "pallas"
    if platform == "cpu":
        from vllm_jax.kernels import cpu

        if cpu.available():
            return "cpu"
    return "xla"
