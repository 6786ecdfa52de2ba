"""Mutation check: break each promise on purpose in a scratch copy and make sure a test notices.

A green suite only means something if it goes red when a promise breaks. `tests/mutations.toml` lists small,
deliberate breakages of the invariants that matter (tenant walls, commit order, paying once, ...), each with
the tests that guard it. For every mutation this script copies the project's files to a scratch directory,
applies the one change there (the repository is never touched), and runs the guard tests against the copy.
A mutation is *killed* when a guard test fails; it *survives* when they all pass, and then `make mutate` fails.

Every snippet must occur exactly once in its file: a refactor that moves or duplicates the code makes the
harness fail loudly instead of silently testing nothing.

Isolation: the project is installed editable into .venv (a path entry for `services/`, added by a .pth file
after PYTHONPATH), so with the scratch copy's `services/` first on PYTHONPATH (and the scratch root as cwd)
`import frugalstream` resolves to the mutated copy, in pytest and in every subprocess a test starts
(`frugalstream serve` inherits the environment). Each run first checks that it does, and fails loudly if not:
a mutation run against the installed code would "survive" for the wrong reason, or be "killed" by nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIST = ROOT / "tests" / "mutations.toml"
DEFAULT_OUT = ROOT / "out" / "mutate.json"
DEFAULT_TIMEOUT_S = 300.0

Status = Literal["killed", "killed_by_error", "survived", "timeout", "harness_error"]
#: Outcomes that count as the promise being guarded.
KILLED: frozenset[str] = frozenset({"killed", "killed_by_error"})


class MutationError(Exception):
    """The mutation list is wrong (missing or ambiguous snippet, unknown file, bad entry): fix the list."""


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    promise: str
    guards: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    name: str
    promise: str
    status: Status
    killed_by: str | None
    seconds: float
    detail: str = ""

    @property
    def killed(self) -> bool:
        return self.status in KILLED


_FIELDS = {"name", "file", "find", "replace", "promise", "guards"}


def load_mutations(path: Path) -> list[Mutation]:
    """Reads `[[mutation]]` tables; every field is required and names are unique."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MutationError(f"{path}: {exc}") from exc
    entries = data.get("mutation")
    if not isinstance(entries, list) or not entries:
        raise MutationError(f"{path}: no [[mutation]] entries")
    mutations: list[Mutation] = []
    for i, entry in enumerate(entries):
        missing, extra = _FIELDS - set(entry), set(entry) - _FIELDS
        if missing or extra:
            raise MutationError(f"{path}: mutation #{i + 1}: missing {sorted(missing)}, unknown {sorted(extra)}")
        guards = entry["guards"]
        if not isinstance(guards, list) or not guards or not all(isinstance(g, str) and g for g in guards):
            raise MutationError(f"{path}: mutation {entry['name']!r}: guards must be a non-empty list of node ids")
        if entry["find"] == entry["replace"]:
            raise MutationError(f"{path}: mutation {entry['name']!r}: the replacement changes nothing")
        mutations.append(Mutation(entry["name"], entry["file"], entry["find"], entry["replace"],
                                  " ".join(entry["promise"].split()), tuple(guards)))
    names = [m.name for m in mutations]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MutationError(f"{path}: duplicate mutation names {dupes}")
    return mutations


def mutated_text(mutation: Mutation, root: Path) -> str:
    """The file's text with the snippet replaced; refuses a snippet that is missing or occurs more than once."""
    path = root / mutation.file
    if not path.is_file():
        raise MutationError(f"{mutation.name}: {mutation.file} does not exist")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.find)
    if count == 0:
        raise MutationError(f"{mutation.name}: snippet not found in {mutation.file} (was the code refactored?)")
    if count > 1:
        raise MutationError(f"{mutation.name}: snippet occurs {count} times in {mutation.file}; make it unique")
    at = text.index(mutation.find)
    if mutation.find.startswith("  ") and at > 0 and text[at - 1] != "\n":
        # Its indentation is part of what it says: found inside a line indented deeper, it would mutate code
        # that moved into another block (another path), and the promise's own path would go unbroken.
        raise MutationError(f"{mutation.name}: snippet starts indented but not at a line's start in "
                            f"{mutation.file} (was the code re-indented?)")
    return text.replace(mutation.find, mutation.replace, 1)


def check_all(mutations: Iterable[Mutation], root: Path) -> None:
    """Validates every snippet against the real tree before any test runs: one broken entry fails the check."""
    problems: list[str] = []
    for m in mutations:
        try:
            mutated_text(m, root)
        except MutationError as exc:
            problems.append(str(exc))
    if problems:
        raise MutationError("\n".join(problems))


def project_files(root: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files (new modules count before they are committed)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and not f.startswith(".venv/") and (root / f).is_file())


def scratch_copy(root: Path, dest: Path, files: Sequence[str] | None = None) -> None:
    for rel in files if files is not None else project_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def apply_mutation(mutation: Mutation, root: Path, scratch: Path) -> None:
    """Writes the mutated file into the scratch copy only; the snippet is checked against the real tree."""
    (scratch / mutation.file).write_text(mutated_text(mutation, root), encoding="utf-8")


_SUMMARY = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$")  # a parametrized node id may hold spaces


def first_failure(output: str) -> tuple[str, str] | None:
    """(kind, node id) of the first FAILED / ERROR line of pytest's short summary."""
    for line in output.splitlines():
        match = _SUMMARY.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    return None


def pytest_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRUGAL_", "PYTEST_"))}
    paths = [str(scratch / "services"), str(scratch), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pytest_command(guards: Sequence[str], scratch: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", *guards, "-x", "-q", "-p", "no:cacheprovider", "-rfE",
            f"--basetemp={scratch / '.pytest-tmp'}"]


def classify(returncode: int, output: str) -> tuple[Status, str | None]:
    """pytest's exit codes: 0 all passed, 1 tests failed, 2 interrupted (collection error), 3-5 misuse."""
    failure = first_failure(output)
    if returncode == 0:
        return "survived", None
    if returncode in (1, 2) and failure is not None:
        kind, node = failure
        return ("killed" if kind == "FAILED" else "killed_by_error"), node
    if returncode == 2:
        return "killed_by_error", "(collection interrupted)"
    return "harness_error", None


def isolation_problem(scratch: Path) -> str | None:
    """None when `import frugalstream` in the guards' environment loads the scratch copy."""
    probe = subprocess.run([sys.executable, "-c", "import frugalstream; print(frugalstream.__file__)"],
                           cwd=scratch, env=pytest_env(scratch), capture_output=True, text=True, check=False)
    loaded = probe.stdout.strip()
    if probe.returncode != 0 or not Path(loaded).resolve().is_relative_to(scratch.resolve()):
        return f"`import frugalstream` does not load the scratch copy ({loaded or probe.stderr.strip()[-300:]})"
    return None


def run_guards(guards: Sequence[str], scratch: Path, timeout_s: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, combined output). The process group is killed on timeout; a scratch
    copy that the guards would not import is a harness error (exit code 3), never a verdict."""
    if (problem := isolation_problem(scratch)) is not None:
        return 3, problem
    proc = subprocess.Popen(pytest_command(guards, scratch), cwd=scratch, env=pytest_env(scratch),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")


def run_one(mutation: Mutation, root: Path, files: Sequence[str], timeout_s: float,
            runner: Callable[[Sequence[str], Path, float], tuple[int | None, str]] = run_guards) -> Outcome:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutate-{mutation.name}-") as tmp:
        scratch = Path(tmp)
        scratch_copy(root, scratch, files)
        apply_mutation(mutation, root, scratch)
        code, output = runner(mutation.guards, scratch, timeout_s)
    seconds = time.monotonic() - started
    if code is None:
        return Outcome(mutation.name, mutation.promise, "timeout", None, seconds, f"no verdict in {timeout_s:.0f} s")
    status, node = classify(code, output)
    detail = "" if status in ("killed", "survived") else _tail(output)
    return Outcome(mutation.name, mutation.promise, status, node, seconds, detail)


def baseline(mutations: Sequence[Mutation], root: Path, files: Sequence[str], timeout_s: float) -> str | None:
    """Runs every guard test on an unmutated copy: a guard that already fails would 'kill' anything."""
    guards = list(dict.fromkeys(g for m in mutations for g in m.guards))
    with tempfile.TemporaryDirectory(prefix="mutate-baseline-") as tmp:
        scratch = Path(tmp)
        scratch_copy(root, scratch, files)
        code, output = run_guards(guards, scratch, timeout_s * 2)
    if code == 0:
        return None
    return "the guard tests fail without any mutation:\n" + _tail(output)


def _tail(output: str, lines: int = 25) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])


_LABEL = {"killed": "killed", "killed_by_error": "killed by error", "survived": "SURVIVED",
          "timeout": "SURVIVED (timeout)", "harness_error": "HARNESS ERROR"}


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("mutation", "promise", "result", "killed by", "seconds")]
    rows += [(o.name, o.promise, _LABEL[o.status], o.killed_by or "-", f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_summary(path: Path, outcomes: Sequence[Outcome], total_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    survived = [o.name for o in outcomes if not o.killed]
    payload = {"passed": not survived, "survived": survived, "total_seconds": round(total_s, 1),
               "mutations": [{**asdict(o), "seconds": round(o.seconds, 1)} for o in outcomes]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _run_all(mutations: Sequence[Mutation], snapshot: Path, files: Sequence[str], timeout_s: float, jobs: int,
             *, baseline_first: bool) -> list[Outcome] | None:
    if baseline_first:
        print(f"baseline: running {len({g for m in mutations for g in m.guards})} guard test(s) unmutated ...",
              flush=True)
        problem = baseline(mutations, snapshot, files, timeout_s)
        if problem is not None:
            print(f"mutate: {problem}", file=sys.stderr)
            return None
    lock = threading.Lock()

    def run(m: Mutation) -> Outcome:
        outcome = run_one(m, snapshot, files, timeout_s)
        with lock:
            print(f"{m.name}: {_LABEL[outcome.status]} {outcome.killed_by or ''} ({outcome.seconds:.1f} s)",
                  flush=True)
            if outcome.detail and outcome.status != "killed_by_error":
                print(outcome.detail, flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run, mutations))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list-file", type=Path, default=DEFAULT_LIST, help="the curated mutation list (TOML)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutation")
    parser.add_argument("--list", action="store_true", help="print the mutations and their guards, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutation")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the guards unmutated first (when the full suite just passed)")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT, help="where to write the summary")
    args = parser.parse_args(argv)

    try:
        mutations = load_mutations(args.list_file)
        unknown = sorted(set(args.only) - {m.name for m in mutations})
        if unknown:
            raise MutationError(f"unknown mutation(s) {unknown}; see --list")
        if args.only:
            mutations = [m for m in mutations if m.name in args.only]
        check_all(mutations, ROOT)
    except MutationError as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.promise}\n  file: {m.file}\n  guards: {' '.join(m.guards)}")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutate-snapshot-") as tmp:
        # One snapshot of the tree for the baseline and every mutation: files edited while the check runs
        # cannot make two mutations test different code.
        snapshot = Path(tmp)
        files = project_files(ROOT)
        scratch_copy(ROOT, snapshot, files)
        try:
            check_all(mutations, snapshot)
        except MutationError as exc:
            print(f"mutate: {exc}", file=sys.stderr)
            return 2
        outcomes = _run_all(mutations, snapshot, files, args.timeout, args.jobs, baseline_first=not args.no_baseline)
    if outcomes is None:
        return 2
    total = time.monotonic() - started
    print()
    print(table(outcomes))
    write_summary(args.json, outcomes, total)
    survived = [o.name for o in outcomes if not o.killed]
    print(f"\n{len(outcomes) - len(survived)}/{len(outcomes)} mutations killed in {total:.0f} s; "
          f"summary in {args.json}")
    if survived:
        print(f"mutate: survived (no test noticed the broken promise): {', '.join(survived)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
