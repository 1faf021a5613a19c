"""check-run (lab/bands.py, re-exported by lab/lab.py): a finished run against the records in
docs/runs. Every correct record passes against bands made without it, as a new pipeline and as a new
PPO seed where its pipeline has others; the ablation rows index.json requires are flagged when
relabelled as the base run; planted mistakes are flagged and correct runs written differently pass;
the rule's false-alarm rate, simulated under the model fitted to the records, is what it states;
missing or damaged files are one error line."""

import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "runs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lab = load(ROOT / "lab" / "lab.py", "lab_grader")
bands = lab.band_rule
INDEX = json.loads((RECORDS / "index.json").read_text(encoding="utf-8"))
RECS = lab.read_records(RECORDS)
BASE = INDEX["base"]
CORRECT = lab.correct_names(RECS)
SEEDS = lab.seed_names(RECS)
# a correct record that is a pipeline of its own (one run), for the planted runs
LONE = next(
    n
    for n in CORRECT
    if sum(lab.pipeline_of(RECS, m) == RECS[n]["index"]["pipeline"] for m in RECS) == 1
)


def pipeline_records(name):
    """Every record of name's pipeline (index.json), correct or not."""
    return [n for n in RECS if lab.pipeline_of(RECS, n) == lab.pipeline_of(RECS, name)]


def relabel(record, out, **config):
    """A copy of a record whose config (results.json and every config line of log.jsonl) is the base
    run's, with config's fields changed: a run that claims to be a reproduction of the base run,
    whatever it really was."""
    base = json.loads((RECORDS / BASE / "results.json").read_text())
    results = json.loads((RECORDS / record / "results.json").read_text())
    results["config"] = dict(base["config"], **config)
    results["environment"]["dtype"] = base["environment"]["dtype"]
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(results))
    lines = []
    for line in (RECORDS / record / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "config":
            row = {"stage": "config", **results["config"]}
        lines.append(json.dumps(row))
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    return out


def check_run(*args):
    p = subprocess.run(
        [sys.executable, str(ROOT / "lab" / "lab.py"), "check-run", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


def metric_of(line):
    """The metric a line of check-run is about (the longest key of lab.METRICS, lab.MUST_BE_POSITIVE
    or lab.SHOWN it starts with, after the verdict)."""
    rest = line[13:]
    keys = [*lab.METRICS, *lab.MUST_BE_POSITIVE, *lab.SHOWN]
    return max(
        (key for key in keys if rest.startswith(key + " ")), key=len, default=rest.split()[0]
    )


def out_of_range(stdout):
    return [metric_of(line) for line in stdout.splitlines() if line.startswith("OUT OF RANGE")]


def passes(p):
    return p.returncode == 0 and not out_of_range(p.stdout)


# ----------------------------------------------------------------------------------- the records


def test_index_lists_every_record_and_each_pipeline_is_one_sft_model():
    """docs/runs/index.json lists exactly the record folders (a record it does not list would take
    no part in the bands); each entry says what the rule reads; the records of one pipeline share
    one SFT model (equal SFT results) and one config but for the PPO seed (groups() refuses
    otherwise); the base run is a correct record."""
    folders = {d.name for d in RECORDS.iterdir() if (d / "results.json").exists()}
    assert folders == set(INDEX["records"])
    for name, entry in INDEX["records"].items():
        assert {"pipeline", "variant", "ppo_seed", "code", "in_bands"} <= set(entry), name
    lab.groups(RECS, list(RECS))
    assert BASE in CORRECT and SEEDS[0] == BASE
    assert set(INDEX["must_be_flagged"]) <= {e["variant"] for e in INDEX["records"].values()}


def test_bands_follow_the_records_and_the_index(tmp_path):
    """The bands come from whatever records the index lists: a new PPO seed of the base pipeline
    (here a copy of its last seed with another ppo_seed, listed in the index) joins its seeds and
    the centre; a record listed in the base pipeline whose config differs is refused; a record
    folder the index does not list takes no part."""
    records = tmp_path / "runs"
    for name in CORRECT:
        (records / name).mkdir(parents=True)
        for f in ("results.json", "log.jsonl"):
            (records / name / f).write_bytes((RECORDS / name / f).read_bytes())
    index = copy.deepcopy(INDEX)
    index["records"] = {n: e for n, e in index["records"].items() if n in CORRECT}
    (records / "index.json").write_text(json.dumps(index))
    (records / "stray").mkdir()
    (records / "stray" / "results.json").write_bytes((RECORDS / BASE / "results.json").read_bytes())
    before = lab.bands(lab.read_records(records), seed_of=lab.pipeline_of(RECS, BASE))
    assert "stray" not in lab.read_records(records)
    new = "cpu_s_new"
    (records / new).mkdir()
    results = json.loads((RECORDS / SEEDS[-1] / "results.json").read_text())
    results["config"]["ppo_seed"] = 99
    results["emprl"]["emp_f1"] += 0.5
    (records / new / "results.json").write_text(json.dumps(results))
    (records / new / "log.jsonl").write_bytes((RECORDS / SEEDS[-1] / "log.jsonl").read_bytes())
    index["records"][new] = dict(index["records"][SEEDS[-1]], ppo_seed=99)
    (records / "index.json").write_text(json.dumps(index))
    runs = lab.read_records(records)
    after = lab.bands(runs, seed_of=lab.pipeline_of(RECS, BASE))
    key = "emprl.emp_f1 - sft.emp_f1"
    assert lab.seed_names(runs) == SEEDS + [new]
    assert (
        after[key]["centre_from"] == SEEDS + [new] and after[key]["dof"] == before[key]["dof"] + 1
    )
    results["config"]["init_kl_coef"] = 0.1
    (records / new / "results.json").write_text(json.dumps(results))
    with pytest.raises(lab.LabError, match=f"{new} is listed as a PPO seed"):
        lab.bands(lab.read_records(records))


def test_lab_tolerances_json_is_the_bands_of_the_records():
    """lab/tolerances.json is what `lab.py bands --write=lab/tolerances.json` makes of docs/runs:
    re-made records or a changed rule fail here until it is regenerated."""
    committed = json.loads((ROOT / "lab" / "tolerances.json").read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(lab.bands_table(RECORDS)))
    assert committed["new_pipeline"]["spread_from"] == CORRECT
    assert committed["new_seed"]["centre_from"] == SEEDS


# ------------------------------------------------------------------------------------- the rule


def test_student_t_quantiles_match_the_tables_and_the_density_for_any_dof():
    """lab.t_quantile (no scipy) gives the printed two-sided quantiles; for whole dof t_within
    equals the finite sum of Abramowitz and Stegun 26.7.3-4, and for dof that are not whole (as
    Satterthwaite's are) the integral of the t density (Simpson's rule)."""
    for within, dof, t in [
        (0.95, 4, 2.776445),
        (0.99, 8, 3.355387),
        (0.99, 1, 63.656741),
        (0.95, 30, 2.042272),
    ]:
        assert abs(lab.t_quantile(within, dof) - t) < 1e-5, (within, dof)

    def finite_sum(x, dof):
        theta = math.atan(x / math.sqrt(dof))
        c2 = math.cos(theta) ** 2
        total, term = 0.0, 1.0
        if dof % 2:
            for i in range(1, (dof - 1) // 2 + 1):
                total += term
                term *= c2 * (2 * i) / (2 * i + 1)
            inner = math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0
            return 2 / math.pi * (theta + inner)
        for i in range(1, dof // 2 + 1):
            total += term
            term *= c2 * (2 * i - 1) / (2 * i)
        return math.sin(theta) * total

    def integral(x, dof, steps=20_000):
        norm = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
        f = lambda u: norm * (1 + u * u / dof) ** (-(dof + 1) / 2)
        h = x / steps
        inner = sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
        return 2 * h / 3 * (f(0) + inner + f(x))

    for dof in (1, 2, 3, 4, 7, 8, 13):
        for x in (0.3, 1.0, 2.5, 6.0):
            assert abs(lab.t_within(x, dof) - finite_sum(x, dof)) < 1e-12, (x, dof)
    for dof in (1.5, 2.7, 8.74, 12.3):
        for x in (0.5, 2.0, 4.0):
            assert abs(lab.t_within(x, dof) - integral(x, dof)) < 1e-9, (x, dof)


def test_the_rule_on_a_small_example_worked_by_hand():
    """Pipelines [1, 3], [4], [6]: means 2, 4, 6, centre 4, between 4, within 2 (1 dof), h = 5/6.
    A new pipeline: V = (1 + 1/3) 4 + (1 - 5/6) 2 = 17/3. A new seed of the first: centre 2,
    V = 2 (1 + 1/2) = 3, 1 dof."""
    stats = lab.summary([[1.0, 3.0], [4.0], [6.0]])
    assert stats["centre"] == 4 and stats["between"] == 4 and stats["within"] == 2
    assert stats["within_dof"] == 1 and abs(stats["h"] - 5 / 6) < 1e-12
    centre, variance, dof = lab.new_pipeline_band(stats, stats)
    assert centre == 4 and abs(variance - 17 / 3) < 1e-12 and dof == 2
    assert lab.new_seed_band([1.0, 3.0], stats) == (2.0, 3.0, 1)


@pytest.mark.slow
def test_the_new_pipeline_variance_is_unbiased_and_its_dof_the_fewest():
    """For the records' design (the pipelines and their seeds), V's mean over simulated records is
    the variance of a new pipeline's run about the centre, whatever the ratio of the two variances;
    and the degrees of freedom used, the fewest Satterthwaite gives over the ratios, are P - 1."""
    design = [len(g) for g in lab.groups(RECS, CORRECT).values()]
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    for ratio in (0.0, 1.0, 10.0):
        draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
        offsets = math.sqrt(ratio) * draw(n, len(design) + 1)
        values = [[offsets[:, i] + draw(n) for _ in range(s)] for i, s in enumerate(design)]
        stats = lab.summary(values)
        centre, variance, dof = lab.new_pipeline_band(stats, stats)
        new = offsets[:, -1] + draw(n)
        truth = ((new - centre) ** 2).mean()
        assert abs(variance.mean() / truth - 1) < 0.02, ratio
        assert dof == len(design) - 1
    sizes = [len(g) for g in lab.groups(RECS, CORRECT).values()]
    h = sum(1 / s for s in sizes) / len(sizes)
    for ratio in bands.RATIOS:
        assert bands.satterthwaite_dof(1 + 1 / len(sizes), 1 - h, sizes, ratio) >= len(sizes) - 1


# ----------------------------------------------------------------------- the simulated false alarm


def rate_bound(trials):
    """ALPHA plus four binomial SDs of a simulated rate."""
    return lab.ALPHA + 4 * math.sqrt(lab.ALPHA * (1 - lab.ALPHA) / trials)


@pytest.mark.slow
@pytest.mark.parametrize("new_seed", [False, True], ids=["new pipeline", "new seed"])
def test_simulated_false_alarm_rate_under_the_fitted_model_is_at_most_alpha(new_seed):
    """The rate the rule states (ALPHA per run): a correct run of a new pipeline, and a new PPO seed
    of the base pipeline, each drawn with a fresh set of records under the model fitted to the
    records (so the bands' variances are estimated anew each time), is flagged on some check at
    most ALPHA of the time, and not far less (more than half of it); each band at most its share
    ALPHA / the graded metrics, within noise."""
    trials = 20_000
    model = bands.fitted_model(RECS)
    result = bands.simulate(model, new_seed=new_seed, trials=trials, seed=1)
    assert lab.ALPHA / 2 < result["run"] <= rate_bound(trials), result["run"]
    share = lab.ALPHA / len(result["metric"])
    noise = 4 * math.sqrt(share / trials)
    assert max(result["metric"].values()) <= share + noise, result["metric"]


@pytest.mark.slow
def test_the_simulation_catches_bands_that_are_too_narrow(monkeypatch):
    """The simulation test fails a rule whose bands are too narrow, planted in the module it runs:
    a new pipeline's band without the centre's own error and the seeds' share (V = S2), and the
    normal quantile in place of Student's t (for a new pipeline and for a new seed)."""
    model = bands.fitted_model(RECS)
    trials = 20_000
    right_pipeline, right_seed = bands.new_pipeline_band, bands.new_seed_band
    plants = [
        ("new_pipeline_band", lambda s, c: (c["centre"], s["between"], s["pipelines"] - 1), False),
        ("new_pipeline_band", lambda s, c: right_pipeline(s, c)[:2] + (1e6,), False),
        ("new_seed_band", lambda runs, s: right_seed(runs, s)[:2] + (1e6,), True),
    ]
    for name, wrong, new_seed in plants:
        with monkeypatch.context() as m:
            m.setattr(bands, name, wrong)
            result = bands.simulate(model, new_seed=new_seed, trials=trials, seed=1)
        assert result["run"] > rate_bound(trials), (name, result["run"])


@pytest.mark.slow
def test_simulated_band_is_exact_at_the_least_favourable_ratio_and_safe_at_the_others():
    """With the metrics independent, one band holds its share ALPHA / 13 within noise where the
    pipelines' spread dwarfs the seeds' (the least favourable ratio, where the dof reach P - 1),
    and at most that share where there is no pipeline spread at all."""
    model = bands.fitted_model(RECS)
    trials = 40_000
    share = lab.ALPHA / len(lab.METRICS)
    for ratio, low in ((1000.0, 0.8), (0.0, 0.0)):
        result = bands.simulate(bands.independent_model(model, ratio), trials=trials, seed=2)
        per = [v for k, v in result["metric"].items() if not lab.of_sft_alone(k)]
        mean = sum(per) / len(per)
        noise = 4 * math.sqrt(share / trials / len(per))
        assert low * share < mean <= share + noise, (ratio, mean, share)


@pytest.mark.slow
def test_simulated_rates_over_the_ratio_of_the_variances():
    """The longer simulation: for every ratio sp^2 / ss^2 of the sweep (metrics independent) a new
    pipeline is flagged at most ALPHA of the time, and so is a new seed."""
    model = bands.fitted_model(RECS)
    trials = 100_000
    for ratio in bands.SWEEP:
        for new_seed in (False, True):
            other = bands.independent_model(model, ratio)
            result = bands.simulate(other, new_seed=new_seed, trials=trials, seed=3)
            assert result["run"] <= rate_bound(trials), (ratio, new_seed, result["run"])


# ------------------------------------------------------------------------------ correct records


@pytest.mark.slow
@pytest.mark.parametrize("record", CORRECT)
def test_every_correct_record_passes_as_a_new_pipeline_and_as_itself(record, tmp_path):
    """Each correct record, relabelled as the base run, is in range against the bands of a new
    pipeline made without its whole pipeline (its seeds share its SFT model); and check-run on the
    record itself leaves it out and grades it as a new PPO seed where its pipeline has other seeds
    (the cpu records), as a new pipeline where not. No tolerance for a flag: every one passes."""
    leave = ",".join(pipeline_records(record))
    p = check_run(relabel(record, tmp_path / record), f"--leave-out={leave}")
    assert passes(p) and "graded as a new pipeline" in p.stdout, p.stdout
    p = check_run(RECORDS / record)
    assert passes(p), p.stdout
    assert f"this run is the record {record}: it is left out" in p.stdout
    others = [
        n
        for n in CORRECT
        if n != record and lab.pipeline_of(RECS, n) == lab.pipeline_of(RECS, record)
    ]
    mode = "graded as a new PPO seed" if others else "graded as a new pipeline"
    assert mode in p.stdout, p.stdout


def test_check_run_knows_a_record_copied_back_into_a_run_directory(tmp_path):
    """A run directory that holds a record's run (its results.json with the full paths a run writes,
    where the record keeps only their last part) is that record: it is left out of the bands it is
    checked against, not counted in them. Another run with one number changed is not."""
    results = json.loads((RECORDS / BASE / "results.json").read_text())
    results["config"].update(out_dir="runs/cpu", data_dir="/data/emprl")
    for name, changed in (("copy", False), ("other", True)):
        run = tmp_path / name
        run.mkdir()
        r = copy.deepcopy(results)
        if changed:
            r["emprl"]["length"] += 0.01
        (run / "results.json").write_text(json.dumps(r))
        (run / "log.jsonl").write_bytes((RECORDS / BASE / "log.jsonl").read_bytes())
        p = check_run(run)
        assert (f"this run is the record {BASE}: it is left out" in p.stdout) != changed, p.stdout


def test_correct_runs_written_differently_pass(tmp_path):
    """What a correct run may look like besides a record: results.json indented with its keys in
    another order and fields this code does not write; dtype "auto" (what it chose is in
    environment); a log.jsonl whose last line a kill cut short, with other stages' lines and
    blank lines between the PPO lines. Each passes, as a new seed of the base pipeline."""
    record = SEEDS[-1]
    run = relabel(record, tmp_path / "odd", ppo_seed=77)
    results = json.loads((run / "results.json").read_text())
    results["config"]["dtype"] = "auto"
    results["extra"] = {"note": "a field this code does not write"}
    reordered = dict(reversed(list(results.items())))
    (run / "results.json").write_text(json.dumps(reordered, indent=4, sort_keys=True))
    lines = (run / "log.jsonl").read_text().splitlines()
    odd = []
    for line in lines:
        odd += [line, "", json.dumps({"stage": "note", "text": "between"})]
    (run / "log.jsonl").write_text("\n".join(odd) + '\n{"stage": "ppo", "score": 0.')
    p = check_run(run, f"--leave-out={record}")
    assert passes(p) and "graded as a new PPO seed of the recorded pipeline" in p.stdout, p.stdout


# ------------------------------------------------------------------------------ wrong runs flagged


def index_flagged():
    """The ablation records of index.json whose variant must be flagged (must_be_flagged), each
    marked xfail (strict) with the reason its entry gives where a sound band cannot flag it."""
    out = []
    for name, entry in INDEX["records"].items():
        if entry["variant"] in INDEX["must_be_flagged"]:
            reason = entry.get("not_flagged")
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(name, marks=marks))
    return out


@pytest.mark.parametrize("record", index_flagged())
def test_check_run_flags_a_required_ablation_relabelled_as_the_base_run(record, tmp_path):
    """The ablation records of the variants index.json says must be flagged (no ER, no EX, no KL,
    GRPO: every record of each), with their config relabelled as the base run's, are out of
    range on at least one metric, by their numbers alone."""
    p = check_run(relabel(record, tmp_path / record))
    assert "graded as a reproduction" in p.stdout and "a variant" not in p.stdout
    assert p.returncode == 1 and out_of_range(p.stdout), p.stdout


@pytest.mark.parametrize("key", list(lab.METRICS))
def test_a_correct_run_with_one_metric_moved_past_its_band_is_flagged_on_it(key, tmp_path):
    """Planted: a correct record (a pipeline of its own, relabelled as the base run) with one
    graded metric moved 1.5 half-widths beyond its band (the gain, perplexity, distinct replies,
    length, or the logged KL) is flagged on that metric and no other."""
    record = LONE
    table = lab.bands(RECS, leave_out=[record])
    band = table[key]
    run = relabel(record, tmp_path / "planted")
    value = lab.metric(RECS[record], key)
    shift = band["high"] + 1.5 * band["half_width"] - value
    if key.startswith("log:"):
        lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        for row in lines:
            if row.get("stage") == "ppo" and "score" in row:
                row[key[4:]] += shift
        (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    else:
        results = json.loads((run / "results.json").read_text())
        section, field = key.split(" - ")[0].split(".")
        results[section][field] += shift
        if section == "sft":  # SFT's perplexity alone: the rise above is kept
            results["emprl"][field] += shift
        (run / "results.json").write_text(json.dumps(results))
    p = check_run(run, f"--leave-out={record}")
    assert p.returncode == 1 and out_of_range(p.stdout) == [key], p.stdout


@pytest.mark.slow
def test_check_run_fails_an_unfinished_run_and_a_run_below_the_majority_constant(tmp_path):
    """A log with fewer PPO iterations than the config's ppo_steps is out of range (the run did not
    finish); so is a run whose EmpRL is below the majority constant, whatever the band says."""
    seed = SEEDS[-1]
    run = relabel(seed, tmp_path / "short")
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:-30]) + "\n")
    p = check_run(run, f"--leave-out={seed}")
    steps = json.loads((RECORDS / BASE / "results.json").read_text())["config"]["ppo_steps"]
    assert p.returncode == 1 and f"PPO iterations of the config's {steps}" in p.stdout, p.stdout
    run = relabel(seed, tmp_path / "below")
    results = json.loads((run / "results.json").read_text())
    results["majority"]["emp_f1"] = results["emprl"]["emp_f1"] + 0.01
    (run / "results.json").write_text(json.dumps(results))
    p = check_run(run, f"--leave-out={seed}")
    assert p.returncode == 1 and out_of_range(p.stdout) == ["emprl.emp_f1 - majority.emp_f1"], (
        p.stdout
    )


# ------------------------------------------------------------------------------------ the output


@pytest.mark.slow
def test_default_output_is_the_verdict_what_is_out_of_range_and_why(tmp_path):
    """Without --details: the lines that say how the run is graded (the record it is, its config,
    a new pipeline or a new seed), one line per check out of range (its value, the band, which side,
    what the metric is) and the verdict with the false-alarm rate; no line for a check in range.
    With --details: every band, the floor, the numbers not graded, and how the bands were made."""
    record = LONE
    run = relabel(record, tmp_path / "moved")
    results = json.loads((run / "results.json").read_text())
    results["emprl"]["length"] += 10.0
    (run / "results.json").write_text(json.dumps(results))
    p = check_run(run, f"--leave-out={record}")
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and out_of_range(p.stdout) == ["emprl.length - sft.length"]
    assert len(lines) <= 4 and not any(line.startswith("in range") for line in lines), p.stdout
    assert " above [" in p.stdout and lab.METRICS["emprl.length - sft.length"] in p.stdout
    assert lines[-1].startswith("1 of 14 checks out of range: not a reproduction")
    assert f"{lab.ALPHA:.0%}" in lines[-1] and "--details" in lines[-1]
    p = check_run(run, f"--leave-out={record}", "--details")
    shown = [line for line in p.stdout.splitlines() if line.startswith(("in range", "OUT OF"))]
    assert [metric_of(line) for line in shown] == list(lab.METRICS) + list(lab.MUST_BE_POSITIVE)
    assert "bands of a new pipeline: centre = mean of the seed means of" in p.stdout
    assert all(" × SD " in line and " dof); " in line for line in shown[: len(lab.METRICS)])
    not_graded = [line for line in p.stdout.splitlines() if line.startswith("not graded")]
    assert [metric_of(line) for line in not_graded] == list(lab.SHOWN)


def test_a_new_seed_of_a_recorded_pipeline_is_graded_against_its_seeds(tmp_path):
    """A run whose SFT results equal the base pipeline's (--from_run of that base, another
    ppo_seed) is graded as a new PPO seed against those seeds, the SFT model's own numbers not
    graded; the same run with one SFT number changed in the last digit is a new pipeline."""
    run = relabel(SEEDS[-1], tmp_path / "seed", ppo_seed=42, from_run=f"runs/{BASE}")
    p = check_run(run, f"--leave-out={SEEDS[-1]}", "--details")
    assert passes(p), p.stdout
    assert f"graded as a new PPO seed of the recorded pipeline {lab.pipeline_of(RECS, BASE)}" in (
        p.stdout
    )
    assert f"bands of a new PPO seed of {lab.pipeline_of(RECS, BASE)}" in p.stdout
    assert re.search(r"^not graded +sft\.ppl ", p.stdout, re.M), p.stdout
    assert f"all {len(lab.METRICS)} checks in range" in p.stdout  # 12 bands and the floor
    results = json.loads((run / "results.json").read_text())
    results["sft"]["ppl"] += 1e-9
    (run / "results.json").write_text(json.dumps(results))
    p = check_run(run, f"--leave-out={SEEDS[-1]}")
    assert "graded as a new pipeline" in p.stdout, p.stdout


@pytest.mark.slow
def test_check_run_reports_a_variant_and_grades_it_against_its_own_record(tmp_path):
    """A run whose config says GRPO is a variant: checked against the other GRPO record(s), not the
    base run's. A variant with no record (β = 0.3) is NOT GRADED (exit 1)."""
    grpo = [n for n, e in INDEX["records"].items() if e["variant"] == "grpo"]
    if len(grpo) > 1:
        p = check_run(RECORDS / grpo[-1])
        assert "a variant, not the base run" in p.stdout and "algo='grpo'" in p.stdout
        assert f"graded against the record(s) of this variant: {', '.join(grpo[:-1])}" in p.stdout
        assert passes(p), p.stdout
    run = relabel(BASE, tmp_path / "beta", init_kl_coef=0.3)
    p = check_run(run)
    assert p.returncode == 1 and "NOT GRADED" in p.stdout and "init_kl_coef=0.3" in p.stdout


def test_check_run_shows_sft_against_the_majority_constant_without_grading_it(tmp_path):
    """A correct run whose identifiers put more of the test split at one level (here: the majority
    constant lowered until SFT lies 5 points above it beyond every other record's) still passes:
    that number is printed beside the recorded range as "not graded" (--details), while EmpRL above
    the constant stays a floor."""
    record = LONE
    run = relabel(record, tmp_path / "skewed")
    results = json.loads((run / "results.json").read_text())
    key = "sft.emp_f1 - majority.emp_f1"
    highest = max(lab.metric(RECS[n], key) for n in CORRECT if n != record)
    results["majority"]["emp_f1"] = results["sft"]["emp_f1"] - highest - 5.0
    (run / "results.json").write_text(json.dumps(results))
    p = check_run(run, f"--leave-out={record}", "--details")
    assert passes(p), p.stdout
    shown = [line for line in p.stdout.splitlines() if line.startswith("not graded")]
    assert len(shown) == 1 and metric_of(shown[0]) == "sft.emp_f1 - majority.emp_f1", p.stdout
    value, low, high = (
        float(x) for x in re.search(r"\s(\S+)   recorded (\S+) \.\. (\S+) ", shown[0]).groups()
    )
    assert value > high + 1, shown[0]


@pytest.mark.parametrize(
    "damage", ["missing run", "damaged run", "missing records", "unknown leave-out"]
)
def test_check_run_on_a_missing_or_damaged_file_is_one_error_line(tmp_path, capsys, damage):
    """A missing or truncated results.json, a records folder without the base record, an unknown
    --leave-out: one line naming the file or record, no traceback."""
    (tmp_path / "run").mkdir()
    text = (RECORDS / SEEDS[-1] / "results.json").read_text()
    if damage == "damaged run":
        (tmp_path / "run" / "results.json").write_text(text[:40])  # cut short
    elif damage != "missing run":
        (tmp_path / "run" / "results.json").write_text(text)
    args = ["check-run", str(tmp_path / "run")]
    if damage == "missing records":
        args.append(f"--records={tmp_path}")
    if damage == "unknown leave-out":
        args.append("--leave-out=cpu_s9")
    code = lab.main(args)
    err = capsys.readouterr().err
    assert code in (1, 2) and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    named = {
        "missing run": "results.json",
        "damaged run": "results.json",
        "missing records": f"{BASE}/results.json",
        "unknown leave-out": "cpu_s9",
    }[damage]
    assert named in err


# ---------------------------------------------------------------------------------- docs/bands.md


def block(command):
    begin, end = bands.BLOCKS[command]
    return bands.DOC.read_text(encoding="utf-8").split(begin, 1)[1].split(end, 1)[0]


@pytest.mark.slow
def test_docs_bands_md_quotes_the_records_as_they_are():
    """docs/bands.md's records block is what `python lab/bands.py records --write` makes of
    docs/runs now: re-made records or a changed rule fail here until it is rewritten."""
    assert block("records") == "\n" + bands.records_text(RECORDS)


# digits docs/bands.md may show outside its blocks, code and formulas, each with its reason
FREE = {
    "2-core AMD EPYC": "the machines, named by docs/bench/lab_sheet.txt's first line",
    "2-core Intel Xeon": "the machine, named by docs/bench/times.txt's lines",
    "macro-F1": "a metric's name",
    "float32": "a dtype's name",
    "bfloat16": "a dtype's name",
    "Emp-F1": "a metric's name",
}


def loose_digits(text):
    """The lines of a docs/bands.md text with a digit outside the blocks a command writes, code,
    comments and the names of FREE."""
    for begin, end in bands.BLOCKS.values():
        head, rest = text.split(begin, 1)
        text = head + rest.split(end, 1)[1]
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    for phrase in FREE:
        text = text.replace(phrase, "")
    return [line for line in text.splitlines() if re.search(r"\d", line)]


def test_docs_bands_md_types_no_number_by_hand():
    """Outside the two blocks a command writes, code and formulas, docs/bands.md has no digit but
    in a name (FREE): every number on the page is computed or pointed to. Planted: a rate typed
    into the prose, or a number edited inside a name, is found."""
    text = bands.DOC.read_text(encoding="utf-8")
    assert not loose_digits(text), loose_digits(text)
    assert loose_digits(text.replace("## Assumptions", "## Assumptions\n\nAbout 4 % of runs."))
    assert loose_digits(text.replace("2-core AMD EPYC", "4-core AMD EPYC"))


@pytest.mark.slow
def test_docs_bands_md_quotes_the_simulated_rates():
    """docs/bands.md's simulate block is what `python lab/bands.py simulate --write` computes from
    the records now (the same draws: its trials and seed are in the block)."""
    quoted = block("simulate")
    trials, seed = (int(x) for x in re.search(r"--trials=(\d+) --seed=(\d+)", quoted).groups())
    assert quoted == "\n" + bands.simulated_text(RECORDS, trials, seed)
