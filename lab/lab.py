"""A course grader for EmpRL: give students a copy of the repository with some functions to write, check their
code in words they understand, and check a finished run against the reference numbers.

    python lab/lab.py new DIR --blank=gae,rloo_advantages    # a student copy: these bodies replaced by a raise
    python lab/lab.py new DIR --blank=all                     # every exercise
    python lab/lab.py check DIR                               # PASS / FAIL per function, then a short PPO run
    python lab/lab.py check DIR --no-run                      # the checks only (seconds)
    python lab/lab.py check-run RUN_DIR [--reference=docs/runs/cpu/results.json] [--tolerances=lab/tolerances.json]

`new` copies the repository (the top-level .py files, README.md, requirements*.txt, tests/, benchmarks/, docs/,
lab/; not .venv, runs or .git) into DIR and, in the copy, replaces the body of each named function by
`raise NotImplementedError("lab exercise: implement ppo.gae ...")`; its signature and docstring (with the
equations) stay. Names are bare (`gae`) or qualified (`ppo.gae`); DIR/.lab.json records them. The exercises are
the keys of EXERCISES below: reward.reward_from_logits, ppo.per_token_kl, ppo.kl_penalized_rewards, ppo.gae,
ppo.rloo_advantages, ppo.policy_loss, ppo.value_loss, and ppo.grpo_advantages where ppo.py has it.

`check` runs the lab checks of each recorded function (every exercise when none is recorded) in DIR, as
`python -m pytest lab/checks/test_<function>.py ...`, and prints one line per function:

    PASS ppo.gae
    FAIL ppo.rloo_advantages: The baseline of reply i is the mean reward of the *other* k - 1 replies ... —
         advantages: at [0] it is -1, the definition gives -2

The checks compare each function with its definition written out in float64 (Python loops over random tensors and
reply masks that end early), so any correct implementation passes, loops included, and the usual mistakes fail:
GAE without λ or bootstrapping past </s>, an RLOO baseline that includes the reply itself, a KL of the wrong sign
or unclamped, a ratio against the wrong log-probs, a value loss without its clip. When every function passes,
`check` trains the tiny preset on a small made-up data set (`tests/synthetic.py`) with the student's code, about
20 s on 2 CPU cores, and reports the score over the iterations and the reward before and after PPO.

`check-run` compares a run's results.json with a reference results.json, metric by metric, within the absolute
tolerances of a JSON table {"emprl.emp_f1": 1.5, "difference.emp_f1.mean": 2.0, ...} whose keys are dotted paths
into results.json.

Exit status: 0 when everything passes (is in range), 1 when something fails or a file is missing or damaged,
2 for a command-line mistake such as an unknown exercise.
"""
import argparse
import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository this grader belongs to

# exercise (module.function) -> the checks that cover it, in pipeline order. One line per exercise; one whose
# function is not in the module (yet) is left out of the choices.
EXERCISES = {
    "reward.reward_from_logits": "lab/checks/test_reward_from_logits.py",  # 2. the empathy reward [R1]
    "ppo.per_token_kl": "lab/checks/test_per_token_kl.py",  # 2. KL_t, clamped
    "ppo.kl_penalized_rewards": "lab/checks/test_kl_penalized_rewards.py",  # 2. r_t = -β·KL_t + s at </s>
    "ppo.gae": "lab/checks/test_gae.py",  # 3. advantages and returns
    "ppo.rloo_advantages": "lab/checks/test_rloo_advantages.py",  # 3. or RLOO
    "ppo.grpo_advantages": "lab/checks/test_grpo_advantages.py",  # 3. or GRPO
    "ppo.policy_loss": "lab/checks/test_policy_loss.py",  # 4. clipped surrogate
    "ppo.value_loss": "lab/checks/test_value_loss.py",  # 4. clipped value loss
}
COPIED_FILES = ["*.py", "README.md", "requirements*.txt", ".gitignore"]  # top-level files of a student copy
COPIED_DIRS = ["tests", "benchmarks", "docs", "lab"]
LAB_FILE = ".lab.json"  # in a student copy: {"blanked": [exercise, ...]}
CHECK_TIMEOUT = 120  # seconds for all the checks (an endless loop in a student's function ends here)
RUN_TIMEOUT = 300  # seconds for the PPO run
# the PPO run of `check`: the tiny preset, identifiers trained long enough to give a signal, 40 iterations
RUN_FLAGS = ["--preset=tiny", "--ident_epochs=4", "--ident_lr=1e-3", "--ppo_steps=40", "--ppo_lr=1e-3",
             "--ppo_eval_every=40"]


class LabError(Exception):
    """A mistake of the user or a missing / damaged file: one line on stderr, exit status `code`, no traceback."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- source rewriting

def find_function(source, name, path="the source"):
    """The ast node of the top-level function `name` in source."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise LabError(f"{path} does not parse (line {e.lineno}: {e.msg})") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LabError(f"{path} has no top-level function {name}")


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def blank_function(source, name, exercise, path="the source"):
    """source with the body of function `name` after its docstring replaced by a NotImplementedError naming the
    exercise. Located with ast (lines after the docstring up to the function's last line), so the signature, the
    docstring and everything outside the function stay as they are, comments included."""
    node = find_function(source, name, path)
    if node.body[0].lineno == node.lineno:
        raise LabError(f"{path}: {name} is a one-line function; give it a body of its own lines to blank it")
    lines = source.splitlines(keepends=True)
    if has_docstring(node):
        first = node.body[0].end_lineno + 1  # 1-based: the line after the docstring
    else:
        first = node.body[0].lineno
    indent = " " * node.body[0].col_offset
    raise_line = f'{indent}raise NotImplementedError("lab exercise: implement {exercise} (see its docstring)")\n'
    return "".join(lines[:first - 1] + [raise_line] + lines[node.end_lineno:])


def replace_function(source, name, new_function, path="the source"):
    """source with the whole function `name` (decorators included) replaced by the text new_function (a complete
    `def`, at the top level). Used to write a student's implementation into a copy."""
    node = find_function(source, name, path)
    lines = source.splitlines(keepends=True)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    new_function = new_function.strip("\n") + "\n"
    out = "".join(lines[:first - 1]) + new_function + "".join(lines[node.end_lineno:])
    find_function(out, name, path)  # still parses and still defines it
    return out


def exercise_file(root, exercise):
    return Path(root) / f"{exercise.split('.')[0]}.py"


def available_exercises(root):
    """The exercises whose function is in root's module (a module that does not parse keeps all of its exercises,
    so that `check` reports the syntax error for each)."""
    out = []
    for exercise in EXERCISES:
        path = exercise_file(root, exercise)
        if not path.exists():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError:
            out.append(exercise)
            continue
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if exercise.split(".")[1] in names:
            out.append(exercise)
    return out


def resolve(names, available):
    """Bare or qualified names -> qualified exercise names, in pipeline order (EXERCISES'); 'all' = all of them."""
    out = []
    for name in names:
        if name == "all":
            matches = available
        else:
            matches = [e for e in available if name in (e, e.split(".")[1])]
        if not matches:
            raise LabError(f"unknown exercise {name!r}: choose from {', '.join(available)} (or all)", code=2)
        out += matches
    return [e for e in available if e in out]


# ----------------------------------------------------------------------------------------------- new

def copy_repository(src, dst):
    """The repository's own files (see COPIED_FILES, COPIED_DIRS) from src into dst; no caches, runs or venv."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in COPIED_FILES:
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "answers.md")  # the key stays home
    for name in COPIED_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, ignore=ignore)


def cmd_new(args):
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabError(f"{out} exists and is not empty: give a new directory for the student copy")
    for name in COPIED_DIRS:  # a copy inside a copied folder would copy itself
        if out.resolve().is_relative_to((ROOT / name).resolve()):
            raise LabError(f"{out} is inside the repository's {name}/: give a directory outside it")
    names = [n.strip() for n in (args.blank or "").split(",") if n.strip()]
    blanked = resolve(names, available_exercises(ROOT))  # before copying: an unknown name leaves nothing behind
    copy_repository(ROOT, out)
    for exercise in blanked:
        path = exercise_file(out, exercise)
        text = blank_function(path.read_text(encoding="utf-8"), exercise.split(".")[1], exercise, path)
        path.write_text(text, encoding="utf-8")
    (out / LAB_FILE).write_text(json.dumps({"blanked": blanked}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote a student copy of the repository to {out}")
    for exercise in blanked:
        node = find_function(exercise_file(out, exercise).read_text(encoding="utf-8"), exercise.split(".")[1])
        print(f"  to implement: {exercise}  ({exercise.split('.')[0]}.py line {node.lineno}), "
              f"checked by {EXERCISES[exercise]}")
    if not blanked:
        print("  nothing blanked: `check` will check every exercise")
    print(f"then: python lab/lab.py check {out}")
    return 0


# ----------------------------------------------------------------------------------------------- check

def describe_failure(row, exercise):
    """One line for a failed check: what the check asks (its docstring) and what went wrong."""
    message, error = row["message"], row["error"]
    if error == "NotImplementedError" and message.startswith("lab exercise: implement "):
        name = message.split()[3]
        if name == exercise:
            return "not implemented yet (it raises NotImplementedError)"
        return f"it calls {name}, which is not implemented yet"
    if error == "collection":
        return f"the checks cannot import the code: {message}"
    if error != "AssertionError":
        message = f"{error}: {message}"
    doc = " ".join(row["doc"].split())  # the docstring on one line
    if not doc:
        return message
    return f"{doc} — {message}"


def run_checks(directory, exercises):
    """Run the checks of the exercises in one pytest process in directory; {exercise: None (pass) or reason}."""
    files = [EXERCISES[e] for e in exercises]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"  # lab/checks/conftest.py writes one JSON line per check here
        env = {**os.environ, "LAB_REPORT": str(report), "PYTHONDONTWRITEBYTECODE": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
        try:
            p = subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return {e: f"the checks did not finish within {CHECK_TIMEOUT} s (an endless loop?)" for e in exercises}
        rows = []
        if report.exists():
            rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    results = {}
    for exercise in exercises:
        mine = [r for r in rows if Path(r["test"].split("::")[0]).name == Path(EXERCISES[exercise]).name]
        failed = [r for r in mine if r["outcome"] == "failed"]
        if failed:
            results[exercise] = describe_failure(failed[0], exercise)
        elif not any(r["outcome"] == "passed" for r in mine):
            output = (p.stdout + p.stderr).strip().splitlines() or ["no output"]
            results[exercise] = f"no check ran (pytest exit status {p.returncode}: {output[-1]})"
        else:
            results[exercise] = None
    return results


def load_module(path, name):
    """A Python file as a module, by its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ppo_run(directory):
    """Train the tiny preset on made-up data with the code in directory; print one PASS / FAIL line; True if it
    finished with finite numbers. The score going up is reported, not required: 40 iterations are noisy."""
    print(f"PPO with your code: train.py {' '.join(RUN_FLAGS)} on a small made-up data set (about 20 s) ...",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = load_module(Path(directory) / "tests" / "synthetic.py", "lab_synthetic_data")
        data_dir = synthetic.write_synthetic_data(Path(tmp) / "data")
        run = Path(tmp) / "run"
        cmd = [sys.executable, "train.py", *RUN_FLAGS, f"--data_dir={data_dir}", f"--out_dir={run}"]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("LAB_REPORT", None)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"FAIL ppo run: train.py did not finish within {RUN_TIMEOUT} s")
            return False
        seconds = time.time() - t0
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
            print(f"FAIL ppo run: train.py stopped with exit status {p.returncode}: {last}")
            return False
        records = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    iterations = [r for r in records if r.get("stage") == "ppo" and "score" in r]
    numbers = {f"iteration {r['step']} {key}": r[key] for r in iterations
               for key in ("score", "kl", "pg_loss", "vf_loss")}
    numbers.update({f"test {model} {key}": value for model in ("sft", "emprl")
                    for key, value in results[model].items() if isinstance(value, (int, float))})
    bad = [name for name, value in numbers.items() if not math.isfinite(value)]
    if bad or not iterations:
        print(f"FAIL ppo run: not finite: {', '.join(bad[:5]) or 'no PPO iteration logged'}")
        return False
    scores = [r["score"] for r in iterations]
    n = max(1, len(scores) // 4)
    first, last = sum(scores[:n]) / n, sum(scores[-n:]) / n
    went = "went up" if last > first else "did not go up (a short run is noisy)"
    print(f"PASS ppo run: {len(scores)} iterations in {seconds:.0f} s, every number finite; the score {went}: "
          f"{first:.3f} (first {n} iterations) -> {last:.3f} (last {n}); "
          f"test reward SFT {results['sft']['reward']:.3f} -> EmpRL {results['emprl']['reward']:.3f}")
    return True


def cmd_check(args):
    directory = Path(args.dir)
    if not directory.is_dir():
        raise LabError(f"{directory}: no such directory (make one with `python lab/lab.py new {directory}`)")
    recorded = []
    if (directory / LAB_FILE).exists():
        try:
            recorded = json.loads((directory / LAB_FILE).read_text(encoding="utf-8"))["blanked"]
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"{directory / LAB_FILE}: damaged ({type(e).__name__}: {e})") from None
    unknown = [e for e in recorded if e not in EXERCISES]
    if unknown:
        raise LabError(f"{directory / LAB_FILE}: unknown exercises {unknown}")
    exercises = recorded or available_exercises(directory)
    missing = [EXERCISES[e] for e in exercises if not (directory / EXERCISES[e]).exists()]
    if missing or not exercises:
        raise LabError(f"{directory} lacks the lab checks {', '.join(missing) or 'lab/checks/'}: is it a copy made "
                       f"by `lab.py new`?")
    results = run_checks(directory, exercises)
    for exercise in exercises:
        if results[exercise] is None:
            print(f"PASS {exercise}")
        else:
            print(f"FAIL {exercise}: {results[exercise]}")
    ok = all(reason is None for reason in results.values())
    if ok and not args.no_run:
        ok = ppo_run(directory)
    elif not ok and not args.no_run:
        print("(the PPO run starts once every function passes)")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------- check-run

def read_json(path, what):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabError(f"{path}: no such file ({what})") from None
    except ValueError as e:
        raise LabError(f"{path}: not valid JSON ({what}): {e}") from None
    except OSError as e:
        raise LabError(f"{path}: cannot read it ({what}): {e.strerror}") from None


def lookup(record, key):
    """The value at a dotted path ("emprl.emp_f1", "samples.0.sft") of a JSON record, or the difference of two
    ("emprl.emp_f1 - majority.emp_f1"); None where there is none."""
    if " - " in key:
        a, b = (lookup(record, part) for part in key.split(" - ", 1))
        return a - b if is_number(a) and is_number(b) else None
    value = record
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cmd_check_run(args):
    path = Path(args.run_dir)
    if path.is_dir():
        path = path / "results.json"
    results = read_json(path, "the run's results")
    reference = read_json(args.reference, "the reference results")
    tolerances = read_json(args.tolerances, "the tolerance table")
    if not isinstance(tolerances, dict) or not tolerances:
        raise LabError(f"{args.tolerances}: should be a JSON object {{\"emprl.emp_f1\": 1.5, ...}} with at least one "
                       f"metric")
    for key, tolerance in tolerances.items():
        if not (is_number(tolerance) and tolerance >= 0):
            raise LabError(f"{args.tolerances}: the tolerance of {key} is {tolerance!r}, not a number >= 0")
        if not is_number(lookup(reference, key)):
            raise LabError(f"{args.reference}: no number at {key} (a key of {args.tolerances})")
    out_of_range = 0
    width = max(len(key) for key in tolerances)
    for key, tolerance in tolerances.items():
        want, got = lookup(reference, key), lookup(results, key)
        low, high = want - tolerance, want + tolerance
        inside = is_number(got) and low <= got <= high  # nan is never inside
        if not inside:
            out_of_range += 1
        shown = f"{got:10.3f}" if is_number(got) else f"{'missing':>10}"
        verdict = "in range" if inside else "OUT OF RANGE"
        print(f"{verdict:<12} {key:<{width}} {shown}   reference {want:.3f} ± {tolerance:g}: [{low:.3f}, {high:.3f}]")
    if out_of_range:
        print(f"{out_of_range} of {len(tolerances)} metrics out of range")
        return 1
    print(f"all {len(tolerances)} metrics in range")
    return 0


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(prog="lab.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="write a student copy of the repository with functions to implement")
    new.add_argument("dir")
    new.add_argument("--blank", default="", help="exercises to blank, comma-separated, or all: "
                     + ", ".join(available_exercises(ROOT)))
    check = commands.add_parser("check", help="check a student copy: PASS / FAIL per function, then a PPO run")
    check.add_argument("dir")
    check.add_argument("--no-run", dest="no_run", action="store_true", help="skip the PPO run")
    check_run = commands.add_parser("check-run", help="compare a run's results.json with the reference")
    check_run.add_argument("run_dir")
    check_run.add_argument("--reference", default=str(ROOT / "docs" / "runs" / "cpu" / "results.json"))
    check_run.add_argument("--tolerances", default=str(ROOT / "lab" / "tolerances.json"))
    args = parser.parse_args(argv)
    try:
        return {"new": cmd_new, "check": cmd_check, "check-run": cmd_check_run}[args.command](args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
