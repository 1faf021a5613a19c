"""check-run's rule and command: a finished run of the base preset against the records in docs/runs.

    python lab/lab.py check-run RUN_DIR             # the verdict, and what is out of range
    python lab/lab.py check-run RUN_DIR --details   # every band and where it comes from
    python lab/lab.py bands                         # the bands (--write=lab/tolerances.json)
    python lab/bands.py simulate                    # the rule's false-alarm rate, simulated

lab.py loads this module by its path and re-exports its names (lab.bands, lab.failed_checks, ...).
docs/runs/index.json says what each record is: its pipeline, its variant, and whether it is one of
the correct runs the bands are made from. docs/bands.md derives the rule for an instructor.

The model. A graded metric of a correct run of pipeline i and PPO seed j is

    y_ij = mu + a_i + e_ij,    a_i ~ N(0, sp^2),    e_ij ~ N(0, ss^2),

where a pipeline is one SFT model with its identifiers (one --seed, dtype, thread count and
machine), and a seed is one PPO run from it (--ppo_seed, with --from_run). A metric of the SFT model
alone (SFT's perplexity) has no seed term: the seeds of one pipeline share it.

The bands. The correct records are P pipelines with n_i seeds each (summary()):

    centre = the mean over the pipelines of each pipeline's seed mean;
    S2     = the variance (P - 1) of those pipeline means, E[S2] = sp^2 + h ss^2, h = mean of 1/n_i;
    W      = the pooled variance of the seeds around their pipeline's mean, sum(n_i - 1) dof.

A run of a new pipeline (new_pipeline_band()): y - centre has variance sp^2 + ss^2 + (sp^2 + h
ss^2) / P, estimated without bias by V = (1 + 1/P) S2 + (1 - h) W, with Satterthwaite's degrees of
freedom. A new PPO seed of a recorded pipeline (new_seed_band(); the run's SFT results equal that
pipeline's records'): centre = the mean of its n seeds, V = W (1 + 1/n), sum(n_i - 1) dof; the
metrics of the SFT model alone are the pipeline's own and not graded. Each band is centre +- k
sqrt(V), k = t(1 - a/2, dof), a = ALPHA / the number of graded metrics (Bonferroni): a correct run
is flagged on some metric with probability at most ALPHA. simulate() checks this by drawing records
and new runs from the model fitted to the records (tests/test_check_run.py).
"""

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
# docs/runs/index.json: what each record is (read_index())
INDEX = "index.json"
# the page that derives the rule, and the markers of the blocks that `python lab/bands.py records
# --write` and `python lab/bands.py simulate --write` put in it
DOC = ROOT / "docs" / "bands.md"
BLOCKS = {
    command: (
        f"<!-- {command}: python lab/bands.py {command} --write -->",
        f"<!-- end of {command} -->",
    )
    for command in ("records", "simulate")
}


class LabError(Exception):
    """A missing or damaged file, or a mistake on the command line: one line on stderr, exit status
    `code`, no traceback. lab.py, which loads this module, sets LabError here to its own class, so
    that one type reaches its main."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# config fields that say where and how a run ran, not what it computes; and the fields a correct
# reproduction may differ in (its seeds and its dtype: the other pipelines and the PPO seeds differ
# in them)
PLUMBING = {"out_dir", "data_dir", "from_run", "device", "max_nonfinite"}
PIPELINE = {"seed", "ppo_seed", "dtype"}
# the chance that a correct run is flagged on some metric: the false-alarm rate per run, split
# evenly over the graded metrics (alpha_per_metric())
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


# ------------------------------------------------------------------------------------- the records


def read_index(records_dir):
    """records_dir/index.json, or the repository's docs/runs/index.json where records_dir has none
    (a folder holding some of the repository's records): {"base": the base run's record,
    "records": {name: entry}, ...}. An entry says the record's pipeline, variant ("ppo" for the
    method as configured), PPO seed, code version, dtype and threads, and may say in_bands (see
    in_bands())."""
    path = Path(records_dir) / INDEX
    if not path.exists():
        path = ROOT / "docs" / "runs" / INDEX
    index = read_json(path, "what each record is")
    if not (
        isinstance(index, dict)
        and isinstance(index.get("records"), dict)
        and index.get("base") in index["records"]
    ):
        raise LabError(f"{path}: not an index of the records (base, and records naming it)")
    return index


def read_records(records_dir):
    """{name: run} of the records that records_dir's index lists and that have a results.json, in
    the index's order. Each run (read_run()) also carries "name", its entry of the index ("index")
    and whether it is the base run's record ("is_base"). A record folder the index does not list
    takes no part (a test checks that docs/runs has none)."""
    records_dir = Path(records_dir)
    index = read_index(records_dir)
    base = index["base"]
    if not (records_dir / base / "results.json").exists():
        raise LabError(f"{records_dir}: no record {base}/results.json (the base run's record)")
    return {
        name: dict(read_run(records_dir / name), name=name, index=entry, is_base=name == base)
        for name, entry in index["records"].items()
        if (records_dir / name / "results.json").exists()
    }


def base_name(records):
    """The base run's record: the one whose config a reproduction must have."""
    return next(name for name, run in records.items() if run["is_base"])


def pipeline_of(records, name):
    """The pipeline of a record (index.json): the records of one pipeline share its SFT model and
    identifiers."""
    return records[name]["index"]["pipeline"]


def in_bands(entry):
    """Whether a record is a correct run of the method that the bands are made from: its index
    entry's in_bands, or by default whether it runs the method as configured ("ppo") in the current
    code."""
    return entry.get("in_bands", entry.get("variant") == "ppo" and entry.get("code") == "current")


def correct_names(records, leave_out=()):
    """The correct records (in_bands()) but those in leave_out: the base run's pipeline first, by
    PPO seed; then the other pipelines, those of another --seed by seed, then those of the base's
    --seed (another dtype or thread count) by name."""
    base = records[base_name(records)]

    def order(name):
        seed = records[name]["config"].get("seed")
        return (
            pipeline_of(records, name) != base["index"]["pipeline"],
            seed == base["config"].get("seed"),
            seed if is_number(seed) else 0,
            pipeline_of(records, name),
            records[name]["index"].get("ppo_seed", 0),
        )

    names = [n for n, r in records.items() if in_bands(r["index"]) and n not in leave_out]
    return sorted(names, key=order)


def groups(records, names):
    """{pipeline: [names]} of the records named, in their order. The records of one pipeline must
    be one SFT model (equal SFT results), and those of one variant in it one config but for the PPO
    seed."""
    out = {}
    for name in names:
        out.setdefault(pipeline_of(records, name), []).append(name)
    for pipeline, members in out.items():
        first = {}
        for name in members:
            variant = records[name]["index"].get("variant")
            like = first.setdefault(variant, name)
            differ = config_differences(
                records[name]["config"], records[like]["config"], PLUMBING | {"ppo_seed"}
            )
            if differ:
                raise LabError(
                    f"record {name} is listed as a PPO seed of the pipeline {pipeline} "
                    f"but its config differs from {like}'s in {sorted(differ)}"
                )
            if records[name]["results"].get("sft") != records[members[0]]["results"].get("sft"):
                raise LabError(
                    f"record {name} is listed in the pipeline {pipeline} but its SFT results "
                    f"differ from {members[0]}'s: not one SFT model"
                )
    return out


def seed_names(records):
    """The base run's pipeline among the correct records: its PPO seeds, in order."""
    base = pipeline_of(records, base_name(records))
    return groups(records, correct_names(records)).get(base, [])


def other_pipelines(records):
    """The correct records of the other pipelines (another SFT model and identifiers)."""
    base = pipeline_of(records, base_name(records))
    return [n for n in correct_names(records) if pipeline_of(records, n) != base]


def of_sft_alone(key):
    """Whether a metric is a number of the SFT model alone (no EmpRL number, no PPO log): the PPO
    seeds of one pipeline share it."""
    return not key.startswith("log:") and "emprl." not in key


# ------------------------------------------------------------------------------------- Student's t


def incomplete_beta(z, a, b):
    """The regularised incomplete beta function I_z(a, b), 0 <= z <= 1, by its continued fraction
    (modified Lentz; Numerical Recipes, section 6.4)."""
    if z <= 0.0:
        return 0.0
    if z >= 1.0:
        return 1.0
    if z > (a + 1) / (a + b + 2):  # where the fraction converges fast
        return 1.0 - incomplete_beta(1.0 - z, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(z) + b * math.log1p(-z)) / a
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * z / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * z / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * z / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def t_within(x, dof):
    """P(|T| < x), x >= 0, for Student's t with dof degrees of freedom (any dof > 0, not only whole
    numbers: Satterthwaite's are not): 1 - I_{dof / (dof + x^2)}(dof / 2, 1 / 2)."""
    return 1.0 - incomplete_beta(dof / (dof + x * x), dof / 2, 0.5)


def t_quantile(within, dof):
    """x with P(|T| < x) = within, by bisection."""
    low, high = 0.0, 1.0
    while t_within(high, dof) < within:
        low, high = high, 2 * high
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (middle, high) if t_within(middle, dof) < within else (low, middle)
    return (low + high) / 2


def alpha_per_metric(graded=None):
    """The false-alarm rate of one band: ALPHA / the number of graded metrics (all of METRICS by
    default)."""
    return ALPHA / len(METRICS if graded is None else graded)


# ---------------------------------------------------------------------------------------- the rule


def summary(values):
    """The statistics the bands are made of, from values: one list per pipeline of its runs' values
    (numbers, or tensors of simulated draws: the arithmetic is the same). pipelines: P; sizes: the
    n_i; centre: the mean of the pipeline means; between: their variance (P - 1); within: the pooled
    variance of the runs around their pipeline's mean, within_dof = sum(n_i - 1) (None when no
    pipeline has two runs); h: the mean of 1/n_i."""
    count = len(values)
    sizes = [len(runs) for runs in values]
    means = [sum(runs) / len(runs) for runs in values]
    centre = sum(means) / count
    within_dof = sum(n - 1 for n in sizes)
    squares = sum(sum((v - m) ** 2 for v in runs) for runs, m in zip(values, means))
    return dict(
        pipelines=count,
        sizes=sizes,
        centre=centre,
        between=sum((m - centre) ** 2 for m in means) / (count - 1) if count > 1 else None,
        within=squares / within_dof if within_dof else None,
        within_dof=within_dof,
        h=sum(1 / n for n in sizes) / count,
    )


def satterthwaite_dof(a, b, sizes, ratio):
    """Satterthwaite's degrees of freedom of V = a between + b within when sp^2 / ss^2 = ratio, for
    pipelines of sizes seeds: 2 E[V]^2 / Var(V), the two terms independent. between is the variance
    of P pipeline means of variances v_i = ratio + 1/n_i (in units of ss^2), a quadratic form with

        E = sum v_i / P,    dof_between = (P - 1)^2 E^2 / ((1 - 2/P) sum v_i^2 + (sum v_i)^2 / P^2),

    P - 1 when the v_i are equal and fewer when they differ; within has sum(n_i - 1)."""
    count = len(sizes)
    v = [ratio + 1 / n for n in sizes]
    mean = sum(v) / count
    dof_between = (count - 1) ** 2 * mean**2 / ((1 - 2 / count) * sum(x**2 for x in v) + mean**2)
    parts = (a * mean) ** 2 / dof_between
    if b > 0:
        parts += b**2 / sum(n - 1 for n in sizes)
    return (a * mean + b) ** 2 / parts


# the ratios sp^2 / ss^2 over which least_dof() looks for the fewest degrees of freedom: 0 and
# 1e-4 .. 1e4 (four a decade)
RATIOS = [0.0] + [10 ** (e / 4) for e in range(-16, 17)]


def least_dof(a, b, sizes):
    """The degrees of freedom of a new pipeline's band: the fewest Satterthwaite gives V over the
    ratios sp^2 / ss^2 (RATIOS) and their limit P - 1 as the ratio grows (between alone, its means
    of equal variance). They depend on the design alone, not on an estimate of the ratio: a band
    with the fewest is at least as wide as the one for the true ratio. For the records' designs the
    fewest is the limit P - 1 (a test checks)."""
    fewest = min([len(sizes) - 1] + [satterthwaite_dof(a, b, sizes, r) for r in RATIOS])
    return round(fewest, 9)  # P - 1, not P - 1 less a rounding error


def new_pipeline_band(spread, centre):
    """(centre, variance, dof) for one run of a new pipeline. spread: summary() of the correct
    pipelines; centre: summary() of the pipelines whose mean is the centre (the same, or the records
    of a variant). Under the model, with P, h the centre's and P', h' the spread's:

        Var(y - centre) = sp^2 (1 + 1/P) + ss^2 (1 + h/P),    E[between] = sp^2 + h' ss^2,

    so V = (1 + 1/P) between + b within, b = 1 + h/P - h' (1 + 1/P), which is 1 - h when the centre
    is the spread's pipelines. A negative b is set to 0: V then overstates the variance (a wider
    band). dof: least_dof()."""
    a = 1 + 1 / centre["pipelines"]
    b = max(0.0, 1 + centre["h"] / centre["pipelines"] - spread["h"] * a)
    variance = a * spread["between"]
    if b > 0:
        variance = variance + b * spread["within"]
    return centre["centre"], variance, least_dof(a, b, spread["sizes"])


def new_seed_band(runs, spread):
    """(centre, variance, dof) for one new PPO seed of a recorded pipeline: the centre is the mean
    of its n recorded seeds (runs), Var(y - centre) = ss^2 (1 + 1/n), ss^2 estimated by the spread's
    within (sum(n_i - 1) dof). The pipeline's own offset a_i is in both y and the centre."""
    return sum(runs) / len(runs), spread["within"] * (1 + 1 / len(runs)), spread["within_dof"]


def grouped_values(records, pipelines, key):
    """The values of metric key of the records of pipelines (groups()), one list per pipeline."""
    return [[metric(records[n], key) for n in names] for names in pipelines.values()]


def bands(records, leave_out=(), centre_names=None, seed_of=None):
    """{metric: band} from the records (read_records()), the rule in one place. The spread comes
    from the correct records (correct_names()) but leave_out, grouped by pipeline.

    seed_of=None: the bands of one run of a new pipeline (new_pipeline_band()), the centre over the
    correct records' pipelines or over centre_names' (the records of a variant); every metric of
    METRICS graded.
    seed_of=PIPELINE: the bands of a new PPO seed of that recorded pipeline (new_seed_band()), the
    centre over its correct records or over those of centre_names in it; the metrics of the SFT
    model alone (of_sft_alone()) are the pipeline's own and not graded. (Not the narrower of this
    band and a new pipeline's, though each alone is right for such a run: the narrower is more
    often the one whose variance came out low by chance, which raises the false-alarm rate.)

    half-width = k sqrt(V), k = t(1 - a/2, dof), a = ALPHA / the number of graded metrics. A band is
    a dict: centre, sd (sqrt(V)), dof, k, half_width, low, high, alpha, the record names it came
    from (centre_from, spread_from), n_centre (the centre's pipelines, or seeds for a new seed),
    n_spread (the spread's pipelines) and seed_of."""
    correct = correct_names(records, leave_out)
    spread_groups = groups(records, correct)
    centre_names = [n for n in (centre_names or correct) if n not in leave_out]
    if seed_of is not None:
        centre_names = [n for n in centre_names if pipeline_of(records, n) == seed_of]
    centre_groups = groups(records, centre_names)
    keys = [key for key in METRICS if seed_of is None or not of_sft_alone(key)]
    if not centre_names or len(spread_groups) < 2:
        raise LabError(
            f"too few records left for bands (centre from {centre_names}, spread from {correct}: "
            "at least two correct pipelines are needed)"
        )
    if seed_of is not None and not sum(len(g) - 1 for g in spread_groups.values()):
        raise LabError(
            "no correct pipeline has two PPO seeds among the records left: no seed-to-seed spread "
            f"for the bands of a new seed of {seed_of}"
        )
    alpha = ALPHA / len(keys)
    out = {}
    for key in keys:
        missing = [n for n in centre_names + correct if metric(records[n], key) is None]
        if missing:
            raise LabError(f"the records {', '.join(missing)} lack the metric {key}")
        spread = summary(grouped_values(records, spread_groups, key))
        centre_values = grouped_values(records, centre_groups, key)
        if seed_of is None:
            centre, variance, dof = new_pipeline_band(spread, summary(centre_values))
        else:
            centre, variance, dof = new_seed_band(centre_values[0], spread)
        if not variance > 0:
            raise LabError(f"the correct records agree exactly on {key}: no spread for a band")
        k = t_quantile(1 - alpha, dof)
        sd = math.sqrt(variance)
        out[key] = dict(
            centre=centre,
            sd=sd,
            dof=dof,
            k=k,
            half_width=k * sd,
            low=centre - k * sd,
            high=centre + k * sd,
            alpha=alpha,
            centre_from=centre_names,
            spread_from=correct,
            n_centre=len(centre_names) if seed_of is not None else len(centre_groups),
            n_spread=len(spread_groups),
            seed_of=seed_of,
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


def grading(run, records, leave_out=()):
    """How check-run grades a run against the records: {"notes": the lines that say so, "table": its
    bands (None: not graded), "leave_out": the records left out}.

    A run that is a record (same_results()) is left out of its own bands. A run whose config differs
    from the base run's in what it computes is a variant: its centre is the records of that variant
    (NOT GRADED when there are none). A run whose SFT results equal those of a recorded pipeline's
    records (a new PPO seed of it: --from_run of that base) is graded as a new seed of that
    pipeline; any other run as a new pipeline."""
    leave_out = list(leave_out)
    notes = []
    for name, record in records.items():
        if same_results(record["results"], run["results"]) and name not in leave_out:
            leave_out.append(name)
            notes.append(
                f"this run is the record {name}: it is left out of the bands it is checked against"
            )
    base = base_name(records)
    differ = describe_config(run["config"], records[base]["config"])
    centre_names = None
    if differ:
        notes.append(
            f"a variant, not the base run: its config differs from {base}'s in {'; '.join(differ)}"
        )
        centre_names = [
            n
            for n, r in records.items()
            if n not in leave_out and not describe_config(run["config"], r["config"])
        ]
        if not centre_names:
            notes.append(
                "NOT GRADED: no record of this variant in the records, so it is not graded as a "
                "reproduction"
            )
            return dict(notes=notes, table=None, leave_out=leave_out)
        notes.append(f"graded against the record(s) of this variant: {', '.join(centre_names)}")
    else:
        pipeline = [
            f"{k}={run['config'].get(k)!r}"
            for k in sorted(PIPELINE)
            if run["config"].get(k) != records[base]["config"].get(k)
        ]
        notes.append(
            f"config: the base run's ({base}){', with ' + ', '.join(pipeline) if pipeline else ''}"
            ": graded as a reproduction"
        )
    candidates = centre_names or correct_names(records, leave_out)
    own = [n for n in candidates if records[n]["results"].get("sft") == run["results"].get("sft")]
    if own:
        seed_of = pipeline_of(records, own[0])
        table = bands(records, leave_out, own, seed_of=seed_of)
        notes.append(
            f"graded as a new PPO seed of the recorded pipeline {seed_of}: its SFT results equal "
            f"those of {', '.join(own)}, so the bands are those seeds' mean ± the spread between "
            "PPO seeds"
        )
    else:
        table = bands(records, leave_out, centre_names)
        first = next(iter(table.values()))
        notes.append(
            "graded as a new pipeline: its SFT results equal no record's, so the bands carry the "
            f"spread between pipelines ({first['n_spread']} correct pipelines, "
            f"{len(first['spread_from'])} runs)"
        )
    return dict(notes=notes, table=table, leave_out=leave_out)


# ------------------------------------------------------------------------------------ the commands

RULE = (
    "a correct run's metric y = mu + a (its pipeline: SFT model and identifiers, variance sp^2) "
    "+ e (its PPO seed, variance ss^2); from the correct records (P pipelines of n_i seeds): "
    "centre = mean over pipelines of their seed means, S2 = variance of those means, W = pooled "
    "variance of the seeds around their pipeline's mean, h = mean of 1/n_i. A new pipeline: V = "
    "(1 + 1/P) S2 + (1 - h) W, Satterthwaite's dof. A new PPO seed of a recorded pipeline of n "
    "seeds (equal SFT results): centre = their mean, V = W (1 + 1/n), dof sum(n_i - 1); metrics of "
    "the SFT model alone not graded. band = centre +- t(1 - a/2, dof) sqrt(V), a = alpha_per_run / "
    "the number of graded metrics (Bonferroni); kl = mean of the logged kl over the last "
    f"{KL_LAST} PPO iterations; {', '.join(MUST_BE_POSITIVE)} must be > 0 (no band); "
    f"{', '.join(SHOWN)} is shown, not graded"
)


def rounded(table):
    fields = ("centre", "sd", "dof", "k", "half_width", "low", "high")
    return {key: {f: round(band[f], 4) for f in fields} for key, band in table.items()}


def bands_table(records_dir):
    """The committed lab/tolerances.json: the rule, and the bands of a new pipeline and of a new PPO
    seed of the base run's pipeline (`lab.py bands --write=lab/tolerances.json` writes it from
    docs/runs; a test checks that it matches the records)."""
    records = read_records(records_dir)
    new = bands(records)
    base = pipeline_of(records, base_name(records))
    seed = bands(records, seed_of=base)
    first, first_seed = next(iter(new.values())), next(iter(seed.values()))
    return {
        "rule": RULE,
        "alpha_per_run": ALPHA,
        "new_pipeline": {
            "alpha_per_metric": round(first["alpha"], 6),
            "centre_from": first["centre_from"],
            "spread_from": first["spread_from"],
            "pipelines": first["n_spread"],
            "bands": rounded(new),
        },
        "new_seed": {
            "pipeline": base,
            "alpha_per_metric": round(first_seed["alpha"], 6),
            "centre_from": first_seed["centre_from"],
            "bands": rounded(seed),
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


def how_made(table):
    """The line of --details that says how the bands were made."""
    first = next(iter(table.values()))
    alpha = (
        f"k = t(1 − a/2, dof) at a = {ALPHA:g}/{len(table)} = {first['alpha']:.4f} per metric "
        f"(Bonferroni: a correct run is flagged on some check at most {ALPHA:.0%} of the time)"
    )
    if first["seed_of"] is not None:
        return (
            f"bands of a new PPO seed of {first['seed_of']}: centre = mean of "
            f"{', '.join(first['centre_from'])}; SD² = W × (1 + 1/{first['n_centre']}), W the "
            f"seeds' pooled variance around their pipeline's mean ({first['dof']:.0f} dof); {alpha}"
        )
    return (
        f"bands of a new pipeline: centre = mean of the seed means of {first['n_centre']} "
        f"pipeline(s) ({', '.join(first['centre_from'])}); SD² = (1 + 1/P) × S² + b × W over "
        f"{first['n_spread']} correct pipelines ({', '.join(first['spread_from'])}): S² the "
        "variance of their means, W the seeds' pooled variance (docs/bands.md); dof = the fewest "
        f"Satterthwaite gives over the ratio of the two variances ({first['dof']:.0f}); {alpha}"
    )


def cmd_check_run(args):
    run = read_run(args.run_dir)
    records = read_records(args.records)
    leave_out = [n for n in (args.leave_out or "").split(",") if n]
    unknown = [n for n in leave_out if n not in records]
    if unknown:
        raise LabError(f"--leave-out: no record {', '.join(unknown)} in {args.records}", code=2)
    details = getattr(args, "details", False)
    graded = grading(run, records, leave_out)
    for line in graded["notes"]:
        print(line)
    table = graded["table"]
    if table is None:
        return 1
    failed = failed_checks(run, table)
    width = max(len(key) for key in [*METRICS, *MUST_BE_POSITIVE, *SHOWN])
    number = lambda got: f"{got:10.3f}" if got is not None else f"{'missing':>10}"
    verdict = lambda key: "OUT OF RANGE" if key in failed else "in range"
    if details:
        print(how_made(table))
    for key, band in table.items():
        if details or key in failed:
            value = metric(run, key)
            side = (
                ""
                if value is None or key not in failed
                else ("below " if value < band["low"] else "above ")
            )
            print(
                f"{verdict(key):<12} {key:<{width}} {number(value)}   {side}[{band['low']:.3f}, "
                f"{band['high']:.3f}] = {band['centre']:.3f} ± {band['k']:.2f} × SD "
                f"{band['sd']:.3f} ({band['dof']:.1f} dof); {METRICS[key]}"
            )
    for key, what in MUST_BE_POSITIVE.items():
        if details or key in failed:
            print(f"{verdict(key):<12} {key:<{width}} {number(metric(run, key))}   > 0; {what}")
    if details:
        first = next(iter(table.values()))
        for key in METRICS:
            if key not in table:
                print(
                    f"{'not graded':<12} {key:<{width}} {number(metric(run, key))}   the pipeline "
                    f"{first['seed_of']}'s own (equal to its records'); {METRICS[key]}"
                )
        correct = correct_names(records, graded["leave_out"])
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
    out_of_range = len(failed)
    steps = run["config"].get("ppo_steps")
    if is_number(steps) and len(run["log"]) < steps:
        out_of_range += 1
        print(
            f"OUT OF RANGE log.jsonl has {len(run['log'])} PPO iterations of the config's "
            f"{steps}: the run is not finished, or its log is not the run's"
        )
    checks = len(table) + len(MUST_BE_POSITIVE)
    if out_of_range:
        print(
            f"{out_of_range} of {checks} checks out of range: not a reproduction. A correct run "
            f"is flagged at most {ALPHA:.0%} of the time (1 in {round(1 / ALPHA)}), so look for a "
            "mistake first" + ("" if details else "; --details shows every band")
        )
        return 1
    print(f"all {checks} checks in range")
    return 0


# ---------------------------------------------------------------------------------- the simulation


def matrix_root(matrix, torch):
    """The symmetric square root of the positive semi-definite part of a symmetric matrix
    (negative eigenvalues, which an estimate by differences can have, set to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def fitted_model(records, leave_out=()):
    """The model fitted to the correct records, for simulate(): the design (the seeds of each
    pipeline, in correct_names() order) and, over the metrics of METRICS together, the mean, the
    covariance of the seed noise (the pooled covariance of the seeds around their pipeline's mean)
    and that of the pipeline offsets (the covariance of the pipeline means less h times the seeds',
    its negative eigenvalues set to 0): the moments the rule estimates, for every pair of
    metrics."""
    import torch

    design = groups(records, correct_names(records, leave_out))
    keys = list(METRICS)
    values = [
        torch.tensor([[metric(records[n], k) for k in keys] for n in names], dtype=torch.float64)
        for names in design.values()
    ]
    means = torch.stack([v.mean(0) for v in values])
    dof = sum(len(v) - 1 for v in values)
    deviations = torch.cat([v - v.mean(0) for v in values])
    seed_cov = deviations.T @ deviations / max(dof, 1)
    centred = means - means.mean(0)
    h = sum(1 / len(v) for v in values) / len(values)
    between = centred.T @ centred / (len(values) - 1)
    root = matrix_root(between - h * seed_cov, torch)
    return dict(
        keys=keys,
        pipelines=list(design),
        seeds=[len(v) for v in values],
        mean=means.mean(0),
        pipeline_cov=root @ root,
        seed_cov=seed_cov,
    )


def independent_model(model, ratio):
    """The fitted model's design with every metric independent, seed variance 1 (0 for the metrics
    of the SFT model alone) and pipeline variance ratio: the rule's rate for any one truth."""
    import torch

    seed = torch.tensor([0.0 if of_sft_alone(k) else 1.0 for k in model["keys"]])
    return dict(
        model,
        mean=torch.zeros(len(model["keys"]), dtype=torch.float64),
        seed_cov=torch.diag(seed).double(),
        pipeline_cov=ratio * torch.eye(len(model["keys"]), dtype=torch.float64),
    )


def simulate(model, new_seed=False, trials=20_000, seed=0, chunk=20_000):
    """The rule's false-alarm rate under model (fitted_model()): in each trial, records of the
    model's design and one new correct run are drawn, the bands are made from the drawn records by
    the rule's own arithmetic (summary(), new_pipeline_band(), new_seed_band()), and the run is
    flagged if a graded metric lies outside its band. The records are drawn afresh each time, so
    the bands' estimated variances vary as they do with real records. new_seed: the run is a new
    PPO seed of the pipeline with the most seeds (the base run's); else a run of a new pipeline.
    Returns {"run": the share of runs flagged on some metric, "metric": {key: share}, "trials"}."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    keys, seeds = model["keys"], model["seeds"]
    pipelines = len(seeds)
    graded = [i for i, k in enumerate(keys) if not (new_seed and of_sft_alone(k))]
    within = 1 - ALPHA / len(graded)
    root_pipeline = matrix_root(model["pipeline_cov"], torch)
    root_seed = matrix_root(model["seed_cov"], torch)
    root_seed[[i for i, k in enumerate(keys) if of_sft_alone(k)]] = 0.0  # the seeds share it
    target = max(range(pipelines), key=lambda i: (seeds[i], -i))
    draw = lambda n, *shape: torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    flagged_runs = 0
    flagged = torch.zeros(len(keys), dtype=torch.float64)
    for start in range(0, trials, chunk):
        n = min(chunk, trials - start)
        offsets = draw(n, pipelines + 1, len(keys)) @ root_pipeline.T
        runs = [
            model["mean"] + offsets[:, i, None, :] + draw(n, s, len(keys)) @ root_seed.T
            for i, s in enumerate(seeds)
        ]
        own = offsets[:, target] if new_seed else offsets[:, pipelines]
        new = model["mean"] + own + draw(n, len(keys)) @ root_seed.T
        out = torch.zeros(n, dtype=torch.bool)
        for m in graded:
            values = [[r[:, j, m] for j in range(r.shape[1])] for r in runs]
            spread = summary(values)
            if new_seed:
                centre, variance, dof = new_seed_band(values[target], spread)
            else:
                centre, variance, dof = new_pipeline_band(spread, spread)
            outside = (new[:, m] - centre).abs() > t_quantile(within, dof) * variance.sqrt()
            flagged[m] += outside.sum()
            out |= outside
        flagged_runs += int(out.sum())
    return dict(
        run=flagged_runs / trials,
        metric={keys[m]: float(flagged[m]) / trials for m in graded},
        trials=trials,
    )


SWEEP = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]  # sp^2 / ss^2 of the sweep in simulated_text()


def simulated_text(records_dir, trials, seed=0):
    """The simulated rates, as docs/bands.md quotes them (python lab/bands.py simulate --write)."""
    records = read_records(records_dir)
    model = fitted_model(records)
    base = pipeline_of(records, base_name(records))
    new = simulate(model, trials=trials, seed=seed)
    again = simulate(model, new_seed=True, trials=trials, seed=seed + 1)
    sweep = [simulate(independent_model(model, r), trials=trials, seed=seed + 2) for r in SWEEP]
    design = ", ".join(f"{p} {s}" for p, s in zip(model["pipelines"], model["seeds"]))
    per = lambda result: max(result["metric"].values())
    pct = lambda x: f"{100 * x:.2f} %"
    return wrapped(
        f"Simulated by `python lab/bands.py simulate --trials={trials} --seed={seed}`: "
        f"{trials:,} draws of the records and a new run each, under the model fitted to the "
        f"{sum(model['seeds'])} correct records of docs/runs ({len(model['seeds'])} pipelines; "
        f"seeds per pipeline: {design}).\n\n"
        f"| new correct run | flagged on some check | worst single band | a per band |\n"
        f"|---|---|---|---|\n"
        f"| a new pipeline | {pct(new['run'])} | {pct(per(new))} | "
        f"{pct(ALPHA / len(new['metric']))} |\n"
        f"| a new PPO seed of {base} | {pct(again['run'])} | {pct(per(again))} | "
        f"{pct(ALPHA / len(again['metric']))} |\n\n"
        f"The metrics independent, sp²/ss² = {', '.join(f'{r:g}' for r in SWEEP)}: a new "
        f"pipeline is flagged {', '.join(pct(s['run']) for s in sweep)} of the time.\n"
    )


def wrapped(text):
    """text with its lines but tables wrapped at 100 columns, as the docs are."""
    return "\n".join(
        line if line.startswith("|") else textwrap.fill(line, 100, break_on_hyphens=False)
        for line in text.split("\n")
    )


def records_text(records_dir):
    """What the records are and how the rule grades them, as docs/bands.md quotes it (python
    lab/bands.py records --write): the correct records with their dtype, threads and machine; each
    graded as a new pipeline without its pipeline, and as check-run grades it; the ablation records
    relabelled as the base run, and what flags each."""
    records = read_records(records_dir)
    index = read_index(records_dir)
    base = base_name(records)
    correct = correct_names(records)
    design = groups(records, correct)
    environment = lambda n: records[n]["results"].get("environment") or {}
    lines = [
        "The correct records (in_bands in docs/runs/index.json):",
        "",
        "| record | pipeline | PPO seed | dtype | threads | machine | torch | code |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in correct:
        entry, env = records[n]["index"], environment(n)
        commit = f" ({entry['commit']})" if entry.get("commit") else ""
        lines.append(
            f"| {n} | {entry['pipeline']} | {entry.get('ppo_seed')} | "
            f"{records[n]['config'].get('dtype')} | {env.get('threads')} | "
            f"{env.get('machine')}, {env.get('cpu_capability')} | {env.get('torch')} | "
            f"{entry.get('code')}{commit} |"
        )

    def count(values):
        values = [str(v) for v in values]
        return ", ".join(f"{v} ({values.count(v)})" for v in sorted(set(values)))

    seeds_metrics = [k for k in METRICS if not of_sft_alone(k)]
    lines += [
        "",
        f"{len(design)} pipelines, {len(correct)} runs; dtype: "
        f"{count([records[n]['config'].get('dtype') for n in correct])}; threads: "
        f"{count([environment(n).get('threads') for n in correct])}; machine: "
        f"{count([environment(n).get('machine') for n in correct])}; CPU capability: "
        f"{count([environment(n).get('cpu_capability') for n in correct])}; torch: "
        f"{count([environment(n).get('torch') for n in correct])}.",
        "",
        f"False alarms: ALPHA = {100 * ALPHA:g} % per run; per band "
        f"{100 * ALPHA / len(METRICS):.2f} % for a new pipeline ({len(METRICS)} graded metrics), "
        f"{100 * ALPHA / len(seeds_metrics):.2f} % for a new seed ({len(seeds_metrics)}).",
        "",
    ]
    alone, itself = [], []
    for n in correct:
        leave = [m for m in records if pipeline_of(records, m) == pipeline_of(records, n)]
        flags = failed_checks(records[n], bands(records, leave_out=leave))
        alone.append(f"{n} (by {', '.join(flags)})" if flags else None)
        graded = grading(records[n], records)
        flags = failed_checks(records[n], graded["table"])
        how = "a new seed" if next(iter(graded["table"].values()))["seed_of"] else "a new pipeline"
        itself.append((n, how, flags))
    flagged = [x for x in alone if x]
    lines.append(
        "Each correct record graded as a new pipeline, against bands made without its pipeline: "
        + (f"flagged: {'; '.join(flagged)}." if flagged else f"all {len(correct)} in range.")
    )
    flagged = [f"{n} (by {', '.join(f)})" for n, _, f in itself if f]
    lines += [
        "",
        "Each graded as check-run grades it, left out of its own bands ("
        + ", ".join(f"{n} as {how}" for n, how, _ in itself)
        + "): "
        + (f"flagged: {'; '.join(flagged)}." if flagged else f"all {len(itself)} in range."),
        "",
        f"The ablation records relabelled as the base run ({base}'s config); the variants that "
        f"must be flagged: {', '.join(index.get('must_be_flagged', []))}.",
        "",
        "| record | variant | must be flagged | graded as | flagged by |",
        "|---|---|---|---|---|",
    ]
    for n, run in records.items():
        variant = run["index"].get("variant")
        if variant == "ppo":
            continue
        relabelled = dict(
            run,
            config=dict(records[base]["config"]),
            results=dict(run["results"], config=dict(records[base]["config"])),
        )
        graded = grading(relabelled, records)
        flags = failed_checks(relabelled, graded["table"])
        how = "a new seed" if next(iter(graded["table"].values()))["seed_of"] else "a new pipeline"
        must = "yes" if variant in index.get("must_be_flagged", []) else "no"
        lines.append(
            f"| {n} | {variant} | {must} | {how} | {', '.join(flags) if flags else 'nothing'} |"
        )
    return wrapped("\n".join(lines) + "\n")


def write_block(command, text):
    """Put text between the markers of command (BLOCKS) in docs/bands.md."""
    begin, end = BLOCKS[command]
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if begin not in doc or end not in doc:
        raise LabError(f"{DOC} lacks the markers {begin} ... {end}")
    head, rest = doc.split(begin, 1)
    DOC.write_text(head + begin + "\n" + text + end + rest.split(end, 1)[1], encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="bands.py", description="the records and the false-alarm rate of check-run's rule"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    shown = commands.add_parser("records", help="the records and how the rule grades them")
    sim = commands.add_parser("simulate", help="simulate the rule under the fitted model")
    sim.add_argument("--trials", type=int, default=200_000)
    sim.add_argument("--seed", type=int, default=0)
    for command in (shown, sim):
        command.add_argument("--records", default=str(ROOT / "docs" / "runs"))
        command.add_argument("--write", action="store_true", help=f"put the text into {DOC}")
    args = parser.parse_args(argv)
    try:
        if args.command == "records":
            text = records_text(args.records)
        else:
            text = simulated_text(args.records, args.trials, args.seed)
        if not args.write:
            print(text, end="")
            return 0
        write_block(args.command, text)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    print(f"wrote the {args.command} block into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
