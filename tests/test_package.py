"""``import look``: cheap, and every subpackage reachable from it."""

from __future__ import annotations

import subprocess
import sys

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
