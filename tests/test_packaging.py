"""What a wheel and a source distribution of look carry: a user installing the package, not the
repository, gets its type hints and recipes; one building from the sdist gets a test suite that
runs (it imports helpers from tests/ and benchmarks/)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import look

REPOSITORY = Path(__file__).resolve().parents[1]


def test_the_package_declares_its_type_hints() -> None:
    assert (Path(look.__file__).parent / "py.typed").is_file()
    assert '"py.typed"' in (REPOSITORY / "pyproject.toml").read_text()


@pytest.mark.slow
def test_the_source_distribution_holds_what_its_tests_and_readme_need(tmp_path: Path) -> None:
    from setuptools import build_meta

    name = build_meta.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as archive:
        members = {member.split("/", 1)[1] for member in archive.getnames() if "/" in member}
    for needed in (
        "tests/__init__.py", "tests/ddp.py", "tests/engine/test_trainer.py",
        "tests/search_triton_cases.py", "benchmarks/gpu_step.py", "docs/method.md",
        "configs/look_cnn-small_fmnist-coarse.yaml", "scripts/test.sh", "src/look/py.typed",
    ):  # fmt: skip
        assert needed in members, needed
    assert not any("__pycache__" in member for member in members)
