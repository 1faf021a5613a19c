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

`new` copies what a student edits and runs, the program's top-level .py files (not tests/, lab/
with the grader's checks and the key, docs/ or benchmarks/), into DIR, a directory outside the
repository (one inside it is refused: `python lab/lab.py new ../my-emprl` makes it beside), and, in
the copy, replaces the body of each named function by `raise NotImplementedError("lab exercise:
implement ppo.gae ...")`; its signature and docstring (with the equations) stay. Names are bare
(`gae`) or qualified (`ppo.gae`); DIR/.lab.json records them. The exercises are the keys of
EXERCISES below: reward.reward_from_logits, ppo.per_token_kl, ppo.kl_penalized_rewards, ppo.gae,
ppo.rloo_advantages, ppo.policy_loss, ppo.value_loss, and ppo.grpo_advantages where ppo.py has it.

`check` runs the lab checks of each recorded function (every exercise when none is recorded) on the
code in DIR and prints one line per function:

    PASS ppo.gae FAIL ppo.rloo_advantages: The baseline of reply i is the mean reward of the *other*
    k - 1 replies ... —
         advantages: at [0] it is -1, the definition gives -2

The checks are the grader's own (lab/checks next to this file), never DIR's: a student may read
them, and checks put into the copy change nothing. Only ppo.py and reward.py are imported from DIR.
The checks compare each function with its definition written out in float64 (Python loops over
random tensors and reply masks that end early), so any correct implementation passes, loops
included, and the usual mistakes fail: GAE without λ or bootstrapping past </s>, an RLOO baseline
that includes the reply itself, a KL of the wrong sign or unclamped, a ratio against the wrong
log-probs, a value loss without its clip. They also differentiate the losses (autograd against the
definition's gradient), require detached statistics, and call each function as training does: in
float32 and bfloat16 with int64, bool and float masks (inputs unchanged, outputs in the inputs'
dtype or float32), on batches of other sizes and replies of up to 30 tokens, ratios far outside the
clip range, non-default eps and clip ranges, and GRPO's per-reply weights as the mask. A failed
check names a cause only when it has recomputed what that mistake gives and the function gives the
same; otherwise it says where the values differ, by how much, and the definition. When every
function passes, `check` runs the training check (training_check below): the tiny preset on a small
made-up data set (`tests/synthetic.py`), twice, in float32 with the same seeds, once with the
student's functions and once with this repository's, and compares the two runs (about 30 s on 2 CPU
cores per algorithm; RLOO when rloo_advantages is an exercise, GRPO when grpo_advantages,
policy_loss or per_token_kl is: GRPO's loss is the one that passes per-reply weights as the mask and
differentiates the KL).

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
import inspect
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
# a student copy: the program's top-level .py files, which the student edits (ppo.py, reward.py)
# and the training check runs (train.py and what it imports); not tests/, lab/ (the grader's checks
# and the key) or docs/
COPIED_FILES = ["*.py"]
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
# fractions, the first minibatch's ratio, and the rollout's score, KL, entropy, length) differ only
# by float32 rounding when the functions are correct, and visibly when a gradient is missing or
# halved (the update moves the policy by another amount). Measured (tests/test_lab.py): correct
# implementations written other ways agree to about 1e-6 relative; a value loss on values.detach()
# moves approx_kl by 0.5 %, a policy loss with its unclipped term detached by 50 %.
FIRST_FIELDS = [
    "score",
    "kl",
    "ratio_first",
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
# |yours - reference| <= FIRST_ATOL + FIRST_RTOL·|reference|
FIRST_RTOL = 5e-4
FIRST_ATOL = 1e-6
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
    """What a student edits and runs (COPIED_FILES: the program's top-level .py files) from src into
    dst; no tests, grader checks, key, docs, caches, runs or venv."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in COPIED_FILES:
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)


def beside_the_repository(out):
    """The path of a directory named like out but beside the repository, as the user would type it
    from where they are: "../my-emprl" from the repository's root."""
    name = out.resolve().name if out.resolve() != ROOT else "my-emprl"
    return os.path.relpath(ROOT.parent / name)


def cmd_new(args):
    out = Path(args.dir)
    # a copy inside the repository would be collected by its tests and copied into later copies
    if out.resolve().is_relative_to(ROOT):
        raise LabError(
            f"{out} is inside the repository ({ROOT}): make the copy beside it, e.g. "
            f"`python lab/lab.py new {beside_the_repository(out)}`"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabError(f"{out} exists and is not empty: give a new directory for the student copy")
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
    message = row["message"]
    error = row["error"]
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


def train(code, data_dir, run, algo, probe=None):
    """train.py of the code in `code` on the made-up data: (log lines, results) or a FAIL reason (a
    string). probe=(exercises, path): the run replays the first calls of those functions on the
    reference's and writes what differs to path (probe_first_calls)."""
    flags = [*RUN_FLAGS, f"--algo={algo}", f"--data_dir={data_dir}", f"--out_dir={run}"]
    cmd = [sys.executable, "train.py", *flags]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("LAB_REPORT", "LAB_CODE", PROBE_ENV):
        env.pop(name, None)
    if probe:
        exercises, path = probe
        cmd = [
            sys.executable,
            "-c",
            PROBE_RUNNER,
            str(Path(__file__).resolve()),
            ",".join(exercises),
        ]
        cmd += flags
        env[PROBE_ENV] = str(path)
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
        a = first[0][key]
        b = first[1][key]
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
        a = yours[1]["emprl"][key]
        b = theirs[1]["emprl"][key]
        if not close(a, b, 0.0, tolerance):
            bad.append(
                f"test {key} of the trained policy: {a:.4g} with your functions, {b:.4g} "
                "with the "
                f"reference's (tolerance ±{tolerance:g}, the spread of PPO seeds)"
            )
    return bad


# What the training check says when a run differs. The run with the student's functions records,
# for each exercise, what its first call in training did (and its first call with an input that
# requires a gradient: GRPO's KL, the losses), replayed on this repository's function with copies of
# the same inputs: the differences found on that call (inputs written in place, dtype, shapes,
# values, gradients) are the causes the FAIL line lists, each confirmed on a call training made.
# Where that replay finds nothing, what differs in the first iteration says where to look
# (FIRST_ITERATION_HINTS). The findings file is named by the environment variable PROBE_ENV.
PROBE_ENV = "LAB_PROBE"
# run in the copy: `python -c PROBE_RUNNER lab.py exercises train.py's flags...`
PROBE_RUNNER = (
    "import importlib.util, os, sys\n"
    "spec = importlib.util.spec_from_file_location('lab_grader_probe', sys.argv.pop(1))\n"
    "lab = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(lab)\n"
    "lab.probe_first_calls(sys.argv.pop(1).split(','), os.environ['LAB_PROBE'])\n"
    "import train\n"
    "train.main(sys.argv[1:])\n"
)
OUTPUT_NAMES = {  # the outputs of an exercise, in order, for the findings' words
    "ppo.gae": ("advantages", "returns"),
    "ppo.policy_loss": ("the loss", "stats"),
    "ppo.value_loss": ("the loss", "stats"),
}
# float32 rounding of another order of operations, with room
PROBE_RTOL = 1e-4
PROBE_ATOL = 1e-5
# In the first iteration both runs sample the same replies from the same model before any update.
# What each logged field is read from tells where a difference starts (measured on planted mistakes:
# an in-place write into the rollout's log-probs moves kl from 0 to 45 and the first ratio from 1
# to 0.07; a value loss on values.detach() or a policy loss with its unclipped term detached move
# only the update's statistics, by 0.1 % to 50 %).
FIRST_ITERATION_HINTS = [
    (
        ("length", "entropy"),
        "in-place writes: length and entropy are read from the reply mask after your functions "
        "ran, from the same replies",
    ),
    (("score",), "the reward: the same replies were scored differently (reward_from_logits)"),
    (
        ("kl", "ratio_first"),
        "in-place writes: kl and the first minibatch's ratio (1 before any update) are read from "
        "the rollout's log-probs after your functions ran",
    ),
    (
        ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "ratio", "explained_var"),
        "the update: the rollout agrees and the losses or their gradients differ (dtype or shapes "
        "of the advantages and returns, a loss computed otherwise, a gradient missing, halved or "
        "detached)",
    ),
]


def output_tensors(exercise, out):
    """[(words, tensor)] of a function's output: a tensor, a tuple of them, or (loss, stats)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [("the output", out)]
    if not isinstance(out, (tuple, list)):
        return []
    names = OUTPUT_NAMES.get(exercise, [f"output {i}" for i in range(len(out))])
    pairs = []
    for name, x in zip(names, out):
        if isinstance(x, torch.Tensor):
            pairs.append((name, x))
        elif isinstance(x, dict):
            pairs += [(f"{name}['{k}']", v) for k, v in x.items() if isinstance(v, torch.Tensor)]
    return pairs


def condition_of(names, args):
    """Words for the inputs of a call: "float32 inputs, an int64 mask, 4 rows of 12 tokens"."""
    import torch

    tensors = [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
    words = []
    floats = [a for n, a in tensors if a.is_floating_point() and n != "mask"]
    if floats:
        words.append(f"{str(floats[0].dtype).replace('torch.', '')} inputs")
    for n, a in tensors:
        if n == "mask":
            dtype = str(a.dtype).replace("torch.", "")
            words.append(f"{'an' if dtype[0] in 'aeiou' else 'a'} {dtype} mask")
            if a.dim() == 2:
                words.append(f"{a.shape[0]} rows of {a.shape[1]} tokens")
    if floats and not any(n == "mask" for n, _ in tensors):
        words.append(f"shape {tuple(floats[0].shape)}")
    return ", ".join(words)


def first_difference(got, want, rtol, atol):
    """Words for where got and want (tensors of one shape) differ most, or None where they agree."""
    import torch

    got = got.detach().double()
    want = want.detach().double()
    allowed = atol * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
    wrong = ~torch.isclose(got, want, rtol=rtol, atol=allowed)
    if not wrong.any():
        return None
    index = tuple(int(i) for i in wrong.nonzero()[0])
    at = f" at [{', '.join(map(str, index))}]" if index else ""
    return f"{at} is {got[index].item():.6g}, the reference's {want[index].item():.6g}"


def replay(exercise, mine, theirs, args, kwargs, before, result):
    """The findings of one call of the student's function `mine` (args, now after the call; before:
    copies of them from before it; result: what it returned) against the reference's `theirs` on
    copies of the same inputs: ["in-place writes: ...", "dtype: ...", "shapes: ...", "values: ...",
    "gradients: ..."]."""
    import torch

    names = list(inspect.signature(theirs).parameters)
    findings = []
    for name, arg, copy in zip(names, args, before):
        if copy is not None and not torch.equal(arg.detach(), copy):
            findings.append(
                f"in-place writes: it changed its argument {name}, which training reads again"
            )

    def fresh():
        """Copies of the inputs from before the call; those that required a gradient are, as in
        training, results of a computation (not leaves), so an in-place write into them is
        allowed as it was there."""
        out = []
        for arg, copy in zip(args, before):
            if copy is None:
                out.append(arg)
            elif arg.requires_grad:
                out.append(copy.clone().requires_grad_(True).clone())
            else:
                out.append(copy.clone())
        return out

    with torch.no_grad():
        want = theirs(*fresh(), **kwargs)
    got_pairs = dict(output_tensors(exercise, result))
    want_pairs = output_tensors(exercise, want)
    for name, w in want_pairs:
        g = got_pairs.get(name)
        if g is None:
            findings.append(f"shapes: it returns no tensor {name}, the reference's does")
        elif g.dtype != w.dtype:
            findings.append(
                f"dtype: {name} in {str(g.dtype).replace('torch.', '')}, the reference's in "
                f"{str(w.dtype).replace('torch.', '')}"
            )
        elif g.shape != w.shape:
            findings.append(
                f"shapes: {name} has shape {tuple(g.shape)}, the reference's {tuple(w.shape)}"
            )
        else:
            where = first_difference(g, w, PROBE_RTOL, PROBE_ATOL)
            if where:
                findings.append(f"values: {name}{where}")
    for i, (name, arg) in enumerate(zip(names, args)):
        if not (isinstance(arg, torch.Tensor) and arg.requires_grad):
            continue
        grads = []
        for function in (mine, theirs):
            inputs = fresh()
            x = before[i].clone().requires_grad_(True)
            inputs[i] = x.clone()  # not a leaf, as in training
            out = output_tensors(exercise, function(*inputs, **kwargs))
            loss = out[0][1].sum() if out else None
            if loss is None or not loss.requires_grad:
                grads.append(None)
                continue
            (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
            grads.append(grad)
        if grads[0] is None and grads[1] is not None:
            findings.append(f"gradients: no gradient reaches {name}, the reference's does")
        elif grads[0] is not None and grads[1] is not None:
            where = first_difference(grads[0], grads[1], PROBE_RTOL, PROBE_ATOL)
            if where:
                findings.append(f"gradients: the gradient with respect to {name}{where}")
    return condition_of(names, args), findings


def probe_first_calls(exercises, path):
    """In a training run of the student's code (PROBE_RUNNER): wrap each exercise function so that
    its first call, and its first call with an input that requires a gradient, are replayed on this
    repository's function (replay); one JSON line per replayed call goes to path. The run itself is
    unchanged: the student's function computes what training uses, on training's own tensors."""

    references = {}
    for exercise in exercises:
        module_name, name = exercise.split(".")
        module = importlib.import_module(module_name)  # the copy's: its folder is the working one
        if module_name not in references:
            references[module_name] = load_module(
                ROOT / f"{module_name}.py", f"lab_reference_{module_name}"
            )
        mine = getattr(module, name)
        theirs = getattr(references[module_name], name)
        setattr(module, name, probed(exercise, mine, theirs, path))


def probed(exercise, mine, theirs, path):
    """mine, with its first call (and first call with a gradient) replayed on theirs."""
    import torch

    seen = set()

    def call(*args, **kwargs):
        kind = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if kind in seen:
            return mine(*args, **kwargs)
        seen.add(kind)
        before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
        condition = condition_of(list(inspect.signature(theirs).parameters), args)
        result = mine(*args, **kwargs)
        try:
            _, findings = replay(exercise, mine, theirs, args, kwargs, before, result)
        except Exception as e:  # the replay must never stop the run
            first = (str(e).strip().splitlines() or [""])[0]
            findings = [f"the replay failed: {type(e).__name__}: {first}"]
        row = {"exercise": exercise, "condition": condition, "findings": findings}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return result

    return call


def probe_report(path):
    """The lines of a failed training check that say what the replay of the first calls found, or
    [] where it found nothing."""
    if not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = []
    for row in rows:
        for finding in row["findings"]:
            lines.append(f"{row['exercise']} ({row['condition']}): {finding}")
    return list(dict.fromkeys(lines))  # a finding of both replays once


def first_iteration_hint(yours, theirs):
    """Where the first iteration's differences start (FIRST_ITERATION_HINTS), or a line saying that
    the first iteration agrees."""
    first = [
        next(r for r in run[0] if r.get("stage") == "ppo" and "score" in r)
        for run in (yours, theirs)
    ]
    differ = {
        key
        for key in FIRST_FIELDS
        if not close(first[0][key], first[1][key], FIRST_RTOL, FIRST_ATOL)
    }
    for fields, hint in FIRST_ITERATION_HINTS:
        if differ & set(fields):
            return (
                f"{', '.join(k for k in FIRST_FIELDS if k in differ)} differ in iteration 1: {hint}"
            )
    return (
        "iteration 1 agrees: the runs part later (a function that differs on some later call only)"
    )


def training_algos(exercises, available):
    """The algorithms the training check trains: PPO always; RLOO when rloo_advantages is an
    exercise (PPO does not call it); GRPO when grpo_advantages, policy_loss or per_token_kl is and
    ppo.py has GRPO: its loss passes per-reply weights as policy_loss's mask and differentiates the
    k3 KL of per_token_kl, which PPO does neither."""
    algos = ["ppo"]
    if "ppo.rloo_advantages" in exercises:
        algos.append("rloo")
    grpo = ("ppo.grpo_advantages", "ppo.policy_loss", "ppo.per_token_kl")
    if "ppo.grpo_advantages" in available and any(e in exercises for e in grpo):
        algos.append("grpo")
    return algos


def training_check(directory, exercises):
    """Train the tiny preset on made-up data twice, in float32 with the same seeds: with the
    student's functions and with this repository's (everything else the student's), and compare
    (compare_runs), for each algorithm of training_algos. Prints one PASS / FAIL line per algorithm;
    a FAIL says what differs, and why where the replay of the first calls confirms it (in-place
    writes, dtype, shapes, values, gradients), else where the first iteration points. True if every
    algorithm passes."""
    algos = training_algos(exercises, available_exercises(ROOT))
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
            probe = tmp / f"probe_{algo}.jsonl"
            yours = train(directory, data_dir, tmp / f"yours_{algo}", algo, (exercises, probe))
            if isinstance(yours, str):  # a reason: the run failed
                print(f"FAIL training check ({algo}): with your code, {yours}")
                for line in probe_report(probe):
                    print(f"     {line}")
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
                    "differently from the reference's:"
                )
                for line in bad:
                    print(f"     {line}")
                found = probe_report(probe)
                if found:
                    print(
                        "  why: on the first calls training made, replayed on the reference's "
                        "functions with the same inputs:"
                    )
                    for line in found:
                        print(f"     {line}")
                else:
                    print(
                        "  why: on the first calls training made your functions agree with the "
                        "reference's (inputs kept, dtype, shapes, values, gradients); "
                        f"{first_iteration_hint(yours, theirs)}"
                    )
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
