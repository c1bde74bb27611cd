"""The CPU kernels: cpu_qmatmul.cc (GGUF-quantized matmul, plain and grouped by expert, float32
activations), cpu_q8dot.cc (the same matmul with activations quantized to int8 per 32 and integer
dot products, as llama.cpp computes it), cpu_dense.cc (matmul with 16-bit weights) and
cpu_attention.cc (paged attention: decode rows, and ragged rows of any sequence and position),
XLA FFI custom calls built on first use.

The C++ sources are compiled once per machine with the system's C++ compiler against the XLA
FFI headers that jaxlib ships, cached under ~/.cache/vllm_jax/kernels (keyed by the sources,
jaxlib and the CPU), and registered as XLA custom calls. They are built for the machine
(-march=native; VLLM_JAX_CPU_FLAGS replaces that, e.g. "-march=haswell" for the portable AVX2
paths), so each picks its instructions (AVX-512 VNNI, AVX-VNNI, AVX2) when it is built.
Without a compiler (or with VLLM_JAX_CPU_KERNELS=0) `available()` is False and callers keep to
the XLA paths. Helper threads: one per core (VLLM_JAX_CPU_THREADS to change).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger("vllm_jax")

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_qmatmul.cc", HERE / "cpu_q8dot.cc", HERE / "cpu_q8panel.cc",
           HERE / "cpu_dense.cc", HERE / "cpu_attention.cc"]
HEADERS = [HERE / "cpu_common.h", HERE / "cpu_fields.h", HERE / "cpu_q8.h"]
TARGETS = ("vllm_jax_qmatmul", "vllm_jax_q8dot", "vllm_jax_q8panel", "vllm_jax_grouped_qmatmul",
           "vllm_jax_dense_matmul",
           "vllm_jax_decode_attention", "vllm_jax_ragged_attention")
# the order the kernel reads each type's fields in (kernels/quant.py `repack` names)
FIELDS = {
    "q4_0": ("d", "qs"), "q4_1": ("d", "m", "qs"), "q5_0": ("d", "qh", "qs"),
    "q5_1": ("d", "m", "qh", "qs"), "q8_0": ("d", "qs"), "q2_k": ("d", "dmin", "sc", "qs"),
    "q3_k": ("d", "sc", "hmask", "qs"), "q4_k": ("d", "dmin", "sc", "m", "qs"),
    "q5_k": ("d", "dmin", "sc", "m", "qh", "qs"), "q6_k": ("d", "sc", "ql", "qh"),
}
QTYPE_CODE = {name: i for i, name in enumerate(FIELDS)}
INT8_QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k")  # cpu_q8dot.cc's
PANEL_ROWS = 16
PANEL_QTYPES = ("q4_0", "q4_1", "q8_0")  # cpu_q8panel.cc's, named q4_0x16 ... in panels
FIELDS.update({f"{q}x{PANEL_ROWS}": FIELDS[q] for q in PANEL_QTYPES})
ACTIVATIONS = ("int8", "int16", "f32")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cache: Path) -> Path:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or clang++) on PATH")
    flags = os.environ.get("VLLM_JAX_CPU_FLAGS", "-march=native").split()
    key = hashlib.sha256(b"\0".join([
        *(f.read_bytes() for f in SOURCES + HEADERS), jaxlib.__version__.encode(), compiler.encode(),
        platform.machine().encode(), _cpu_id().encode(), " ".join(flags).encode()]))
    key = key.hexdigest()[:16]
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-w",
           "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(tmp)]
    log.info("building the CPU kernels (once): %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{compiler} failed:\n{done.stderr[-2000:]}")
    tmp.replace(lib)
    return lib


def available() -> bool:
    """Build (once) and register the kernels; False, with one warning, where that fails."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _register()
        return bool(_state["ok"])


def _register() -> bool:
    if os.environ.get("VLLM_JAX_CPU_KERNELS", "1") == "0":
        return False
    cache = Path(os.environ.get("VLLM_JAX_CACHE", Path.home() / ".cache" / "vllm_jax"))
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cache / "kernels")))
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                        platform="cpu")
    except Exception as e:  # no compiler, a failed build, a jax without jax.ffi: XLA paths
        log.warning("CPU kernels unavailable, using the XLA paths (slower; GGUF weights get "
                    "unpacked at load): %s", e)
        return False
    _state["lib"] = lib  # keep it loaded
    return True


def _call(target: str, result) -> Callable:
    if not available():
        raise RuntimeError("the CPU kernels could not be built (see the warning above); "
                           "use the xla backend")
    return jax.ffi.ffi_call(target, result)


def _args(fields: dict, qtype: str) -> list:
    return [fields[k] for k in FIELDS[qtype]]


def qmatmul(x2: jax.Array, fields: dict, qtype: str, activations: str = "f32") -> jax.Array:
    """x2 [T, cols] @ W.T -> float32 [T, rows] (W bit-identical to quant.dequantize's).

    activations "f32": float32 products of x2 and the weights; "int8" (INT8_QTYPES; the others
    take the float32 path): x2 quantized to int8 per 32 (scale max|x| / 127, round to nearest
    even) and integer dot products, llama.cpp's arithmetic (cpu_q8dot.cc, or cpu_q8panel.cc for
    weights in panels); "int16": the same to 1/32767 for weights in panels (the others take the
    float32 path)."""
    return qmatmul_many(x2, [(fields, qtype)], activations)[0]


def qmatmul_many(x2: jax.Array, weights: list[tuple[dict, str]],
                 activations: str = "f32") -> list[jax.Array]:
    """[qmatmul(x2, fields, qtype, activations) for fields, qtype in weights], bit-identical,
    in one kernel call per target (the int8 and the float32 path): x2 is converted (or
    quantized) once and one pass of the helper threads covers every weight's rows, so a layer's
    q, k, v (or gate, up) cost one hand-off and one wait instead of three (two)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: choose from {', '.join(ACTIVATIONS)}")
    x32 = x2.astype(jnp.float32)

    def call(target, idx):
        shapes = [jax.ShapeDtypeStruct((x2.shape[0], rows(*weights[i])), jnp.float32)
                  for i in idx]
        qtypes = [base_qtype(weights[i][1]) for i in idx]
        bits = {"bits": np.int64(8 if int8 else 16)} if target == "vllm_jax_q8panel" else {}
        return _call(target, shapes)(
            x32, *(a for i in idx for a in _args(*weights[i])),
            qtypes=np.array([QTYPE_CODE[q] for q in qtypes], np.int64),
            counts=np.array([len(FIELDS[q]) for q in qtypes], np.int64), **bits)

    int8 = activations == "int8"

    def target(qtype):
        if is_panel(qtype):
            if activations == "f32":
                raise ValueError(f"{qtype}: weights in panels take int8 or int16 activations")
            return "vllm_jax_q8panel"
        return "vllm_jax_q8dot" if int8 and qtype in INT8_QTYPES else "vllm_jax_qmatmul"

    return _per_group([target(q) for _, q in weights], call)


# -- weights in panels of 16 rows (cpu_q8panel.cc) ---------------------------------------------


def is_panel(qtype: str) -> bool:
    return qtype.endswith(f"x{PANEL_ROWS}")


def base_qtype(qtype: str) -> str:
    return qtype[:-len(f"x{PANEL_ROWS}")] if is_panel(qtype) else qtype


def rows(fields: dict, qtype: str) -> int:
    """The weight's rows (out_features), in either layout."""
    return fields["d"].shape[0] * (PANEL_ROWS if is_panel(qtype) else 1)


def can_panel(fields: dict, qtype: str) -> bool:
    d = fields["d"]
    return qtype in PANEL_QTYPES and d.ndim == 2 and d.shape[0] % PANEL_ROWS == 0


def _values(fields: dict, qtype: str) -> np.ndarray:
    """A legacy type's weights as unsigned bytes [rows, blocks, 32] (w = d * u + c)."""
    qs = np.asarray(fields["qs"])
    if qtype == "q8_0":
        return (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(len(qs), -1, 32)
    b = qs.reshape(len(qs), -1, 16)  # byte i: weight i (low nibble), i + 16 (high)
    return np.concatenate([b & 15, b >> 4], axis=-1)


def to_panels(fields: dict, qtype: str) -> tuple[dict, str]:
    """GGUF fields [rows, ...] (kernels/quant.py `repack`) -> cpu_q8panel.cc's panels: fields
    [rows / 16, ...] (each field row a panel: its 32-blocks in turn, see the kernel) and the
    panel type name."""
    u = _values(fields, qtype)
    p, nb = u.shape[0] // PANEL_ROWS, u.shape[1]
    u = u.reshape(p, PANEL_ROWS, nb, 32).transpose(0, 2, 1, 3)  # [panel, block, row, 32]
    if qtype == "q8_0":
        qs = u.reshape(p, nb, PANEL_ROWS, 8, 4).transpose(0, 1, 3, 2, 4)
    else:
        pairs = u.reshape(p, nb, PANEL_ROWS, 4, 2, 4)  # [.., k, half, 4]: weight 8k + 4 half + i
        qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).transpose(0, 1, 3, 2, 4)
    out = {k: np.asarray(fields[k]).reshape(p, PANEL_ROWS, nb).transpose(0, 2, 1).reshape(p, -1)
           for k in FIELDS[qtype] if k != "qs"}
    out["qs"] = np.ascontiguousarray(qs).reshape(p, -1)
    return out, f"{qtype}x{PANEL_ROWS}"


def for_activations(w, activations: str):
    """A kernels.quant.PackedWeight as the C++ kernels read it best with these activations: int8
    and int16 read Q4_0, Q4_1 and Q8_0 weights in 16-row panels (4 weights of 16 rows in one
    load, so a few tokens cost no unpacking and no horizontal sums); a weight on several devices
    keeps GGUF's rows."""
    arrays = list(w.fields.values())
    if (activations not in ("int8", "int16") or not can_panel(w.fields, w.qtype)
            or any(len(a.sharding.device_set) > 1 for a in arrays if hasattr(a, "sharding"))):
        return w
    fields, qtype = to_panels({k: np.asarray(v) for k, v in w.fields.items()}, w.qtype)
    sharding = getattr(arrays[0], "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):  # a mesh of one device: stay on it
        return w._replace(qtype=qtype, fields={k: jax.device_put(v, sharding)
                                               for k, v in fields.items()})
    # uncommitted, as the loader leaves weights: a committed one commits the step's outputs,
    # and the cache they become would compile the first step's bucket again for committed input
    return w._replace(qtype=qtype, fields={k: jnp.asarray(v) for k, v in fields.items()})


def panel_rows(fields: dict, qtype: str, ids: jax.Array) -> dict:
    """Rows `ids` of weights in panels as GGUF fields (kernels/quant.py `repack`'s layout of the
    base type), e.g. the embedding's rows of a table tied to an lm_head in panels."""
    qtype, n = base_qtype(qtype), ids.shape[0]
    panel, lane = ids // PANEL_ROWS, ids % PANEL_ROWS

    def pick(f, width):  # [P, (...) * 16 * width] -> [N, ..., width]: lane `lane` of panel
        x = jnp.take(f, panel, axis=0, mode="fill", fill_value=0).reshape(n, -1, PANEL_ROWS, width)
        return jnp.take_along_axis(x, lane[:, None, None, None], axis=2)[:, :, 0]

    out = {k: pick(fields[k], 1).reshape(n, -1) for k in FIELDS[qtype] if k != "qs"}
    b = pick(fields["qs"], 4)  # q8_0: [N, blocks * 8 groups, 4]; q4: [N, blocks * 4 pairs, 4]
    if qtype == "q8_0":
        out["qs"] = (b.reshape(n, -1).astype(jnp.int16) - 128).astype(jnp.int8)
    else:
        w = jnp.stack([b & 15, b >> 4], axis=-2).reshape(n, -1, 32)  # weight 8k + 4 half + i
        out["qs"] = (w[..., :16] | (w[..., 16:] << 4)).astype(jnp.uint8).reshape(n, -1)
    return out


def _per_group(keys: list, run: Callable) -> list:
    """run(key, indices) -> the outputs of those indices, once per distinct key; the outputs in
    the order of keys."""
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out: list = [None] * len(keys)
    for k, idx in groups.items():
        for i, y in zip(idx, run(k, idx)):
            out[i] = y
    return out


def grouped_qmatmul(x2: jax.Array, fields: dict, qtype: str, group_sizes: jax.Array) -> jax.Array:
    """x2 [N, cols] rows sorted by expert, group_sizes int32 [E] (sum <= N; rows past the sum are
    padding and come out 0), fields: quant.repack fields of E experts stacked on a leading axis,
    each [E, rows, ...] -> float32 [N, rows]; row i of group e is x2[i] @ W_e.T (W_e bit-identical
    to quant.dequantize of expert e's fields). Only experts with rows are read."""
    rows = fields["d"].shape[1]
    call = _call("vllm_jax_grouped_qmatmul",
                 jax.ShapeDtypeStruct((x2.shape[0], rows), jnp.float32))
    return call(x2.astype(jnp.float32), group_sizes.astype(jnp.int32), *_args(fields, qtype),
                qtype=QTYPE_CODE[qtype])


DENSE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def dense_matmul(x2: jax.Array, w: jax.Array) -> jax.Array:
    """x2 [T, K] (float32, bfloat16 or float16) @ w.T for w [N, K] (bfloat16, float16 or float32)
    -> float32 [T, N], float32 accumulation.

    The weights are read as they are stored (no float32 copy) and each is widened to float32 in
    registers: the products are of the exact values, the sums float32. bfloat16 activations
    with bfloat16 weights on a CPU with AVX512-BF16 multiply pairs with vdpbf16ps, which reads
    subnormal bfloat16 values as 0. Other activation dtypes are cast to float32 first."""
    return dense_matmul_many(x2, [w])[0]


def dense_matmul_many(x2: jax.Array, ws: list[jax.Array]) -> list[jax.Array]:
    """[dense_matmul(x2, w) for w in ws], bit-identical, in one kernel call per weight dtype
    (x2 packed once, one pass of the helper threads over every weight's rows)."""
    for w in ws:
        if x2.ndim != 2 or w.ndim != 2 or x2.shape[1] != w.shape[1]:
            raise ValueError(f"dense_matmul: x2 [T, K] and w [N, K] expected, got {x2.shape} "
                             f"and {w.shape}")
        if w.dtype not in DENSE_DTYPES:
            raise ValueError(f"dense_matmul: weight dtype {w.dtype} (bfloat16, float16 or "
                             "float32)")
    if x2.dtype not in DENSE_DTYPES:
        x2 = x2.astype(jnp.float32)

    def call(_, idx):
        shapes = [jax.ShapeDtypeStruct((x2.shape[0], ws[i].shape[0]), jnp.float32) for i in idx]
        return _call("vllm_jax_dense_matmul", shapes)(x2, *(ws[i] for i in idx))

    return _per_group([w.dtype for w in ws], call)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale: float,
                     sliding_window: int | None = None) -> jax.Array:
    """paged_attention.decode_attention for float32/float16/bfloat16 caches (same arguments; the
    cache is read as float32 and all arithmetic is float32)."""
    call = _call("vllm_jax_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, block_tables.astype(jnp.int32),
               context_lens.astype(jnp.int32), scale=np.float32(scale),
               window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)


def ragged_attention(q, k_cache, v_cache, seq_idx, positions, block_tables, context_lens, *,
                     scale: float, sliding_window: int | None = None) -> jax.Array:
    """paged_attention.prefill_attention (same arguments): every query token, a decode row or a
    token of a prompt chunk, attends causally over its own sequence's pages."""
    call = _call("vllm_jax_ragged_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    ints = [a.astype(jnp.int32) for a in (seq_idx, positions, block_tables, context_lens)]
    out = call(q.astype(jnp.float32), k_cache, v_cache, *ints, scale=np.float32(scale),
               window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)
