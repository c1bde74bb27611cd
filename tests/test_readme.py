"""Every ```python block of README.md runs as written on the default model (SmolLM2-135M
Q4_1 GGUF) with "path/to/model" replaced by its path; the OpenAI client's block runs against
the server started by the README's own command line."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, server_process

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER = "path/to/model"
SERVER = "python -m vllm_jax.server"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def sections() -> dict[str, str]:
    """README's "## " sections by title."""
    parts = re.split(r"^## (.+)$", README.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def python_blocks() -> list[tuple[str, str]]:
    """(id, code) of each ```python block, the id naming its section."""
    blocks = []
    for title, body in sections().items():
        codes = re.findall(r"^```python\n(.*?)^```$", body, flags=re.M | re.S)
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        blocks += [(f"{slug}-{i + 1}", code) for i, code in enumerate(codes)]
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_this_file_runs():
    ids = [i for i, _ in BLOCKS]
    assert {"python-api-1", "python-api-2", "openai-compatible-server-1",
            "the-model-as-a-jax-library-1"} <= set(ids), ids
    assert all(PLACEHOLDER in code or "base_url=" in code for _, code in BLOCKS)


def server_command() -> list[str]:
    """The README's command line that starts the server (an indented block, `\\` continued)."""
    body = sections()["OpenAI-compatible server"]
    m = re.search(r"^    (" + re.escape(SERVER) + r".*?)(?<!\\)$", body, flags=re.M | re.S)
    assert m, f"no `{SERVER}` command line in the README's server section"
    return shlex.split(m.group(1).replace("\\\n", " "))


@pytest.fixture(scope="module")
def server(real_model, tmp_path_factory):
    """The README's server, on the default model and a free port: the port it listens on."""
    argv = server_command()
    assert argv[:3] == ["python", "-m", "vllm_jax.server"] and "--port" in argv
    port = free_port()
    argv = [sys.executable] + argv[1:]
    argv = [str(real_model("smollm2-135m")) if a == PLACEHOLDER else a for a in argv]
    argv[argv.index("--port") + 1] = str(port)
    log_path = tmp_path_factory.mktemp("readme") / "server.log"
    with server_process(argv, log_path, env=ENV) as port:
        yield port


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_python_block_runs(code, real_model, request):
    code = code.replace(PLACEHOLDER, str(real_model("smollm2-135m")))
    if "base_url=" in code:
        port = request.getfixturevalue("server")
        assert "127.0.0.1:8000" in code
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}"
    if "print(" in code:
        assert r.stdout.strip(), r.stderr[-3000:]
