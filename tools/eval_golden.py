#!/usr/bin/env python3
"""Golden values for `dfwatch eval`'s metrics (src/offline/metrics.rs), made with scikit-learn.

    .venv/bin/pip install scikit-learn && .venv/bin/python tools/eval_golden.py \
        > tests/fixtures/eval/golden.json

AUC and AP come from scikit-learn (roc_auc_score, average_precision_score). The EER follows the
definition written in the report and in src/offline/metrics.rs, computed here on scikit-learn's
roc_curve (every threshold kept): the first ROC segment where FPR - FNR goes from below zero to
zero or above, interpolated linearly to the point where it is zero. Accuracy is the fraction
whose call at score >= 0.5 matches the label. Not run by CI (scikit-learn is not a test
dependency); the JSON it printed is committed.
"""
import json
import sys

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def eer(labels, scores):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    d = fpr - (1.0 - tpr)
    for i in range(len(d) - 1):
        if d[i] < 0 <= d[i + 1]:
            t = d[i] / (d[i] - d[i + 1])
            return float(fpr[i] + t * (fpr[i + 1] - fpr[i]))
    raise ValueError("no crossing")


def case(name, labels, scores):
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    return {
        "name": name,
        "labels": labels.tolist(),
        "scores": scores.tolist(),
        "auc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "eer": eer(labels, scores),
        "accuracy": float(np.mean((scores >= 0.5).astype(int) == labels)),
    }


def main():
    rng = np.random.default_rng(20261201)
    cases = []
    n = 300
    labels = rng.integers(0, 2, n)
    cases.append(case("random", labels, rng.random(n)))
    cases.append(case("separated", labels, rng.random(n) * 0.6 + labels * 0.35))
    tied = np.round(rng.random(n) * 0.5 + labels * 0.25, 1)
    cases.append(case("tied to one decimal", labels, tied))
    cases.append(case("few distinct", labels, rng.integers(0, 3, n) / 2.0))
    imb = (rng.random(120) < 0.1).astype(int)
    cases.append(case("imbalanced", imb, rng.random(120) + imb * 0.2))
    cases.append(case("tiny with a tie", [0, 1, 0, 1, 1], [0.1, 0.4, 0.4, 0.8, 0.35]))
    cases.append(case("all tied", [0, 1, 1, 0], [0.7, 0.7, 0.7, 0.7]))
    json.dump({"sklearn": __import__("sklearn").__version__, "cases": cases}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
