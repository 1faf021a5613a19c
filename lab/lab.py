"""A course grader for EmpRL: give students a copy of the repository with some functions to write,
check their code in words they understand, and check a finished run against the reference numbers.

    # a student copy: these bodies replaced by a raise
    python lab/lab.py new DIR --blank=gae,rloo_advantages
    python lab/lab.py new DIR --blank=all                     # every exercise
    # PASS / FAIL per function, then a training check
    python lab/lab.py check DIR
    python lab/lab.py check DIR --no-run                      # the checks only (seconds)
    # a finished run against the records in docs/runs
    python lab/lab.py check-run RUN_DIR

`new` copies the repository (the top-level .py files, README.md, requirements*.txt, tests/,
benchmarks/, docs/, lab/; not .venv, runs or .git) into DIR and, in the copy, replaces the body of
each named function by `raise NotImplementedError("lab exercise: implement ppo.gae ...")`; its
signature and docstring (with the equations) stay. Names are bare (`gae`) or qualified (`ppo.gae`);
DIR/.lab.json records them. The exercises are the keys of EXERCISES below:
reward.reward_from_logits, ppo.per_token_kl, ppo.kl_penalized_rewards, ppo.gae, ppo.rloo_advantages,
ppo.policy_loss, ppo.value_loss, and ppo.grpo_advantages where ppo.py has it.

`check` runs the lab checks of each recorded function (every exercise when none is recorded) on the
code in DIR and prints one line per function:

    PASS ppo.gae FAIL ppo.rloo_advantages: The baseline of reply i is the mean reward of the *other*
    k - 1 replies ... —
         advantages: at [0] it is -1, the definition gives -2

The checks are the grader's own (lab/checks next to this file), never DIR's: a student may read
them, and editing the copy's checks changes nothing. Only ppo.py and reward.py are imported from
DIR. The checks compare each function with its definition written out in float64 (Python loops over
random tensors and reply masks that end early), so any correct implementation passes, loops
included, and the usual mistakes fail: GAE without λ or bootstrapping past </s>, an RLOO baseline
that includes the reply itself, a KL of the wrong sign or unclamped, a ratio against the wrong
log-probs, a value loss without its clip. They also differentiate the losses (autograd against the
definition's gradient, in float64), and require detached statistics and inputs left unchanged. When
every function passes, `check` runs the training check (training_check below): the tiny preset on a
small made-up data set (`tests/synthetic.py`), twice, in float32 with the same seeds, once with the
student's functions and once with this repository's, and compares the two runs (about 30 s on 2 CPU
cores per algorithm; RLOO and GRPO too when their advantages are exercises).

`check-run` tells a correct run of the base preset from a subtly wrong one, using the run records in
docs/runs (results.json and log.jsonl each; docs/runs/index.json says what each is). Its rule lives
in lab/bands.py and docs/bands.md derives it. It compares the run's config with the base record's: a
run of another algorithm, reward, KL setting or preset is a variant, graded against the records of
that variant, or NOT GRADED when there is none; seeds and dtype may differ (PIPELINE). A run whose
SFT results equal a recorded pipeline's (--from_run of that base) is graded as a new PPO seed of it,
against its seeds; any other run as a new pipeline, against bands that carry the spread between
pipelines as well as between PPO seeds. For each metric of METRICS (the gains over SFT overall and
per mechanism, by the identifiers and by the judge; SFT's perplexity and its rise; the change in
distinct replies and in length; the KL to the SFT model over the last PPO iterations of log.jsonl)
the band is centre ± k × SD, k such that a correct run is flagged on some metric with probability at
most ALPHA; EmpRL must lie above the majority constant (MUST_BE_POSITIVE, no band); SFT against the
majority constant is shown, not graded (SHOWN). It prints the verdict and each check out of range;
--details prints every band and where it comes from. A run that is itself a record is checked
against bands made without it. `bands --write=lab/tolerances.json` writes the bands of the records,
for reading; a test checks the committed file matches the records.

Exit status: 0 when everything passes (is in range), 1 when something fails or a file is missing or
damaged, 2 for a command-line mistake such as an unknown exercise.
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

# exercise (module.function) -> the checks that cover it, in pipeline order. One line per exercise;
# one whose function is not in the module (yet) is left out of the choices.
EXERCISES = {
    # 2. the empathy reward [R1]
    "reward.reward_from_logits": "lab/checks/test_reward_from_logits.py",
    "ppo.per_token_kl": "lab/checks/test_per_token_kl.py",  # 2. KL_t, clamped
    # 2. r_t = -β·KL_t + s at </s>
    "ppo.kl_penalized_rewards": "lab/checks/test_kl_penalized_rewards.py",
    "ppo.gae": "lab/checks/test_gae.py",  # 3. advantages and returns
    "ppo.rloo_advantages": "lab/checks/test_rloo_advantages.py",  # 3. or RLOO
    "ppo.grpo_advantages": "lab/checks/test_grpo_advantages.py",  # 3. or GRPO
    "ppo.policy_loss": "lab/checks/test_policy_loss.py",  # 4. clipped surrogate
    "ppo.value_loss": "lab/checks/test_value_loss.py",  # 4. clipped value loss
}
# top-level files of a student copy
COPIED_FILES = ["*.py", "README.md", "requirements*.txt", ".gitignore"]
COPIED_DIRS = ["tests", "benchmarks", "docs", "lab"]
LAB_FILE = ".lab.json"  # in a student copy: {"blanked": [exercise, ...]}
# seconds for all the checks (an endless loop in a student's function ends here)
CHECK_TIMEOUT = 120
RUN_TIMEOUT = 300  # seconds for one training run
# the training check of `check`: the tiny preset (float32 on every machine) with the same seeds,
# identifiers trained long enough to give a signal, 40 iterations; run with the student's functions
# and with the reference's
RUN_FLAGS = [
    "--preset=tiny",
    "--dtype=float32",
    "--seed=1337",
    "--ppo_seed=0",
    "--ident_epochs=4",
    "--ident_lr=1e-3",
    "--ppo_steps=40",
    "--ppo_lr=1e-3",
    "--ppo_eval_every=40",
]
# The training check compares two things. (1) The first iteration: both runs sample the same replies
# from the same SFT model, so its logged statistics (the update's losses, ratio, approx_KL, clip
# fractions, and the rollout's score, KL, entropy, length) differ only by float32 rounding when the
# functions are correct, and visibly when a gradient is missing or halved (the update moves the
# policy by another amount). Measured (tests/test_lab.py): correct implementations written other
# ways agree to about 1e-6 relative; a value loss on values.detach() moves approx_kl by 0.5 %, a
# policy loss with its unclipped term detached by 50 %.
FIRST_FIELDS = [
    "score",
    "kl",
    "pg_loss",
    "vf_loss",
    "approx_kl",
    "clipfrac",
    "vf_clipfrac",
    "ratio",
    "explained_var",
    "entropy",
    "length",
]
FIRST_RTOL, FIRST_ATOL = 5e-4, 1e-6  # |yours - reference| <= ATOL + RTOL·|reference|
# (2) The end of the run, as a check that learning did not break: means over the last LAST
# iterations and the test reward of the trained policy. Once one sampled token differs the runs part
# like two PPO seeds, so these tolerances are the spread of the reference over PPO seeds 0-3 on this
# data (about twice the largest difference between two seeds): they catch a run that stops learning
# or blows up, not a subtle mistake (that is (1)'s job).
LAST = 10
# log fields
FINAL_TOLERANCE = {"score": 0.04, "kl": 2.5, "vf_loss": 2.0, "entropy": 0.5, "length": 5.0}
# numbers of EmpRL on the made-up test split, results.json
FINAL_RESULTS_TOLERANCE = {"reward": 0.06}


class LabError(Exception):
    """A mistake of the user or a missing / damaged file: one line on stderr, exit status `code`, no
    traceback."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------- source rewriting


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
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )


def blank_function(source, name, exercise, path="the source"):
    """source with the body of function `name` after its docstring replaced by a NotImplementedError
    naming the exercise. Located with ast (lines after the docstring up to the function's last
    line), so the signature, the docstring and everything outside the function stay as they are,
    comments included."""
    node = find_function(source, name, path)
    if node.body[0].lineno == node.lineno:
        raise LabError(
            f"{path}: {name} is a one-line function; give it a body of its own lines to blank it"
        )
    lines = source.splitlines(keepends=True)
    if has_docstring(node):
        first = node.body[0].end_lineno + 1  # 1-based: the line after the docstring
    else:
        first = node.body[0].lineno
    indent = " " * node.body[0].col_offset
    raise_line = (
        f'{indent}raise NotImplementedError("lab exercise: implement {exercise} (see its '
        'docstring)")\n'
    )
    return "".join(lines[: first - 1] + [raise_line] + lines[node.end_lineno :])


def replace_function(source, name, new_function, path="the source"):
    """source with the whole function `name` (decorators included) replaced by the text new_function
    (a complete `def`, at the top level). Used to write a student's implementation into a copy."""
    node = find_function(source, name, path)
    lines = source.splitlines(keepends=True)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    new_function = new_function.strip("\n") + "\n"
    out = "".join(lines[: first - 1]) + new_function + "".join(lines[node.end_lineno :])
    find_function(out, name, path)  # still parses and still defines it
    return out


def exercise_file(root, exercise):
    return Path(root) / f"{exercise.split('.')[0]}.py"


def available_exercises(root):
    """The exercises whose function is in root's module (a module that does not parse keeps all of
    its exercises, so that `check` reports the syntax error for each)."""
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
        names = {
            n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if exercise.split(".")[1] in names:
            out.append(exercise)
    return out


def resolve(names, available):
    """Bare or qualified names -> qualified exercise names, in pipeline order (EXERCISES'); 'all' =
    all of them."""
    out = []
    for name in names:
        if name == "all":
            matches = available
        else:
            matches = [e for e in available if name in (e, e.split(".")[1])]
        if not matches:
            raise LabError(
                f"unknown exercise {name!r}: choose from {', '.join(available)} (or all)", code=2
            )
        out += matches
    return [e for e in available if e in out]


# ---------------------------------------------------------------------------------------------- new


def copy_repository(src, dst):
    """The repository's own files (see COPIED_FILES, COPIED_DIRS) from src into dst; no caches, runs
    or venv."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in COPIED_FILES:
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)
    # the key stays home
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "answers.md")
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
    # before copying: an unknown name leaves nothing behind
    blanked = resolve(names, available_exercises(ROOT))
    copy_repository(ROOT, out)
    for exercise in blanked:
        path = exercise_file(out, exercise)
        text = blank_function(
            path.read_text(encoding="utf-8"), exercise.split(".")[1], exercise, path
        )
        path.write_text(text, encoding="utf-8")
    (out / LAB_FILE).write_text(json.dumps({"blanked": blanked}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote a student copy of the repository to {out}")
    for exercise in blanked:
        node = find_function(
            exercise_file(out, exercise).read_text(encoding="utf-8"), exercise.split(".")[1]
        )
        print(
            f"  to implement: {exercise}  ({exercise.split('.')[0]}.py line {node.lineno}), "
            f"checked by {EXERCISES[exercise]}"
        )
    if not blanked:
        print("  nothing blanked: `check` will check every exercise")
    print(f"then: python lab/lab.py check {out}")
    return 0


# -------------------------------------------------------------------------------------------- check


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
    """Run the checks of the exercises in one pytest process on the code in directory; {exercise:
    None (pass) or reason}.

    The checks are this repository's (ROOT/lab/checks), never the copy's: a student may read them,
    but editing the copy's lab/checks changes nothing. The code under test (ppo.py, reward.py) is
    imported from directory: lab/checks/conftest.py puts LAB_CODE first on sys.path. pytest runs in
    an empty folder with an empty configuration, so no pytest.ini or conftest.py of the copy takes
    part."""
    files = [str(ROOT / EXERCISES[e]) for e in exercises]
    with tempfile.TemporaryDirectory() as tmp:
        # lab/checks/conftest.py writes one JSON line per check here
        report = Path(tmp) / "report.jsonl"
        config = Path(tmp) / "pytest.ini"
        config.write_text("[pytest]\n", encoding="utf-8")
        env = {
            **os.environ,
            "LAB_REPORT": str(report),
            "LAB_CODE": str(Path(directory).resolve()),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(config),
            f"--rootdir={ROOT / 'lab' / 'checks'}",
            f"--confcutdir={ROOT / 'lab' / 'checks'}",
            *files,
        ]
        try:
            p = subprocess.run(
                cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return {
                e: f"the checks did not finish within {CHECK_TIMEOUT} s (an endless loop?)"
                for e in exercises
            }
        rows = []
        if report.exists():
            rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    results = {}
    for exercise in exercises:
        mine = [
            r for r in rows if Path(r["test"].split("::")[0]).name == Path(EXERCISES[exercise]).name
        ]
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


def reference_copy(directory, exercises, out):
    """A copy of the student's code (the top-level .py files of directory) in out, with each
    exercise function replaced by this repository's: the run that differs from the student's in
    those functions only."""
    out.mkdir(parents=True)
    for path in sorted(Path(directory).glob("*.py")):
        shutil.copy2(path, out / path.name)
    for exercise in exercises:
        module, name = exercise.split(".")
        ours = (ROOT / f"{module}.py").read_text(encoding="utf-8")
        node = find_function(ours, name, f"{module}.py")
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        function = "".join(ours.splitlines(keepends=True)[first - 1 : node.end_lineno])
        path = out / f"{module}.py"
        path.write_text(
            replace_function(path.read_text(encoding="utf-8"), name, function, path),
            encoding="utf-8",
        )
    return out


def train(code, data_dir, run, algo):
    """train.py of the code in `code` on the made-up data: (log lines, results) or a FAIL reason (a
    string)."""
    cmd = [
        sys.executable,
        "train.py",
        *RUN_FLAGS,
        f"--algo={algo}",
        f"--data_dir={data_dir}",
        f"--out_dir={run}",
    ]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("LAB_REPORT", "LAB_CODE"):
        env.pop(name, None)
    try:
        p = subprocess.run(
            cmd, cwd=code, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return f"train.py did not finish within {RUN_TIMEOUT} s"
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
        return f"train.py stopped with exit status {p.returncode}: {last}"
    records = [
        json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    return records, json.loads((run / "results.json").read_text(encoding="utf-8"))


def close(a, b, rtol, atol):
    """a and b agree within atol + rtol·|b|; two nans agree (explained variance without a value
    head)."""
    if math.isnan(a) and math.isnan(b):
        return True
    return math.isfinite(a) and abs(a - b) <= atol + rtol * abs(b)


def compare_runs(yours, theirs):
    """The lines that say how the run with the student's functions differs from the reference's; []
    if it does not. yours and theirs are (log lines, results) of train()."""
    bad = []
    iterations = [
        [r for r in run[0] if r.get("stage") == "ppo" and "score" in r] for run in (yours, theirs)
    ]
    if not iterations[0] or len(iterations[0]) != len(iterations[1]):
        return [
            f"{len(iterations[0])} PPO iterations logged with your functions, "
            f"{len(iterations[1])} with the "
            f"reference's"
        ]
    first = [its[0] for its in iterations]
    for key in FIRST_FIELDS:
        a, b = first[0][key], first[1][key]
        if not close(a, b, FIRST_RTOL, FIRST_ATOL):
            bad.append(
                f"iteration 1 {key}: {a:.6g} with your functions, {b:.6g} with the "
                "reference's (the same "
                f"replies were sampled: they may differ by rounding only, {FIRST_RTOL:g} "
                "relative)"
            )
    for key, tolerance in FINAL_TOLERANCE.items():
        a, b = (sum(r[key] for r in its[-LAST:]) / len(its[-LAST:]) for its in iterations)
        if not close(a, b, 0.0, tolerance):
            bad.append(
                f"{key}, mean of the last {LAST} iterations: {a:.4g} with your functions, "
                f"{b:.4g} with the "
                f"reference's (tolerance ±{tolerance:g}, the spread of PPO seeds)"
            )
    for key, tolerance in FINAL_RESULTS_TOLERANCE.items():
        a, b = yours[1]["emprl"][key], theirs[1]["emprl"][key]
        if not close(a, b, 0.0, tolerance):
            bad.append(
                f"test {key} of the trained policy: {a:.4g} with your functions, {b:.4g} "
                "with the "
                f"reference's (tolerance ±{tolerance:g}, the spread of PPO seeds)"
            )
    return bad


def training_check(directory, exercises):
    """Train the tiny preset on made-up data twice, in float32 with the same seeds: with the
    student's functions and with this repository's (everything else the student's), and compare
    (compare_runs). With rloo_advantages or grpo_advantages among the exercises that algorithm is
    trained too (PPO does not call them). Prints one PASS / FAIL line per algorithm, and what
    differs; True if every algorithm passes."""
    algos = ["ppo"] + [a for a in ("rloo", "grpo") if f"ppo.{a}_advantages" in exercises]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the grader's data
        synthetic = load_module(ROOT / "tests" / "synthetic.py", "lab_synthetic_data")
        data_dir = synthetic.write_synthetic_data(tmp / "data")
        reference = reference_copy(directory, exercises, tmp / "reference")
        for algo in algos:
            print(
                f"training check ({algo}): train.py {' '.join(RUN_FLAGS)} --algo={algo} on a "
                "small made-up data "
                f"set, with your functions and with the reference's (about 30 s) ...",
                flush=True,
            )
            t0 = time.time()
            yours = train(directory, data_dir, tmp / f"yours_{algo}", algo)
            if isinstance(yours, str):  # a reason: the run failed
                print(f"FAIL training check ({algo}): with your code, {yours}")
                ok = False
                continue
            theirs = train(reference, data_dir, tmp / f"reference_{algo}", algo)
            if isinstance(theirs, str):
                print(
                    f"FAIL training check ({algo}): with the reference functions in your copy, "
                    f"{theirs}"
                )
                ok = False
                continue
            bad = compare_runs(yours, theirs)
            if bad:
                print(
                    f"FAIL training check ({algo}): your functions pass each check but train "
                    "differently from the "
                    f"reference's; look for a gradient that is missing, halved or detached:"
                )
                for line in bad:
                    print(f"     {line}")
                ok = False
                continue
            print(
                f"PASS training check ({algo}) in {time.time() - t0:.0f} s: iteration 1 as the "
                "reference's, the "
                f"last {LAST} iterations within the spread of PPO seeds; test reward SFT "
                f"{yours[1]['sft']['reward']:.3f} -> EmpRL {yours[1]['emprl']['reward']:.3f} "
                "(reference "
                f"{theirs[1]['emprl']['reward']:.3f})"
            )
    return ok


def cmd_check(args):
    directory = Path(args.dir)
    if not directory.is_dir():
        raise LabError(
            f"{directory}: no such directory (make one with `python lab/lab.py new {directory}`)"
        )
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
    if not exercises:
        modules = sorted({exercise_file("", e).name for e in EXERCISES})
        raise LabError(
            f"{directory} has none of the exercises' functions (in "
            f"{', '.join(modules)}): is it a copy "
            f"made by `lab.py new`?"
        )
    results = run_checks(directory, exercises)
    for exercise in exercises:
        if results[exercise] is None:
            print(f"PASS {exercise}")
        else:
            print(f"FAIL {exercise}: {results[exercise]}")
    ok = all(reason is None for reason in results.values())
    if ok and not args.no_run:
        ok = training_check(directory, exercises)
    elif not ok and not args.no_run:
        print("(the training check starts once every function passes)")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------- check-run

# check-run's rule and command live in lab/bands.py, loaded by its path as the checks are. Its
# errors are this grader's LabError, and its names are this module's too: benchmarks/records.py,
# lab/metric_ranges.py and the tests read them as lab.<name>.
band_rule = load_module(Path(__file__).resolve().with_name("bands.py"), "lab_bands")
band_rule.LabError = LabError
PLUMBING = band_rule.PLUMBING
PIPELINE = band_rule.PIPELINE
ALPHA = band_rule.ALPHA
KL_LAST = band_rule.KL_LAST
METRICS = band_rule.METRICS
MUST_BE_POSITIVE = band_rule.MUST_BE_POSITIVE
SHOWN = band_rule.SHOWN
read_json = band_rule.read_json
lookup = band_rule.lookup
is_number = band_rule.is_number
read_run = band_rule.read_run
metric = band_rule.metric
method = band_rule.method
config_differences = band_rule.config_differences
read_index = band_rule.read_index
read_records = band_rule.read_records
base_name = band_rule.base_name
pipeline_of = band_rule.pipeline_of
in_bands = band_rule.in_bands
correct_names = band_rule.correct_names
groups = band_rule.groups
seed_names = band_rule.seed_names
other_pipelines = band_rule.other_pipelines
of_sft_alone = band_rule.of_sft_alone
t_within = band_rule.t_within
t_quantile = band_rule.t_quantile
alpha_per_metric = band_rule.alpha_per_metric
summary = band_rule.summary
new_pipeline_band = band_rule.new_pipeline_band
new_seed_band = band_rule.new_seed_band
bands = band_rule.bands
failed_checks = band_rule.failed_checks
describe_config = band_rule.describe_config
same_results = band_rule.same_results
grading = band_rule.grading
bands_table = band_rule.bands_table
cmd_bands = band_rule.cmd_bands
cmd_check_run = band_rule.cmd_check_run


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="lab.py",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser(
        "new", help="write a student copy of the repository with functions to implement"
    )
    new.add_argument("dir")
    new.add_argument(
        "--blank",
        default="",
        help="exercises to blank, comma-separated, or all: " + ", ".join(available_exercises(ROOT)),
    )
    check = commands.add_parser(
        "check", help="check a student copy: PASS / FAIL per function, then a PPO run"
    )
    check.add_argument("dir")
    check.add_argument("--no-run", dest="no_run", action="store_true", help="skip the PPO run")
    check_run = commands.add_parser(
        "check-run", help="check a finished run against the records in docs/runs"
    )
    check_run.add_argument("run_dir")
    check_run.add_argument(
        "--records", default=str(ROOT / "docs" / "runs"), help="the folder of run records"
    )
    check_run.add_argument(
        "--leave-out",
        dest="leave_out",
        default="",
        help="records (comma-separated) to leave out of the bands",
    )
    check_run.add_argument(
        "--details", action="store_true", help="every band and where it comes from"
    )
    band = commands.add_parser(
        "bands", help="print the bands check-run uses (--write=lab/tolerances.json)"
    )
    band.add_argument("--records", default=str(ROOT / "docs" / "runs"))
    band.add_argument("--write", default="", help="write them to this file instead")
    args = parser.parse_args(argv)
    try:
        commands = {
            "new": cmd_new,
            "check": cmd_check,
            "check-run": cmd_check_run,
            "bands": cmd_bands,
        }
        return commands[args.command](args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
