"""Plant bugs in lora_min.py one at a time and check that the test suite catches each.

    python tools/mutants.py                     # every mutant, report to stdout
    python tools/mutants.py --jobs 2 --only 120-140 --report mutants.md
    python tools/mutants.py --lines 154,380 --tests test_lora_min.py   # re-check a few lines

Each mutant is one small edit of the syntax tree (a flipped operator or comparison,
True <-> False, a number changed, `not` dropped, and/or swapped, a `raise` turned
into `pass`, a returned value replaced by None), written as lora_min.py into a
scratch copy of the repository, where the tests run with -x: the first failing
test kills the mutant. A mutant no test kills is a survivor: either a real gap
in the tests or an equivalent edit (same behaviour); the report lists each with
its line so a person can judge which.
"""

import argparse
import ast
import concurrent.futures
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "lora_min.py"
TESTS = ["test_lora_min.py", "test_model.py", "test_misuse.py", "test_peft.py", "test_layers.py", "test_real_models.py",
         "test_parameters.py", "test_experts_speed.py", "test_quantized.py", "test_mnist_demo.py", "test_distributed.py"]
SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}


def _swap_op(new):
    def make(node):
        node.op = new()
        return node
    return make


def _swap_compare(i, new):
    def make(node):
        node.ops[i] = new()
        return node
    return make


def _set_value(value):
    def make(node):
        node.value = value
        return node
    return make


def mutation_points(tree):
    """Yield (node, description, make) for every single edit; make(node) returns its replacement."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in SWAPS:
            new = SWAPS[type(node.op)]
            yield node, f"{type(node.op).__name__} -> {new.__name__}", _swap_op(new)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    yield node, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", _swap_compare(i, SWAPS[type(op)])
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "drop `not`", lambda n: n.operand
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield node, f"{node.value} -> {not node.value}", _set_value(not node.value)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            yield node, f"{node.value!r} -> {node.value + 1!r}", _set_value(node.value + 1)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            yield node, "raise -> pass", lambda n: ast.Pass()
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, "return x -> return None", lambda n: ast.Return(ast.Constant(None))


class Replace(ast.NodeTransformer):
    """Replace one node (found by identity) with make(node)."""

    def __init__(self, target, make):
        self.target, self.make = target, make

    def visit(self, node):
        node = self.generic_visit(node)
        return self.make(node) if node is self.target else node


def mutants(source):
    """(number, line, description, mutated source) for every mutation point."""
    tree = ast.parse(source)
    for number, (node, description, _) in enumerate(list(mutation_points(tree))):
        fresh = copy.deepcopy(tree)
        fresh_node, _, make = list(mutation_points(fresh))[number]
        fresh = Replace(fresh_node, make).visit(fresh)
        yield number, node.lineno, description, ast.unparse(ast.fix_missing_locations(fresh))


def snapshot(source_dir):
    """A copy of the code and tests as they are now, so that edits made during a long run
    cannot change what later mutants are tested against."""
    work = Path(tempfile.mkdtemp(prefix="mutant-"))
    for name in os.listdir(source_dir):
        if name.endswith(".py") or name in ("pytest.ini", "benchmarks"):
            src = Path(source_dir) / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    return work


def run_tests(work, timeout, tests):
    env = {**os.environ, "HYPOTHESIS_MAX_EXAMPLES": os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25"),
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MNIST_DATA_DIR", None)  # the real-data run takes a minute; the synthetic pipeline stays
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if done.returncode == 0:
        return "SURVIVED"
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "killed by " + (failed[0].split(" ")[1].split("::")[-1] if failed else f"exit {done.returncode}")


def check_one(args):
    number, line, description, source, timeout, tests, frozen = args
    work = snapshot(frozen)
    try:
        (work / TARGET).write_text(source)
        return number, line, description, run_tests(work, timeout, tests)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", help="a range of mutant numbers, e.g. 10-20")
    p.add_argument("--lines", help="only mutants on these lines of lora_min.py, e.g. 120,245,310")
    p.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    p.add_argument("--tests", nargs="+", default=TESTS)
    p.add_argument("--report", help="also write the table to this file")
    args = p.parse_args(argv)
    frozen = snapshot(ROOT)
    source = (frozen / TARGET).read_text()
    baseline = check_one((-1, 0, "unmutated (ast.unparse)", ast.unparse(ast.parse(source)), args.timeout, args.tests, frozen))
    if baseline[3] != "SURVIVED":
        sys.exit(f"the unmutated file fails its tests ({baseline[3]}): fix that first")
    todo = list(mutants(source))
    if args.only:
        lo, hi = map(int, args.only.split("-"))
        todo = [m for m in todo if lo <= m[0] <= hi]
    if args.lines:
        lines_wanted = {int(n) for n in args.lines.split(",")}
        todo = [m for m in todo if m[1] in lines_wanted]
    lines = source.splitlines()
    rows, start = [], time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(check_one, (*m, args.timeout, args.tests, frozen)) for m in todo]
        for job in concurrent.futures.as_completed(jobs):
            number, line, description, verdict = job.result()
            rows.append((number, line, description, verdict))
            print(f"[{len(rows)}/{len(todo)} {time.time() - start:.0f}s] #{number} line {line}: {description}: {verdict}",
                  flush=True)
    rows.sort()
    survivors = [r for r in rows if r[3] == "SURVIVED"]
    table = [f"{len(rows) - len(survivors)} of {len(rows)} mutants killed; {len(survivors)} survived", "",
             "| # | line | edit | code |", "| ---: | ---: | --- | --- |"]
    table += [f"| {n} | {line} | {d} | `{lines[line - 1].strip()}` |" for n, line, d, _ in survivors]
    print("\n".join(table))
    if args.report:
        Path(args.report).write_text("\n".join(table) + "\n")
    shutil.rmtree(frozen, ignore_errors=True)


if __name__ == "__main__":
    main()
