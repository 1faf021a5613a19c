"""data.py: parsing (fixture files written here, and the real files when EMPRL_DATA has them),
EPITOME splits, the tokenizer, context encoding, batching, downloads against a local http.server,
and a fuzz of both CSV parsers. Runs in a few seconds."""

import csv
import hashlib
import io
import json
import random
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import data
from data import DataError

ED_HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"


def ed_text():
    """Two conversations: 4 turns (rows out of order, `_comma_`, a stray quote, extra trailing
    fields) and 3 turns."""
    rows = [
        "hit:1_conv:2,2,proud,I won_comma_ finally.,2,Congratulations! What did you win?,,",
        "hit:1_conv:2,1,proud,I won_comma_ finally.,1,I won the chess cup_comma_ at last.,,",
        'hit:1_conv:2,3,proud,I won_comma_ finally.,1,"The regional one.,5|5|5,,extra,fields',
        "hit:1_conv:2,4,proud,I won_comma_ finally.,2,That is huge_comma_ well done.,,",
        "hit:2_conv:4,1,sad,My dog died.,3,My dog died last week.,,",
        "hit:2_conv:4,2,sad,My dog died.,4,I am so sorry.,,",
        "hit:2_conv:4,3,sad,My dog died.,3,Thanks.,,",
    ]
    return "\n".join([ED_HEADER] + rows) + "\n"


def epitome_text(rows):
    """Quoted CSV in EPITOME's layout; rows are (sp_id, rp_id, seeker_post, response_post,
    level)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sp_id", "rp_id", "seeker_post", "response_post", "level", "rationales"])
    for r in rows:
        w.writerow(list(r) + [""])
    return buf.getvalue()


EPITOME_ROWS = [
    ("s1", "r1", "I feel alone,\nagain.", 'I\'m so sorry "friend".', 2),
    ("s2", "r2", "Exams tomorrow", "Good luck!", 0),
    ("s1", "r3", "I feel alone,\nagain.", "Why?", 1),
]


# ----------------------------------------------------------------------------- ED parsing


def test_ed_fixture_one_example_per_listener_turn_with_earlier_turns_as_context(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text(ed_text())
    ex = data.load_empathetic_dialogues(p)
    assert [(e.conv_id, len(e.context)) for e in ex] == [
        ("hit:1_conv:2", 1),
        ("hit:1_conv:2", 3),
        ("hit:2_conv:4", 1),
    ]
    # rows re-ordered by utterance_idx, _comma_ restored
    assert ex[0].context == ["I won the chess cup, at last."]
    assert ex[0].target == "Congratulations! What did you win?"
    # stray quote kept, extra trailing fields ignored
    assert ex[1].context[2] == '"The regional one.'
    assert ex[1].target == "That is huge, well done."
    assert (ex[0].emotion, ex[0].situation) == ("proud", "I won, finally.")


ED_BAD = {  # name -> (file bytes or None for a missing file, text the message must contain)
    "missing": (None, "not found"),
    "empty": (b"", "empty"),
    "wrong_header": (b"a,b,c\nx,1,y\n", ":1:"),
    "too_few_fields": ((ED_HEADER + "\nc1,1,sad,p,1,hi,,\nc1,2,sad,p\n").encode(), ":3:"),
    "non_integer_idx": ((ED_HEADER + "\nc1,1,sad,p,1,hi,,\nc1,two,sad,p,1,hi,,\n").encode(), ":3:"),
    "idx_gap": ((ED_HEADER + "\nc1,1,sad,p,1,hi,,\nc1,3,sad,p,1,hi,,\n").encode(), "expected 1..2"),
    "undecodable": (
        (ED_HEADER + "\nc1,1,sad,p,1,hi,,\nc1,2,sad,p,1,h\xff\xfe,,\n").encode("latin-1"),
        ":3:",
    ),
}


@pytest.mark.parametrize("case", sorted(ED_BAD))
def test_ed_bad_input_raises_data_error_naming_file_and_line(tmp_path, case):
    content, expected = ED_BAD[case]
    p = tmp_path / "bad.csv"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.load_empathetic_dialogues(p)
    assert str(p) in str(e.value) and expected in str(e.value)


@pytest.mark.slow
def test_ed_real_files_give_the_published_example_counts(real_data_dir):
    """40,254 / 5,738 / 5,259 listener turns: the number of (context, reply) pairs EmpRL trains and
    tests on."""
    counts = {}
    for split in data.ED_SPLITS:
        ex = data.load_empathetic_dialogues(real_data_dir / "empatheticdialogues" / f"{split}.csv")
        counts[split] = len(ex)
        # speaker first and last: odd context length
        assert all(len(e.context) % 2 == 1 for e in ex)
        assert not any("_comma_" in e.target or "_comma_" in e.context[-1] for e in ex)
    assert counts == {"train": 40254, "valid": 5738, "test": 5259}


# ----------------------------------------------------------------------------- EPITOME


def test_epitome_fixture_parses_quoted_multiline_fields(tmp_path):
    p = tmp_path / "er.csv"
    p.write_text(epitome_text(EPITOME_ROWS))
    recs = data.load_epitome(p)
    assert [(r.sp_id, r.rp_id, r.level) for r in recs] == [
        ("s1", "r1", 2),
        ("s2", "r2", 0),
        ("s1", "r3", 1),
    ]
    assert (
        recs[0].seeker_post == "I feel alone,\nagain."
        and recs[0].response_post == 'I\'m so sorry "friend".'
    )


EPITOME_BAD = {
    "missing": (None, "not found"),
    "empty": (b"  \n", "empty"),
    "wrong_header": (b"id,text,label\n1,a,0\n", ":1:"),
    "header_only": (epitome_text([]).encode(), "no rows"),
    "too_few_fields": (epitome_text(EPITOME_ROWS[:1]).encode() + b"s9,r9,post\n", ":4:"),
    "non_integer_level": (epitome_text([("s1", "r1", "a", "b", "high")]).encode(), ":2:"),
    "level_outside_0_2": (
        epitome_text([("s1", "r1", "a", "b", 0), ("s1", "r2", "a", "b", 3)]).encode(),
        ":3:",
    ),
    "undecodable": (
        epitome_text([("s1", "r1", "a", "b", 0)]).encode() + b"s2,r2,\xc3\x28,b,0,\n",
        ":3:",
    ),
}


@pytest.mark.parametrize("case", sorted(EPITOME_BAD))
def test_epitome_bad_input_raises_data_error_naming_file_and_line(tmp_path, case):
    content, expected = EPITOME_BAD[case]
    p = tmp_path / "bad.csv"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.load_epitome(p)
    assert str(p) in str(e.value) and expected in str(e.value)


def write_epitome_dir(root, n_seekers=40):
    """Three mechanism files with the same pairs in the same order, a duplicate pair with
    conflicting levels."""
    rows = [
        (f"s{i}", f"r{i}{j}", f"post {i}", f"reply {i}{j}", (i + j) % 3)
        for i in range(n_seekers)
        for j in range(i % 3 + 1)
    ]  # 1-3 responses per seeker post
    # duplicate of the first pair, other level
    rows.insert(5, rows[0][:4] + ((rows[0][4] + 1) % 3,))
    (root / "epitome").mkdir(parents=True)
    for name in data.EPITOME_FILES.values():
        (root / "epitome" / name).write_text(epitome_text(rows))
    return rows


def test_epitome_splits_dedupe_keep_first_and_split_by_seeker(tmp_path):
    """First occurrence of a duplicate pair wins; a seeker post's pairs share a split; same split
    for all mechanisms."""
    rows = write_epitome_dir(tmp_path)
    splits = data.load_epitome_splits(tmp_path, seed=0)
    for mech in data.MECHANISMS:
        got = [r for s in ("train", "valid", "test") for r in splits[mech][s]]
        assert len(got) == len(rows) - 1
        first = [r for r in got if (r.sp_id, r.rp_id) == rows[0][:2]]
        assert len(first) == 1 and first[0].level == rows[0][4]
        seekers = [{r.sp_id for r in splits[mech][s]} for s in ("train", "valid", "test")]
        assert not (seekers[0] & seekers[1] or seekers[0] & seekers[2] or seekers[1] & seekers[2])
        assert [len(x) for x in seekers] == [30, 2, 8]  # 75/5/20 of 40 seekers
    keys = {
        m: {s: [(r.sp_id, r.rp_id) for r in splits[m][s]] for s in splits[m]}
        for m in data.MECHANISMS
    }
    assert keys["er"] == keys["ip"] == keys["ex"]
    assert data.load_epitome_splits(tmp_path, seed=0) == splits
    assert data.load_epitome_splits(tmp_path, seed=1) != splits


def test_epitome_real_files_rows_dedup_and_75_5_20_split(real_data_dir):
    for name in data.EPITOME_FILES.values():
        recs = data.load_epitome(real_data_dir / "epitome" / name)
        assert len(recs) == 3084 and len({(r.sp_id, r.rp_id) for r in recs}) == 3023
    splits = data.load_epitome_splits(real_data_dir, seed=0)
    for mech in data.MECHANISMS:
        sizes = {s: len(v) for s, v in splits[mech].items()}
        assert sum(sizes.values()) == 3023
        assert abs(sizes["train"] / 3023 - 0.75) < 0.02 and abs(sizes["valid"] / 3023 - 0.05) < 0.01
        assert {(r.sp_id, r.rp_id) for r in splits[mech]["test"]} == {
            (r.sp_id, r.rp_id) for r in splits["er"]["test"]
        }
        assert not {r.sp_id for r in splits[mech]["train"]} & {
            r.sp_id for r in splits[mech]["test"]
        }
    assert data.load_epitome_splits(real_data_dir, seed=0) == splits


# ----------------------------------------------------------------------- tokenizer and model inputs

CORPUS = [
    "I lost my job today and I feel terrible.",
    "Oh no, I'm so sorry to hear that!",
    "What happened at work?",
    "My dog is sick, and I am worried about him.",
    "That must be hard. How old is he?",
    "He is twelve years old.",
    "speaker: hi listener: hello",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.Tokenizer.train(
        CORPUS, tmp_path_factory.mktemp("tok") / "spiece.model", vocab_size=200
    )


def test_tokenizer_round_trip_and_t5_special_ids(tok):
    text = "I am so sorry, what happened?"
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_id == 1 and (tok.pad_id, tok.unk_id) == (0, 2) and 1 not in ids[:-1]
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-1] + [1, 5, 6] + [0, 0]) == text  # stops at EOS
    assert tok.decode([0] + ids) == text  # pad skipped
    padded = data.make_batch({"ids": [tok.encode("What happened?"), ids]}, [0, 1])["ids"]
    assert [tok.decode(row) for row in padded] == ["What happened?", text]


def test_tokenizer_training_is_deterministic_and_atomic(tmp_path):
    a = data.Tokenizer.train(CORPUS, tmp_path / "a.model", vocab_size=200, seed=3)
    b = data.Tokenizer.train(CORPUS, tmp_path / "b.model", vocab_size=200, seed=3)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]
    assert a.vocab_size == b.vocab_size <= 200


def test_tokenizer_bad_models_and_corpora_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="none.model: not a SentencePiece model"):
        data.Tokenizer(tmp_path / "none.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        data.Tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match="smaller vocab_size"):
        data.Tokenizer.train(["abcdefghijklmnop"], tmp_path / "small.model", vocab_size=5)
    assert not (tmp_path / "small.model").exists()
    # a model with sentencepiece's default ids (unk 0, bos 1, eos 2) is not T5-compatible
    import sentencepiece as spm

    w = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=w, vocab_size=50, minloglevel=2
    )
    (tmp_path / "other.model").write_bytes(w.getvalue())
    with pytest.raises(DataError, match="T5 needs 0/1/2"):
        data.Tokenizer(tmp_path / "other.model")


def test_format_context_tags_roles_with_the_last_turn_the_speakers():
    assert data.format_context(["I am sad."]) == "speaker: I am sad."
    assert (
        data.format_context(["I am sad.", " Why? ", "Lost my job."])
        == "speaker: I am sad. listener: Why? speaker: Lost my job."
    )
    assert data.format_context(["Hi.", "Hello!"]) == "listener: Hi. speaker: Hello!"


def test_encode_context_left_truncation_keeps_the_latest_turn_and_ends_with_eos(tok):
    turns = ["I lost my job today and I feel terrible."] * 30 + ["My dog is sick."]
    ids = data.encode_context(tok, turns, max_len=30)
    assert len(ids) == 30 and ids[-1] == tok.eos_id
    assert tok.decode(ids).endswith("speaker: My dog is sick.")
    full = tok.encode(data.format_context(turns), add_eos=False)
    assert ids[:-1] == full[-29:]  # the most recent tokens, in order
    assert data.encode_context(tok, ["Hi."], max_len=200) == tok.encode("speaker: Hi.")


def test_encode_target_cuts_at_max_len_with_eos_last(tok):
    long = " ".join(CORPUS[:10])
    ids = data.encode_target(tok, long, max_len=50)
    assert (
        len(ids) == 50
        and ids[-1] == tok.eos_id
        and ids[:-1] == tok.encode(long, add_eos=False)[:49]
    )
    assert data.encode_target(tok, "He is twelve.") == tok.encode("He is twelve.")
    assert data.cut_target([5, 6, 7, 1], 3) == [5, 6, 1] and data.cut_target([5, 1], 3) == [5, 1]


def test_make_batch_pads_token_lists_right_with_a_mask_and_stacks_numbers():
    """Token-id lists become right-padded ids and a mask (1 = real token); numbers and arrays are
    stacked."""
    split = {
        "ctx": [[5, 6, 1], [7, 1], [9, 9, 9, 1]],
        "level": [2, 0, 1],
        "levels": np.array([[0, 1, 2]] * 3),
    }
    b = data.make_batch(split, [2, 1])
    assert b["ctx"].dtype == b["ctx_mask"].dtype == torch.long
    assert b["ctx"].tolist() == [[9, 9, 9, 1], [7, 1, 0, 0]] and b["ctx_mask"].tolist() == [
        [1, 1, 1, 1],
        [1, 1, 0, 0],
    ]
    assert b["level"].tolist() == [1, 0] and b["levels"].shape == (2, 3)


def test_in_input_order_batches_by_length_and_returns_rows_in_input_order():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    seen = []

    def fn(idx):
        seen.append([lengths[i] for i in idx])
        return [10 * i for i in idx]

    assert data.in_input_order(fn, lengths, batch_size=3) == [10 * i for i in range(7)]
    assert seen == [[1, 2, 3], [5, 7, 8], [9]]  # similar lengths share a batch


def test_batch_indices_cover_each_index_once_seeded_and_bucketing_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(1000)]
    for shuffle in (False, True):
        for bucket in (False, True):
            batches = data.batch_indices(lengths, 16, shuffle=shuffle, seed=1, bucket=bucket)
            assert sorted(i for b in batches for i in b) == list(range(1000))
            # bucketed order may move the short batch
            assert all(len(b) == 16 for b in batches[:-1]) or bucket
            assert batches == data.batch_indices(
                lengths, 16, shuffle=shuffle, seed=1, bucket=bucket
            )
    assert data.batch_indices(lengths, 16, shuffle=False, seed=0)[0] == list(range(16))
    assert data.batch_indices(lengths, 16, True, seed=1) != data.batch_indices(
        lengths, 16, True, seed=2
    )
    padding = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    bucketed, plain = (
        data.batch_indices(lengths, 16, True, 1, bucket=True),
        data.batch_indices(lengths, 16, True, 1),
    )
    assert padding(bucketed) < 0.7 * padding(plain)


# ----------------------------------------------------------------------------- downloads


class Server:
    """A local http.server: routes maps a path to bytes; paths in `truncate` send half the promised
    bytes."""

    def __init__(self):
        self.routes, self.truncate, self.requests = {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()


def make_tar(members):
    """tar.gz bytes; members maps name -> bytes, or -> ("symlink", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


ED_MEMBERS = {f"empatheticdialogues/{s}.csv": ed_text().encode() for s in data.ED_SPLITS}


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Server()
    s.routes["/ed.tar.gz"] = make_tar(ED_MEMBERS)
    epitome = epitome_text(EPITOME_ROWS).encode()
    for name in data.EPITOME_FILES.values():
        s.routes[f"/epitome/{name}"] = epitome
        monkeypatch.setitem(data.EPITOME_SHA256, name, hashlib.sha256(epitome).hexdigest())
    monkeypatch.setitem(data.URLS, "empatheticdialogues", s.url + "/ed.tar.gz")
    monkeypatch.setitem(data.URLS, "epitome", s.url + "/epitome/")
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_download_fetches_extracts_records_checksum_then_never_again(tmp_path, server):
    d = tmp_path / "data"
    assert data.ensure_data(d) == d
    assert listing(d) == [
        "empatheticdialogues",
        "empatheticdialogues.tar.gz.json",
        "empatheticdialogues/test.csv",
        "empatheticdialogues/train.csv",
        "empatheticdialogues/valid.csv",
        "epitome",
    ] + sorted(f"epitome/{n}" for n in data.EPITOME_FILES.values())  # no archive, no temp files
    assert len(data.load_empathetic_dialogues(d / "empatheticdialogues" / "valid.csv")) == 3
    record = json.loads((d / "empatheticdialogues.tar.gz.json").read_text())
    assert record["sha256"] == hashlib.sha256(server.routes["/ed.tar.gz"]).hexdigest()
    n, before = len(server.requests), {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    assert data.ensure_data(d) == d  # complete: no request, nothing written
    assert len(server.requests) == n and before == {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    # a re-download must match the recorded sha256
    (d / "empatheticdialogues" / "test.csv").unlink()
    server.routes["/ed.tar.gz"] = make_tar({**ED_MEMBERS, "empatheticdialogues/README": b"changed"})
    with pytest.raises(DataError, match="sha256"):
        data.ensure_data(d)
    assert (
        not (d / "empatheticdialogues" / "test.csv").exists()
        and not (d / "empatheticdialogues.tar.gz").exists()
    )


def test_fetch_checks_length_size_and_sha256(tmp_path, server):
    body = server.routes["/ed.tar.gz"]
    server.routes["/cut"] = body
    server.truncate.add("/cut")
    assert data.fetch(server.url + "/ed.tar.gz") == body
    for url, kwargs, expected in [
        ("/cut", {}, "interrupted"),
        ("/ed.tar.gz", {"sha256": "0" * 64}, "sha256"),
        ("/ed.tar.gz", {"max_bytes": 100}, "larger than"),
        ("/nothing", {}, "HTTPError"),
    ]:
        with pytest.raises(DataError, match=expected):
            data.fetch(server.url + url, **kwargs)


BAD_ARCHIVES = {
    "interrupted": ("truncate", "interrupted download"),
    "truncated_tarball": ("half", "empatheticdialogues"),
    "missing_member": ({k: v for k, v in ED_MEMBERS.items() if "test" not in k}, "has no file"),
    "symlink_as_split": (
        {
            **{k: v for k, v in ED_MEMBERS.items() if "test" not in k},
            "empatheticdialogues/test.csv": ("symlink", "/etc/passwd"),
        },
        "has no file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_ed_archive_is_refused_and_leaves_nothing_behind(tmp_path, server, case):
    kind, expected = BAD_ARCHIVES[case]
    if kind == "truncate":
        server.truncate.add("/ed.tar.gz")
    elif kind == "half":
        server.routes["/ed.tar.gz"] = server.routes["/ed.tar.gz"][
            : len(server.routes["/ed.tar.gz"]) // 2
        ]
    else:
        server.routes["/ed.tar.gz"] = make_tar(kind)
    d = tmp_path / "data"
    with pytest.raises(DataError, match=expected) as e:
        data.ensure_data(d)
    assert "empatheticdialogues/train.csv" in str(e.value) and e.value.__cause__ is None
    assert [p for p in listing(d) if p.startswith("empatheticdialogues")] in (
        [],
        ["empatheticdialogues"],
    )


@pytest.mark.parametrize("member", ["../evil.csv", "/tmp/evil.csv", "empatheticdialogues/evil.csv"])
def test_ed_archive_members_other_than_the_three_splits_are_never_written(tmp_path, server, member):
    """Members are read by their fixed names and written to fixed paths: a path with '..', an
    absolute path or an extra file in the archive writes nothing anywhere."""
    server.routes["/ed.tar.gz"] = make_tar({**ED_MEMBERS, member: b"x"})
    d = tmp_path / "data"
    data.ensure_data(d)
    assert sorted(p.name for p in (d / "empatheticdialogues").iterdir()) == [
        "test.csv",
        "train.csv",
        "valid.csv",
    ]
    assert not (tmp_path / "evil.csv").exists() and not list(tmp_path.rglob("evil.csv"))


def test_epitome_download_with_wrong_checksum_is_refused(tmp_path, server, monkeypatch):
    name = data.EPITOME_FILES["ip"]
    monkeypatch.setitem(data.EPITOME_SHA256, name, "0" * 64)
    d = tmp_path / "data"
    with pytest.raises(DataError, match="sha256"):
        data.ensure_data(d)
    # er was fine, ip refused, ex never fetched
    assert listing(d / "epitome") == [data.EPITOME_FILES["er"]]


def test_offline_error_lists_missing_files_where_to_put_and_get_them(tmp_path, monkeypatch):
    # port 9: refused
    monkeypatch.setitem(data.URLS, "empatheticdialogues", "http://127.0.0.1:9/ed.tar.gz")
    d = tmp_path / "data"
    (d / "epitome").mkdir(parents=True)
    for name in data.EPITOME_FILES.values():
        (d / "epitome" / name).write_text("x")
    with pytest.raises(DataError) as e:
        data.ensure_data(d)
    msg = str(e.value)
    assert (
        "empatheticdialogues/train.csv" in msg and "epitome/" not in msg.split("Download failed")[0]
    )
    assert str(d / "empatheticdialogues") in msg and "http://127.0.0.1:9/ed.tar.gz" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_default_data_dir_follows_emprl_data(monkeypatch, tmp_path):
    monkeypatch.setenv("EMPRL_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("EMPRL_DATA")
    assert data.default_data_dir().parts[-3:] == (".cache", "emprl", "data")


# ----------------------------------------------------------------------------- fuzz


def mutate(rng, raw: bytes) -> bytes:
    """A few random edits: flip/insert/delete bytes, inject CSV-significant characters, truncate."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        op, i = rng.randrange(5), rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice(
                [b",", b'"', b"\n", b"\r", b"\x00", b"_comma_", b"-1", b"7", b"\xff", b"\xe2\x80"]
            )
        elif op == 2:
            del b[i : i + rng.randint(1, 20)]
        elif op == 3:
            b = b[:i]
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 10)))
    return bytes(b)


@pytest.mark.parametrize(
    "parser,seed_text",
    [(data.load_empathetic_dialogues, ed_text()), (data.load_epitome, epitome_text(EPITOME_ROWS))],
)
def test_fuzzed_csv_files_only_ever_raise_data_error(tmp_path, parser, seed_text):
    """Seeded and time-bounded (~1 s per parser): any input either parses or raises our
    DataError."""
    rng, p, n, t0 = random.Random(0), tmp_path / "fuzz.csv", 0, time.monotonic()
    while time.monotonic() - t0 < 1.0:
        if rng.random() < 0.9:
            raw = mutate(rng, seed_text.encode())
        else:  # random bytes
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        p.write_bytes(raw)
        try:
            parser(p)
        except DataError:
            pass
        n += 1
    assert n > 100
