"""Metrics (robustmm_fast.metrics): hand-computed cases, agreement with scikit-learn and with a
straight re-statement of MMSA's regression metrics, and the robustness summaries."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from robustmm_fast.metrics import (classification_metrics, curve_area, effective_robustness,
                                   primary_metric, regression_metrics, relative_robustness,
                                   subset_mean)


# ---------------------------------------------------------------- classification

def test_classification_hand_computed():
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    # correct at 0, 1, 3, 5 -> 4/6
    # class 0: TP 2, predicted 2, support 3 -> P 1,   R 2/3, F1 4/5
    # class 1: TP 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    # class 2: TP 1, predicted 2, support 1 -> P 1/2, R 1,   F1 2/3
    # macro F1 (4/5 + 1/2 + 2/3)/3 = 59/90; weighted (3*4/5 + 2*1/2 + 1*2/3)/6 = 61/90
    # UAR (2/3 + 1/2 + 1)/3 = 13/18
    out = classification_metrics(torch.tensor(pred), torch.tensor(true))
    assert out == pytest.approx({"accuracy": 4 / 6, "f1_macro": 59 / 90, "f1_weighted": 61 / 90,
                                 "uar": 13 / 18}, abs=1e-12)
    assert all(type(v) is float for v in out.values())
    # the same predictions as logits (argmax)
    logits = torch.full((6, 3), -1.0)
    logits[torch.arange(6), torch.tensor(pred)] = 2.0
    assert classification_metrics(logits, np.array(true)) == out


def test_classification_class_only_predicted():
    true = [0, 0, 1, 1]
    pred = [0, 2, 1, 1]
    # F1 over {0, 1, 2}: class 0 P 1 R 1/2 F1 2/3, class 1 F1 1, class 2 (never true) F1 0
    # macro (2/3 + 1 + 0)/3 = 5/9; weighted by support 2, 2, 0: (4/3 + 2)/4 = 5/6
    # UAR averages the classes of `true` only: (1/2 + 1)/2 = 3/4
    out = classification_metrics(pred, true)
    assert out == pytest.approx({"accuracy": 0.75, "f1_macro": 5 / 9, "f1_weighted": 5 / 6,
                                 "uar": 0.75}, abs=1e-12)


def _f1_from_confusion(true, pred, num_classes):
    """Independent F1 (numpy, from the confusion matrix) over the classes seen in either."""
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, (true, pred), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    seen = (support + predicted) > 0
    f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return f1[seen].mean(), (f1 * support).sum() / support.sum()


@pytest.mark.parametrize("seed", range(5))
def test_classification_agrees_with_independent_computation(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    true = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[true]     # better than chance
    pred = logits.argmax(1)
    out = classification_metrics(torch.from_numpy(logits).float(), torch.from_numpy(true))
    macro, weighted = _f1_from_confusion(true, pred, c)
    assert out["accuracy"] == pytest.approx(np.mean(pred == true), abs=1e-12)
    assert out["f1_macro"] == pytest.approx(macro, abs=1e-12)
    assert out["f1_weighted"] == pytest.approx(weighted, abs=1e-12)
    assert out["uar"] == pytest.approx(balanced_accuracy_score(true, pred), abs=1e-12)


def test_classification_errors():
    with pytest.raises(ValueError, match="samples"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        classification_metrics(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    with pytest.raises(TypeError, match="integer"):
        classification_metrics([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="logits_or_pred"):
        classification_metrics(np.zeros((2, 2, 2)), [0, 1])
    with pytest.raises(ValueError, match="true"):
        classification_metrics([0, 1], [[0, 1]])
    # integral floats (labels stored as float) are accepted
    assert classification_metrics([0.0, 1.0], [0, 1])["accuracy"] == 1.0


# ---------------------------------------------------------------- MMSA regression

def _mmsa_reference(y_pred, y_true):
    """MMSA's MetricsTop.__eval_mosei_regression (thuiar/MMSA, src/MMSA/utils/metricsTop.py),
    restated statement by statement with numpy and scikit-learn."""
    def multiclass_acc(p, t):
        return np.sum(np.round(p) == np.round(t)) / float(len(t))

    test_preds = y_pred.view(-1).cpu().detach().numpy()
    test_truth = y_true.view(-1).cpu().detach().numpy()
    test_preds_a7 = np.clip(test_preds, a_min=-3., a_max=3.)
    test_truth_a7 = np.clip(test_truth, a_min=-3., a_max=3.)
    test_preds_a5 = np.clip(test_preds, a_min=-2., a_max=2.)
    test_truth_a5 = np.clip(test_truth, a_min=-2., a_max=2.)
    test_preds_a3 = np.clip(test_preds, a_min=-1., a_max=1.)
    test_truth_a3 = np.clip(test_truth, a_min=-1., a_max=1.)
    mae = np.mean(np.absolute(test_preds - test_truth))
    corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = multiclass_acc(test_preds_a7, test_truth_a7)
    mult_a5 = multiclass_acc(test_preds_a5, test_truth_a5)
    mult_a3 = multiclass_acc(test_preds_a3, test_truth_a3)
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    non_zeros_binary_truth = (test_truth[non_zeros] > 0)
    non_zeros_binary_preds = (test_preds[non_zeros] > 0)
    non_zeros_acc2 = accuracy_score(non_zeros_binary_preds, non_zeros_binary_truth)
    non_zeros_f1_score = f1_score(non_zeros_binary_truth, non_zeros_binary_preds, average='weighted')
    binary_truth = (test_truth >= 0)
    binary_preds = (test_preds >= 0)
    acc2 = accuracy_score(binary_preds, binary_truth)
    f_score = f1_score(binary_truth, binary_preds, average='weighted')
    return {"Has0_acc_2": round(acc2, 4), "Has0_F1_score": round(f_score, 4),
            "Non0_acc_2": round(non_zeros_acc2, 4), "Non0_F1_score": round(non_zeros_f1_score, 4),
            "Mult_acc_5": round(mult_a5, 4), "Mult_acc_7": round(mult_a7, 4),
            "MAE": round(mae, 4), "Corr": round(corr, 4), "_mult_a3": round(mult_a3, 4)}


MMSA_KEYS = ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
             "Mult_acc_7", "MAE", "Corr")


def test_regression_hand_computed():
    true = torch.tensor([0.4, 2.2, -3.0, 0.0, 1.6], dtype=torch.float64)
    pred = torch.tensor([0.5, 2.5, -1.4, 0.6, -0.2], dtype=torch.float64)
    out = regression_metrics(pred, true)
    assert set(out) == set(MMSA_KEYS) | {"Mult_acc_3"}
    # np.round halves to even: 0.5 -> 0 and 2.5 -> 2
    # clip 3:  pred -> 0, 2, -1, 1, 0   true -> 0, 2, -3, 0, 2   => 2/5
    # clip 2:  pred -> 0, 2, -1, 1, 0   true -> 0, 2, -2, 0, 2   => 2/5
    # clip 1:  pred -> 0, 1, -1, 1, 0   true -> 0, 1, -1, 0, 1   => 3/5
    # MAE (0.1 + 0.3 + 1.6 + 0.6 + 1.8)/5 = 0.88
    # Has0: pred >= 0 T T F T F, true >= 0 T T F T T -> acc 4/5;
    #   F1(T) = 2*1*(3/4)/(7/4) = 6/7 (support 4), F1(F): P 1/2 R 1 -> 2/3 (support 1)
    #   weighted (4*6/7 + 2/3)/5 = 86/105 = 0.81905 -> 0.819
    # Non0 (drop true == 0): pred > 0 T T F F, true > 0 T T F T -> acc 3/4;
    #   F1(T) = 4/5 (support 3), F1(F) = 2/3 (support 1): (12/5 + 2/3)/4 = 23/30 -> 0.7667
    assert out["Mult_acc_7"] == 0.4 and out["Mult_acc_5"] == 0.4 and out["Mult_acc_3"] == 0.6
    assert out["MAE"] == 0.88
    assert out["Has0_acc_2"] == 0.8 and out["Has0_F1_score"] == 0.819
    assert out["Non0_acc_2"] == 0.75 and out["Non0_F1_score"] == 0.7667
    assert all(type(v) is float for v in out.values())


def test_regression_corr_hand_computed():
    true = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0])
    assert regression_metrics(2 * true + 1, true)["Corr"] == 1.0
    assert regression_metrics(-true, true)["Corr"] == -1.0
    # x = 1, 2, 3 vs y = 1, 3, 2: cov 1/2 (sample), var 1 and 1 -> r = 0.5
    assert regression_metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])["Corr"] == 0.5


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regression_matches_mmsa_restatement(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n = 400
    true = (torch.rand(n, generator=g) * 7 - 3.5)
    true[:40] = 0.0                                          # MOSI-like exact neutral labels
    true[40:80] = torch.round(true[40:80] * 2) / 2           # halves: ties for np.round
    pred = (0.6 * true + 0.8 * torch.randn(n, generator=g)).to(dtype)
    pred[80:100] = torch.round(pred[80:100] * 2) / 2
    true = true.to(dtype)
    ref = _mmsa_reference(pred.view(-1, 1), true.view(-1, 1))
    out = regression_metrics(pred.view(-1, 1), true.view(-1, 1))
    for k in MMSA_KEYS:
        assert abs(out[k] - float(ref[k])) < 1e-6, (k, out[k], ref[k])
    assert abs(out["Mult_acc_3"] - float(ref["_mult_a3"])) < 1e-6
    # the results are already rounded to 4 decimals
    assert all(v == round(v, 4) for v in out.values())


def test_regression_degenerate_inputs_give_nan_not_errors():
    true = torch.tensor([0.5, -1.0, 2.0, -0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # and no warnings either
        out = regression_metrics(torch.full((4,), 0.7), true)
    assert math.isnan(out["Corr"])
    assert out["MAE"] == round((0.2 + 1.7 + 1.3 + 1.0) / 4, 4)   # 1.05
    zeros = regression_metrics(torch.tensor([0.1, -0.2, 0.3]), torch.zeros(3))
    assert math.isnan(zeros["Non0_acc_2"]) and math.isnan(zeros["Non0_F1_score"])
    assert zeros["Has0_acc_2"] == round(2 / 3, 4)


def test_regression_errors():
    with pytest.raises(ValueError, match="pred has 2"):
        regression_metrics([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least one"):
        regression_metrics([], [])
    with pytest.raises(ValueError, match="pred must be finite"):
        regression_metrics([float("nan"), 0.2], [0.1, 0.2])


def test_primary_metric():
    assert primary_metric("classification") == ("accuracy", True)
    assert primary_metric("regression") == ("MAE", False)
    with pytest.raises(ValueError, match="task"):
        primary_metric("ranking")


# ---------------------------------------------------------------- robustness summaries

def test_subset_mean():
    assert subset_mean([0.5, 0.7, 0.9]) == pytest.approx(0.7, abs=1e-12)
    out = subset_mean([{"accuracy": 0.9, "f1_macro": 0.8}, {"accuracy": 0.7, "f1_macro": 0.4}])
    assert out == pytest.approx({"accuracy": 0.8, "f1_macro": 0.6}, abs=1e-12)
    assert math.isnan(subset_mean([0.5, float("nan")]))
    with pytest.raises(ValueError, match="keys"):
        subset_mean([{"accuracy": 0.9}, {"f1_macro": 0.4}])
    with pytest.raises(ValueError, match="at least one"):
        subset_mean([])
    with pytest.raises(TypeError, match="numbers"):
        subset_mean([0.5, {"accuracy": 0.9}])


def test_curve_area():
    etas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert curve_area(etas, [0.93] * 6) == pytest.approx(0.93, abs=1e-12)   # flat curve -> value
    # linear 1.0 -> 0.5: mean value 0.75
    assert curve_area(etas, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]) == pytest.approx(0.75, abs=1e-12)
    # uneven: 0.1 * (1 + 0.8)/2 + 0.4 * (0.8 + 0.6)/2 = 0.09 + 0.28 = 0.37, / 0.5 = 0.74
    assert curve_area([0.0, 0.1, 0.5], [1.0, 0.8, 0.6]) == pytest.approx(0.74, abs=1e-12)
    assert curve_area([0.3], [0.8]) == 0.8
    with pytest.raises(ValueError, match="increasing"):
        curve_area([0.0, 0.2, 0.1], [1.0, 0.9, 0.8])
    with pytest.raises(ValueError, match="points"):
        curve_area([0.0, 0.1], [1.0, 0.9, 0.8])


def test_relative_robustness_multibench():
    # MultiBench: sum (v_i + v_{i+1}) * 0.1 / 2 -> (1.8 + 1.4) * 0.05 = 0.16
    assert relative_robustness([1.0, 0.8, 0.6]) == pytest.approx(0.16, abs=1e-12)
    assert relative_robustness([1.0, 0.8, 0.6], step=0.2) == pytest.approx(0.32, abs=1e-12)
    assert relative_robustness([0.7]) == 0.0
    with pytest.raises(ValueError, match="step"):
        relative_robustness([1.0, 0.8], step=0.0)


def test_effective_robustness_multibench():
    # late fusion shifted to start at 0.9: [0.9, 0.65, 0.35]; 0 + 0.15 + 0.25 = 0.4
    assert effective_robustness([0.9, 0.8, 0.6], [0.95, 0.7, 0.4]) == pytest.approx(0.4, abs=1e-12)
    # a method that degrades exactly like late fusion has effective robustness 0
    assert effective_robustness([0.8, 0.7, 0.5], [0.9, 0.8, 0.6]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same levels"):
        effective_robustness([0.9, 0.8], [0.9, 0.8, 0.7])


# ---------------------------------------------------------------- our counts == scikit-learn, bit for bit

def _label_cases():
    """(true, pred) pairs: random many-class, a class only predicted, a class only true, one
    class, two samples, bools (MMSA's binary metrics), labels that are not 0..C-1."""
    rng = np.random.default_rng(0)
    for n, c in ((1, 2), (2, 2), (7, 3), (160, 10), (400, 10), (2000, 7), (333, 40)):
        for _ in range(3):
            true = rng.integers(0, c, n)
            pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, c + 2, n))
            yield true, pred
    yield np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64)
    yield np.zeros(5, dtype=np.int64), np.array([0, 1, 2, 3, 4])
    yield np.array([3, 3, 9, 9, 100]), np.array([9, 3, 9, 100, -1])
    b = rng.random(301) > 0.4
    yield b, rng.random(301) > 0.5
    yield np.ones(4, dtype=bool), np.array([True, False, True, True])


@pytest.mark.parametrize("case", list(_label_cases()), ids=lambda c: f"n{len(c[0])}")
def test_counts_equal_sklearn_bit_for_bit(case):
    from sklearn.metrics import recall_score

    from robustmm_fast.metrics import accuracy, f1, recall_macro
    true, pred = case
    assert accuracy(true, pred) == accuracy_score(true, pred)
    assert accuracy(pred, true) == accuracy_score(pred, true)
    for average in ("macro", "weighted"):
        assert f1(true, pred, average) == f1_score(true, pred, average=average, zero_division=0)
    labels = np.unique(true)
    assert recall_macro(true, pred, labels) == recall_score(true, pred, labels=labels,
                                                           average="macro", zero_division=0)
    assert recall_macro(true, pred, labels) == balanced_accuracy_score(true, pred)


def test_classification_metrics_do_not_import_sklearn():
    import subprocess
    import sys
    code = ("import sys, torch; from robustmm_fast.metrics import classification_metrics as c; "
            "c(torch.tensor([[0.1, 0.9]]), torch.tensor([1])); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
