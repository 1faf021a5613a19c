"""Data for EmpRL: download + cache, EmpatheticDialogues and EPITOME parsing, SentencePiece tokenizer, batching.

Data directory layout (what the official archives give; `ensure_data` fetches what is missing):
    <data_dir>/empatheticdialogues/{train,valid,test}.csv    ED, Rashkin et al. 2019 (CC BY-NC 4.0)
    <data_dir>/epitome/{emotional-reactions,interpretations,explorations}-reddit.csv   Sharma et al. 2020

Every problem with a user's files raises DataError with one message naming the file, the line and what
to do. Nothing here writes into the data directory except a download into it, and every write goes to
a temporary name in the same folder and is renamed when complete, so a killed run never leaves a file
that looks complete.

Shapes: B batch, L longest sequence in the batch.
"""
import csv
import hashlib
import http.client
import io
import json
import os
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import sentencepiece as spm
import torch


class DataError(ValueError):
    """A data file or tokenizer model is missing, malformed or unsafe; the message says which and what to do."""


ED_SPLITS = ("train", "valid", "test")
ED_COLUMNS = ["conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance", "selfeval", "tags"]
EPITOME_COLUMNS = ["sp_id", "rp_id", "seeker_post", "response_post", "level"]  # then `rationales`, unused
MECHANISMS = ("er", "ip", "ex")
EPITOME_FILES = {"er": "emotional-reactions-reddit.csv", "ip": "interpretations-reddit.csv",
                 "ex": "explorations-reddit.csv"}
# Official locations; a dict so tests (or a mirror) can point them elsewhere.
URLS = {"empatheticdialogues": "https://dl.fbaipublicfiles.com/parlai/empatheticdialogues/empatheticdialogues.tar.gz",
        "epitome": "https://raw.githubusercontent.com/behavioral-data/Empathy-Mental-Health/master/dataset/"}
EPITOME_SHA256 = {  # commit 0e11f98 of behavioral-data/Empathy-Mental-Health
    "emotional-reactions-reddit.csv": "225b28ffdc257f8a997d557eb937e78b68235e6203c87c7e2203d00fef8545cc",
    "interpretations-reddit.csv": "2cedbe4252c919d22a6f46685afa16d3192a91e3306c2d4a386be12a30ad3f29",
    "explorations-reddit.csv": "9efa1af8e0537c16894379598f2076cb380ae18aacd9a8d26ebd381f5b7f9645"}
MAX_DOWNLOAD_BYTES = 500 << 20  # the ED archive is ~28 MB (~80 MB of CSVs inside); far bigger is not ED


# ----------------------------------------------------------------------------- reading files

def _read_text(path) -> str:
    """Whole file as UTF-8 text; DataError for a missing, empty or undecodable file (with its line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run `python train.py` on a machine with internet "
                        f"to download the data, or set --data_dir / EMPRL_DATA to a complete data directory")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty; delete it and download it again")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 text ({e.reason}); "
                        f"the file is damaged, download it again") from None


def _int_field(value: str, path, line: int, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{line}: field {name}={value[:40]!r} is not an integer; "
                        f"fix or re-download the file") from None


# ----------------------------------------------------------------------------- EmpatheticDialogues

@dataclass
class EDExample:
    conv_id: str
    emotion: str        # one of 32 emotion labels (ED's `context` column)
    situation: str      # the speaker's written situation (ED's `prompt` column)
    context: list       # earlier turns, oldest first; turn 0 is the speaker's
    target: str         # the listener's reply to learn


def load_empathetic_dialogues(csv_path) -> list:
    """One EDExample per listener turn (even utterance_idx) of one ED split file, in file order.

    The official format is a plain comma join, no CSV quoting, commas in text written `_comma_`. Some
    texts start with an unmatched `"`, so a quote-aware parser would merge lines: we split on ','.
    Only the first 8 fields are used: rows with extra trailing fields (a few official rows) are accepted.
    Rows are grouped by conv_id and ordered by utterance_idx, which must run 1..n in each conversation.
    """
    lines = _read_text(csv_path).split("\n")
    if lines[-1] == "":  # the final newline
        lines.pop()
    header = lines[0].rstrip("\r").split(",")
    if header[:8] != ED_COLUMNS:
        raise DataError(f"{csv_path}:1: header {','.join(header)[:120]!r} is not ED's "
                        f"{','.join(ED_COLUMNS)!r}; is this an EmpatheticDialogues split file?")
    convs = {}  # conv_id -> list of (utterance_idx, line, fields); dicts keep first-seen order
    for line, text in enumerate(lines[1:], start=2):
        fields = text.rstrip("\r").split(",")
        if len(fields) < 8:
            raise DataError(f"{csv_path}:{line}: {len(fields)} comma-separated fields, ED rows need 8; "
                            f"the file is damaged (or quote-aware CSV writing merged rows), download it again")
        idx = _int_field(fields[1], csv_path, line, "utterance_idx")
        convs.setdefault(fields[0], []).append((idx, line, fields))
    examples = []
    for conv_id, rows in convs.items():
        rows.sort(key=lambda r: r[0])
        if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
            raise DataError(f"{csv_path}:{rows[0][1]}: conversation {conv_id} has utterance_idx "
                            f"{[r[0] for r in rows][:20]}, expected 1..{len(rows)} with no gaps or repeats")
        turns = [r[2][5].replace("_comma_", ",") for r in rows]
        emotion, situation = rows[0][2][2], rows[0][2][3].replace("_comma_", ",")
        for i in range(1, len(turns), 2):  # 0-based odd i = 1-based even utterance_idx = listener turn
            examples.append(EDExample(conv_id, emotion, situation, turns[:i], turns[i]))
    return examples


# ----------------------------------------------------------------------------- EPITOME

@dataclass
class EpitomeRecord:
    sp_id: str           # seeker post id (Reddit)
    rp_id: str           # response post id
    seeker_post: str
    response_post: str
    level: int           # 0 no, 1 weak, 2 strong communication of this file's mechanism


def load_epitome(csv_path) -> list:
    """All records of one EPITOME file, in file order, duplicates included (see `load_epitome_splits`).

    Quoted CSV (posts hold commas, quotes and newlines), read with the csv module; `rationales` is unused.
    """
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""))
    records = []
    try:
        header = next(reader)
        if header[:5] != EPITOME_COLUMNS:
            raise DataError(f"{csv_path}:1: header {header[:6]!r} does not start with {EPITOME_COLUMNS!r}; "
                            f"is this an EPITOME *-reddit.csv file?")
        for row in reader:
            if len(row) < 5:
                raise DataError(f"{csv_path}:{reader.line_num}: {len(row)} fields, EPITOME rows need 5 "
                                f"({','.join(EPITOME_COLUMNS)}); the file is damaged, download it again")
            level = _int_field(row[4], csv_path, reader.line_num, "level")
            if level not in (0, 1, 2):
                raise DataError(f"{csv_path}:{reader.line_num}: level {level} is outside 0..2")
            records.append(EpitomeRecord(row[0], row[1], row[2], row[3], level))
    except csv.Error as e:  # e.g. a field longer than csv's field size limit
        raise DataError(f"{csv_path}:{reader.line_num}: not valid CSV ({e}); download the file again") from None
    if not records:
        raise DataError(f"{csv_path}: a header but no rows; download the file again")
    return records


def load_epitome_splits(data_dir, seed=0) -> dict:
    """{mech: {"train"|"valid"|"test": [EpitomeRecord]}}, 75/5/20 of the seeker posts, seeded.

    Duplicates: 60 (sp_id, rp_id) pairs occur more than once (10/10/5 with conflicting levels in
    ER/IP/EX); we keep the first occurrence in file order, which is deterministic and, as the three
    files list the same pairs in the same order, the same pair for every mechanism.
    Split: EPITOME ships none. We split by seeker post (sp_id), not by pair, so a seeker post answered
    twice never sits in both train and test; sp_ids (the union over the three files, sorted) are
    shuffled with `seed` and cut at 75 % / 80 %. The split of a record depends on its sp_id only, so
    a pair lands in the same split for all three mechanisms.
    """
    records = {}
    for mech in MECHANISMS:
        seen, records[mech] = set(), []
        for r in load_epitome(Path(data_dir) / "epitome" / EPITOME_FILES[mech]):
            if (r.sp_id, r.rp_id) not in seen:
                seen.add((r.sp_id, r.rp_id))
                records[mech].append(r)
    seekers = sorted({r.sp_id for recs in records.values() for r in recs})
    order = np.random.default_rng(seed).permutation(len(seekers))
    n_train, n_valid = round(0.75 * len(seekers)), round(0.05 * len(seekers))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[seekers[i]] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return {mech: {s: [r for r in recs if split_of[r.sp_id] == s] for s in ("train", "valid", "test")}
            for mech, recs in records.items()}


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """SentencePiece with T5's conventions: pad 0, EOS 1 (appended), UNK 2, no BOS.

    Loads any such model, e.g. the `spiece.model` shipped with a pretrained T5 (32,000 pieces; T5's
    embedding has 32,128 rows, the extra ids are never produced here and are skipped when decoding).
    """
    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, model_path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model not found; train one with Tokenizer.train or "
                            f"point to a T5 checkpoint's spiece.model")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a SentencePiece model ({e}); delete it to retrain") from None
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (0, 1, 2):
            raise DataError(f"{self.path}: pad/eos/unk ids are {self.sp.pad_id()}/{self.sp.eos_id()}/"
                            f"{self.sp.unk_id()}, T5 needs 0/1/2; retrain with Tokenizer.train")
        self.vocab_size = self.sp.GetPieceSize()

    @classmethod
    def train(cls, texts, model_path, vocab_size=8000, seed=0):
        """Train a unigram model on `texts` (in the given order) and write it atomically to model_path.

        Deterministic for a given corpus, vocab_size and seed: one thread, seeded sampler, no shuffling.
        hard_vocab_limit=False lets a small corpus end with fewer pieces than asked (see .vocab_size).
        """
        model_path = Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        proto = io.BytesIO()  # sentencepiece writes the model here; we write the file ourselves, atomically
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=proto, model_type="unigram",
                vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=0.9995,
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                unk_piece="<unk>", input_sentence_size=200_000, shuffle_input_sentence=False,
                num_threads=1, minloglevel=2)
        except RuntimeError as e:  # sentencepiece reports an empty or too-small corpus this way
            raise DataError(f"training the tokenizer for {model_path} failed ({e}); "
                            f"give it more text or a smaller vocab_size") from None
        write_atomic(model_path, proto.getvalue())
        return cls(model_path)

    def encode(self, text: str, add_eos=True) -> list:
        ids = self.sp.EncodeAsIds(text)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids) -> str:
        """Text of ids up to the first EOS; pad, UNK and ids beyond the vocabulary are skipped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.sp.DecodeIds([i for i in ids if self.unk_id < i < self.vocab_size])

    def decode_batch(self, batch) -> list:
        """decode for each row of a list of id lists or a 2-D tensor (B, L)."""
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids) for ids in batch]


# ----------------------------------------------------------------------------- model inputs

def format_context(turns) -> str:
    """Role-tagged dialogue context: "speaker: I lost my job. listener: Oh no! speaker: Yes, today."

    The model always replies as the listener, so the last turn is the speaker's and roles alternate
    backwards from it (for ED contexts, which start with the speaker and have odd length, this is the
    same as alternating from the start). An EPITOME seeker post or a user's message is one speaker turn.
    Plain words, not new special tokens, so any SentencePiece vocabulary (ours or T5's) encodes them.
    """
    n = len(turns)
    return " ".join(f"{'speaker' if (n - 1 - i) % 2 == 0 else 'listener'}: {t.strip()}" for i, t in enumerate(turns))


def encode_context(tok, turns, max_len=200) -> list:
    """Ids of format_context(turns) + EOS, at most max_len: when too long the oldest tokens are dropped,
    so the end of the latest turn, which the reply answers, is always kept (a cut may split a word or tag)."""
    return tok.encode(format_context(turns), add_eos=False)[-(max_len - 1):] + [tok.eos_id]


def encode_target(tok, text, max_len=50) -> list:
    """Ids of the reply + EOS, cut to max_len with EOS kept as the last token."""
    return tok.encode(text, add_eos=False)[:max_len - 1] + [tok.eos_id]


def pad_batch(seqs, pad_id=0):
    """Right-pad to the longest sequence: ids (B, L) and mask (B, L), 1 = real token."""
    L = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def batch_indices(lengths, batch_size, shuffle, seed, bucket=False) -> list:
    """Index batches covering every example once (the last may be short).

    shuffle: seeded permutation. bucket: sort by length within chunks of 50 batches so each batch
    holds similar lengths (less padding), then shuffle the order of the batches so that training
    does not see lengths in a sorted sequence.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        chunk = 50 * batch_size
        order = np.concatenate([sorted(order[i:i + chunk], key=lambda j: lengths[j])
                                for i in range(0, len(order), chunk)] or [order])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if bucket and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ----------------------------------------------------------------------------- downloads

def default_data_dir() -> Path:
    """EMPRL_DATA if set, else ~/.cache/emprl/data."""
    return Path(os.environ.get("EMPRL_DATA") or Path.home() / ".cache" / "emprl" / "data").expanduser()


def _required_files():
    return [f"empatheticdialogues/{s}.csv" for s in ED_SPLITS] + [f"epitome/{f}" for f in EPITOME_FILES.values()]


def ensure_data(data_dir=None) -> Path:
    """Return data_dir once every data file is there, downloading the missing ones (nothing if none is).

    Offline or on any failed download: DataError listing the missing files, where to put them and
    where to get them (no urllib traceback).
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    missing = [f for f in _required_files() if not (data_dir / f).is_file()]
    if not missing:
        return data_dir
    try:
        if any(f.startswith("empatheticdialogues/") for f in missing):
            _fetch_empathetic_dialogues(data_dir)
        for name in EPITOME_FILES.values():
            if f"epitome/{name}" in missing:
                print(f"downloading {URLS['epitome'] + name}")
                download(URLS["epitome"] + name, data_dir / "epitome" / name, EPITOME_SHA256[name])
    except (ValueError, KeyError, OSError, tarfile.TarError, EOFError, zlib.error) as e:
        # ValueError covers our DataError and a damaged .json record; the rest a damaged archive or disk
        raise DataError(
            f"data files missing in {data_dir}: {', '.join(missing)}. Download failed: "
            f"{type(e).__name__}: {e}. Get them from {URLS['empatheticdialogues']} (extract "
            f"train/valid/test.csv into {data_dir / 'empatheticdialogues'}) and {URLS['epitome']} "
            f"(the three *-reddit.csv into {data_dir / 'epitome'}), or set --data_dir / EMPRL_DATA "
            f"to a directory that has them") from None
    return data_dir


def download(url, dest, sha256=None, max_bytes=None) -> str:
    """Stream url to dest through a temp file in dest's folder, check its length (Content-Length) and
    sha256, then rename; return the sha256. Any failure raises DataError and leaves nothing at dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            expected = r.headers.get("Content-Length")
            while chunk := r.read(1 << 20):
                n += len(chunk)
                if max_bytes is not None and n > max_bytes:
                    raise DataError(f"{url} is larger than {max_bytes} bytes, not the expected file")
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and str(n) != expected.strip():
            raise DataError(f"{url}: received {n} of {expected} bytes (interrupted download)")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(f"{url}: sha256 {digest.hexdigest()} differs from the expected {sha256}")
        os.replace(tmp, dest)
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # offline, HTTP error, bad URL, cut connection
        raise DataError(f"downloading {url} to {dest} failed: {type(e).__name__}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest.hexdigest()


def _fetch_empathetic_dialogues(data_dir: Path):
    """Download the ED archive, check it, write only its three split CSVs, then delete the archive.

    ED publishes no checksum: the first download records the archive's sha256 and size in
    <data_dir>/empatheticdialogues.tar.gz.json, and later downloads must match it. The archive is
    untrusted: it is refused whole if any member has an absolute path, a '..' component, or is a link
    or device, and we write only to fixed names, never to a member's own path.
    """
    archive, record = data_dir / "empatheticdialogues.tar.gz", data_dir / "empatheticdialogues.tar.gz.json"
    known = json.loads(record.read_text())["sha256"] if record.is_file() else None
    print(f"downloading {URLS['empatheticdialogues']}")
    digest = download(URLS["empatheticdialogues"], archive, known, max_bytes=MAX_DOWNLOAD_BYTES)
    try:
        csvs = {}
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated one fails here
            for m in members:
                unsafe = m.name.startswith(("/", "\\")) or ".." in PurePosixPath(m.name).parts
                if unsafe or not (m.isfile() or m.isdir()):  # links, devices, fifos
                    raise DataError(f"unsafe member {m.name!r} in the ED archive (absolute path, '..', link "
                                    f"or device); refusing it")
            files = {str(PurePosixPath(m.name)): m for m in members if m.isfile()}
            for s in ED_SPLITS:
                if f"empatheticdialogues/{s}.csv" not in files:
                    raise DataError(f"no member empatheticdialogues/{s}.csv in {URLS['empatheticdialogues']}; "
                                    f"not the ED archive")
                csvs[s] = tar.extractfile(files[f"empatheticdialogues/{s}.csv"]).read(MAX_DOWNLOAD_BYTES)
        for s in ED_SPLITS:  # only once all three are read and checked
            write_atomic(data_dir / "empatheticdialogues" / f"{s}.csv", csvs[s])
        if known is None:
            write_atomic(record, json.dumps({"url": URLS["empatheticdialogues"], "sha256": digest,
                                             "bytes": archive.stat().st_size}).encode())
    finally:
        archive.unlink(missing_ok=True)


def write_atomic(path, data: bytes):
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = e.filename or str(path)  # a full disk names no file: name the one being written
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
