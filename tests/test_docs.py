"""Every number the docs quote from a record, a benchmark output or the config is tied to it.

A number in README.md, docs/*.md or lab/*.md is tied in one of three ways, and each is tested here:

1. between markers, `<!--=EXPR-->text<!--/-->`: benchmarks/records.py fills the text from EXPR (a
   record, docs/bench, train.py's Config, a constant of the code); a text that differs fails.
2. by its place: the numbers of the README's method table, row by row and in order, against the
   config and the code (METHOD_TABLE below).
3. every other number, in digits or in words ("twenty"), must lie inside one of the phrases FREE
   lists for its file, each with the reason it comes from no record: a class's length, a year,
   the paper's settings. A number typed by hand anywhere else fails.

The planted edits at the end show each way catching a wrong number (a changed digit, a swap to
another value the test knows, a number in words, a marker removed) and passing text that is right
but written differently. docs/bands.md is checked by its own tests (tests/test_check_run.py).
"""

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402

CHECKED = [p for p in records.docs() if p.name != "bands.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMENT = re.compile(r"<!--.*?-->", re.S)
NUMBER = re.compile(
    r"(?<![\w.\-/])[+−-]?(?:\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?(?:⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)?|\.\d+|½)[kMBx]?(?![\w])"
    r"|\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty"
    r"|hundred|thousand|twice|half|dozen)\b",
    re.I,
)
# numbers that are labels, not quantities: headings, numbered lists, exercises, steps, deviations,
# citations and versions
LABELS = [
    r"(?<![\w.\-/+−])[01](?![\w.])",  # 0 and 1: masks, bounds, ratios, the mathematics
    r"^#+ C?\d+\.",
    r"^\s*\d+\. ",
    r"\b[Ee]xercises?\s+\d+(?:(?:, | and | or |-)\d+)*",
    r"\b[Dd]eviations?\s+\d+(?: and \d+)?",
    r"\bsteps?\s+\d+(?:-\d+)?",
    r"\bPart \d\b",
    r"\b(?:C|R|J)\d\b",
    r"et\s+al\.,?\s+(?:\w+\s+)?\(?(?:19|20)\d\d",
    r"arXiv:\d+\.\d+",
    r"TAFFC,? \d{4}",
    r"TRL \d+\.\d+\.\d+|transformers \d+\.\d+(?:\.\d+)?",
]

# Numbers that come from no record, benchmark output or config, and why. A phrase frees the numbers
# inside it (an edited or moved number falls outside and fails); "re:" makes it a regular
# expression.
FREE = {
    "*": {
        "2-core": "the machines this was made on",
        "2 CPU cores": "the machines this was made on",
        "2 CPU processes": "the machines this was tested on",
        "2-3 hour": "the lab's length",
        "95 %": "95 % intervals",
        "× 100": "Emp-F1 is a percentage",
        "n − 1": "a formula",
        "k − 1": "a formula",
        "1/N": "a formula",
        "(0, 1]": "the reward's range",
        "rank 0": "torchrun's first process",
        "CC BY-NC 4.0": "the data's licence",
        "75 / 5 / 20": "EPITOME's split (data.load_epitome_splits)",
        "1-minute load": "what the load average is",
        "excludes 0": "the rule of a difference",
        "above 0": "the rule of a difference",
        "ratio is 1": "PPO's invariant",
        "the other two": "the method has three mechanisms",
        "the three": "the method has three mechanisms",
        "all three": "the method has three mechanisms",
        "three levels": "the method has three mechanisms",
    },
    "README.md": {
        "Three empathy": "the method has three mechanisms",
        "three classifiers": "the method has three mechanisms",
        "the two labels": "generated and human",
        "Masks are 1": "a mask's definition",
        "mask is 1": "a mask's definition",
        "the six stages": "train.py's stages",
    },
    "docs/ablations.md": {
        "fewer than 3 seeds": "the page's rule for resolving a row",
        "The last three rows": "the table's rows",
    },
    "docs/emprl.md": {
        "all three splits": "ED's train, valid and test",
        "at most\n   0.2 ×": "the adaptive β's clip (ppo.KLController)",
        "three communication mechanisms": "EPITOME",
        "level 0 = no,\n  1 = weak, 2 = strong": "EPITOME's level coding",
        "EMNLP 2020": "a citation",
        "a few hundred examples": "the tiny preset, in words",
        '"1" holds': "PPO's invariant",
        "probability near 0": "words",
        "1/√d": "a formula",
        "16 GB": "a card size",
    },
    "docs/identifiers.md": {
        "Two one-off": "the two measurements listed below",
    },
    "docs/reliability.md": {
        "exit code 130": "the shell's code for Ctrl-C",
        "0666 less the umask": "file modes",
        "(0644 under the usual 022": "file modes",
        "exit 1": "exit status",
    },
    "docs/results.md": {
        "Three kinds of noise": "the list below",
        "three findings": "the paper's",
    },
    "docs/speed.md": {
        "32 rollouts of 30 tokens from\n64-token contexts": "bench_ppo.py's fixed work",
        "4 PPO epochs of minibatch 8 with\ngradient accumulation 4": "bench_ppo.py's fixed work",
        "about 10⁻³⁸": "float32's smallest normal number",
        "less than 10⁻³⁸": "float32's smallest normal number",
        "the two implementations": "ours and TRL's",
        "τ = 1": "a condition of the code",
        "two rounds": "the output's rounds",
        "512² matmul": "train.choose_dtype's probe",
        "least twice as fast": "train.choose_dtype's threshold",
    },
    "lab/metrics.md": {
        "beyond ±0.1": "a rule of thumb",
        "above about 0.01": "a rule of thumb",
        "above about 0.2": "a rule of thumb",
        "about 0.98-1.02": "a rule of thumb",
        "two runs on 2 cores take about twice as long": "a rule of thumb",
    },
    "lab/answers.md": {
        "0.5 × 0.5 × 0.5 = 0.125": "a worked example",
        "with one probability at 0.01, 0.5 × 0.5 × 0.01 = 0.0025": "a worked example",
        "index 3": "a worked example",
        "RLOO: −0.2, −0.067, +0.067, +0.2": "a worked example",
        "GRPO: −1.161, −0.387, +0.387, +1.161": "a worked example",
        "deviation with k − 1, 0.129": "a worked example",
        "½·(0.2 − 1)² = 0.32": "a worked example",
        "½·(0.5 − 1)² = 0.125": "a worked example",
        "half of\nit": "the gradient at ρ = 1",
        "the missing ½": "the value loss's ½",
        "the two errors": "the value loss's two errors",
        "of the two\nruns": "words",
        "about 2 hours": "a class's length",
        "a few dozen iterations": "the training check, in words",
        "product of two probabilities": "a mechanism left out",
        "uses all three": "the method has three mechanisms",
        "exactly three tests": "the -k expression",
        "a few hundred contexts": "the validation, in words",
        "The two penalties": "words",
        "the other three": "RLOO's baseline",
    },
    "lab/README.md": {
        "all three algorithms": "PPO, RLOO, GRPO",
        "Name two": "the question",
        "other\ntwo": "the method has three mechanisms",
        "write three sentences": "the task",
        r"re:\b\d+(?:-\d+)? min\b": "a student's time: the teacher's estimate",
        r"re:^\| \d \|": "the schedule's steps",
        "2-hour class": "a shorter class",
        "must be 1": "PPO's invariant",
        "three advantage estimators": "GAE, RLOO, GRPO",
        "Three identifiers each give the human reply's level probability 0.5": "a worked example",
        "drops to 0.01": "a worked example",
        "A reply of 4 real tokens": "a worked example",
        "A reply of 3 tokens, reward only on its last token (score 1)": "a worked example",
        "Four replies to one context earn 0.1, 0.2, 0.3, 0.4": "a worked example",
        "which of the two": "RLOO and GRPO",
        'step "2 reward"': "a row of the method table",
        'rows "3 GAE",\n"3 or RLOO" and "3 or GRPO"': "rows of the method table",
        'row "4 update"': "a row of the method table",
        "The three docstrings": "the three functions",
        "towards a return of\n1, with clip range 0.2": "a worked example",
        "β = 0": "the no-KL run",
        "clamped at 0": "the clamp",
        "the other three": "RLOO's baseline",
        "is 1 for a perfect value head and 0 for one": "explained variance's range",
        "twice, with your functions": "the training check's two runs",
    },
}


def free_phrases(path):
    return {**FREE["*"], **FREE.get(str(path.relative_to(ROOT)), {})}


def prose(text):
    """The text a reader reads as prose and tables, with everything tied otherwise blanked out (the
    same length, so positions stay): code blocks and spans, markers and their text, comments, link
    targets, and the README's method table."""

    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))

    text = FENCE.sub(blank, text)
    text = records.MARKER.sub(blank, text)
    # lab/metrics.md's ranges, written and tested by lab/metric_ranges.py (tests/test_lab.py)
    text = re.sub(r"<!-- ranges:.*?<!-- end of ranges -->", blank, text, flags=re.S)
    text = COMMENT.sub(blank, text)
    text = re.sub(r"^    .*$", blank, text, flags=re.M)  # indented code
    text = re.sub(r"`[^`]*`", blank, text)
    text = re.sub(r"\]\([^)\s]*\)", blank, text)
    text = re.sub(r"https?://\S+", blank, text)
    table = method_table_span(text)
    if table:
        text = (
            text[: table[0]]
            + blank(re.match(r"(?s).*", text[table[0] : table[1]]))
            + text[table[1] :]
        )
    return text


def loose_numbers(text, phrases):
    """The numbers of a text that no marker, place or free phrase ties: [(number, line)]."""
    text = prose(text)
    covered = set()
    patterns = [
        p[3:] if p.startswith("re:") else r"\s+".join(map(re.escape, p.split())) for p in phrases
    ]
    for pattern in LABELS + patterns:
        for m in re.finditer(pattern, text, flags=re.M):
            covered.update(range(m.start(), m.end()))
    return [
        (m.group(0), text.count("\n", 0, m.start()) + 1)
        for m in NUMBER.finditer(text)
        if not set(range(m.start(), m.end())) <= covered
    ]


# ---------------------------------------------------------------------- the method table, by place

METHOD_HEADER = "| step | equation | code |"
# row (its first cell; a row without one is named after the row above, with "+") -> the numbers of
# its equation cell in order: an expression of benchmarks/records.py, or a constant of the equation
METHOD_TABLE = {
    "context": ['cfg("max_context_tokens")'],
    "SFT": ["-1"],
    "identifier": [],
    "target levels": [],
    "1 rollout": [
        'cfg("ppo_temperature")',
        'cfg("ppo_min_new_tokens")',
        'cfg("ppo_max_new_tokens")',
    ],
    "2 reward": [],
    "2 reward+": [],
    "2 reward++": ['cfg("kl_min")', 'cfg("kl_max")'],
    "3 GAE": ["+1", "+1", 'const("emprl","GAMMA")', 'cfg("ppo_lam")'],
    "3 or RLOO": [],
    "3 or GRPO": ['const("ppo","grpo_advantages.eps")', "1", "1", "5"],  # 5: "step 5"
    "4 update": ['1-float(cfg("ppo_clip_range"))', '1+float(cfg("ppo_clip_range"))'],
    "4 update+": [
        "½",
        'const("emprl","VALUE_CLIP")',
        'cfg("ppo_vf_coef")',
        'const("emprl","MAX_GRAD_NORM")',
        'const("emprl","RATIO_THRESHOLD")',
        "0",
    ],
    "5 β": ["1", 'cfg("kl_target")', "1", "0.2", 'cfg("kl_horizon")'],
    "5 stats": ["½", "1"],
    "6 eval": [],
}


# in an equation a number may follow a slash: KL/6
EQUATION_NUMBER = re.compile(NUMBER.pattern.replace(r"(?<![\w.\-/])", r"(?<![\w.\-])"), re.I)


def method_table_span(text):
    start = text.find(METHOD_HEADER)
    if start < 0:
        return None
    end = text.find("\n\n", start)
    return start, end if end > 0 else len(text)


def value(token):
    """A number as the docs write it, as a float: −1, 10⁻⁴, ½, 5,259."""
    if token == "½":
        return 0.5
    sup = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")
    m = re.fullmatch(r"([+−-]?\d+)([⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)", token)
    if m:
        return float(m.group(1)) ** float(m.group(2).translate(sup))
    return float(token.replace("−", "-").replace(",", ""))


def method_table_errors(text):
    """[(row, what the docs say, what the config and code give)] of the README's method table."""
    span = method_table_span(text)
    if span is None:
        return [("the table", "missing", METHOD_HEADER)]
    rows = {}
    last = ""
    for line in text[span[0] : span[1]].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        last = cells[0] or last + "+"
        # the equation cell: everything between the first and the last cell (a `|` in an equation
        # splits it too)
        equation = " | ".join(cells[1:-1]).replace("..", "  ")
        rows[last] = [m.group(0) for m in EQUATION_NUMBER.finditer(equation)]
    errors = []
    for row in sorted(set(rows) | set(METHOD_TABLE)):
        found = [value(t) for t in rows.get(row, ["(no such row)"]) if t != "(no such row)"]
        want = [
            value(records.render(e)) if not re.fullmatch(r"[+−-]?[\d.½]+", e) else value(e)
            for e in METHOD_TABLE.get(row, [])
        ]
        if (
            row not in rows
            or row not in METHOD_TABLE
            or len(found) != len(want)
            or any(abs(a - b) > 1e-12 * max(1.0, abs(b)) for a, b in zip(found, want))
        ):
            errors.append((row, rows.get(row), want))
    return errors


# --------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marker_shows_what_its_source_gives(path):
    """Edit a number between markers, or a record without `python benchmarks/records.py write`,
    and this fails."""
    stale = records.stale(path.read_text())
    assert not stale, f"{path.name}: stale markers (expression, text, source gives): {stale}"


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_number_is_typed_by_hand(path):
    """A number outside the markers and the method table lies in a free phrase of its file."""
    loose = loose_numbers(path.read_text(), free_phrases(path))
    assert not loose, (
        f"{path.name}: numbers tied to nothing (number, line): {loose}; put a number from a "
        "record, docs/bench or the config between markers (benchmarks/records.py), or add a phrase "
        "with its reason to FREE"
    )


def test_the_method_table_matches_the_config_and_the_code():
    errors = method_table_errors((ROOT / "README.md").read_text())
    assert not errors, f"README method table (row, docs, config and code): {errors}"


def test_planted_edits_fail_and_right_rewordings_pass(monkeypatch):
    """Each way a quoted number goes wrong is caught on a copy of the README: a changed digit, a
    swap to another known value, two values swapped, a marker removed, a number typed by hand, a
    rate in words, an edited or swapped default of the method table, a changed record. The
    untouched copy and a copy reworded around its markers pass."""
    text = (ROOT / "README.md").read_text()
    phrases = free_phrases(ROOT / "README.md")
    headline = records.render('ci(seeds("cpu"),"diff.emp_f1")')
    judge = records.render('ci(seeds("cpu"),"diff.emp_f1_judge")')
    beta = records.render('cfg("init_kl_coef","cpu")')

    def passes(t):
        return not records.stale(t) and not loose_numbers(t, phrases) and not method_table_errors(t)

    assert passes(text)
    # a changed digit, inside a marker
    assert records.stale(text.replace(headline, headline.replace("3", "4", 1), 1))
    # a swap to another value the docs know: β 0.5 -> the paper's 0.2
    paper_beta = records.render('cfg("init_kl_coef")')
    assert paper_beta != beta and records.stale(text.replace(f"-->{beta}<", f"-->{paper_beta}<", 1))
    # two marker values swapped
    swapped = text.replace(headline, "\0").replace(judge, headline).replace("\0", judge)
    assert swapped != text and records.stale(swapped)
    # a marker removed, its number left as text
    unmarked = text.replace('<!--=ci(seeds("cpu"),"diff.emp_f1")-->', "", 1).replace(
        f"{headline}<!--/-->", headline, 1
    )
    assert unmarked != text and loose_numbers(unmarked, phrases)
    # a record number typed by hand, and a rate in words
    assert loose_numbers(
        text.replace("## Quick start", "It gains +3.50 points.\n\n## Quick start"), phrases
    )
    assert loose_numbers(
        text.replace("## Quick start", "Flagged one time in twenty.\n\n## Quick start"), phrases
    )
    # the method table: λ edited to another known value (the temperature), and τ swapped with λ
    assert method_table_errors(text.replace("λ = 0.95", "λ = 0.9"))
    assert method_table_errors(text.replace("τ = 0.9", "τ = 0.95").replace("λ = 0.95", "λ = 0.9"))
    assert method_table_errors(text.replace("KL/6", "KL/5"))
    # the right text, written differently: words around a marker changed, a free phrase moved
    reworded = text.replace("PPO raises\n[Emp-F1](#glossary)", "PPO lifts\n[Emp-F1](#glossary)")
    reworded = reworded.replace("## Quick start", "Made on 2-core machines.\n\n## Quick start")
    assert reworded != text and passes(reworded)
    # a record changed without `write`: the untouched README is stale
    original = records.results

    def changed(name):
        r = json.loads(json.dumps(original(name)))
        if name == records.seeds("cpu")[-1]:
            r["emprl"]["emp_f1"] += 1.0
        return r

    monkeypatch.setattr(records, "results", changed)
    assert records.stale(text)


def test_a_bench_output_a_time_or_a_line_count_edited_by_hand_fails():
    """speed.md's figures are docs/bench's outputs, the README's times those of
    docs/bench/times.txt and its code map's line counts `wc -l`'s: an edit of any fails."""
    speed = (ROOT / "docs" / "speed.md").read_text()
    ratio = records.render('bench("ppo_against_trl.txt",r"\\| ([\\d.]+x) \\|")')
    assert ratio in speed and records.stale(speed.replace(f"-->{ratio}<", "-->1.50x<", 1))
    readme = (ROOT / "README.md").read_text()
    lines = records.render('lines("t5.py")')
    row = next(line for line in readme.splitlines() if line.startswith("| `t5.py` |"))
    assert row.endswith(f"| {lines} |")
    edited = row.replace(f"| {lines} |", f"| {int(lines.replace(',', '')) + 1} |")
    assert records.stale(readme.replace(row, edited))
    took = records.render('times("tiny_busy")')
    assert took in readme and records.stale(readme.replace(f"-->{took}<", "-->9 s (load 1.0)<", 1))


def test_every_link_resolves():
    """Relative links of the checked files point at files that exist, and #anchors at headings."""
    bad = []
    for path in CHECKED:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append((path.name, target))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append((path.name, target))
    assert not bad, bad


def anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_readme_is_a_front_page():
    """At most 160 lines and 2,000 words, its sections in the stated order, every glossary term
    defined in the glossary and linked to it where the result uses it first."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160 and len(text.split()) <= 2000
    order = [
        "## The result",
        "## Quick start",
        "## Reading the code",
        "## Glossary",
        "## Licences and citation",
        "## The method",
        "## Teaching with it",
        "## Code",
    ]
    at = [text.index(h) for h in order]
    assert at == sorted(at), order
    lab = text[text.index("## Teaching with it") : text.index("## Code")].strip().splitlines()[1:]
    assert len([line for line in lab if line.strip()]) <= 10, "the lab in at most 10 lines"
    glossary = text[text.index("## Glossary") : text.index("## Licences")]
    for term in [
        "SFT",
        "Identifiers",
        "Emp-F1",
        "Judge",
        "Majority level",
        "PPO",
        "GAE",
        "RLOO",
        "GRPO",
        "β and the KL penalty",
        "Pipeline",
        "PPO seed",
        "Record",
    ]:
        assert f"**{term}**" in glossary, term
    before = text[: text.index("## Glossary")]
    for term in ["identifiers", "PPO", "KL penalty", "Emp-F1", "judge", "PPO seeds", "record"]:
        assert f"[{term}](#glossary)" in before, term
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_no_sentence_is_in_two_files():
    """A passage lives in one file and the others link to it: no sentence of twelve words or more
    (markers and tables aside: a table is generated from the records) appears in two of the checked
    files."""
    seen = {}
    for path in CHECKED:
        prose = re.sub(r"^\|.*$", "", FENCE.sub("", path.read_text()), flags=re.M)
        text = " ".join(COMMENT.sub("", prose).split())
        for sentence in re.split(r"(?<=[.!?:])\s+", text):
            if len(sentence.split()) >= 12:
                seen.setdefault(sentence, set()).add(str(path.relative_to(ROOT)))
    assert not {s: f for s, f in seen.items() if len(f) > 1}


def test_the_files_the_readme_names_exist():
    readme = (ROOT / "README.md").read_text()
    for name in set(re.findall(r"`([\w/]+\.py)`", readme)):
        assert (ROOT / name).exists(), name


def test_the_lab_sheet_is_short_and_names_a_copy_beside_the_repository():
    sheet = (ROOT / "lab" / "README.md").read_text()
    assert len(sheet.splitlines()) <= 300
    assert "lab.py new ../" in sheet and "lab.py new my-emprl" not in sheet


def test_the_docs_code_is_small_and_free_of_cycles_commits_and_run_lists():
    """benchmarks/records.py (the code whose job is writing the docs) is at most 500 lines (as ruff
    formats it: CI checks the formatting), imports no other benchmark script, and holds no commit
    and no record name: those live in docs/runs/index.json and in the markdown."""
    source = (ROOT / "benchmarks" / "records.py").read_text()
    assert len(source.splitlines()) <= 500
    local = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    imports = {n.names[0].name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    imports |= {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert not imports & local, imports & local
    strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)]
    strings = [s for s in strings if isinstance(s, str)]
    assert not [s for s in strings if re.fullmatch(r"[0-9a-f]{7,40}", s)]
    names = set(records.index()) - {"tiny", "cpu", "small", "gpu"}  # preset names may appear
    assert not [s for s in strings if s in names], "record names belong in index.json or the docs"


def test_student_t_quantiles():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df, t in records.T975.items():
        assert abs(scipy_stats.t.ppf(0.975, df) - t) < 1e-6


def test_intervals_over_seeds_and_against_ppo():
    """An interval over seeds is mean ± t·SD/√n; a row against PPO is Welch's, min(n) − 1 dof,
    and says "not resolved" when it holds 0 or a side has fewer than 3 seeds, and only then."""
    runs = {
        f"r{i}": {"emprl": {"x": x}, "sft": {"x": 0.0}} for i, x in enumerate([2.64, 3.74, 4.30])
    }
    runs |= {f"p{i}": {"emprl": {"x": x}, "sft": {"x": 0.0}} for i, x in enumerate([1.0, 1.5, 2.0])}
    runs |= {f"q{i}": {"emprl": {"x": x}, "sft": {"x": 0.0}} for i, x in enumerate([-1, -0.5, 0])}
    original = records.results
    try:
        records.results = lambda name: runs[name]
        a = records.ci(["r0", "r1", "r2"], "diff.x")
        sd = (sum((x - a.mean) ** 2 for x in [2.64, 3.74, 4.30]) / 2) ** 0.5
        assert abs(a.hi - a.mean - 4.302653 * sd / 3**0.5) < 1e-9 and str(a).startswith("+")
        w = records.welch(["r0", "r1", "r2"], ["p0", "p1", "p2"], "diff.x")
        se = (sd**2 / 3 + 0.25 / 3) ** 0.5
        assert abs(w.mean - (a.mean - 1.5)) < 1e-12 and abs(w.hi - w.mean - 4.302653 * se) < 1e-9
        assert str(w).endswith("], not resolved") and w.lo < 0 < w.hi
        far = records.welch(["r0", "r1", "r2"], ["q0", "q1", "q2"], "diff.x")
        assert far.lo > 0 and str(far).endswith("]")  # resolved: no note
        below = records.welch(["q0", "q1", "q2"], ["r0", "r1", "r2"], "diff.x")
        assert below.hi < 0 and str(below).endswith("]")
        two = records.welch(["r1", "r2"], ["q0", "q0"], "diff.x")
        assert two.lo > 0 and str(two).endswith("], not resolved")  # 2 seeds: never resolved
        one = records.welch(["r0"], ["p0", "p1", "p2"], "diff.x")
        assert str(one).endswith("(one seed: not resolved)") and one.note  # no interval
        assert "[" not in str(records.ci(["r0"], "diff.x"))  # one seed: no interval
    finally:
        records.results = original


def test_new_records_flow_into_the_docs(tmp_path, monkeypatch):
    """Two more PPO seeds of the record pipeline, and an ablation pipeline of the current code with
    rows of several seeds, listed in index.json: the headline counts the seeds, the ablation table
    shows every row with its difference from PPO, and nothing else needs editing."""
    runs = tmp_path / "runs"
    shutil.copytree(records.RUNS, runs)
    index = json.loads((runs / "index.json").read_text())
    n = len(records.seeds("cpu"))
    for seed in (n, n + 1):
        shutil.copytree(runs / "cpu_s1", runs / f"cpu_s{seed}")
        index["records"][f"cpu_s{seed}"] = dict(index["records"]["cpu_s1"], ppo_seed=seed)
    for variant in ("ppo", "no_kl"):
        for seed in range(3):
            name = f"abl_{variant}_{seed}"
            shutil.copytree(
                runs / ("base_s0" if variant == "ppo" else "base_no_kl_s0"), runs / name
            )
            entry = dict(pipeline="abl", variant=variant, ppo_seed=seed, code="current")
            index["records"][name] = dict(entry, dtype="float32", threads=1, commit="0123456")
    (runs / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(records, "RUNS", runs)
    records.clear()
    try:
        assert records.render('len(seeds("cpu"))') == str(n + 2)
        table = records.render("ablations()")
        assert "`abl`" in table and "| no_kl | 3 |" in table
        row = next(line for line in table.splitlines() if line.startswith("| no_kl |"))
        assert row.count("[") == 4  # both labellers, over seeds and against PPO
    finally:
        records.clear()


# What the sentences of docs/ablations.md say of each row of the base pipeline against its PPO
# seeds: "above" or "below" (the interval over seeds excludes 0) or "not resolved". A new record
# that changes one fails here, and the sentence that says it is rewritten.
ABLATION_CLAIMS = {
    ("no_kl", "kl"): "above",
    ("no_kl", "emprl.reward"): "above",
    ("no_kl", "diff.emp_f1"): "above",
    ("no_kl", "diff.emp_f1_judge"): "not resolved",
    ("no_kl", "emprl.ppl"): "above",
    ("no_kl", "emprl.length"): "below",
    ("no_kl", "emprl.unique_frac"): "below",
    ("no_er", "diff.emp_f1"): "not resolved",
    ("no_er", "diff.emp_f1_judge"): "not resolved",
    ("no_er", "diff.emp_f1_er"): "below",
    ("no_er", "diff.emp_f1_judge_er"): "below",
    ("no_er", "diff.emp_f1_ex"): "above",
    ("no_er", "diff.emp_f1_judge_ex"): "above",
    ("no_ip", "diff.emp_f1_ip"): "not resolved",
    ("no_ip", "diff.emp_f1_judge_ip"): "not resolved",
    ("no_ip", "diff.emp_f1_ex"): "above",
    ("no_ip", "diff.emp_f1_judge_ex"): "above",
    ("no_ip", "diff.emp_f1"): "above",
    ("no_ip", "diff.emp_f1_judge"): "not resolved",
    ("no_ex", "diff.emp_f1"): "not resolved",
    ("no_ex", "diff.emp_f1_judge"): "below",
    ("no_ex", "diff.emp_f1_ex"): "below",
    ("no_ex", "diff.emp_f1_judge_ex"): "below",
    ("no_ex", "diff.emp_f1_er"): "above",
    ("no_ex", "diff.emp_f1_judge_er"): "not resolved",
    ("rloo", "kl"): "above",
    ("rloo", "emprl.ppl"): "above",
    ("rloo", "emprl.length"): "below",
    ("rloo", "emprl.unique_frac"): "below",
    ("rloo", "diff.emp_f1"): "not resolved",
    ("rloo", "diff.emp_f1_judge"): "not resolved",
    ("rloo", "diff.emp_f1_er"): "above",
    ("rloo", "diff.emp_f1_judge_er"): "above",
    ("rloo", "diff.emp_f1_judge_ex"): "below",
    ("grpo", "kl"): "below",
    ("grpo", "emprl.length"): "above",
    ("grpo", "emprl.unique_frac"): "above",
    ("grpo", "emprl.ppl"): "below",
    ("grpo", "diff.emp_f1"): "below",
    ("grpo", "diff.emp_f1_judge"): "below",
    ("grpo", "diff.emp_f1_judge_er"): "below",
    ("grpo", "diff.emp_f1_judge_ex"): "above",
}


def test_the_directions_the_ablation_page_states_hold_in_the_records():
    """Each direction a sentence of docs/ablations.md states (ABLATION_CLAIMS) is what the row's
    seeds against PPO's give, and the page names every row it states one for."""
    page = (ROOT / "docs" / "ablations.md").read_text()
    for (row, path), said in ABLATION_CLAIMS.items():
        w = records.welch(records.seeds("base", row), records.seeds("base"), path)
        found = "not resolved" if w.note else ("above" if w.lo > 0 else "below")
        assert found == said, f"{row} {path}: the page says {said}, the records give {w}"
        assert f"(`{row}`)" in page


def test_the_ip_gain_the_pages_call_the_smallest_is_the_smallest():
    """docs/ablations.md and the key's exercise 4 say PPO's IP gain on base is the smallest of the
    three mechanisms' gains (by the identifiers, mean over the PPO seeds)."""
    gain = {
        m: records.ci(records.seeds("base"), f"diff.emp_f1_{m}").mean for m in ("er", "ip", "ex")
    }
    assert min(gain, key=gain.get) == "ip", gain
    assert "IP gain is the smallest" in (ROOT / "docs" / "ablations.md").read_text()
    assert "IP\ngain is the smallest" in (ROOT / "lab" / "answers.md").read_text()
