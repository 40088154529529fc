"""Evaluation metrics: classification, MMSA's regression metrics, robustness summaries.

All functions take torch tensors, numpy arrays or lists and return plain Python floats.

- `classification_metrics`: accuracy, macro / weighted F1 and UAR: scikit-learn's definitions
  and arithmetic (`accuracy`, `f1`, `recall_macro`: bit for bit its accuracy_score, f1_score and
  recall_score, checked in tests/test_metrics.py), computed from one bincount instead of
  sklearn's validation layers, which cost ~20 ms a call: every epoch's validation calls it.
- `regression_metrics`: MMSA's ``MetricsTop.__eval_mosei_regression`` (thuiar/MMSA,
  src/MMSA/utils/metricsTop.py; MOSI uses the same function) step for step.
- `primary_metric`: the key and direction used for validation-based model selection.
- Robustness summaries: `subset_mean` (mean over the fixed subsets), `curve_area` (normalised
  area under the curve over the missing rate), and MultiBench's `relative_robustness` and
  `effective_robustness` (pliang279/MultiBench, eval_scripts/robustness.py).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Mapping

import numpy as np
import torch

__all__ = ["classification_metrics", "regression_metrics", "primary_metric", "subset_mean",
           "curve_area", "relative_robustness", "effective_robustness"]

TASKS = ("classification", "regression")


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor, array or list, got {type(x).__name__}: {e}") \
            from None


def _labels(x: np.ndarray, name: str) -> np.ndarray:
    """A 1-D integer label array (integral floats accepted, e.g. labels stored as float)."""
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int64)
    if np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        return x.astype(np.int64)
    raise TypeError(f"{name} must hold integer class labels, got dtype {x.dtype}"
                    + ("" if not np.issubdtype(x.dtype, np.floating) else " with non-integer values"))


# ---------------------------------------------------------------- classification

def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn.metrics.accuracy_score(y_true, y_pred) of two 1-D label arrays: the mean of
    y_true == y_pred (numpy.average of the bool array, as sklearn's _average)."""
    return float(np.average(y_true == y_pred))


def _class_counts(y_true: np.ndarray, y_pred: np.ndarray, labels=None):
    """(tp, predicted, true) int64 counts per label: sklearn's multilabel_confusion_matrix
    sums (labels default: the sorted union of both arrays' values, sklearn's unique_labels)."""
    if labels is None:
        labels = np.union1d(y_true, y_pred)
    k = len(labels)

    def code(a):  # index in labels, k for a value that is not a label (counted nowhere)
        i = np.minimum(np.searchsorted(labels, a), k - 1)
        return np.where(labels[i] == a, i, k)

    t, p = code(y_true), code(y_pred)
    tp = np.bincount(t[t == p], minlength=k + 1)[:k]
    return tp, np.bincount(p, minlength=k + 1)[:k], np.bincount(t, minlength=k + 1)[:k]


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sklearn's _prf_divide with zero_division=0: num / den in float64, 0 where den == 0."""
    den = den.astype(np.float64)
    zero = den == 0
    den[zero] = 1
    out = num.astype(np.float64) / den
    out[zero] = 0.0
    return out


def f1(y_true: np.ndarray, y_pred: np.ndarray, average: str) -> float:
    """sklearn.metrics.f1_score(y_true, y_pred, average="macro" | "weighted", zero_division=0):
    per label 2 tp / (2 tp + fn + fp) = 2 tp / (true + predicted), then numpy.nanmean (macro)
    or numpy.average weighted by the true counts (weighted), as scikit-learn 1.9 computes it
    (older releases went through precision and recall: the same value up to the last bits)."""
    tp, predicted, true = _class_counts(y_true, y_pred)
    score = _divide(2.0 * tp.astype(np.float64), true.astype(np.float64) + predicted)
    if average == "macro":
        return float(np.nanmean(score))
    if average == "weighted":
        return float(np.average(score, weights=true)) if true.sum() else float(np.nanmean(score))
    raise ValueError(f"average must be 'macro' or 'weighted', got {average!r}")


def recall_macro(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> float:
    """sklearn.metrics.recall_score(y_true, y_pred, labels=labels, average="macro",
    zero_division=0): numpy.nanmean over `labels` of tp / true."""
    tp, _, true = _class_counts(y_true, y_pred, labels)
    return float(np.nanmean(_divide(tp, true)))


def classification_metrics(logits_or_pred, true) -> dict[str, float]:
    """{"accuracy", "f1_macro", "f1_weighted", "uar"} of predictions against labels `true` (N,).

    `logits_or_pred` is either scores (N, C) (the prediction is their argmax) or predicted
    labels (N,). F1 uses scikit-learn's default label set (classes in `true` or in the
    prediction; a class that is never predicted has F1 0). UAR, the unweighted average recall,
    is the mean over the classes present in `true` of their recall (= scikit-learn's
    balanced_accuracy_score): recall_score(labels=unique(true), average="macro").
    """
    pred = _numpy(logits_or_pred, "logits_or_pred")
    y = _numpy(true, "true")
    if y.ndim != 1:
        raise ValueError(f"true must be (N,), got shape {y.shape}")
    if pred.ndim == 2:
        if not np.issubdtype(pred.dtype, np.floating):
            raise TypeError(f"logits (N, C) must be floating point, got {pred.dtype}")
        pred = pred.argmax(axis=1)
    elif pred.ndim != 1:
        raise ValueError(f"logits_or_pred must be logits (N, C) or labels (N,), got shape {pred.shape}")
    pred = _labels(pred, "logits_or_pred")
    y = _labels(y, "true")
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"logits_or_pred has {pred.shape[0]} samples but true has {y.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("true must hold at least one sample, got 0")
    return {
        "accuracy": accuracy(y, pred),
        "f1_macro": f1(y, pred, "macro"),
        "f1_weighted": f1(y, pred, "weighted"),
        "uar": recall_macro(y, pred, np.unique(y)),
    }


# ---------------------------------------------------------------- MMSA regression

def _multiclass_acc(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    # MMSA's __multiclass_acc; np.round rounds halves to even (0.5 -> 0, 1.5 -> 2), as MMSA does
    return np.sum(np.round(y_pred) == np.round(y_true)) / float(len(y_true))


def _mmsa_round(x) -> float:
    """MMSA's round(x, 4) on the very type MMSA rounds (a numpy scalar rounds with numpy, in
    its own dtype; a Python float with Python), then the Python float nearest that 4-decimal
    value (a float32 result such as 0.3 would otherwise read 0.30000001192...)."""
    return round(float(round(x, 4)), 4)


def regression_metrics(pred, true) -> dict[str, float]:
    """MMSA's MOSI/MOSEI regression metrics of predictions `pred` against labels `true` (N,).

    As MetricsTop.__eval_mosei_regression computes them (inputs flattened, float32 kept):

        Mult_acc_k  = mean(round(clip(pred, -c, c)) == round(clip(true, -c, c)))
                      c = 3, 2, 1 for k = 7, 5, 3 (np.round: halves to even)
        MAE         = mean |pred - true|
        Corr        = np.corrcoef(pred, true)[0, 1]
        Has0_acc_2  = accuracy(pred >= 0, true >= 0)      Has0_F1_score: weighted F1 of the same
        Non0_acc_2  = accuracy(pred > 0, true > 0) over samples with true != 0
        Non0_F1_score: weighted F1 of the same

    each rounded to 4 decimals with Python's round() as MMSA does. MMSA returns Mult_acc_3
    nowhere although it computes it; here it is an extra key. Where MMSA would crash or warn
    this returns NaN instead: Corr of a constant pred or true (corrcoef divides by a zero
    standard deviation), and the Non0 pair when every label is 0 (MMSA indexes with an
    empty float array). F1 passes zero_division=0, which is the value of scikit-learn's
    default "warn" without the warning.
    """
    test_preds = _numpy(pred, "pred").reshape(-1)
    test_truth = _numpy(true, "true").reshape(-1)
    for name, a in (("pred", test_preds), ("true", test_truth)):
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be numeric, got {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got NaN or inf")
    if test_preds.shape != test_truth.shape:
        raise ValueError(f"pred has {test_preds.size} values but true has {test_truth.size}")
    if test_truth.size == 0:
        raise ValueError("true must hold at least one sample, got 0")

    test_preds_a7 = np.clip(test_preds, a_min=-3., a_max=3.)
    test_truth_a7 = np.clip(test_truth, a_min=-3., a_max=3.)
    test_preds_a5 = np.clip(test_preds, a_min=-2., a_max=2.)
    test_truth_a5 = np.clip(test_truth, a_min=-2., a_max=2.)
    test_preds_a3 = np.clip(test_preds, a_min=-1., a_max=1.)
    test_truth_a3 = np.clip(test_truth, a_min=-1., a_max=1.)

    mae = np.mean(np.absolute(test_preds - test_truth))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant input: NaN, as in MMSA
        corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = _multiclass_acc(test_preds_a7, test_truth_a7)
    mult_a5 = _multiclass_acc(test_preds_a5, test_truth_a5)
    mult_a3 = _multiclass_acc(test_preds_a3, test_truth_a3)

    non_zeros = test_truth != 0
    if non_zeros.any():
        non_zeros_binary_truth = test_truth[non_zeros] > 0
        non_zeros_binary_preds = test_preds[non_zeros] > 0
        non_zeros_acc2 = accuracy(non_zeros_binary_preds, non_zeros_binary_truth)
        non_zeros_f1_score = f1(non_zeros_binary_truth, non_zeros_binary_preds, "weighted")
    else:
        non_zeros_acc2 = non_zeros_f1_score = float("nan")

    binary_truth = test_truth >= 0
    binary_preds = test_preds >= 0
    acc2 = accuracy(binary_preds, binary_truth)
    f_score = f1(binary_truth, binary_preds, "weighted")

    return {
        "Has0_acc_2": _mmsa_round(acc2),
        "Has0_F1_score": _mmsa_round(f_score),
        "Non0_acc_2": _mmsa_round(non_zeros_acc2),
        "Non0_F1_score": _mmsa_round(non_zeros_f1_score),
        "Mult_acc_5": _mmsa_round(mult_a5),
        "Mult_acc_7": _mmsa_round(mult_a7),
        "MAE": _mmsa_round(mae),
        "Corr": _mmsa_round(corr),
        "Mult_acc_3": _mmsa_round(mult_a3),
    }


def primary_metric(task: str) -> tuple[str, bool]:
    """(metric key, higher is better) used for model selection: accuracy for classification,
    MAE (lower is better) for regression."""
    if task == "classification":
        return "accuracy", True
    if task == "regression":
        return "MAE", False
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ---------------------------------------------------------------- robustness summaries

def _curve(values, name: str) -> np.ndarray:
    arr = _numpy(values, name)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating)
                                     or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    return arr.astype(np.float64)


def subset_mean(results):
    """Mean over the fixed subsets of per-subset results.

    `results` is a non-empty list of numbers (returns a float) or of metric dicts with the same
    keys (returns {key: mean}). NaN entries propagate (a NaN metric is not silently dropped).
    """
    results = list(results)
    if not results:
        raise ValueError("results must hold at least one subset's result, got none")
    if all(isinstance(r, Mapping) for r in results):
        keys = list(results[0].keys())
        for i, r in enumerate(results):
            if set(r.keys()) != set(keys):
                raise ValueError(f"results[{i}] has keys {sorted(r.keys())}, expected {sorted(keys)}")
        return {k: float(np.mean([float(r[k]) for r in results])) for k in keys}
    if all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in results):
        return float(np.mean([float(r) for r in results]))
    raise TypeError("results must be all numbers or all metric dicts")


def curve_area(etas, values) -> float:
    """Normalised area under a curve over the missing rate:

        area = sum_i (eta_{i+1} - eta_i) * (v_i + v_{i+1}) / 2  /  (eta_last - eta_first)

    i.e. the trapezoid rule divided by the span, so a flat curve at v gives v (the mean value
    of the piecewise-linear curve). `etas` strictly increasing; a one-point curve gives its
    value.
    """
    x = _curve(etas, "etas")
    y = _curve(values, "values")
    if x.shape != y.shape:
        raise ValueError(f"etas has {x.size} points but values has {y.size}")
    if x.size == 1:
        return float(y[0])
    if not np.all(np.diff(x) > 0):
        raise ValueError(f"etas must be strictly increasing, got {x.tolist()}")
    area = np.sum(np.diff(x) * (y[:-1] + y[1:]) / 2.0)
    return float(area / (x[-1] - x[0]))


def relative_robustness(values, step: float = 0.1) -> float:
    """MultiBench's relative robustness (relative_robustness_helper): the trapezoid area of the
    performance curve at equally spaced perturbation levels,

        RR = sum_i (v_i + v_{i+1}) * step / 2        (MultiBench: step = 0.1)

    not normalised by the span (a flat curve at v over levels 0, 0.1, ..., 0.5 gives 0.5 v).
    MultiBench then max-min normalises each score across the methods of its results table;
    that table is not ours, so the raw score is returned (normalise across your own methods).
    """
    y = _curve(values, "values")
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"step must be a number, got {type(step).__name__} {step!r}")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    return float(np.sum((y[:-1] + y[1:]) * float(step) / 2.0))


def effective_robustness(values, baseline) -> float:
    """MultiBench's effective robustness (effective_robustness_helper): how much less a method
    loses than the late-fusion baseline, with the baseline curve shifted to start where the
    method starts,

        beta_i = b_i + (v_0 - b_0),      ER = sum_i (v_i - beta_i) = sum_i [(v_i - v_0) - (b_i - b_0)]

    `baseline` is late fusion's curve (MultiBench uses its 'LF' results) at the same levels as
    `values`. Like `relative_robustness`, MultiBench's cross-method max-min normalisation is
    left to the caller.
    """
    v = _curve(values, "values")
    b = _curve(baseline, "baseline")
    if v.shape != b.shape:
        raise ValueError(f"baseline has {b.size} points but values has {v.size}; they must be "
                         "measured at the same levels")
    beta = b + (v[0] - b[0])
    return float(np.sum(v - beta))
