"""``import look``: cheap, and every subpackage reachable from it; what a wheel and a source
distribution carry (type hints; a test suite that runs, with its helpers and benchmarks)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import look


def test_subpackages_load_on_first_use() -> None:
    # A fresh interpreter: this one has imported everything already.
    code = (
        "import sys, look; assert 'torch' not in sys.modules, 'import look imported torch'; "
        "print(look.losses.LookLoss.__name__, look.memory.MemoryBank.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LookLoss", "MemoryBank"]
    assert set(look.__all__) <= set(dir(look))
    assert look.search_triton.HOPPER_CONFIG is not None, "the README's name for it"
    try:
        look.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no attribute 'no_such_thing'" in str(error)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_the_readmes_library_example_runs() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Library use", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (Library use)", "exec"), namespace)
    bank = namespace["bank"]
    assert bank.valid.sum() > 0  # type: ignore[attr-defined]  # the loop wrote its batches


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
