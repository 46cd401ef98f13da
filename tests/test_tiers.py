"""The test tiers: every end-to-end test that conftest lists exists, and `-m "not e2e"` leaves each of them out."""

import ast
from pathlib import Path

import pytest

from conftest import E2E_MODULES, E2E_TESTS, LONGEST_FIRST

TESTS = Path(__file__).parent


def _test_names(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_listed_end_to_end_test_exists():
    for module in [*E2E_MODULES, *LONGEST_FIRST]:
        assert (TESTS / module).exists(), module
    for name in E2E_TESTS:
        module, test = name.split("::")
        assert test in _test_names(TESTS / module), f"tests/conftest.py lists {name}, which does not exist"


def test_the_unit_tier_leaves_out_every_end_to_end_test(capsys):
    """Collect (no run, in this process) with the unit tier's marker expression: no listed test is selected, and
    the rest are."""
    args = ["--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not e2e and not slow",
            "--rootdir", str(TESTS.parent), str(TESTS / "test_study.py"), str(TESTS / "test_cli.py")]  # fmt: skip
    capsys.readouterr()
    assert pytest.main(args) == 0
    out = capsys.readouterr().out
    selected = {"tests/" + line.split("[")[0].split("tests/", 1)[-1] for line in out.splitlines() if "::" in line}
    listed = {f"tests/{n}" for n in E2E_TESTS if n.startswith(("test_study.py", "test_cli.py"))}
    assert listed and not listed & selected
    assert (
        "tests/test_study.py::test_parse_key" in selected
        and "tests/test_cli.py::test_study_help_shows_the_study_settings_and_how_to_set_those_of_its_runs" in selected
    )
