"""Which hyperparameters a search's score depended on: permutation importance of a random forest fit to the trials.

Pure (no MLflow, no Keras) so any tuner's trials table (`tuning._trials_table` rows) can be scored and tested on
hand-made rows. Permutation importance rather than the forest's impurity importance: impurity importance favours
continuous, high-cardinality hyperparameters (lr, dropout) over choices with two values, whatever the score.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.search_space import Param

MIN_FIT = 3  # below this a forest has nothing to split: no importance at all
MIN_TRUSTED = 10  # below this, or below TRIALS_PER_PARAM per hyperparameter, the ranking moves with the seed
TRIALS_PER_PARAM = 3
REPEATS = 20
TREES = 100


def hyperparameter_importance(rows: list[dict[str, Any]], params: list[Param], objective_direction: str,
                              seed: int) -> dict[str, Any]:
    """Each hyperparameter's share of the score's explained variation (shares sum to 1), with the raw permutation
    importance (`mean`, `std` over repeats, in R^2 lost), `trials`, `trustworthy` and a one-line `note`. Only
    completed trials count; with fewer than MIN_FIT of them, or a constant score, nothing is fit and the dicts are
    empty."""
    done = [r for r in rows if r.get("score") not in (None, "") and r.get("status", "COMPLETED") == "COMPLETED"]
    n, threshold = len(done), trust_threshold(len(params))
    y = np.array([float(r["score"]) for r in done]) * (-1.0 if objective_direction == "min" else 1.0)
    constant = n >= MIN_FIT and bool(np.ptp(y) == 0)
    result: dict[str, Any] = {"share": {}, "mean": {}, "std": {}, "trials": n, "trustworthy": False,
                              "note": _note(n, threshold, constant)}
    if n < MIN_FIT or constant:
        return result
    mean, std = _permutation_importance(encode(done, params), y, seed)
    names = [p.name for p in params]
    result["mean"], result["std"] = dict(zip(names, mean, strict=True)), dict(zip(names, std, strict=True))
    result["share"] = dict(zip(names, shares(mean), strict=True))
    if not any(result["share"].values()):
        result["note"] = f"{result['note']}; the forest found no hyperparameter that explains the score"
    result["trustworthy"] = n >= threshold and any(result["share"].values())
    return result


def trust_threshold(n_params: int) -> int:
    """Trials needed before the importance is trusted: MIN_TRUSTED, and TRIALS_PER_PARAM per hyperparameter."""
    return max(MIN_TRUSTED, TRIALS_PER_PARAM * n_params)


def _note(n: int, threshold: int, constant: bool) -> str:
    parts = []
    if n < threshold:
        parts.append(f"too few trials ({n}) to trust the importance (want {threshold})")
    if n < MIN_FIT:
        parts.append(f"none computed below {MIN_FIT} trials")
    elif constant:
        parts.append(f"the score is the same in all {n} trials: none computed")
    return "; ".join(parts) or f"permutation importance of a random forest on {n} trials"


def encode(rows: list[dict[str, Any]], params: list[Param]) -> np.ndarray:
    """One column per hyperparameter, so that permuting a column permutes the whole hyperparameter: numbers as
    they are (log10 on a log scale), choices as their index among the declared values (a forest isolates any
    category with a split or two; one-hot would split a choice over columns permuted apart). An inactive
    conditional value ("" in the trials table) is a value of its own below every active one, not NaN."""
    return np.column_stack([[_encode_value(r.get(p.name, ""), p) for r in rows] for p in params])


def _encode_value(value: Any, p: Param) -> float:
    if p.kind == "choice":
        labels = [str(v) for v in p.values]
        return float(labels.index(str(value))) if value != "" else -1.0
    low, high = (math.log10(v) for v in p.values) if p.log else (float(v) for v in p.values)
    if value == "":
        return low - max(high - low, 1.0)
    return math.log10(float(value)) if p.log else float(value)


def _permutation_importance(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[list[float], list[float]]:
    """Mean and std over REPEATS of the R^2 a forest fit to (x, y) loses when one column is shuffled."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    forest = RandomForestRegressor(n_estimators=TREES, random_state=seed, n_jobs=1).fit(x, y)
    found = permutation_importance(forest, x, y, n_repeats=REPEATS, random_state=seed, n_jobs=1)
    return [float(v) for v in found.importances_mean], [float(v) for v in found.importances_std]


def shares(means: list[float]) -> list[float]:
    """Importances as shares summing to 1, negatives (shuffling helped: noise) clipped to 0; all 0 if none is
    positive."""
    clipped = np.clip(np.asarray(means, dtype=float), 0.0, None)
    total = clipped.sum()
    return [float(v / total) if total > 0 else 0.0 for v in clipped]
