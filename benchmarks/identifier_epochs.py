"""How noisy is choosing an identifier's epoch? Test macro-F1 after every epoch, beside the
validation figures.

Trains the `cpu` preset's three identifiers (from scratch, class weights, the pipeline's EPITOME
split) for a fixed number of epochs without early stopping, and after each epoch prints the
validation loss and macro-F1 (what train.py's early stopping sees) next to the test macro-F1 (what
it cannot see). About 10 minutes on 2 cores.

    python benchmarks/identifier_epochs.py --spm=runs/cpu/spiece.model [--data=DIR] [--epochs=8]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import reward  # noqa: E402
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--spm", required=True, help="the run's spiece.model (e.g. runs/cpu/spiece.model)"
    )
    p.add_argument("--data", default="", help="data directory (default: $EMPRL_DATA)")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    cfg, _ = train.parse_args(["--preset=cpu"])
    tok = data.Tokenizer(args.spm)
    splits = data.load_epitome_splits(
        Path(args.data) if args.data else data.default_data_dir(), seed=cfg.seed
    )
    for mech in data.MECHANISMS:
        ex = {
            s: reward.epitome_examples(
                splits[mech][s], tok, cfg.ident_ctx_tokens, cfg.ident_resp_tokens
            )
            for s in splits[mech]
        }
        print(
            f"{mech}: {' / '.join(str(len(e['level'])) for e in ex.values())} train / valid / "
            "test pairs, "
            f"valid level counts {np.bincount(ex['valid']['level'], minlength=3).tolist()}"
        )
        torch.manual_seed(cfg.seed)  # the same initialisation as the pipeline's identifier stage
        model = reward.EmpathyIdentifier(train.build_model(cfg, tok.vocab_size).config)
        y_test = np.array(ex["test"]["level"])

        # called after each epoch's validation: score the same weights on the test split
        def log(line, model=model, ex=ex, y_test=y_test, mech=mech):
            m = reward.classification_metrics(
                y_test, reward.predict(model, ex["test"], 64, "cpu").argmax(-1)
            )
            print(
                f"  {mech} {line} || test macro-F1 {m['macro_f1']:.3f} acc {m['acc']:.3f}",
                flush=True,
            )

        reward.train_identifier(
            model,
            ex["train"],
            ex["valid"],
            epochs=args.epochs,
            batch_size=cfg.ident_batch_size,
            lr=cfg.ident_lr,
            class_weights=cfg.ident_class_weights,
            device="cpu",
            seed=cfg.seed,
            patience=args.epochs + 1,
            log=log,
        )


if __name__ == "__main__":
    main()
