"""Data for EmpRL: download + cache, EmpatheticDialogues and EPITOME parsing, SentencePiece
tokenizer, batching.

Data directory layout (what the official archives give; `ensure_data` fetches what is missing):
    <data_dir>/empatheticdialogues/{train,valid,test}.csv   ED, Rashkin et al. 2019 (CC BY-NC 4.0)
    <data_dir>/epitome/{emotional-reactions,interpretations,explorations}-reddit.csv
                                                            EPITOME, Sharma et al. 2020

Every problem with a user's file raises DataError, one message naming the file, the line and what to
do. Nothing writes into the data directory but a download, and every file is written whole or not at
all. Shapes: B batch, L longest sequence in the batch.
"""

import csv
import hashlib
import http.client
import io
import json
import os
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from t5 import atomic_write


class DataError(ValueError):
    """A data file or tokenizer model is missing, malformed or unsafe; the message says which and
    what to do."""


ED_SPLITS = ("train", "valid", "test")
ED_COLUMNS = [
    "conv_id",
    "utterance_idx",
    "context",
    "prompt",
    "speaker_idx",
    "utterance",
    "selfeval",
    "tags",
]
# then `rationales`, unused
EPITOME_COLUMNS = ["sp_id", "rp_id", "seeker_post", "response_post", "level"]
MECHANISMS = ("er", "ip", "ex")  # emotional reactions, interpretations, explorations
LEVELS = ("no", "weak", "strong")  # empathy level 0, 1, 2 of each mechanism
EPITOME_FILES = {
    "er": "emotional-reactions-reddit.csv",
    "ip": "interpretations-reddit.csv",
    "ex": "explorations-reddit.csv",
}
URLS = {
    "empatheticdialogues": "https://dl.fbaipublicfiles.com/parlai/empatheticdialogues/empatheticdialogues.tar.gz",
    "epitome": "https://raw.githubusercontent.com/behavioral-data/Empathy-Mental-Health/master/dataset/",
}
EPITOME_SHA256 = {  # commit 0e11f98 of behavioral-data/Empathy-Mental-Health
    "emotional-reactions-reddit.csv": "225b28ffdc257f8a997d557eb937e78b68235e6203c87c7e2203d00fef8545cc",  # noqa: E501
    "interpretations-reddit.csv": "2cedbe4252c919d22a6f46685afa16d3192a91e3306c2d4a386be12a30ad3f29",  # noqa: E501
    "explorations-reddit.csv": "9efa1af8e0537c16894379598f2076cb380ae18aacd9a8d26ebd381f5b7f9645",
}
# the ED archive is ~28 MB (~80 MB of CSVs inside); far bigger is not ED
MAX_DOWNLOAD_BYTES = 500 << 20


# ----------------------------------------------------------------------------- reading files


def _read_text(path) -> str:
    """Whole file as UTF-8 text; DataError for a missing, empty or undecodable file (with its
    line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; set --data_dir / EMPRL_DATA to a complete data directory"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty; delete it and download it again")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({e.reason}); the file is damaged, download it again"
        ) from None


# an int, or a DataError naming file and line
def _int_field(value: str, path, line: int, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(
            f"{path}:{line}: field {name}={value[:40]!r} is not an integer; re-download the file"
        ) from None


# ----------------------------------------------------------------------------- EmpatheticDialogues


@dataclass
class EDExample:
    conv_id: str
    emotion: str  # one of 32 emotion labels (ED's `context` column)
    situation: str  # the speaker's written situation (ED's `prompt` column)
    context: list  # earlier turns, oldest first; turn 0 is the speaker's
    target: str  # the listener's reply to learn


def load_empathetic_dialogues(csv_path) -> list:
    """One EDExample per listener turn (even utterance_idx) of one ED split file, in file order.

    The official format is a plain comma join, commas in text written `_comma_`; some texts start
    with an unmatched `"`, so a quote-aware parser would merge lines: we split on ','. Extra
    trailing fields (a few official rows) are ignored. Rows are grouped by conv_id and ordered by
    utterance_idx (1..n, no gaps)."""
    lines = _read_text(csv_path).split("\n")
    if lines[-1] == "":  # the final newline
        lines.pop()
    header = lines[0].rstrip("\r").split(",")
    if header[:8] != ED_COLUMNS:
        raise DataError(
            f"{csv_path}:1: header {','.join(header)[:120]!r} is not ED's "
            f"{','.join(ED_COLUMNS)!r}; is this an EmpatheticDialogues split file?"
        )
    convs = {}  # conv_id -> list of (utterance_idx, line, fields); dicts keep first-seen order
    for line, text in enumerate(lines[1:], start=2):
        fields = text.rstrip("\r").split(",")
        if len(fields) < 8:
            raise DataError(
                f"{csv_path}:{line}: {len(fields)} comma-separated fields, ED rows "
                "need 8; "
                "the file is damaged (or quote-aware CSV writing merged rows), "
                "download it again"
            )
        idx = _int_field(fields[1], csv_path, line, "utterance_idx")
        convs.setdefault(fields[0], []).append((idx, line, fields))
    examples = []
    for conv_id, rows in convs.items():
        rows.sort(key=lambda r: r[0])
        if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
            raise DataError(
                f"{csv_path}:{rows[0][1]}: conversation {conv_id} has utterance_idx "
                f"{[r[0] for r in rows][:20]}, expected 1..{len(rows)} with no gaps "
                "or repeats"
            )
        turns = [r[2][5].replace("_comma_", ",") for r in rows]
        emotion = rows[0][2][2]
        situation = rows[0][2][3].replace("_comma_", ",")
        # 0-based odd i = 1-based even utterance_idx = listener turn
        for i in range(1, len(turns), 2):
            examples.append(EDExample(conv_id, emotion, situation, turns[:i], turns[i]))
    return examples


# ----------------------------------------------------------------------------- EPITOME


@dataclass
class EpitomeRecord:
    sp_id: str  # seeker post id (Reddit)
    rp_id: str  # response post id
    seeker_post: str
    response_post: str
    level: int  # 0 no, 1 weak, 2 strong communication of this file's mechanism


def load_epitome(csv_path) -> list:
    """All records of one EPITOME file, in file order, duplicates included (see
    `load_epitome_splits`). Quoted CSV (posts hold commas, quotes and newlines), read with the csv
    module; `rationales` is unused."""
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""))
    records = []
    try:
        header = next(reader)
        if header[:5] != EPITOME_COLUMNS:
            raise DataError(
                f"{csv_path}:1: header {header[:6]!r} does not start with "
                f"{EPITOME_COLUMNS!r}; "
                f"is this an EPITOME *-reddit.csv file?"
            )
        for row in reader:
            if len(row) < 5:
                raise DataError(
                    f"{csv_path}:{reader.line_num}: {len(row)} fields, EPITOME rows "
                    "need 5 "
                    f"({','.join(EPITOME_COLUMNS)}); the file is damaged, download it "
                    "again"
                )
            level = _int_field(row[4], csv_path, reader.line_num, "level")
            if level not in (0, 1, 2):
                raise DataError(f"{csv_path}:{reader.line_num}: level {level} is outside 0..2")
            records.append(EpitomeRecord(row[0], row[1], row[2], row[3], level))
    except csv.Error as e:  # e.g. a field longer than csv's field size limit
        raise DataError(
            f"{csv_path}:{reader.line_num}: not valid CSV ({e}); download the file again"
        ) from None
    if not records:
        raise DataError(f"{csv_path}: a header but no rows; download the file again")
    return records


def load_epitome_splits(data_dir, seed=0) -> dict:
    """{mech: {"train"|"valid"|"test": [EpitomeRecord]}}, 75/5/20 of the seeker posts, seeded.

    Duplicates: 60 (sp_id, rp_id) pairs occur twice or more (10/10/5 with conflicting levels in
    ER/IP/EX); the first in file order is kept, the same pair for every mechanism. EPITOME ships no
    split: we split by seeker post, so a post answered twice is never in both train and test, and a
    pair lands in the same split for all three mechanisms (the sorted union of sp_ids, shuffled with
    `seed`, cut at 75 % / 80 %)."""
    records = {}
    for mech in MECHANISMS:
        seen = set()
        records[mech] = []
        for r in load_epitome(Path(data_dir) / "epitome" / EPITOME_FILES[mech]):
            if (r.sp_id, r.rp_id) not in seen:
                seen.add((r.sp_id, r.rp_id))
                records[mech].append(r)
    seekers = sorted({r.sp_id for recs in records.values() for r in recs})
    order = np.random.default_rng(seed).permutation(len(seekers))
    n_train = round(0.75 * len(seekers))
    n_valid = round(0.05 * len(seekers))
    split_of = {
        seekers[i]: "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
        for rank, i in enumerate(order)
    }
    return {
        mech: {s: [r for r in recs if split_of[r.sp_id] == s] for s in ("train", "valid", "test")}
        for mech, recs in records.items()
    }


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """SentencePiece with T5's conventions: pad 0, EOS 1 (appended), UNK 2, no BOS. Loads any such
    model, e.g. a pretrained T5's `spiece.model` (32,000 pieces; its 32,128 embedding rows' extra
    ids are never produced)."""

    pad_id = 0
    eos_id = 1
    unk_id = 2

    def __init__(self, model_path):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:  # missing, truncated or not a model
            raise DataError(
                f"{self.path}: not a SentencePiece model ({str(e).strip()[:120]})"
            ) from None
        if (ids := (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())) != (0, 1, 2):
            raise DataError(
                f"{self.path}: pad/eos/unk ids are {ids}, T5 needs 0/1/2; retrain "
                "with Tokenizer.train"
            )
        self.vocab_size = self.sp.GetPieceSize()

    @classmethod
    def train(cls, texts, model_path, vocab_size=8000, seed=0):
        """Train a unigram model on `texts` and write it to model_path. Deterministic for a given
        corpus, size and seed (one thread, no shuffling); a small corpus may end with fewer pieces
        than asked (see .vocab_size)."""
        # sentencepiece writes the model here; we write the file ourselves, atomically
        proto = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=proto,
                model_type="unigram",
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                character_coverage=0.9995,
                pad_id=0,
                eos_id=1,
                unk_id=2,
                bos_id=-1,
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                input_sentence_size=200_000,
                shuffle_input_sentence=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece reports an empty or too-small corpus this way
            raise DataError(
                f"training the tokenizer for {model_path} failed ({e}); "
                f"give it more text or a smaller vocab_size"
            ) from None
        atomic_write(model_path, proto.getvalue())
        return cls(model_path)

    def encode(self, text: str, add_eos=True) -> list:
        ids = self.sp.EncodeAsIds(text)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids) -> str:
        """Text of ids up to the first EOS; pad, UNK and ids beyond the vocabulary are skipped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.sp.DecodeIds([i for i in ids if self.unk_id < i < self.vocab_size])


# ----------------------------------------------------------------------------- model inputs


def format_context(turns) -> str:
    """Role-tagged dialogue context: "speaker: I lost my job. listener: Oh no! speaker: Yes, today."

    The model replies as the listener, so the last turn is the speaker's and roles alternate
    backwards from it; an EPITOME seeker post or a user's message is one speaker turn. Plain words,
    not special tokens, so any SentencePiece vocabulary (ours or T5's) encodes them."""
    n = len(turns)
    return " ".join(
        f"{'speaker' if (n - 1 - i) % 2 == 0 else 'listener'}: {t.strip()}"
        for i, t in enumerate(turns)
    )


def encode_context(tok, turns, max_len=200) -> list:
    """Ids of format_context(turns) + EOS, at most max_len: the oldest tokens are dropped, so the
    end of the latest turn, which the reply answers, is always kept."""
    return tok.encode(format_context(turns), add_eos=False)[-(max_len - 1) :] + [tok.eos_id]


def encode_target(tok, text, max_len=50) -> list:
    """Ids of the reply + EOS, cut to max_len (see cut_target)."""
    return cut_target(tok.encode(text), max_len)


def cut_target(ids, max_len) -> list:
    """Ids that end with EOS, cut to max_len with the EOS kept as the last token."""
    return ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else ids


def make_batch(split, idx, device="cpu"):
    """Examples idx of a split (a dict of equal-length lists) as tensors on device: token-id lists
    become `key` (B, L), right-padded with 0, and `key_mask` (B, L), 1 = real token; numbers become
    `key` (B, ...)."""
    batch = {}
    for key, values in split.items():
        rows = [values[i] for i in idx]
        if isinstance(rows[0], list):  # token ids
            L = max(len(r) for r in rows)
            # (B, L)
            batch[key] = torch.tensor([r + [0] * (L - len(r)) for r in rows], dtype=torch.long)
            # (B, L)
            batch[f"{key}_mask"] = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        else:
            batch[key] = torch.as_tensor(np.asarray(rows))  # (B,) or (B, M)
    return {k: v.to(device) for k, v in batch.items()}


def batch_indices(lengths, batch_size, shuffle, seed, bucket=False) -> list:
    """Index batches covering every example once (the last may be short); shuffle: seeded. bucket:
    sort by length in chunks of 50 batches (less padding), then shuffle the batches' order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        chunk = 50 * batch_size
        order = np.concatenate(
            [
                sorted(order[i : i + chunk], key=lambda j: lengths[j])
                for i in range(0, len(order), chunk)
            ]
            or [order]
        )
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if bucket and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def in_input_order(fn, lengths, batch_size):
    """[fn(idx)[j] for every example], fn called on batches of similar length (little padding); the
    rows fn returns for a batch are put back in the order of the input. Every batched inference goes
    through here."""
    out = [None] * len(lengths)
    for idx in batch_indices(lengths, batch_size, shuffle=False, seed=0, bucket=True):
        for i, row in zip(idx, fn(idx)):
            out[i] = row
    return out


# ----------------------------------------------------------------------------- downloads


def default_data_dir() -> Path:  # EMPRL_DATA if set, else ~/.cache/emprl/data
    return Path(
        os.environ.get("EMPRL_DATA") or Path.home() / ".cache" / "emprl" / "data"
    ).expanduser()


def ensure_data(data_dir=None) -> Path:
    """data_dir once every data file is there, downloading the missing ones. Offline or on a failed
    download: a DataError listing the missing files, where to put them and where to get them."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    required = [f"empatheticdialogues/{s}.csv" for s in ED_SPLITS] + [
        f"epitome/{f}" for f in EPITOME_FILES.values()
    ]
    missing = [f for f in required if not (data_dir / f).is_file()]
    if not missing:
        return data_dir
    try:
        if any(f.startswith("empatheticdialogues/") for f in missing):
            _fetch_empathetic_dialogues(data_dir)
        for name in EPITOME_FILES.values():
            if f"epitome/{name}" in missing:
                print(f"downloading {URLS['epitome'] + name}")
                atomic_write(
                    data_dir / "epitome" / name, fetch(URLS["epitome"] + name, EPITOME_SHA256[name])
                )
    except (ValueError, KeyError, OSError, tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(
            f"data files missing in {data_dir}: {', '.join(missing)}. Download "
            f"failed: {type(e).__name__}: "
            f"{e}. Get them from {URLS['empatheticdialogues']} (train/valid/test.csv "
            "into "
            f"{data_dir / 'empatheticdialogues'}) and {URLS['epitome']} (the three "
            "*-reddit.csv into "
            f"{data_dir / 'epitome'}), or set --data_dir / EMPRL_DATA to a directory "
            "with them"
        ) from None
    return data_dir


def fetch(url, sha256=None, max_bytes=MAX_DOWNLOAD_BYTES) -> bytes:
    """The body of url, checked against its Content-Length, max_bytes and sha256; any failure is a
    DataError."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            expected = r.headers.get("Content-Length")
            body = r.read(max_bytes + 1)
    except http.client.IncompleteRead as e:
        raise DataError(
            f"{url}: received {len(e.partial)} bytes, then the connection closed "
            "(interrupted download)"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # offline, HTTP error, bad URL
        raise DataError(f"downloading {url} failed: {type(e).__name__}: {e}") from None
    if len(body) > max_bytes:
        raise DataError(f"{url} is larger than {max_bytes} bytes, not the expected file")
    if expected is not None and str(len(body)) != expected.strip():
        raise DataError(f"{url}: received {len(body)} of {expected} bytes (interrupted download)")
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise DataError(
            f"{url}: sha256 {hashlib.sha256(body).hexdigest()} differs from the expected {sha256}"
        )
    return body


def _fetch_empathetic_dialogues(data_dir: Path):
    """Download the ED archive (in memory) and write its three split CSVs. Members are read by their
    fixed names and written to fixed paths, so no member can write elsewhere. ED publishes no
    checksum: the first download records the archive's sha256 in
    <data_dir>/empatheticdialogues.tar.gz.json, later ones must match."""
    record = data_dir / "empatheticdialogues.tar.gz.json"
    known = json.loads(record.read_text())["sha256"] if record.is_file() else None
    print(f"downloading {URLS['empatheticdialogues']}")
    body = fetch(URLS["empatheticdialogues"], known)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        # reads it all: truncation fails here
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        names = [f"empatheticdialogues/{s}.csv" for s in ED_SPLITS]
        if any(n not in members for n in names):
            raise DataError(
                f"{URLS['empatheticdialogues']} has no file "
                f"{[n for n in names if n not in members]}; "
                f"not the ED archive"
            )
        csvs = [tar.extractfile(members[n]).read(MAX_DOWNLOAD_BYTES) for n in names]
    for name, text in zip(names, csvs):  # only once all three are read
        atomic_write(data_dir / name, text)
    if known is None:  # the first download: record what later ones must match
        atomic_write(record, json.dumps({"sha256": hashlib.sha256(body).hexdigest()}).encode())
