"""Packaging: the [metal] extra installs on Apple silicon.

pip cannot be asked to resolve `.[metal]` for a Mac from here: it evaluates environment markers
against the running interpreter (Linux, say), where the extra's markers select nothing. So the
requirements are read from pyproject.toml, their markers evaluated for macOS arm64 with Python 3.12,
and pip resolves what remains for that platform (`--platform macosx_14_0_arm64 --python-version
3.12 --only-binary :all:`): the plugin with the jax it needs and flax, the project's other
dependencies, and all their dependencies. This downloads about 190 MB of wheels (jaxlib and the
plugin are most of it; pip caches them), since PyPI does not serve wheel metadata on its own.
When the index cannot be reached the test is skipped and says why; any other failure, a
ResolutionImpossible above all, fails it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLATFORM, PYTHON = "macosx_14_0_arm64", "3.12"
MAC = {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
       "platform_machine": "arm64", "python_version": PYTHON, "python_full_version": PYTHON + ".0",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# What pip prints when it cannot talk to the index (DNS, refused or dropped connections, proxies,
# TLS interception, timeouts): then the test says so and skips.
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
               "Temporary failure in name resolution", "Name or service not known",
               "nodename nor servname", "Network is unreachable", "No route to host",
               "Connection refused", "Connection reset", "ConnectTimeoutError",
               "ReadTimeoutError", "Read timed out", "ProxyError", "Max retries exceeded",
               "Could not fetch URL", "SSLError", "connection broken")
TIMEOUT_S = 900


def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def for_target(requirements: list[str], env: dict) -> list[str]:
    """The requirements whose markers hold in `env`, without their markers."""
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def metal_set() -> list[str]:
    meta = project()
    return (for_target(meta["optional-dependencies"]["metal"], MAC)
            + for_target(meta["dependencies"], MAC))


def test_metal_extra_is_for_apple_silicon_with_python_312_only():
    metal = project()["optional-dependencies"]["metal"]
    assert for_target(metal, MAC), "the metal extra selects nothing on macOS arm64, Python 3.12"
    for other in ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
                  {"platform_machine": "x86_64"},  # an Intel Mac, or Python under Rosetta
                  {"python_version": "3.11", "python_full_version": "3.11.9"}):
        assert for_target(metal, {**MAC, **other}) == [], other


def test_metal_install_resolves_for_macos_arm64(tmp_path):
    if os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes", "on"):
        pytest.skip("PIP_NO_INDEX is set: pip has no index to resolve the macOS set from")
    reqs = metal_set()
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(tmp_path / "wheels"),
           "--platform", PLATFORM, "--python-version", PYTHON, "--only-binary", ":all:",
           "--retries", "2", "--timeout", "30", "--progress-bar", "off",
           "--disable-pip-version-check", "--no-input", *reqs]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (e.stdout, e.stderr))
        rc = None
    if rc == 0:
        wheels = {canonicalize_name(w.name.split("-")[0]): w.name
                  for w in (tmp_path / "wheels").glob("*.whl")}
        for text in for_target(project()["optional-dependencies"]["metal"], MAC) + ["flax"]:
            assert canonicalize_name(Requirement(text).name) in wheels, (text, sorted(wheels))
        assert re.search(r"macosx_\d+_\d+_(arm64|universal2)\.whl$", wheels.get("jaxlib", "")), \
            sorted(wheels.values())
        return
    if "No module named pip" in out:
        pytest.skip(f"{sys.executable} has no pip")
    conflict = "ResolutionImpossible" in out or "conflicting dependencies" in out
    seen = next((s for s in UNREACHABLE if s in out), None)
    if seen and not conflict:
        line = next(l for l in out.splitlines() if seen in l).strip()
        pytest.skip(f"the package index cannot be reached: {line[:300]}")
    if rc is None:
        pytest.fail(f"pip download did not finish in {TIMEOUT_S} s:\n{out[-4000:]}")
    pytest.fail(f"the [metal] set does not resolve for {PLATFORM}, Python {PYTHON} "
                f"(pip exit {rc}):\n{' '.join(cmd[3:])}\n{out[-4000:]}")
