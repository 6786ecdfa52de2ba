"""The mutation harness (scripts/mutate.py) must fail loudly on a stale list and never touch the repository."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from scripts.mutate import (
    DEFAULT_LIST,
    ROOT,
    Mutation,
    MutationError,
    check_all,
    classify,
    first_failure,
    isolation_problem,
    load_mutations,
    main,
    mutated_text,
    run_one,
)

ORIGINAL = "def price(x):\n    return x * 2\n\n\ndef other(x):\n    return x * 3\n"


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text(ORIGINAL)
    (root / "pkg" / "data.txt").write_text("kept as is")
    return root


def _mutation(find: str, replace: str = "    return 0\n", file: str = "pkg/mod.py") -> Mutation:
    return Mutation("m", file, find, replace, "prices double", ("tests/test_x.py::test_price",))


def test_missing_snippet_is_refused(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    with pytest.raises(MutationError, match="not found"):
        mutated_text(_mutation("    return x * 4\n"), root)
    with pytest.raises(MutationError, match="does not exist"):
        mutated_text(_mutation("x", file="pkg/gone.py"), root)


def test_ambiguous_snippet_is_refused(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    with pytest.raises(MutationError, match="2 times"):
        mutated_text(_mutation("    return x"), root)


def test_an_indented_snippet_found_inside_a_deeper_line_is_refused(tmp_path: Path) -> None:
    """Code moved into a deeper block still holds the old, shallower snippet as a substring: mutating it there
    would break another path, and the promise's own would go unbroken (the check would pass for nothing)."""
    root = _repo(tmp_path)
    (root / "pkg" / "mod.py").write_text("def price(x):\n    if x:\n        return x * 2\n    return 0\n")
    with pytest.raises(MutationError, match="re-indented"):
        mutated_text(_mutation("    return x * 2\n"), root)
    assert "return 1" in mutated_text(_mutation("        return x * 2\n", "        return 1\n"), root)
    assert "x * 5" in mutated_text(_mutation(" x * 2", " x * 5"), root), "a mid-line snippet may start with a space"


def test_check_all_reports_every_stale_entry(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    good = _mutation("    return x * 2\n")
    with pytest.raises(MutationError) as stale:
        check_all([good, _mutation("nope"), _mutation("def ")], root)
    assert "not found" in str(stale.value) and "2 times" in str(stale.value)
    check_all([good], root)


def test_mutation_is_applied_to_a_scratch_copy_and_the_repository_is_untouched(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    seen: dict[str, str] = {}

    def fake_pytest(guards: Sequence[str], scratch: Path, timeout_s: float) -> tuple[int | None, str]:
        assert scratch != root and not scratch.is_relative_to(root)
        seen["mod"] = (scratch / "pkg" / "mod.py").read_text()
        seen["data"] = (scratch / "pkg" / "data.txt").read_text()
        seen["guards"] = " ".join(guards)
        return 1, "F\n=== short test summary info ===\nFAILED tests/test_x.py::test_price - assert 0 == 4\n"

    outcome = run_one(_mutation("    return x * 2\n"), root, ["pkg/mod.py", "pkg/data.txt"], 10.0, runner=fake_pytest)

    assert seen["mod"] == ORIGINAL.replace("    return x * 2\n", "    return 0\n")
    assert seen["data"] == "kept as is" and seen["guards"] == "tests/test_x.py::test_price"
    assert (root / "pkg" / "mod.py").read_text() == ORIGINAL, "the repository itself is never mutated"
    assert outcome.status == "killed" and outcome.killed_by == "tests/test_x.py::test_price"


def test_outcomes_are_classified_from_pytest_exit_code_and_summary() -> None:
    assert classify(0, "3 passed") == ("survived", None)
    assert classify(1, "FAILED tests/a.py::test_b - AssertionError") == ("killed", "tests/a.py::test_b")
    assert classify(1, "ERROR tests/a.py::test_b - fixture failed") == ("killed_by_error", "tests/a.py::test_b")
    assert classify(2, "ERROR tests/a.py - ImportError: boom\nInterrupted: 1 error") == \
        ("killed_by_error", "tests/a.py")
    assert classify(4, "ERROR: not found: tests/a.py::test_gone")[0] == "harness_error"
    assert first_failure("....\nFAILED tests/a.py::test_p[x-1] - boom\nFAILED tests/a.py::test_q") == \
        ("FAILED", "tests/a.py::test_p[x-1]")


def test_a_timeout_counts_as_survived(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    outcome = run_one(_mutation("    return x * 2\n"), root, ["pkg/mod.py"], 1.0, runner=lambda *_: (None, "..."))
    assert outcome.status == "timeout" and not outcome.killed


def test_the_curated_list_is_valid_against_the_current_code() -> None:
    mutations = load_mutations(DEFAULT_LIST)
    check_all(mutations, ROOT)
    for m in mutations:
        assert all("::" in g and (ROOT / g.split("::")[0]).is_file() for g in m.guards), m.name


def test_list_file_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "m.toml"
    broken.write_text('[[mutation]]\nname = "x"\n')
    assert main(["--list-file", str(broken), "--list"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--only", "no-such-mutation", "--list"]) == 2


def test_guards_import_the_scratch_copy_or_the_run_is_refused(tmp_path: Path) -> None:
    """A mutation run against the installed code proves nothing: the harness checks what `import` loads."""
    package = tmp_path / "services" / "frugalstream"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert isolation_problem(tmp_path) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    problem = isolation_problem(empty)
    assert problem is not None and "does not load the scratch copy" in problem

