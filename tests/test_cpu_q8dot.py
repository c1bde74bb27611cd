"""The integer-activation CPU matmuls (kernels/cpu_q8dot.cc over GGUF's rows, cpu_q8panel.cc over
16-row panels, q4_0x16 ...: int8 and int16 activations) against (a) a numpy emulation of their
arithmetic: x quantized per 32 exactly as the kernel does, each block's integer-valued product
with gguf-py's weights summed in float64, then scaled (equal up to the kernel's float32 sums),
and (b) the float32 product of gguf-py's weights and x, within the bound int8 activations allow.
Both for the build for this machine and the portable ones (AVX2; AVX-VNNI; plain loops), few and
many tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax.kernels import cpu
from vllm_jax.kernels.quant import QTYPES, quantize, repack

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
TOKENS = (1, 2, 3, 4, 8, 9, 13, 16, 23)  # the row path (1-4); tiles of 6 and a last one of 1-5
# rtol of the whole output against the float32 product: the int8 rounding of x (<= 1/254 of
# each block's max) leaves ~0.4% of |y| on random data
F32_RTOL = 1e-2
# of sum |x| |w|: float32 sums of terms up to 128x the weights (Q8_0 read as q + 128)
EMULATION_RTOL = 1e-5
PANELS = tuple(f"{q}x{cpu.PANEL_ROWS}" for q in cpu.PANEL_QTYPES)
KINDS = (*cpu.INT8_QTYPES, *PANELS, *(f"{q}:int16" for q in PANELS))  # qtype[:activations]
LEVELS = {"int8": 127, "int16": 32767}
PORTABLE = {"avx2": "-march=haswell", "avx_vnni": "-march=haswell -mavxvnni",
            "no_simd_intrinsics": "-march=x86-64"}  # the loops other CPUs (ARM) compile
NEEDS = {"avx2": "avx2", "avx_vnni": "avx_vnni"}  # the /proc/cpuinfo flag a build runs on


def _split(kind: str) -> tuple[str, str]:
    qtype, _, activations = kind.partition(":")
    return qtype, activations or "int8"


def _case(kind: str, seed: int):
    """fields of 37 rows (two 16-row panels of cpu_q8dot.cc's tiles and a ragged one; panels:
    48 rows), 19 legacy blocks (two groups of 8 and 3 more) or 3 K-blocks; gguf-py's float32
    weights, and x for each token count."""
    qtype, panels = cpu.base_qtype(_split(kind)[0]), cpu.is_panel(_split(kind)[0])
    elems = QTYPES[qtype][0]
    rows, cols = 48 if panels else 37, (3 if elems == 256 else 19) * elems
    rng = np.random.default_rng(seed)
    qt = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    w = gguf.quants.dequantize(qt.raw, QTYPES[qtype][2]).reshape(rows, cols)
    xs = [rng.standard_normal((t, cols)).astype(np.float32) for t in TOKENS]
    xs[-1][0, :64] = 0  # all-zero blocks: scale 0
    return cpu.to_panels(repack(qt), qtype)[0] if panels else repack(qt), w, xs


def emulate(x: np.ndarray, w: np.ndarray, level: int = 127) -> np.ndarray:
    """The kernel's arithmetic in numpy: d = max|x| / level (127: int8, 32767: int16) and
    q = rint(x * (1 / d)) in float32 per 32 of x; y = sum over blocks of d * (q . w) (float64
    sums)."""
    xb = x.reshape(len(x), -1, 32)
    d = np.abs(xb).max(-1) / np.float32(level)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0))
    q = np.rint(xb * inv[..., None].astype(np.float32))
    wb = w.reshape(len(w), -1, 32).astype(np.float64)
    return np.einsum("tb,tbk,rbk->tr", d.astype(np.float64), q, wb)


def _check(qtype: str, got: list, w, xs):
    for x, y in zip(xs, got):
        y, ref = np.asarray(y), x.astype(np.float64) @ w.T.astype(np.float64)
        assert y.shape == ref.shape
        err = np.abs(y - emulate(x, w, LEVELS[_split(qtype)[1]])) / (np.abs(x) @ np.abs(w).T)
        assert err.max() < EMULATION_RTOL, f"{qtype} {len(x)} tokens: {err.max():.1e} off"
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < F32_RTOL, f"{qtype} {len(x)} tokens: {rel:.2e} off the float32 product"


def _run(kind: str, fields: dict, xs: list) -> list:
    qtype, activations = _split(kind)
    fn = jax.jit(lambda x, f: cpu.qmatmul(x, f, qtype, activations=activations))
    f = {k: jnp.asarray(v) for k, v in fields.items()}
    return [np.asarray(fn(jnp.asarray(x), f)) for x in xs]


@pytest.mark.parametrize("qtype", KINDS)
def test_int8_matmul_matches_its_emulation_and_the_float32_product(qtype):
    fields, w, xs = _case(qtype, 7)
    _check(qtype, _run(qtype, fields, xs), w, xs)


def test_int8_matmul_leaves_other_types_to_the_float32_path():
    fields, w, xs = _case("q5_k", 8)
    for x, y in zip(xs, _run("q5_k", fields, xs)):
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_activations_must_be_named():
    with pytest.raises(ValueError, match="activations"):
        cpu.qmatmul(jnp.zeros((1, 32)), {"d": jnp.zeros((1, 1))}, "q8_0", activations="int4")


def _portable_main(path: str):
    """In a subprocess built with VLLM_JAX_CPU_FLAGS: `path`'s cases -> their outputs.
    Only the int8 kernels are built (the other kernels' portable builds are not under test here)."""
    cpu.SOURCES = [cpu.HERE / "cpu_q8dot.cc", cpu.HERE / "cpu_q8panel.cc"]
    cpu.TARGETS = ("vllm_jax_q8dot", "vllm_jax_q8panel")
    data = np.load(path)
    out = {}
    for qtype in KINDS:
        fields = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(qtype + "/")}
        xs = [data[f"x/{qtype}/{i}"] for i in range(int(data[f"n/{qtype}"]))]
        out.update({f"{qtype}/{i}": y for i, y in enumerate(_run(qtype, fields, xs))})
    np.savez(path.replace(".npz", ".out.npz"), **out)


def _outputs(level: str, cases: dict, tmp_path: Path) -> dict:
    """{qtype: (fields, xs)} -> {qtype: [y of each x]}, from the build for this machine
    ("native") or, in a subprocess, a portable one (PORTABLE's flags)."""
    if level == "native":
        return {q: _run(q, f, xs) for q, (f, xs) in cases.items()}
    if level in NEEDS and NEEDS[level] not in cpu._cpu_id().split():
        pytest.skip(f"this CPU has no {NEEDS[level]} to run the {level} build")
    arrays = {f"{q}/{k}": v for q, (f, _) in cases.items() for k, v in f.items()}
    arrays |= {f"x/{q}/{i}": x for q, (_, xs) in cases.items() for i, x in enumerate(xs)}
    arrays |= {f"n/{q}": np.array(len(xs)) for q, (_, xs) in cases.items()}
    path = str(tmp_path / "cases.npz")
    np.savez(path, **arrays)
    env = dict(os.environ, VLLM_JAX_CPU_FLAGS=PORTABLE[level])
    code = (f"import sys; sys.path[:0] = {json.dumps([str(Path(__file__).parent)])}; "
            f"import test_cpu_q8dot as t; t._portable_main({path!r})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(path.replace(".npz", ".out.npz"))
    return {q: [out[f"{q}/{i}"] for i in range(len(xs))] for q, (_, xs) in cases.items()}


@pytest.mark.parametrize("level", list(PORTABLE))
def test_portable_builds_match_the_emulation(level, tmp_path):
    cases = {q: _case(q, 9) for q in KINDS}
    got = _outputs(level, {q: (f, xs) for q, (f, _, xs) in cases.items()}, tmp_path)
    for q, (_, w, xs) in cases.items():
        _check(q, got[q], w, xs)


@pytest.mark.parametrize("level", ["native", *PORTABLE])
def test_a_tokens_output_is_the_same_bits_whatever_the_call_holds(level, tmp_path):
    """Each token's y alone (T=1) equals, bit for bit, its y in calls of T=2..23 tokens (the row
    path and the tiles, full and ragged), at the start and the end of the call."""
    rng = np.random.default_rng(11)
    windows = [(s, t) for t in range(2, 24) for s in sorted({0, 23 - t})]
    cases = {}
    for q in KINDS:
        fields, w, _ = _case(q, 12)
        x = rng.standard_normal((23, w.shape[1])).astype(np.float32)
        cases[q] = fields, [x[i:i + 1] for i in range(23)] + [x[s:s + t] for s, t in windows]
    got = _outputs(level, cases, tmp_path)
    for q, ys in got.items():
        alone = np.concatenate(ys[:23])
        for (s, t), y in zip(windows, ys[23:]):
            same = (y == alone[s:s + t]).all(1)
            assert same.all(), f"{q}, {t} tokens from {s}: {np.flatnonzero(~same) + s} differ"


@pytest.mark.parametrize("qtype", cpu.PANEL_QTYPES)
def test_panel_rows_are_the_gguf_rows(qtype):
    """The rows an embedding gathers from a table in panels (tied to the lm_head) are repack's
    rows, bit for bit; ids past the table (padding tokens) give scale 0: zero embeddings."""
    rng = np.random.default_rng(13)
    fields = repack(quantize(rng.standard_normal((64, 96)).astype(np.float32), qtype))
    panels, kind = cpu.to_panels(fields, qtype)
    ids = np.array([0, 15, 16, 63, 31, 2, 47])
    got = cpu.panel_rows({k: jnp.asarray(v) for k, v in panels.items()}, kind,
                         jnp.asarray(np.append(ids, 2**31 - 1)))
    for k, v in fields.items():
        assert np.array_equal(np.asarray(got[k])[:-1], v[ids]), k
    assert not np.asarray(got["d"])[-1].any()


def test_int16_activations_are_within_float32_rounding_of_the_float32_product():
    """int16 per 32 (the down projection's with int8 CPU activations) leaves ~1e-5 of |y|."""
    fields, w, xs = _case(f"q4_1x{cpu.PANEL_ROWS}", 14)
    for x, y in zip(xs, _run(f"q4_1x{cpu.PANEL_ROWS}:int16", fields, xs)):
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4
