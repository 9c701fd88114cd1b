#!/usr/bin/env python3
"""Mutation testing of the pure safety modules, with the standard library only.

For each module (gateway/watchdog.py, gateway/programs.py) every single-operator mutant is
generated from the source's `ast` and applied as a text splice of that one operator (the rest
of the file is left byte for byte, so line numbers stay right):

* comparisons: `<`, `<=`, `>`, `>=` each to the other three (strict/non-strict flip,
  negation, reversal); `==` <-> `!=`; `is` <-> `is not`; `in` <-> `not in`;
* boolean operators: each `and` <-> `or`;
* `not x` -> `x`;
* `+` <-> `-` anywhere inside the operands of a comparison.

Each mutant is written over the module in a private copy of the repository (one per job, in
a temporary directory; the real files are never touched) and the unit tests are run there:

    pytest -x -q -p no:cacheprovider <the module's test file first> <the other test file>

(`-W ignore::pytest.PytestAssertRewriteWarning` too), each run in a fresh fork of a server
that has imported the third-party modules once (`--serve`); Hypothesis runs derandomized,
without its database and without shrinking. A failing run or a timeout kills the mutant; a
passing run is a survivor. Before the run, the unmutated copy must pass and a copy whose
module raises at import must fail with that error, which proves the tests import the copy
and not the original.

A line carrying the marker `# mutate: equivalent (<why>)` is not mutated: its mutants are
listed as equivalent with the reason, and not counted. `# mutate: equivalent < -> <= (<why>)`
names one mutant of the line (as the report prints it) and excludes only that one. Use it
only where the mutant cannot change behaviour, and say why.

    .venv/bin/python scripts/mutate.py [--module watchdog|programs|PATH] [--jobs 2]
        [--timeout 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "gateway/watchdog.py": ["tests/test_watchdog.py", "tests/test_programs.py"],
    "gateway/programs.py": ["tests/test_programs.py", "tests/test_watchdog.py"],
}
TESTS_ALL = sorted({t for tests in TESTS.values() for t in tests})
# What a copy needs for the tests to run: conftest.py imports device_sim and tests.helpers;
# pyproject.toml gives pytest its rootdir and `pythonpath = ["."]` (the copy comes first).
COPY = ["gateway", "device_sim", "tests", "pyproject.toml"]
# `# mutate: equivalent (why)`: every mutant of the line; `# mutate: equivalent < -> <= (why)`:
# only that one (several such clauses may follow one another in the comment).
MARKER = re.compile(r"mutate:\s*equivalent(?:\s+(?P<orig>[^()]+?)\s*->\s*(?P<mut>[^()]+?))?"
                    r"\s*\((?P<why>[^()]*(?:\([^()]*\)[^()]*)*)\)")

COMPARE_SWAPS: dict[str, list[str]] = {
    "<": ["<=", ">=", ">"],
    "<=": ["<", ">", ">="],
    ">": [">=", "<=", "<"],
    ">=": [">", "<", "<="],
    "==": ["!="],
    "!=": ["=="],
    "is": ["is not"],
    "is not": ["is"],
    "in": ["not in"],
    "not in": ["in"],
}
COMPARE_TOKENS = {"<", "<=", ">", ">=", "==", "!=", "is", "not", "in"}


@dataclass
class Mutant:
    file: str
    line: int
    col: int
    kind: str
    original: str
    mutant: str
    source: str  # the source line, stripped
    start: int  # character offsets of the spliced text in the module's source
    end: int
    replacement: str
    status: str = "pending"  # killed | survived | timeout | equivalent | error
    reason: str = ""  # why equivalent, or the error
    seconds: float = 0.0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class Source:
    """A module's text with conversions between ast positions and character offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.tokens = [
            t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type in (tokenize.OP, tokenize.NAME)
        ]

    def offset(self, lineno: int, col_bytes: int) -> int:
        """ast columns count UTF-8 bytes; offsets count characters."""
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode()[:col_bytes].decode())

    def tok_offset(self, pos: tuple[int, int]) -> int:
        return self.starts[pos[0] - 1] + pos[1]

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def tokens_between(self, lo: int, hi: int, wanted: set[str]) -> list[tokenize.TokenInfo]:
        """Operator tokens strictly between two operands (parentheses and the like skipped)."""
        return [t for t in self.tokens
                if lo <= self.tok_offset(t.start) and self.tok_offset(t.end) <= hi
                and t.string in wanted]

    def line_of(self, offset: int) -> int:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi - 1:
            mid = (lo + hi) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid
        return lo + 1


def generate(path: str) -> list[Mutant]:
    src = Source((ROOT / path).read_text())
    tree = ast.parse(src.text, filename=path)
    found: list[Mutant] = []
    used: set[tuple[int, int]] = set()

    def add(kind: str, start: int, end: int, replacement: str, original: str,
            mutant: str) -> None:
        line = src.line_of(start)
        text = src.lines[line - 1]
        m = Mutant(path, line, start - src.starts[line - 1], kind, original, mutant,
                   text.strip(), start, end, replacement)
        comment = text[text.index("#"):] if "#" in text else ""
        for marker in MARKER.finditer(comment):
            orig, mut = marker.group("orig"), marker.group("mut")
            if orig is None or (orig.strip(), mut.strip()) == (original, mutant):
                m.status, m.reason = "equivalent", marker.group("why").strip()
                used.add((line, marker.start()))
        found.append(m)

    def span(tokens: list[tokenize.TokenInfo]) -> tuple[int, int, str]:
        a, b = src.tok_offset(tokens[0].start), src.tok_offset(tokens[-1].end)
        return a, b, " ".join(t.string for t in tokens)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i in range(len(node.ops)):
                toks = src.tokens_between(src.end(operands[i]), src.start(operands[i + 1]),
                                          COMPARE_TOKENS)
                if not toks:
                    continue  # inside an f-string: not reachable by tokens
                a, b, op = span(toks)
                for new in COMPARE_SWAPS.get(op, []):
                    add("compare", a, b, new, op, new)
            for operand in operands:
                for sub in ast.walk(operand):
                    if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Add | ast.Sub):
                        toks = src.tokens_between(src.end(sub.left), src.start(sub.right),
                                                  {"+", "-"})
                        if len(toks) == 1:
                            a, b, op = span(toks)
                            new = "-" if op == "+" else "+"
                            add("arith", a, b, new, op, new)
        elif isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            other = "or" if word == "and" else "and"
            for left, right in zip(node.values, node.values[1:], strict=False):
                toks = src.tokens_between(src.end(left), src.start(right), {word})
                if len(toks) == 1:
                    a, b, _ = span(toks)
                    add("boolean", a, b, other, word, other)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            a = src.start(node)
            # up to the token after `not` (an opening parenthesis of the operand stays)
            b = min(src.tok_offset(t.start) for t in src.tokens if src.tok_offset(t.start) > a)
            operand = src.text[b:src.end(node)]
            add("not", a, b, "", f"not {operand}", operand)

    for n, text in enumerate(src.lines, start=1):  # a marker that matches nothing is stale
        comment = text[text.index("#"):] if "#" in text else ""
        for marker in MARKER.finditer(comment):
            if (n, marker.start()) not in used:
                print(f"warning: {path}:{n}: marker matches no mutant: {marker.group(0)}",
                      file=sys.stderr)
    unique: dict[tuple[int, int, str], Mutant] = {}
    for m in sorted(found, key=lambda m: (m.start, m.replacement)):
        unique.setdefault((m.start, m.end, m.replacement), m)
    mutants = list(unique.values())
    for m in mutants:  # every mutant must be valid Python and differ from the original
        text = mutated(src.text, m)
        compile(text, path, "exec")
        assert ast.dump(ast.parse(text)) != ast.dump(tree), m
    return mutants


def mutated(text: str, m: Mutant) -> str:
    return text[:m.start] + m.replacement + text[m.end:]


# ---------------------------------------------------------------------- running

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider",
               "-W", "ignore::pytest.PytestAssertRewriteWarning"]  # plugins pre-imported
PROJECT = ("gateway", "device_sim", "tests")


def make_copy(base: Path, n: int) -> Path:
    dest = base / f"job{n}"
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _fork_pytest(workdir: Path, args: list[str], out: Path, timeout: float
                 ) -> tuple[int | None, float]:
    """pytest.main in a forked child (own process group) with its output in `out`;
    rc None on timeout (the child's group is killed)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        rc = 3
        try:
            os.setpgid(0, 0)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(workdir)
            import pytest

            rc = int(pytest.main(args))
        except BaseException:  # the child must always exit here
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - t0
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, time.monotonic() - t0
        time.sleep(0.01)


def serve(workdir: Path) -> None:
    """A fork server for one copy (`--serve`): third-party modules are imported once, each run
    is a fresh fork that imports the project (and so the mutant) from the copy.

    Hypothesis runs derandomized, without its example database and without shrinking: the
    same examples every run, and a failing property kills the mutant without the minutes a
    shrink can take."""
    sys.dont_write_bytecode = True
    names_file, out = workdir / ".mutate-modules.json", workdir / ".mutate-out.txt"
    sys.argv = ["pytest"]
    # Which modules the tests need: collect once in a child and note every module that is
    # not the project's; import those here, before any fork.
    pid = os.fork()
    if pid == 0:
        rc = 3
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(workdir)
            import pytest

            rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "--co", *TESTS_ALL]))
            names = [n for n, m in list(sys.modules.items())
                     if n.split(".")[0] not in (*PROJECT, "__main__")
                     and not str(getattr(m, "__file__", None) or "").startswith(str(workdir))]
            names_file.write_text(json.dumps(names))
        finally:
            os._exit(rc)
    os.waitpid(pid, 0)
    for name in json.loads(names_file.read_text()) if names_file.exists() else []:
        with contextlib.suppress(BaseException):
            importlib.import_module(name)
    with contextlib.suppress(ImportError):
        from hypothesis import Phase, settings

        settings.register_profile("mutate", derandomize=True, database=None,
                                  phases=[Phase.explicit, Phase.reuse, Phase.generate])
        settings.load_profile("mutate")
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        rc, took = _fork_pytest(workdir, PYTEST_ARGS + req["tests"], out, req["timeout"])
        shutil.rmtree(workdir / ".hypothesis", ignore_errors=True)
        print(json.dumps({"rc": rc, "seconds": took}), flush=True)


class Runner:
    """One private copy of the repository and its fork server."""

    def __init__(self, base: Path, n: int) -> None:
        self.workdir = make_copy(base, n)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python(), str(Path(__file__).resolve()), "--serve", str(self.workdir)],
            cwd=self.workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)

    def ready(self) -> None:
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            sys.exit(f"the fork server for {self.workdir} did not start")

    def run(self, tests: list[str], timeout: float) -> tuple[str, float, str]:
        """(passed | failed | timeout | error, seconds, pytest's output)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"tests": tests, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        rc, took = reply["rc"], reply["seconds"]
        out_file = self.workdir / ".mutate-out.txt"
        out = out_file.read_text(errors="replace") if out_file.exists() else ""
        if rc is None:
            return "timeout", took, out
        if rc == 0:
            return "passed", took, out
        if rc == 5:  # no tests collected: the command is wrong, not the mutant
            return "error", took, out
        # 1 tests failed, 2 collection broke, 3 internal error, 4 conftest import failed: the
        # mutant broke the tests (the baseline run has shown the command itself is right).
        return "failed", took, out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def last_line(out: str) -> str:
    return out.strip().splitlines()[-1] if out.strip() else ""


def check_copies(runners: list[Runner], path: str, timeout: float) -> None:
    """The unmutated copy passes, and a poisoned module in another copy fails with the
    poison's message: the tests import the copy, not the original."""
    target = runners[-1].workdir / path
    original = target.read_text()
    target.write_text(original + '\nraise RuntimeError("mutate.py canary")\n')
    try:
        with ThreadPoolExecutor(2) as pool:
            base = pool.submit(runners[0].run, TESTS[path], timeout)
            canary = pool.submit(runners[-1].run, TESTS[path], timeout)
            (b_status, b_took, b_out), (c_status, _, c_out) = base.result(), canary.result()
    finally:
        target.write_text(original)
    if b_status != "passed":
        sys.exit(f"the unmutated tests do not pass ({b_status}):\n{b_out}")
    if c_status != "failed" or "mutate.py canary" not in c_out:
        sys.exit(f"the tests did not import the copied {path} (canary {c_status})")
    print(f"  baseline passes in {b_took:.1f} s; the tests import the copy")


def run_module(path: str, mutants: list[Mutant], runners: list[Runner], timeout: float
               ) -> None:
    text = (ROOT / path).read_text()
    free: queue.Queue[Runner] = queue.Queue()
    for r in runners:
        free.put(r)
    todo = [m for m in mutants if m.status == "pending"]
    done = 0

    def one(m: Mutant) -> None:
        nonlocal done
        runner = free.get()
        target = runner.workdir / path
        try:
            target.write_text(mutated(text, m))
            status, m.seconds, out = runner.run(TESTS[path], timeout)
        finally:
            target.write_text(text)
            free.put(runner)
        m.status = {"passed": "survived", "failed": "killed"}.get(status, status)
        if status == "error":
            m.reason = last_line(out)
        done += 1
        mark = {"killed": ".", "survived": "S", "timeout": "T"}.get(m.status, "E")
        print(mark, end="\n" if done % 60 == 0 or done == len(todo) else "", flush=True)

    with ThreadPoolExecutor(len(runners)) as pool:
        list(pool.map(one, todo))


def report(path: str, mutants: list[Mutant]) -> dict:
    counted = [m for m in mutants if m.status != "equivalent"]
    killed = [m for m in counted if m.status in ("killed", "timeout")]
    survived = [m for m in counted if m.status == "survived"]
    errors = [m for m in counted if m.status == "error"]
    equivalent = [m for m in mutants if m.status == "equivalent"]
    score = 100.0 * len(killed) / len(counted) if counted else 100.0
    print(f"\n{path}: {len(counted)} mutants, {len(killed)} killed "
          f"({sum(m.status == 'timeout' for m in killed)} by timeout), {len(survived)} "
          f"survived, {len(errors)} errors; score {score:.1f} %"
          + (f"; {len(equivalent)} equivalent, not counted" if equivalent else ""))
    for m in survived:
        print(f"  SURVIVED {m.where}: {m.original} -> {m.mutant}  (col {m.col + 1})\n"
              f"           | {m.source}")
    for m in errors:
        print(f"  ERROR    {m.where}: {m.original} -> {m.mutant}  (col {m.col + 1}): {m.reason}")
    for m in equivalent:
        print(f"  EQUIV    {m.where}: {m.original} -> {m.mutant}  (col {m.col + 1}): {m.reason}")
    return {
        "total": len(counted), "killed": len(killed), "survived": len(survived),
        "errors": len(errors), "equivalent": len(equivalent), "score": round(score, 2),
        "mutants": [
            {k: v for k, v in asdict(m).items() if k not in ("start", "end", "replacement")}
            for m in mutants
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", choices=None,
                    help="watchdog, programs, or a path in TESTS (repeatable; default both)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    ap.add_argument("--min-score", type=float, default=None,
                    help="exit 1 when a module scores below this percentage (CI gate)")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: fork server
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    paths = []
    for name in args.module or list(TESTS):
        path = name if name in TESTS else f"gateway/{name.removesuffix('.py')}.py"
        if path not in TESTS:
            ap.error(f"unknown module {name!r}: one of {', '.join(TESTS)}")
        paths.append(path)

    t0 = time.monotonic()
    results: dict[str, dict] = {}
    jobs = max(1, args.jobs)
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        runners = [Runner(Path(tmp), n) for n in range(max(2, jobs))]  # the canary needs two
        try:
            for r in runners:
                r.ready()
            for path in paths:
                mutants = generate(path)
                pending = sum(m.status == "pending" for m in mutants)
                print(f"{path}: {pending} mutants to run" + (
                    f" ({len(mutants) - pending} marked equivalent)"
                    if pending < len(mutants) else ""))
                if args.list:
                    for m in mutants:
                        print(f"  {m.where}: {m.original} -> {m.mutant}    | {m.source}")
                    continue
                check_copies(runners, path, args.timeout)
                run_module(path, mutants, runners[:jobs], args.timeout)
                results[path] = report(path, mutants)
        finally:
            for r in runners:
                r.close()
    took = time.monotonic() - t0
    print(f"\nmutation run took {took:.0f} s with {args.jobs} job(s)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(took, 1), "modules": results},
                                        indent=2) + "\n")
    low = [p for p, r in results.items()
           if args.min_score is not None and r["score"] < args.min_score]
    if low:
        print(f"below the minimum score of {args.min_score:g} %: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
