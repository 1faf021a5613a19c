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
docs/runs (results.json and log.jsonl each). It first compares the run's config with the base
record's (docs/runs/cpu): a run of another algorithm, reward, KL setting or preset is reported as a
variant and checked against the records of that variant (the centres from them), or NOT GRADED when
there is none; seeds and dtype may differ (PIPELINE). Then, for each metric of METRICS (the gains
over SFT overall and per mechanism, by the identifiers and by the judge; SFT's perplexity and its
rise; the change in distinct replies and in length; the KL to the SFT model over the last PPO
iterations of log.jsonl), it prints the value and the band [low, high] = centre ± k × SD with where
each comes from (bands(): centre = mean over the base run's PPO seeds cpu, cpu_s1, ...; SD over
those and the other pipelines; k such that a correct run is flagged on some metric with probability
at most ALPHA). EmpRL must lie above the majority constant (MUST_BE_POSITIVE, no band); SFT against
the majority constant is shown beside the recorded range, not graded (SHOWN). A run that is itself a
record is checked against bands made without it. `bands --write=lab/tolerances.json` writes the
bands of the records, for reading; a test checks the committed file matches the records.

Exit status: 0 when everything passes (is in range), 1 when something fails or a file is missing or
damaged, 2 for a command-line mistake such as an unknown exercise.
"""

import argparse
import ast
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
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

# The records check-run grades against (docs/runs/<name>/: results.json and log.jsonl of a finished
# run). The base run's PPO seeds are BASE and every BASE_s<N> (N = 1, 2, ...; whichever exist); the
# other pipelines are correct runs of the same method whose SFT and identifiers differ too (another
# --seed, float32 instead of bfloat16, or the same seed at torch's default threads on an idle
# machine: other rounding, so another SFT model and identifiers). Records of earlier code (EARLIER)
# take no part: their numbers are no longer quoted (docs/ablations.md).
BASE = "cpu"
# cpu_seed2, ..., cpu_fp32, cpu_quiet
OTHER_PIPELINES = re.compile(rf"{BASE}_seed\d+|{BASE}_fp32|{BASE}_quiet")
EARLIER = ["cpu_fp32_earlier", "cpu_fp32_earlier_no_kl"]
# config fields that say where and how a run ran, not what it computes; and the fields a correct
# reproduction may differ in (its seeds and its dtype: the other pipelines and the PPO seeds differ
# in them)
PLUMBING = {"out_dir", "data_dir", "from_run", "device", "max_nonfinite"}
PIPELINE = {"seed", "ppo_seed", "dtype"}
# the chance that a correct run is flagged on some metric: the false-alarm rate per run (see
# multiplier())
ALPHA = 0.05
# the KL to the SFT model: mean of the logged `kl` over the last KL_LAST PPO iterations
KL_LAST = 20
# metric -> what it is, for the graded metrics (a band each). A key is a dotted path into
# results.json, a difference "a - b" of two, or "log:FIELD" (the mean of FIELD over the last KL_LAST
# PPO iterations of log.jsonl). What PPO changed, measured within one run against the run's own SFT
# model, not absolute numbers: a pipeline whose identifiers label differently moves every Emp-F1 of
# the run by 10 points (cpu_seed2), and its SFT model's own diversity and length move with it. SFT's
# perplexity is the one number of the SFT model graded on its own.
METRICS = {
    "emprl.emp_f1 - sft.emp_f1": "EmpRL's gain in Emp-F1 over SFT, by the identifiers (the "
    "reward's own models)",
    "emprl.emp_f1_er - sft.emp_f1_er": "the gain in ER, by the identifiers",
    "emprl.emp_f1_ip - sft.emp_f1_ip": "the gain in IP, by the identifiers",
    "emprl.emp_f1_ex - sft.emp_f1_ex": "the gain in EX, by the identifiers",
    "emprl.emp_f1_judge - sft.emp_f1_judge": "EmpRL's gain by the independent judge",
    "emprl.emp_f1_judge_er - sft.emp_f1_judge_er": "the gain in ER, by the judge",
    "emprl.emp_f1_judge_ip - sft.emp_f1_judge_ip": "the gain in IP, by the judge",
    "emprl.emp_f1_judge_ex - sft.emp_f1_judge_ex": "the gain in EX, by the judge",
    "sft.ppl": "perplexity of the human replies under SFT",
    "emprl.ppl - sft.ppl": "the rise in perplexity from SFT to EmpRL (drift from the language "
    "model)",
    "emprl.unique_frac - sft.unique_frac": "the change in the share of distinct replies from SFT "
    "to EmpRL",
    "emprl.length - sft.length": "the change in mean reply length from SFT to EmpRL, words",
    "log:kl": f"KL to the SFT model, summed over a reply, mean of the last {KL_LAST} PPO "
    "iterations",
}
# Checked without a band: must be > 0.
MUST_BE_POSITIVE = {
    "emprl.emp_f1 - majority.emp_f1": "EmpRL above the constant majority level (a floor, no band)"
}
# Shown beside the range of the correct records, not graded. The majority constant measures the
# identifiers more than the run: how much of the test split they put at one level, which moves it by
# many points between pipelines; the --seed=2 pipeline's SFT lies far below it where the others lie
# close (lab/answers.md, exercise 0, has the numbers), and a band made from a handful of pipelines
# calls that correct pipeline wrong. EmpRL against the constant is graded by its floor and through
# the gains over SFT.
SHOWN = {
    "sft.emp_f1 - majority.emp_f1": "SFT against the constant majority level (shown, not graded)"
}


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
    """The value at a dotted path ("emprl.emp_f1", "samples.0.sft") of a JSON record, or the
    difference of two ("emprl.emp_f1 - majority.emp_f1"); None where there is none."""
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


def read_run(path):
    """A run directory (or its results.json) -> {"results", "log" (PPO lines), "config", "path"}."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    results = read_json(directory / "results.json", "the run's results")
    if not isinstance(results, dict):
        raise LabError(f"{directory / 'results.json'}: not a results record (a JSON object)")
    log = []
    if (directory / "log.jsonl").exists():
        for line in (directory / "log.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: the others still count
            if isinstance(row, dict) and row.get("stage") == "ppo" and "score" in row:
                log.append(row)
    config = dict(results.get("config") or {})
    if config.get("dtype") == "auto":  # what auto chose on that machine
        config["dtype"] = (results.get("environment") or {}).get("dtype", "auto")
    return {"results": results, "log": log, "config": config, "path": directory}


def metric(run, key):
    """The value of metric key (see METRICS) in a run, or None."""
    if key.startswith("log:"):
        values = [row.get(key[4:]) for row in run["log"][-KL_LAST:]]
        if len(values) < KL_LAST or not all(is_number(v) for v in values):
            return None
        return sum(values) / len(values)
    value = lookup(run["results"], key)
    return value if is_number(value) else None


def method(config):
    """The fields of a config that decide what a run computes: all but PLUMBING and PIPELINE."""
    return {k: v for k, v in config.items() if k not in PLUMBING | PIPELINE}


def config_differences(a, b, ignore=frozenset()):
    """The fields where configs a and b differ. A field that only one of them has is not a
    difference: code of another version added or removed the option (the records of docs/runs may
    mix code versions)."""
    return {k for k in set(a) & set(b) if a[k] != b[k]} - set(ignore)


def other_pipelines(records):
    """The correct runs of the base method that retrain SFT and the identifiers too: BASE_seedN (by
    N), BASE_fp32, BASE_quiet."""
    found = [n for n in records if OTHER_PIPELINES.fullmatch(n)]
    return sorted(
        found,
        key=lambda n: (n.endswith("_quiet"), n.endswith("_fp32"), int(re.sub(r"\D", "", n) or 0)),
    )


def read_records(records_dir):
    """{name: run} of every record in records_dir (a folder with results.json)."""
    records_dir = Path(records_dir)
    if not (records_dir / BASE / "results.json").exists():
        raise LabError(f"{records_dir}: no record {BASE}/results.json (the base run's record)")
    return {
        d.name: read_run(d)
        for d in sorted(records_dir.iterdir())
        if (d / "results.json").exists() and d.name not in EARLIER
    }


def seed_names(records):
    """The base run's PPO seeds among the records: BASE and BASE_s<N>, which must have BASE's config
    but ppo_seed."""
    names = [BASE] + sorted(
        (n for n in records if n.startswith(f"{BASE}_s") and n[len(BASE) + 2 :].isdigit()),
        key=lambda n: int(n[len(BASE) + 2 :]),
    )
    for name in names:
        differ = config_differences(
            records[name]["config"], records[BASE]["config"], PLUMBING | {"ppo_seed"}
        )
        if differ:
            raise LabError(
                f"record {name} is named as a PPO seed of {BASE} but its config "
                f"differs in {sorted(differ)}"
            )
    return names


def t_within(x, dof):
    """P(|T| < x) for Student's t with an integer number dof of degrees of freedom (Abramowitz and
    Stegun 26.7.3-4, a finite sum)."""
    theta = math.atan(x / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:  # odd
        total, term = 0.0, 1.0
        for i in range(1, (dof - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * i) / (2 * i + 1)
        inner = math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0
        return 2 / math.pi * (theta + inner)
    total, term = 0.0, 1.0
    for i in range(1, dof // 2 + 1):
        total += term
        term *= c2 * (2 * i - 1) / (2 * i)
    return math.sin(theta) * total


def t_quantile(within, dof):
    """x with P(|T| < x) = within, by bisection."""
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_within(middle, dof) < within else (low, middle)
    return (low + high) / 2


def distinct(values):
    """The values with exact repeats counted once: PPO seeds that reuse one SFT model (--from_run)
    report the same SFT numbers, which are one measurement of the SFT pipeline, not three."""
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def multiplier(n_centre, n_spread):
    """k of a band centre ± k·SD: a prediction interval for one new correct run with the SD
    estimated from n_spread runs (Student's t, n_spread - 1 degrees of freedom) and the centre a
    mean of n_centre: k = t_{1 - a/2, n_spread - 1} · sqrt(1 + 1/n_centre), at a =
    alpha_per_metric(). check-run gives one verdict per run, so the false-alarm rate that matters is
    the run's: ALPHA split evenly over the banded metrics (Bonferroni), which bounds it whether or
    not the metrics move together."""
    return t_quantile(1 - alpha_per_metric(), n_spread - 1) * math.sqrt(1 + 1 / n_centre)


def alpha_per_metric():
    """The false-alarm rate of one band: ALPHA / the number of banded metrics."""
    return ALPHA / len(METRICS)


def bands(records, leave_out=(), centre_names=None):
    """{metric: band} from the records, the rule in one place:

    centre     = the mean of the metric over the base run's PPO seeds (BASE, BASE_s1, ...), or
                 over centre_names
                 (the records of a variant);
    sd         = its standard deviation (n - 1) over the correct runs: the PPO seeds and the
                 other pipelines
                 (OTHER_PIPELINES), which also retrain SFT and the identifiers; equal values (the
                 SFT numbers of PPO seeds that share one SFT model) count once;
    half-width = multiplier(n_centre, n_spread) · sd: a correct run falls outside one band with
    probability
                 ALPHA / len(METRICS), outside some band with probability at most ALPHA.
    Records in leave_out take no part (a correct run is checked against bands computed without it).
    A band is a dict: centre, sd, k, half_width, low, high, and the record names it came from."""
    seeds = [n for n in seed_names(records) if n not in leave_out]
    spread = seeds + [n for n in other_pipelines(records) if n not in leave_out]
    centre_names = [n for n in (centre_names or seeds) if n not in leave_out]
    out = {}
    for key in METRICS:
        missing = [n for n in centre_names + spread if metric(records[n], key) is None]
        if missing:
            raise LabError(f"the records {', '.join(missing)} lack the metric {key}")
        centre_values = distinct([metric(records[n], key) for n in centre_names])
        values = distinct([metric(records[n], key) for n in spread])
        if not centre_values or len(values) < 2:
            raise LabError(
                f"too few records left for a band of {key} (centre from "
                f"{centre_names}, spread from "
                f"{spread})"
            )
        centre, sd = sum(centre_values) / len(centre_values), statistics.stdev(values)
        k = multiplier(len(centre_values), len(values))
        out[key] = dict(
            centre=centre,
            sd=sd,
            k=k,
            half_width=k * sd,
            low=centre - k * sd,
            high=centre + k * sd,
            centre_from=centre_names,
            spread_from=spread,
            n_centre=len(centre_values),
            n_spread=len(values),
        )
    return out


def failed_checks(run, table):
    """The checks of a run that fail, as check-run decides: the bands of table (bands()) its metric
    lies outside (or is missing from), and the floors of MUST_BE_POSITIVE it does not clear."""
    value = {key: metric(run, key) for key in [*table, *MUST_BE_POSITIVE]}
    finite = {key: v is not None and math.isfinite(v) for key, v in value.items()}
    return [
        key
        for key, band in table.items()
        if not (finite[key] and band["low"] <= value[key] <= band["high"])
    ] + [key for key in MUST_BE_POSITIVE if not (finite[key] and value[key] > 0)]


def bands_table(records_dir):
    """The committed lab/tolerances.json: the rule, its parameters, and the bands of the base run
    (`lab.py bands --write=lab/tolerances.json` writes it from docs/runs; a test checks that it
    matches the records)."""
    table = bands(read_records(records_dir))
    first = next(iter(table.values()))
    return {
        "rule": "centre = mean over the base run's PPO seeds; sd over those seeds and the "
        "other pipelines (equal "
        "values once); half_width = k x sd, k = t(1 - alpha/2, n - 1) x sqrt(1 + "
        "1/n_centre), alpha = "
        "alpha_per_run / the number of bands (Bonferroni); kl = mean of the logged "
        "kl over the last "
        f"{KL_LAST} PPO iterations; {', '.join(MUST_BE_POSITIVE)} must be > 0 (no "
        "band); "
        f"{', '.join(SHOWN)} is shown, not graded",
        "alpha_per_run": ALPHA,
        "alpha_per_metric": round(alpha_per_metric(), 6),
        "centre_from": first["centre_from"],
        "spread_from": first["spread_from"],
        "bands": {
            key: {k: round(band[k], 4) for k in ("centre", "sd", "k", "half_width", "low", "high")}
            for key, band in table.items()
        },
    }


def cmd_bands(args):
    table = bands_table(args.records)
    text = json.dumps(table, indent=1, ensure_ascii=False) + "\n"
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


def describe_config(config, base):
    """The method fields where config differs from base, "name=value" each."""
    mine, theirs = method(config), method(base)
    return [
        f"{k}={mine.get(k)!r} (the record: {theirs.get(k)!r})"
        for k in sorted(config_differences(mine, theirs))
    ]


def same_results(a, b):
    """Whether two results.json are one run's: equal but for where the run lived (a record keeps
    only the last part of out_dir, data_dir and from_run)."""
    strip = lambda r: {
        k: ({f: x for f, x in v.items() if f not in PLUMBING} if k == "config" else v)
        for k, v in r.items()
    }
    return strip(a) == strip(b)


def cmd_check_run(args):
    run = read_run(args.run_dir)
    records = read_records(args.records)
    base = records[BASE]
    leave_out = [n for n in (args.leave_out or "").split(",") if n]
    unknown = [n for n in leave_out if n not in records]
    if unknown:
        raise LabError(f"--leave-out: no record {', '.join(unknown)} in {args.records}", code=2)
    same = [n for n, r in records.items() if same_results(r["results"], run["results"])]
    for name in same:  # the run is a record itself: judge it by the others
        if name not in leave_out:
            leave_out.append(name)
            print(
                f"this run is the record {name}: it is left out of the bands it is checked against"
            )
    differ = describe_config(run["config"], base["config"])
    centre_names = None
    if differ:
        matching = [
            n for n, r in records.items() if not describe_config(run["config"], r["config"])
        ]
        print(
            f"a variant, not the base run: its config differs from {BASE}'s in {'; '.join(differ)}"
        )
        if not [n for n in matching if n not in leave_out]:
            print(
                f"NOT GRADED: no record of this variant in {args.records}, so it is not graded "
                "as a reproduction"
            )
            return 1
        centre_names = [n for n in matching if n not in leave_out]
        print(f"graded against the record(s) of this variant: {', '.join(centre_names)}")
    else:
        pipeline = [
            f"{k}={run['config'].get(k)!r}"
            for k in sorted(PIPELINE)
            if run["config"].get(k) != base["config"].get(k)
        ]
        print(
            "config: the base run's "
            f"({BASE}){', with ' + ', '.join(pipeline) if pipeline else ''}: graded as a "
            f"reproduction"
        )
    table = bands(records, leave_out, centre_names)
    first = next(iter(table.values()))
    print(
        f"bands: centre = mean over {', '.join(first['centre_from'])}; half-width = k × SD over "
        f"{', '.join(first['spread_from'])} (correct runs; equal values once), k for a false "
        f"alarm of {ALPHA:g} "
        f"per run: {alpha_per_metric():.4f} per metric over {len(table)} metrics (Bonferroni, "
        "Student's t)"
    )
    failed = failed_checks(run, table)
    out_of_range = len(failed)
    width = max(len(key) for key in [*METRICS, *MUST_BE_POSITIVE, *SHOWN])
    number = lambda got: f"{got:10.3f}" if got is not None else f"{'missing':>10}"
    verdict = lambda key: "OUT OF RANGE" if key in failed else "in range"
    for key, band in table.items():
        print(
            f"{verdict(key):<12} {key:<{width}} {number(metric(run, key))}   [{band['low']:.3f}, "
            f"{band['high']:.3f}] = {band['centre']:.3f} ± {band['k']:.2f} × SD "
            f"{band['sd']:.3f} (mean of "
            f"{band['n_centre']}, SD of {band['n_spread']}); {METRICS[key]}"
        )
    for key, what in MUST_BE_POSITIVE.items():
        print(f"{verdict(key):<12} {key:<{width}} {number(metric(run, key))}   > 0; {what}")
    correct = [n for n in seed_names(records) + other_pipelines(records) if n not in leave_out]
    for key, what in SHOWN.items():
        values = [v for v in (metric(records[n], key) for n in correct) if v is not None]
        recorded = (
            f"{min(values):.3f} .. {max(values):.3f} in {len(correct)} correct records"
            if values
            else "none"
        )
        print(
            f"{'not graded':<12} {key:<{width}} {number(metric(run, key))}   recorded "
            f"{recorded}; {what}"
        )
    steps = run["config"].get("ppo_steps")
    if is_number(steps) and len(run["log"]) < steps:
        out_of_range += 1
        print(
            f"OUT OF RANGE log.jsonl has {len(run['log'])} PPO iterations of the config's "
            f"{steps}: the run is not "
            f"finished, or its log is not the run's"
        )
    if out_of_range:
        print(
            f"{out_of_range} of {len(table) + len(MUST_BE_POSITIVE)} checks out of range: not a "
            "reproduction"
        )
        return 1
    print(f"all {len(table) + len(MUST_BE_POSITIVE)} checks in range")
    return 0


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
