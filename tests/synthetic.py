"""A small made-up data directory in the official formats, so the whole pipeline runs on a fresh
clone.

EmpatheticDialogues: `empatheticdialogues/{train,valid,test}.csv`, a plain comma join with the
header `conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags`, commas in text
written `_comma_`, four turns a conversation (speaker, listener, speaker, listener). EPITOME: the
three `*-reddit.csv` files, quoted CSV with
`sp_id,rp_id,seeker_post,response_post,level,rationales`, the same (seeker, response) pairs in the
same order in all three, every level present. The texts are random sentences from small word lists,
with cue phrases that decide the levels, so the identifiers have something to learn.
"""

import csv
import random

EMOTIONS = ["sad", "proud", "afraid", "excited", "lonely", "grateful", "angry", "surprised"]
SUBJECTS = [
    "my dog",
    "my sister",
    "the exam",
    "my new job",
    "our trip",
    "the neighbours",
    "my car",
    "the party",
]
EVENTS = [
    "went badly today",
    "was cancelled",
    "made me cry",
    "finally happened",
    "surprised everyone",
    "kept me awake all night",
    "went better than I hoped",
    "broke down again",
]
FEELINGS = [
    "I feel awful",
    "I am so happy",
    "I cannot stop thinking about it",
    "I am nervous",
    "I feel alone",
]
REACTIONS = [
    "I am so sorry to hear that",
    "That is wonderful news",
    "Oh no",
    "Wow",
    "Congratulations",
]
QUESTIONS = [
    "What happened next?",
    "How did you feel?",
    "Did you talk to anyone?",
    "Why do you think so?",
]
UNDERSTANDING = [
    "That must be hard",
    "I understand how that feels",
    "I went through something similar",
]


def sentence(rng, words):
    return (
        " ".join([rng.choice(SUBJECTS), rng.choice(EVENTS)])
        + ", "
        + rng.choice(words).lower()
        + "."
    )


def write_synthetic_data(root, seed=0, conversations=(120, 32, 32), epitome_pairs=240):
    """Write ED's three splits (conversations per split) and EPITOME's three files under root;
    returns root."""
    rng = random.Random(seed)
    (root / "empatheticdialogues").mkdir(parents=True, exist_ok=True)
    (root / "epitome").mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), conversations):
        rows = ["conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"]
        for c in range(n):
            emotion, situation = rng.choice(EMOTIONS), sentence(rng, FEELINGS)
            turns = [
                situation.capitalize(),
                f"{rng.choice(REACTIONS)}, {rng.choice(QUESTIONS).lower()}",
                sentence(rng, FEELINGS).capitalize(),
                f"{rng.choice(UNDERSTANDING)}. {rng.choice(QUESTIONS)}",
            ]
            for i, turn in enumerate(turns, start=1):
                text = [t.replace(",", "_comma_") for t in (situation, turn)]
                rows.append(
                    f"hit:{c}_conv:{split}{c},{i},{emotion},{text[0]},{1 + (i + 1) % 2},{text[1]},,"
                )
        (root / "empatheticdialogues" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    pairs = []  # (seeker post, response, ER level, IP level, EX level), decided by cue phrases
    for i in range(epitome_pairs):
        levels = [rng.randrange(3) for _ in range(3)]
        parts = [
            ["", "Oh no.", "I am so sorry, that is heartbreaking."][levels[0]],
            ["", "I see.", "I understand, that must be really hard."][levels[1]],
            ["", "Anyway?", "What happened after that? How are you coping?"][levels[2]],
        ]
        response = " ".join(p for p in parts if p) or f"Try {rng.choice(SUBJECTS)} instead."
        pairs.append((f"sp{i}", f"rp{i}", sentence(rng, FEELINGS).capitalize(), response, *levels))
    for mech, name in enumerate(("emotional-reactions", "interpretations", "explorations")):
        with open(root / "epitome" / f"{name}-reddit.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["sp_id", "rp_id", "seeker_post", "response_post", "level", "rationales"]
            )
            for sp, rp, post, response, *levels in pairs:
                writer.writerow([sp, rp, post, response, levels[mech], ""])
    return root
