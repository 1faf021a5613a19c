"""The independent judge: a second opinion on empathy levels that PPO never optimises.

Emp-F1 asks the identifiers, the very models whose probabilities are PPO's reward, whether a reply's
levels match the human reply's; a rise in Emp-F1 is therefore partly built in, and a policy can
learn the identifiers' blind spots (reward over-optimisation; Gao et al. 2022 watch it with a "gold"
model beside the proxy). The judge is another model family fit on the same EPITOME train split: per
mechanism, a class-balanced logistic regression on TF-IDF features of the reply text alone (words
and bigrams). It shares nothing with the identifiers and no reward calls it, so PPO cannot shape its
errors:

    [J1] x_y = tfidf(y) / ||tfidf(y)||,  idf_w = log((1 + N) / (1 + df_w)) + 1
                                                      (V,)  the terms of at least 2 replies
    [J2] q_k(. | y) = softmax(W_k x_y + b_k)          (C,)

Emp-F1 by the judge is the same weighted F1 (reward.emp_f1) with the judge labelling both the
generated and the human replies. Being a bag of words it cannot see context; docs/results.md says
what it does and does not catch. Shapes: N texts, V terms, C empathy levels (3).
"""

import math
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import data
import reward

WORD = re.compile(r"[a-z0-9']+")


def ngrams(text):
    """The judge's terms of a text: its lower-cased words and word bigrams."""
    words = WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class Judge:
    """Per mechanism a TF-IDF logistic regression on the reply text. `state` = {mech: {terms, idf
    (V,), weight (V, C), bias (C,), l2}}: plain tensors and strings, what the run directory stores
    (judge.pt)."""

    def __init__(self, state):
        self.state = state
        self.index = {m: {t: j for j, t in enumerate(h["terms"])} for m, h in state.items()}

    def features(self, mech, texts):
        """[J1]: term counts x idf, L2-normalised; sparse (a reply holds a few dozen of the V
        terms).  -> (N, V)"""
        pairs = [
            (i, self.index[mech][g])
            for i, t in enumerate(texts)
            for g in ngrams(t)
            if g in self.index[mech]
        ]
        # (2, nnz); coalesce sums a repeated term
        ij = torch.tensor(pairs, dtype=torch.long).view(-1, 2).T
        x = torch.sparse_coo_tensor(
            ij,
            self.state[mech]["idf"][ij[1]],
            (len(texts), len(self.index[mech])),
            check_invariants=True,
        ).coalesce()
        norm = torch.zeros(len(texts)).index_add_(0, x.indices()[0], x.values() ** 2).sqrt()  # (N,)
        return torch.sparse_coo_tensor(
            x.indices(), x.values() / norm[x.indices()[0]], x.shape, check_invariants=True
        )

    def logits(self, mech, texts):
        """[J2] before the softmax.  N texts -> (N, C)"""
        return (
            torch.sparse.mm(self.features(mech, texts), self.state[mech]["weight"])
            + self.state[mech]["bias"]
        )

    def levels(self, texts):
        """The judge's levels of N texts for ER, IP, EX: (N, 3) int array."""
        return np.stack([self.logits(m, texts).argmax(-1).numpy() for m in data.MECHANISMS], axis=1)

    @classmethod
    def fit(cls, train, valid, l2s=(1e-4, 1e-3, 1e-2)):
        """train, valid: {mech: (texts, levels)}. For each L2 strength, class-balanced cross-entropy
        + l2/2 ||W||^2 minimised by full-batch L-BFGS (deterministic); the fit with the best
        validation macro-F1 is kept."""
        state = {}
        for mech, (texts, y) in train.items():
            # document frequency of each term
            df = Counter(g for t in texts for g in set(ngrams(t)))
            terms = sorted(g for g, n in df.items() if n >= 2)
            # (V,)  [J1]
            idf = torch.tensor([math.log((1 + len(texts)) / (1 + df[g])) + 1 for g in terms])
            x = cls({mech: dict(terms=terms, idf=idf)}).features(mech, texts)  # (N, V)
            fits = [
                dict(
                    terms=terms,
                    idf=idf,
                    l2=l2,
                    **fit_logistic_regression(x, torch.as_tensor(y), l2),
                )
                for l2 in l2s
            ]
            f1 = [
                reward.classification_metrics(
                    valid[mech][1], cls({mech: h}).logits(mech, valid[mech][0]).argmax(-1)
                )["macro_f1"]
                for h in fits
            ]
            state[mech] = fits[int(np.argmax(f1))]  # ties: the first listed
        return cls(state)

    def test(self, test, log=print):
        """Macro-F1 and accuracy per mechanism on {mech: (texts, levels)}, each printed: {mech:
        metrics}."""
        out = {}
        for i, (mech, (texts, y)) in enumerate(test.items()):
            out[mech] = reward.classification_metrics(y, self.levels(texts)[:, i])
            log(
                f"judge {mech} (TF-IDF logistic regression, l2 {self.state[mech]['l2']:g}): test "
                "macro-F1 "
                f"{out[mech]['macro_f1']:.3f}, accuracy {out[mech]['acc']:.3f}"
            )
        return out


def fit_logistic_regression(x, y, l2, steps=200):
    """Multinomial logistic regression on features x (N, V) and levels y (N,), each level weighted N
    / (C n_c) ("balanced", as the identifiers' class weights): {"weight": (V, C), "bias": (C,)}."""
    counts = torch.bincount(y, minlength=reward.NUM_LEVELS).clamp(min=1)
    sample_w = (len(y) / (reward.NUM_LEVELS * counts))[y] / len(y)  # (N,) sums to 1
    w = torch.zeros(x.shape[1], reward.NUM_LEVELS, requires_grad=True)
    b = torch.zeros(reward.NUM_LEVELS, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        ce = F.cross_entropy(torch.sparse.mm(x, w) + b, y, reduction="none")  # (N,)
        loss = (sample_w * ce).sum() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    return dict(weight=w.detach(), bias=b.detach())
