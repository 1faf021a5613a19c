"""check-run's rule and command: a finished run of the base preset against the records in docs/runs.

lab.py loads this module by its path and re-exports its names (lab.bands, lab.failed_checks, ...):
`python lab/lab.py check-run RUN_DIR` and `python lab/lab.py bands` run the commands below. What the
rule is, and why, is in lab.py's docstring (check-run) and in bands() below.
"""

import json
import math
import re
import statistics
from pathlib import Path


class LabError(Exception):
    """A missing or damaged file, or a mistake on the command line: one line on stderr, exit status
    `code`, no traceback. lab.py, which loads this module, sets LabError here to its own class, so
    that one type reaches its main."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


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
