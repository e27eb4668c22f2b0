"""Train the n-gram moderation classifier on the development set; write its weights.

    python bench/train_moderation.py [--out core/moderation/ngram_model.json.gz]

Reads bench/data/moderation/dev.jsonl (``--chitchat N`` adds N ordinary English chat
messages of the chitchat-dataset package as benign examples: tried with 3,000, it cut
English false alarms but taught the model that French, Spanish, German and Chinese are
abusive -- most non-English examples are -- so it is off). The held-out set is opened
for one thing: dropping development samples that nearly repeat a held-out one
(character-trigram Jaccard >= 0.6), so the held-out figures are not inflated by
near-copies. Its labels and per-item results are never looked at.

One logistic regression per category (one against the rest), on binary features
L2-normalised (as :class:`core.moderation.ngram.NgramModel` evaluates them). C and the
thresholds come from 5-fold cross-validation on the development set: each category's
threshold is the lowest one that keeps the benign false-positive rate of the
cross-validated scores at or under 1 % and the edgy one at or under 3 %, but not
below 0.5.
Needs scikit-learn and numpy (installed with the ``moderation`` extra).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.moderation.ngram import features
from core.moderation.normalise import normalise
from core.moderation.spam import check_spam

DATA = Path(__file__).resolve().parent / "data" / "moderation"
CATEGORIES = ("insult", "threat", "hate", "sexual", "selfharm", "spam", "injection")
# Thresholds are not set below this (in hundredths). Stricter budgets (0.5 % / 2 %, not
# below 0.65) were tried: cross-validated mean recall fell from 0.48 to 0.29.
MIN_THRESHOLD = 50


def trigrams(text: str) -> set[str]:
    key = f" {normalise(text).key} "
    return {key[i:i + 3] for i in range(len(key) - 2)}


def decontaminated(rows: list[dict[str, Any]], heldout: list[str]) -> list[dict[str, Any]]:
    held = [trigrams(t) for t in heldout]
    kept = []
    for row in rows:
        grams = trigrams(row["text"])
        if not any(len(grams & h) / max(1, len(grams | h)) >= 0.6 for h in held):
            kept.append(row)
    return kept


def chitchat(count: int) -> list[dict[str, Any]]:
    """Ordinary chat messages (chitchat-dataset, English) as extra benign examples,
    without those the built-in terms object to (a casual chat swears now and then)."""
    import chitchat_dataset

    from core.moderation.terms import TermFilter

    terms = TermFilter.from_policy([], [])
    found: list[dict[str, Any]] = []
    for convo in chitchat_dataset.Dataset().values():
        for group in convo["messages"]:
            for m in group:
                text = m["text"].strip()
                if 3 <= len(text) <= 200 and terms.find_in_message(normalise(text)) is None:
                    found.append({"text": text, "label": "benign", "lang": "en", "tag": "chat"})
        if len(found) >= count:
            break
    return found[:count]


def matrix(rows: list[dict[str, Any]], vocab: dict[str, int] | None = None) -> Any:
    import numpy as np
    from scipy.sparse import csr_matrix

    feats = [features(r["text"]) for r in rows]
    if vocab is None:
        counts: dict[str, int] = {}
        for f in feats:
            for name in f:
                counts[name] = counts.get(name, 0) + 1
        vocab = {name: i for i, name in enumerate(sorted(n for n, c in counts.items() if c >= 2))}
    indptr, indices, data = [0], [], []
    for f in feats:
        known = sorted(vocab[n] for n in f if n in vocab)
        indices += known
        data += [1.0 / np.sqrt(len(known))] * len(known) if known else []
        indptr.append(len(indices))
    return csr_matrix((data, indices, indptr), shape=(len(rows), len(vocab))), vocab


def train(rows: list[dict[str, Any]], c: float) -> tuple[dict[str, int], Any, Any]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x, vocab = matrix(rows)
    coefs, intercepts = [], []
    for category in CATEGORIES:
        y = np.array([r["label"] == category for r in rows])
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        model.fit(x, y)
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    return vocab, np.array(coefs), np.array(intercepts)


def cross_scores(rows: list[dict[str, Any]], c: float, folds: int = 5) -> Any:
    import numpy as np

    scores = np.zeros((len(rows), len(CATEGORIES)))
    for k in range(folds):
        train_rows = [r for i, r in enumerate(rows) if i % folds != k]
        test_idx = [i for i in range(len(rows)) if i % folds == k]
        vocab, coefs, intercepts = train(train_rows, c)
        x, _ = matrix([rows[i] for i in test_idx], vocab)
        logits = x @ coefs.T + intercepts
        scores[test_idx] = 1 / (1 + np.exp(-logits))
    return scores


def choose_thresholds(rows: list[dict[str, Any]], scores: Any) -> tuple[dict[str, float], float]:
    """Per category, the lowest threshold within the false-positive budget; mean recall."""
    benign = [i for i, r in enumerate(rows) if r["label"] == "benign"]
    edgy = [i for i, r in enumerate(rows) if r["label"] == "edgy"]
    thresholds: dict[str, float] = {}
    recalls = []
    for j, category in enumerate(CATEGORIES):
        chosen = 0.95
        for t in [x / 100 for x in range(MIN_THRESHOLD, 96)]:
            fp_b = sum(scores[i, j] >= t for i in benign) / max(1, len(benign))
            fp_e = sum(scores[i, j] >= t for i in edgy) / max(1, len(edgy))
            if fp_b <= 0.01 and fp_e <= 0.03:
                chosen = t
                break
        thresholds[category] = chosen
        positives = [i for i, r in enumerate(rows) if r["label"] == category]
        recalls.append(sum(scores[i, j] >= chosen for i in positives) / max(1, len(positives)))
    return thresholds, sum(recalls) / len(recalls)


def main() -> None:
    """Train, choose C and thresholds by cross-validation, write the model."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1]
                                             / "core" / "moderation" / "ngram_model.json.gz"))
    parser.add_argument("--chitchat", type=int, default=0,
                        help="add this many chitchat-dataset messages as benign (see above)")
    args = parser.parse_args()
    load = lambda name: [json.loads(line) for line in  # noqa: E731
                         (DATA / name).read_text(encoding="utf-8").splitlines() if line]
    rows = load("dev.jsonl")
    heldout_texts = [r["text"] for r in load("heldout.jsonl")]
    rows = decontaminated(rows, heldout_texts)
    # Floods within a message are the spam rules' job; taught them, the model learns that
    # "hi" is spam. It learns promotional spam only.
    rows = [r for r in rows if not (r["label"] == "spam" and check_spam(r["text"]))]
    if args.chitchat:
        rows += chitchat(args.chitchat)
    print(f"training samples: {len(rows)} (development set without near-copies of held-out "
          "messages or in-message floods)")
    best = None
    for c in (1.0, 3.0, 10.0, 30.0):
        thresholds, recall = choose_thresholds(rows, cross_scores(rows, c))
        print(f"C={c:<5} cross-validated mean recall {recall:.3f} at thresholds {thresholds}")
        if best is None or recall > best[0]:
            best = (recall, c, thresholds)
    assert best is not None
    _, c, thresholds = best
    vocab, coefs, intercepts = train(rows, c)
    # Every feature is kept, even small ones: the runtime normalises over known features.
    weights = {name: [round(float(w), 3) for w in coefs[:, i]] for name, i in vocab.items()}
    model = {
        "categories": list(CATEGORIES), "c": c,
        "intercepts": [round(float(b), 4) for b in intercepts],
        "thresholds": thresholds, "weights": weights,
    }
    blob = gzip.compress(json.dumps(model, ensure_ascii=False, sort_keys=True).encode(), 9,
                         mtime=0)
    Path(args.out).write_bytes(blob)
    print(f"C={c}: {len(weights)} features, {len(blob) / 1024:.0f} KiB -> {args.out}")


if __name__ == "__main__":
    main()
