"""The docs' numbers, filled in from their sources: people write the sentences, this writes the
numbers and the tables. A number from a record (docs/runs/NAME: results.json, identifiers.json,
log.jsonl; docs/runs/index.json says what each is), a benchmark output (docs/bench) or the config
sits in README.md, docs/*.md or lab/*.md between two markers that a rendered page does not show:

    EmpRL − SFT is <!--=ci(seeds("cpu"),"diff.emp_f1")-->+3.23 [+2.95, +3.50]<!--/--> over ...

The first marker holds a Python expression over NAMES below, the text up to `<!--/-->` what it
gives (for a table, the markers stand on lines of their own). `write` fills every marker; `check`
and tests/test_docs.py fail on a text that differs: a number edited by hand, or a record changed.

    python benchmarks/records.py write                          # fill every marker from its source
    python benchmarks/records.py check                          # exit 1, naming the stale markers
    python benchmarks/records.py save runs/cpu docs/runs/cpu    # keep a finished run's record

Over the PPO seeds of one pipeline a number is a mean with a 95 % Student-t interval (PPO's training
noise); a row against PPO, a difference of means with Welch's standard error and min(n) − 1 degrees
of freedom; a single record's bracket, its paired bootstrap over the test contexts (evaluation
noise).
"""

import argparse
import ast
import json
import math
import re
import statistics
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "docs" / "runs"
BENCH = ROOT / "docs" / "bench"
FILES = ("results.json", "identifiers.json", "log.jsonl")
PATH_FIELDS = ("out_dir", "data_dir", "from_run")
DOCS = ["README.md", "docs/*.md", "lab/*.md"]
docs = lambda: sorted({p for pattern in DOCS for p in ROOT.glob(pattern)})  # the files with markers
MARKER = re.compile(r"<!--=(.*?)-->(.*?)<!--/-->", re.S)
MINUS = "−"


@cache
def index():
    return json.loads((RUNS / "index.json").read_text())["records"]


@cache
def results(name):
    return json.loads((RUNS / name / "results.json").read_text())


@cache
def log(name):
    """The record's log lines (a line cut short by a kill is skipped)."""
    out = []
    for line in (RUNS / name / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def clear():
    for f in (index, results, log, tree):
        f.cache_clear()


def seeds(pipeline, variant="ppo"):
    """The records of one pipeline and variant, by PPO seed."""
    found = [(r["ppo_seed"], n) for n, r in index().items() if r["pipeline"] == pipeline]
    return [n for _, n in sorted(found) if index()[n]["variant"] == variant]


def pipelines(code=None):
    """One ppo record per pipeline (its lowest PPO seed), of one code version or of all."""
    out = {}
    for n, r in sorted(index().items(), key=lambda kv: -kv[1]["ppo_seed"]):
        if r["variant"] == "ppo" and code in (None, r["code"]):
            out[r["pipeline"]] = n
    return sorted(out.values(), key=lambda n: (index()[n]["code"] != "current", n))


def v(name, path):
    """A number of results.json by dotted path ("emprl.emp_f1"); "diff.KEY" is emprl − sft; "kl"
    the summed KL to the SFT model over check-run's last PPO iterations."""
    if path.startswith("diff."):
        return v(name, "emprl." + path[5:]) - v(name, "sft." + path[5:])
    if path == "kl":
        return statistics.mean(series(name, "kl")[-int(code_value("lab/bands", "KL_LAST")) :])
    x = results(name)
    for part in path.split("."):
        x = x[part]
    return x


def series(name, field):
    """A field of every PPO iteration's log line, in order (a resumed run logs some twice)."""
    its = {r["step"]: r for r in log(name) if r.get("stage") == "ppo" and field in r}
    return [its[k][field] for k in sorted(its)]


def share(name, mechanism, level=0):
    """The share of ED's human training replies that the record's identifiers give a level."""
    line = next(r for r in log(name) if r.get("stage") == "labels" and r.get("split") == "train")
    return line["counts"][mechanism][level] / sum(line["counts"][mechanism])


def minutes(name, *stages):
    """Minutes the record's stages took (all by default), from results.json time_s."""
    t = results(name)["time_s"]
    return round(sum(t[s] for s in stages or t) / 60)


def load(name):
    """The 1-minute load average over the stages' starts and ends: "0.4 to 2.1"."""
    loads = [x for r in log(name) if r.get("stage") == "timing" for x in r["load_1min"]]
    return f"{min(loads):.1f} to {max(loads):.1f}"


# ------------------------------------------------------------------------------------- statistics

# t(0.975, df), the 95 % two-sided Student-t quantile (scipy.stats.t.ppf, 6 places): a table, so
# that every machine writes the same text
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912}
T975.update({7: 2.364624, 8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813})


class Interval:
    """A mean with its 95 % interval, shown "+3.23 [+2.95, +3.50]" (the mean alone without one)."""

    def __init__(self, mean, half, signed=True, d=2, alone=" (one seed)", note=""):
        self.mean = mean
        self.alone = alone  # what the mean alone is followed by
        self.note = note  # what the interval is followed by
        self.lo = mean - half
        self.hi = mean + half
        self.signed = signed
        self.d = d

    def __str__(self):
        f = sg if self.signed else num
        if math.isnan(self.lo):
            return f(self.mean, self.d) + self.alone
        return f"{f(self.mean, self.d)} [{f(self.lo, self.d)}, {f(self.hi, self.d)}]{self.note}"


def ci(names, path, d=2):
    """Mean and 95 % t interval of a number over records (the PPO seeds of one pipeline)."""
    x = [v(n, path) for n in names]
    half = T975[len(x) - 1] * statistics.stdev(x) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return Interval(statistics.mean(x), half, path.startswith("diff"), d)


def welch(a, b, path):
    """The mean over records a minus the mean over records b, with its 95 % t interval; "not
    resolved" when the interval holds 0 or either side has fewer than 3 seeds."""
    x = [v(n, path) for n in a]
    y = [v(n, path) for n in b]
    d = statistics.mean(x) - statistics.mean(y)
    n = min(len(x), len(y))
    if n < 2:
        return Interval(d, math.nan, alone=" (one seed: not resolved)", note=", not resolved")
    se = math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y))
    half = T975[n - 1] * se
    resolved = n >= 3 and not d - half <= 0 <= d + half
    return Interval(d, half, note="" if resolved else ", not resolved")


def span(names, path):
    """The lowest to the highest value over records: "+2.86 to +3.72"."""
    f = sg if path.startswith("diff") else num
    x = [v(n, path) for n in names]
    return f"{f(min(x))} to {f(max(x))}"


def num(x, d=2):
    s = f"{x:,.{d}f}" if abs(x) >= 10000 else f"{x:.{d}f}"
    return MINUS + s[1:] if s.startswith("-") and float(s.replace(",", "")) != 0 else s.lstrip("-")


def sg(x, d=2):
    """Signed: +2.64, −0.41."""
    s = num(x, d)
    return s if s.startswith(MINUS) else "+" + s


pct = lambda x: f"{100 * x:.0f} %"  # a share: 65 %
lvl = lambda x: f"{x:.3f}".lstrip("0")  # a score in [0, 1] without its leading 0: .723


def literal(x):
    """A number as code writes it, for prose: 10.0 -> "10", 3e-05 -> "3e-5"."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return re.sub(r"e-0*", "e-", str(x))


@cache
def tree(path):
    return ast.parse((ROOT / path).read_text())


def evaluate(node):
    """A literal of the source, `dict(key=literal, ...)` included."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict":
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    return ast.literal_eval(node)


def assigned(module, name):
    """The value node of `NAME = ...` at any depth of a module's source."""
    nodes = [n for n in ast.walk(tree(module + ".py")) if isinstance(n, ast.Assign)]
    return next(n.value for n in nodes if getattr(n.targets[0], "id", "") == name)


def cfg(field, preset=None):
    """A field of train.py's Config as a preset sets it, as written there: 0.5, 3e-5, 10000."""
    presets = assigned("train", "PRESETS")
    chosen = dict(zip([k.value for k in presets.keys], presets.values)).get(preset)
    found = evaluate(chosen) if chosen else {}
    return literal(found[field]) if field in found else const("train", "Config." + field)


def code_value(module, name):
    """From a module's source: a constant "NAME", a field "Class.field", a default "func.arg"."""
    owner, _, attr = name.rpartition(".")
    if not owner:
        return evaluate(assigned(module, attr))
    for node in ast.walk(tree(module + ".py")):
        if isinstance(node, ast.ClassDef) and node.name == owner:
            fields = [i for i in node.body if isinstance(i, ast.AnnAssign)]
            return evaluate(next(i.value for i in fields if i.target.id == attr))
        if isinstance(node, ast.FunctionDef) and node.name == owner:
            a = node.args
            params = a.args[len(a.args) - len(a.defaults) :] + a.kwonlyargs
            return evaluate(dict(zip([p.arg for p in params], a.defaults + a.kw_defaults))[attr])
    raise KeyError(f"{module}.py has no {name}")


def const(module, name):
    """code_value() as literal() writes it."""
    return literal(code_value(module, name))


def bench(file, pattern, every=False):
    """A number of a benchmark output in docs/bench (or of a generated block of a docs page, as
    "../bands.md"), found by a regular expression: the first match, or with `every` the range of
    all matches ("5.3-11.0")."""
    found = re.findall(pattern, (BENCH / file).read_text())
    if not found:
        raise KeyError(f"docs/bench/{file}: nothing matches {pattern!r}")
    low, high = (min(found, key=float), max(found, key=float)) if every else (found[0], found[0])
    return low if low == high else f"{low}-{high}"


def times(name):
    """A measurement of docs/bench/times.txt: its seconds (range over its lines) and load."""
    rows = [line.split(" | ") for line in (BENCH / "times.txt").read_text().splitlines()]
    rows = [r for r in rows if r[0] == name]
    if not rows:
        return "not measured yet"
    s = sorted(round(float(r[1])) for r in rows)
    loads = [float(x) for r in rows for x in r[2].split(" -> ")]
    took = f"{s[0]} s" if s[0] == s[-1] else f"{s[0]}-{s[-1]} s"
    return f"{took} (load {min(loads):.1f}-{max(loads):.1f})"


def lines(*files):
    """`wc -l` of files of the repository, summed; of every Python file at its top by default."""
    files = files or sorted(p.name for p in ROOT.glob("*.py"))
    return f"{sum(len((ROOT / f).read_text().splitlines()) for f in files):,}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(out + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def boot(name, key):
    """A record's EmpRL − SFT with its paired-bootstrap 95 % interval over the test contexts."""
    d = results(name)["difference"][key]
    return f"{sg(d['mean'])} [{sg(d['ci95'][0])}, {sg(d['ci95'][1])}]"


def code_map():
    """Each Python file at the top, with its docstring's first sentence and its `wc -l`."""
    rows = []
    for f in sorted(p.name for p in ROOT.glob("*.py")):
        doc = " ".join((ast.get_docstring(tree(f)) or "").split("\n\n")[0].split())
        rows.append(
            [f"`{f}`", doc.split(". ")[0].split(";")[0].rstrip(".").replace("|", "/"), lines(f)]
        )
    return table(["file", "what it holds (its docstring)", "lines"], rows)


def headline(pipeline):
    """SFT, EmpRL and EmpRL − SFT over the PPO seeds of a pipeline, in 8 columns."""
    group = seeds(pipeline)
    keys = ["emp_f1", "emp_f1_judge", "reward", "bleu_1", "length", "unique_frac", "ppl"]
    d = [3 if k == "reward" else 2 for k in keys]
    rows = [["SFT"] + [num(v(group[0], "sft." + k), i) for k, i in zip(keys, d)]]
    rows.append([f"EmpRL (mean of {len(group)} seeds)"])
    rows[1] += [num(ci(group, "emprl." + k).mean, i) for k, i in zip(keys, d)]
    rows.append(["EmpRL − SFT [95 % t]"] + [ci(group, "diff." + k, i) for k, i in zip(keys, d)])
    head = ["", "Emp-F1", "by the judge", "reward", "BLEU-1", "words", "distinct replies", "PPL"]
    return table(head, rows)


def seeds_table(pipeline, variants=("ppo",)):
    """One row per record of a pipeline's variants; for one variant, then their mean [t]."""
    group = [n for var in variants for n in seeds(pipeline, var)]
    rows = [
        [n, index()[n]["variant"], index()[n]["ppo_seed"], num(v(n, "emprl.emp_f1"))]
        + [boot(n, "emp_f1"), boot(n, "emp_f1_judge"), num(v(n, "emprl.ppl")), num(v(n, "kl"))]
        for n in group
    ]
    keys = ["emprl.emp_f1", "diff.emp_f1", "diff.emp_f1_judge", "emprl.ppl", "kl"]
    if len(variants) == 1:
        rows.append([f"mean [95 % t], n = {len(group)}", "", ""] + [ci(group, k) for k in keys])
    head = ["record", "row", "PPO seed", "EmpRL Emp-F1", "EmpRL − SFT [bootstrap]"]
    return table(head + ["judge: EmpRL − SFT [bootstrap]", "EmpRL PPL", "summed KL"], rows)


def pipelines_table():
    """One row per pipeline (its lowest PPO seed): what made it, its identifiers, its gains."""
    rows = []
    for n in pipelines():
        r = index()[n]
        code = r["commit"] if r["code"] == "current" else "earlier code"
        f1 = " / ".join(lvl(results(n)["identifiers"][m]["macro_f1"]) for m in ("er", "ip", "ex"))
        levels = [num(v(n, f"{m}.emp_f1")) for m in ("majority", "sft", "emprl")]
        rows.append([n, code, f"{r['dtype']}, {r['threads']}", f1, *levels, boot(n, "emp_f1")])
        rows[-1].append(boot(n, "emp_f1_judge"))
    head = ["record", "code", "dtype, threads", "identifiers' macro-F1 ER / IP / EX", "majority"]
    return table(head + ["SFT", "EmpRL", "EmpRL − SFT", "judge: EmpRL − SFT"], rows)


def ablation_rows(groups):
    """Each variant (groups: variant -> its records) over its seeds, and minus the "ppo" seeds."""
    rows = []
    for var, group in sorted(groups.items(), key=lambda kv: (kv[0] != "ppo", kv[0])):
        vs = ["", ""]
        if var != "ppo" and "ppo" in groups:
            vs = [welch(group, groups["ppo"], k) for k in ("diff.emp_f1", "diff.emp_f1_judge")]
        rows.append(
            [var, len(group), ci(group, "diff.emp_f1"), vs[0], ci(group, "diff.emp_f1_judge")]
            + [vs[1], num(ci(group, "emprl.ppl").mean, 1), num(ci(group, "kl").mean)]
        )
    head = ["row", "seeds", "EmpRL − SFT", "row − PPO", "judge: EmpRL − SFT", "row − PPO"]
    return table(head + ["PPL", "summed KL"], rows)


def ablations():
    """The ablation table of every pipeline with rows of the current code, from index.json."""
    current = {
        r["pipeline"] for r in index().values() if r["variant"] != "ppo" and r["code"] == "current"
    }
    out = []
    for p in sorted(current):
        variants = {r["variant"] for r in index().values() if r["pipeline"] == p}
        out.append(f"Pipeline `{p}`:\n\n" + ablation_rows({x: seeds(p, x) for x in variants}))
        out.append(
            f"Every record of `{p}`:\n\n"
            + seeds_table(p, sorted(variants, key=lambda x: (x != "ppo", x)))
        )
    return "\n\n".join(out) or "*No ablation row of the current code is recorded yet.*"


def stage_times(*names):
    """Minutes per stage of whole-pipeline records, with their dtype, threads and load."""
    stages = list(results(names[0])["time_s"])
    rows = []
    for n in names:
        rows.append(
            [n, index()[n]["dtype"], index()[n]["threads"], *[minutes(n, s) for s in stages]]
        )
        rows[-1] += [minutes(n), num(statistics.median(series(n, "seconds"))), load(n)]
    return table(["record", "dtype", "threads", *stages, "all", "s / PPO iteration", "load"], rows)


def presets_table(*fields):
    """Config fields as each preset of train.py sets them, beside Config's defaults."""
    rows = [[f"`{f}`", *[cfg(f, p) for p in [None, "gpu", "small", "cpu", "tiny"]]] for f in fields]
    return table(["field", "`Config`", "`gpu`", "`small`", "`cpu`", "`tiny`"], rows)


def identifiers_table(name):
    """The record's identifiers and judge on EPITOME's test split."""
    ids = results(name)["identifiers"]
    rows = [
        [m.upper()]
        + [lvl(ids[m][k]) for k in ("acc", "macro_f1", "weighted_f1")]
        + [lvl(ids[m]["judge"]["macro_f1"]), lvl(ids[m]["majority"]["macro_f1"])]
        for m in ("er", "ip", "ex")
    ]
    head = ["mechanism", "accuracy", "macro-F1", "weighted-F1", "judge macro-F1"]
    return table(head + ["majority macro-F1"], rows)


def sample(name, i=0):
    """A test dialogue of the record's `samples` with the human, SFT and EmpRL replies."""
    s = results(name)["samples"][i]
    turns = re.sub(r" (speaker|listener): ", r"<br>*\1:* ", " " + s["context"])[4:]
    rows = [["context", turns], ["human reply", s["reference"]], ["SFT", s["sft"]]]
    return table(["", "text"], rows + [["EmpRL", s["emprl"]]])


def held_out(rule, what="flagged"):
    """The held-out test of check-run's rule of commit `rule`: the records held out for it
    (index.json held_out_for) and what it flagged them on (held_out_flags, measured with that rule
    when they arrived). what: "n", "flagged" or "names"."""
    flags = {n: r["held_out_flags"] for n, r in index().items() if r.get("held_out_for") == rule}
    flagged = [n for n in flags if flags[n]]
    return {"n": len(flags), "flagged": len(flagged), "names": ", ".join(flagged) or "none"}[what]


# ---------------------------------------------------------------------------------------- markers

NAMES = {  # what a marker's expression may call
    name: globals()[name]
    for name in """seeds pipelines v series share minutes load ci welch
span num sg pct lvl literal cfg code_value const bench times lines boot code_map headline
seeds_table pipelines_table ablations stage_times presets_table identifiers_table sample
held_out index results log""".split()
}
NAMES.update(len=len, min=min, max=max, round=round, int=int, float=float, mean=statistics.mean)


def render(expr):
    """What a marker's expression gives: the text between its markers."""
    try:
        value = eval(expr, {"__builtins__": {}, **NAMES})
    except Exception as e:
        raise ValueError(f"<!--={expr}-->: {type(e).__name__}: {e}") from e
    text = num(value) if isinstance(value, float) else str(value)
    return "\n" + text.strip("\n") + "\n" if "\n" in text else text


def stale(text):
    """[(expression, its text, what it gives now)] of the markers of a text that are not current."""
    out = []
    for m in MARKER.finditer(text):
        try:
            want = render(m[1])
        except ValueError as e:
            want = f"error {e}"
        if m[2] != want:
            out.append((m[1], m[2], want))
    return out


def write_all():
    """Fill every marker of the docs; one whose expression fails keeps its text (and exit 1)."""
    errors = []

    def fill(m):
        try:
            return f"<!--={m[1]}-->{render(m[1])}<!--/-->"
        except ValueError as e:
            errors.append(str(e))
            return m[0]

    for path in docs():
        text = path.read_text()
        new = MARKER.sub(fill, text)
        if new != text:  # only the files that change: others may be editing theirs
            path.write_text(new)
    print("\n".join(errors) or "every marker written")
    return not errors


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["write", "check", "save"])
    p.add_argument("paths", nargs="*", help="save: the run directory and the record directory")
    args = p.parse_args()
    if args.command == "write":
        sys.exit(0 if write_all() else 1)
    elif args.command == "check":
        bad = [(path, s) for path in docs() for s in stale(path.read_text())]
        for path, (expr, found, want) in bad:
            print(f"{path.relative_to(ROOT)}: <!--={expr}--> shows {found!r}, its source {want!r}")
        sys.exit(1 if bad else 0)
    run, record = map(Path, args.paths)
    if not all((run / f).exists() for f in FILES):
        sys.exit(f"error: {run} is not a finished run: it lacks one of {', '.join(FILES)}")
    record.mkdir(parents=True, exist_ok=True)
    # the run section's paths are kept as their last part: where things lay on one machine
    cut = re.compile(rf'"({"|".join(PATH_FIELDS)})": "(?:[^"]*/)?([^"/]+)/?"')
    for f in FILES:
        (record / f).write_text(cut.sub(r'"\1": "\2"', (run / f).read_text()))
    print(f"{run} -> {record}: {', '.join(FILES)}; now add it to docs/runs/index.json")


if __name__ == "__main__":
    main()
