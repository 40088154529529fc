"""Missing-modality protocols (robustmm_fast.missing) against CyIN's definitions
(trains/MissingProtocol.py): rates, >= 1 modality per sample, seeding, the dataset-level
distribution (and rates above (M-1)/M), the instance-level pattern frequencies, the per-entry
variant, modality dropout statistics, and mask files.

Statistical checks use fixed seeds and tolerances of about 5 standard deviations of the
estimate (stated at each check), so they cannot flake and still catch a wrong formula.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustmm_fast.missing import (fixed_subsets, instance_missing, load_masks, modality_dropout,
                                   per_entry_missing, random_missing, save_masks, subset_name)

RATES = (0.1, 0.2, 0.3, 0.4, 0.5)


# ---------------------------------------------------------------- fixed subsets

@pytest.mark.parametrize("m", range(1, 7))
def test_fixed_subsets_are_all_nonempty_combinations(m):
    s = fixed_subsets(m)
    assert s.dtype == torch.bool and s.shape == (2 ** m - 1, m)
    assert s.any(dim=1).all()                                    # non-empty
    assert len({tuple(r) for r in s.tolist()}) == 2 ** m - 1     # unique, hence all of them
    assert s[-1].all()                                           # the complete set is last


def test_fixed_subsets_order_is_the_bitmask():
    # row r = bitmask r + 1, bit m = modality m
    expected = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert fixed_subsets(3).int().tolist() == expected


def test_fixed_subsets_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_modalities"):
        fixed_subsets(0)
    with pytest.raises(ValueError, match="num_modalities"):
        fixed_subsets(21)
    with pytest.raises(TypeError, match="num_modalities"):
        fixed_subsets(2.0)
    with pytest.raises(TypeError, match="num_modalities"):
        fixed_subsets(True)


def test_subset_name():
    names = ["fac", "fou", "kar", "mor", "pix", "zer"]
    assert subset_name(torch.tensor([True, False, False, False, True, False]), names) == "fac+pix"
    assert subset_name([False, False, False, False, False, True], names) == "zer"
    assert subset_name(fixed_subsets(6)[-1], names) == "fac+fou+kar+mor+pix+zer"
    with pytest.raises(ValueError, match="at least one"):
        subset_name(torch.zeros(6, dtype=torch.bool), names)
    with pytest.raises(ValueError, match="names"):
        subset_name(torch.ones(3, dtype=torch.bool), names)
    with pytest.raises(TypeError, match="row"):
        subset_name(torch.ones(6), names)


# ---------------------------------------------------------------- random missing rate

@pytest.mark.parametrize("m", [2, 3, 6])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 33, 50, 2000])
def test_random_missing_rate_and_one_modality_per_sample(n, m):
    for eta in RATES:
        if eta > (m - 1) / m:
            continue
        mask = random_missing(n, m, eta, seed=1111)
        assert mask.dtype == torch.bool and mask.shape == (n, m) and mask.device.type == "cpu"
        assert mask.any(dim=1).all()
        observed = 1.0 - mask.double().mean().item()
        # K = round(eta*N*M) missing entries: off by at most half an entry
        assert abs(observed - eta) <= 1 / (2 * n * m) + 1e-9, (n, m, eta, observed)
        if n * m >= 100:
            assert abs(observed - eta) <= 0.005


def test_random_missing_exact_counts_hand_computed():
    # N=10, M=3, eta=0.3: round(9.0) = 9 missing entries; N=7, M=3, eta=0.1: round(2.1) = 2
    assert (~random_missing(10, 3, 0.3, seed=0)).sum().item() == 9
    assert (~random_missing(7, 3, 0.1, seed=0)).sum().item() == 2


def test_random_missing_limits():
    assert random_missing(5, 3, 0.0, seed=3).all()
    # eta = (M-1)/M: every sample keeps exactly its one protected modality
    at_limit = random_missing(300, 3, 2 / 3, seed=3)
    assert (at_limit.sum(dim=1) == 1).all()
    assert random_missing(4, 1, 0.0, seed=0).all()   # one modality: always all present
    assert random_missing(10, 1, 0.1, seed=0).all()
    with pytest.raises(ValueError, match="rate"):
        random_missing(10, 3, 1.01, seed=0)
    with pytest.raises(ValueError, match="rate"):
        random_missing(10, 3, -0.1, seed=0)
    with pytest.raises(ValueError, match="rate"):
        random_missing(10, 3, float("nan"), seed=0)
    with pytest.raises(TypeError, match="rate"):
        random_missing(10, 3, "0.1", seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        random_missing(-1, 3, 0.1, seed=0)
    with pytest.raises(TypeError, match="num_samples"):
        random_missing(10.0, 3, 0.1, seed=0)
    with pytest.raises(ValueError, match="num_modalities"):
        random_missing(10, 0, 0.0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        random_missing(10, 3, 0.1, seed=1.5)
    assert random_missing(0, 3, 0.3, seed=0).shape == (0, 3)


@pytest.mark.parametrize("m", [2, 3, 6])
def test_random_missing_above_limit_keeps_exactly_one(m):
    # CyIN (MissingProtocol.py:54-60): present ratio 1 - eta <= 1/M -> each sample keeps one
    # modality, uniformly. Rates strictly above (M-1)/M (CyIN evaluates 0.6 and 0.7 for M = 3)
    # and 1.0 are accepted and all give the same mask as eta = (M-1)/M for the same seed.
    n = 30000
    limit = random_missing(n, m, (m - 1) / m, seed=21)
    assert (limit.sum(dim=1) == 1).all()
    for eta in sorted({min(1.0, (m - 1) / m + 0.01), 0.7, 0.9, 1.0}):
        if eta <= (m - 1) / m:
            continue
        mask = random_missing(n, m, eta, seed=21)
        assert (mask.sum(dim=1) == 1).all(), eta
        assert torch.equal(mask, limit), eta
    # the kept modality is uniform: each column ~ Binomial(n, 1/M), within 4 sigma
    q = 1 / m
    sigma = (n * q * (1 - q)) ** 0.5
    assert ((limit.sum(dim=0).double() - n * q).abs() <= 4 * sigma).all()


def test_random_missing_seeding():
    a = random_missing(200, 6, 0.3, seed=1111)
    assert torch.equal(a, random_missing(200, 6, 0.3, seed=1111))
    assert not torch.equal(a, random_missing(200, 6, 0.3, seed=1112))


def test_random_missing_matches_cpm_nets_distribution():
    # CPM-Nets: one protected modality per sample, the other entries i.i.d. given it.
    # M=2: each sample has one unprotected entry, so exactly K = round(eta*2N) samples lose one
    # modality and N - K are complete.
    mask = random_missing(1000, 2, 0.25, seed=5)
    assert (mask.sum(dim=1) == 2).sum().item() == 1000 - 500
    # M=3, eta=0.4: each of the 2N unprotected entries is missing with prob r = 1.2N/2N = 0.6,
    # (nearly) independently, so a sample keeps 1/2/3 modalities w.p. r^2, 2r(1-r), (1-r)^2 =
    # 0.36, 0.48, 0.16. N = 20000: std of each fraction <= 0.0036, tolerance 0.02 (> 5 std).
    mask = random_missing(20000, 3, 0.4, seed=6)
    kept = mask.sum(dim=1)
    for k, p in ((1, 0.36), (2, 0.48), (3, 0.16)):
        assert abs((kept == k).float().mean().item() - p) < 0.02, k
    # symmetric in the modalities: each column misses eta of its entries (std 0.0035)
    assert torch.allclose(1 - mask.float().mean(dim=0), torch.full((3,), 0.4), atol=0.02)


# ---------------------------------------------------------------- instance-level probability

def _pattern_codes(mask):
    """Row -> bitmask sum_m mask[m] * 2^m (int64)."""
    return (mask.long() << torch.arange(mask.shape[1])).sum(dim=1)


@pytest.mark.parametrize("m", [2, 3, 6])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_instance_missing_follows_cyin(m, p):
    # CyIN (MissingProtocol.py:98-112): with probability p a sample gets one of the 2^M - 2
    # incomplete non-empty patterns, uniformly; otherwise it is complete.
    n = 200_000
    mask = instance_missing(n, m, p, seed=1111)
    assert mask.dtype == torch.bool and mask.shape == (n, m) and mask.device.type == "cpu"
    assert mask.any(dim=1).all()                       # never an empty pattern
    incomplete = ~mask.all(dim=1)
    k = int(incomplete.sum())
    # incomplete fraction ~ Binomial(n, p) / n: within 4 sigma of p
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(k / n - p) <= 4 * sigma, (m, p, k / n)
    # given k incomplete samples, each pattern's count ~ Binomial(k, 1/(2^M - 2)): every one of
    # the 2^M - 2 patterns within 4 sigma of 1/(2^M - 2), and no other pattern occurs
    n_pat = 2 ** m - 2
    counts = torch.bincount(_pattern_codes(mask[incomplete]), minlength=2 ** m).double()
    assert counts[0] == 0 and counts[-1] == 0          # not empty, not complete
    q = 1 / n_pat
    sigma_q = (q * (1 - q) / k) ** 0.5
    freq = counts[1:-1] / k
    assert ((freq - q).abs() <= 4 * sigma_q).all(), (m, p, (freq - q).abs().max() / sigma_q)
    # missing entries per sample X: 0 if complete, M - |b| for a uniform incomplete pattern b;
    # E[X] = p*M/2 (a pattern and its complement are equally likely), so the missing fraction
    # of entries is within 4 sigma of p/2, sigma = sqrt(Var X / n) / M
    sizes = fixed_subsets(m)[:-1].sum(dim=1).double()        # |b| of the 2^M - 2 patterns
    ex2 = p * ((m - sizes) ** 2).mean().item()
    sigma_x = ((ex2 - (p * m / 2) ** 2) / n) ** 0.5 / m
    assert abs((~mask).double().mean().item() - p / 2) <= 4 * sigma_x


def test_instance_missing_issue_example():
    # M = 3, p = 0.7: 70% of samples incomplete (the per-entry variant leaves 97.3%)
    n, m, p = 100_000, 3, 0.7
    frac = (~instance_missing(n, m, p, seed=5).all(dim=1)).double().mean().item()
    assert abs(frac - p) <= 4 * (p * (1 - p) / n) ** 0.5
    per_entry = (~per_entry_missing(n, m, p, seed=5).all(dim=1)).double().mean().item()
    expected = 1 - (1 - p) ** m                                         # 0.973
    assert abs(per_entry - expected) <= 4 * (expected * (1 - expected) / n) ** 0.5


def test_instance_missing_edges_and_seeding():
    assert instance_missing(50, 4, 0.0, seed=0).all()
    assert instance_missing(50, 1, 0.0, seed=0).all()
    one = instance_missing(1000, 3, 1.0, seed=0)       # p = 1: every sample incomplete
    assert not one.all(dim=1).any() and one.any(dim=1).all()
    assert instance_missing(0, 3, 0.5, seed=0).shape == (0, 3)
    a = instance_missing(100, 6, 0.5, seed=1)
    assert torch.equal(a, instance_missing(100, 6, 0.5, seed=1))
    assert not torch.equal(a, instance_missing(100, 6, 0.5, seed=2))
    # same seed: incomplete samples at a smaller p keep their pattern at a larger p
    lo, hi = instance_missing(5000, 3, 0.3, seed=9), instance_missing(5000, 3, 0.7, seed=9)
    lo_inc = ~lo.all(dim=1)
    assert torch.equal(lo[lo_inc], hi[lo_inc]) and (~hi.all(dim=1))[lo_inc].all()
    # many modalities: still one pattern per sample, never empty or complete
    wide = instance_missing(2000, 40, 1.0, seed=3)
    assert wide.any(dim=1).all() and not wide.all(dim=1).any()
    with pytest.raises(ValueError, match="one modality"):
        instance_missing(10, 1, 0.5, seed=0)
    with pytest.raises(ValueError, match="num_modalities"):
        instance_missing(10, 63, 0.5, seed=0)
    with pytest.raises(ValueError, match="prob"):
        instance_missing(10, 3, 1.5, seed=0)
    with pytest.raises(ValueError, match="prob"):
        instance_missing(10, 3, -0.5, seed=0)
    with pytest.raises(TypeError, match="prob"):
        instance_missing(10, 3, None, seed=0)


# ---------------------------------------------------------------- per-entry variant

def test_per_entry_missing_rate_and_rescue():
    n, m, p = 20000, 3, 0.3
    mask = per_entry_missing(n, m, p, seed=7)
    assert mask.dtype == torch.bool and mask.shape == (n, m)
    assert mask.any(dim=1).all()
    # expected missing fraction p - p^M / M (an all-missing sample gets one back) = 0.291;
    # std of the mean over 60000 entries ~ 0.0019, tolerance 0.01
    expected = p - p ** m / m
    assert abs((1 - mask.float().mean().item()) - expected) < 0.01


def test_per_entry_missing_edges_and_seeding():
    assert per_entry_missing(50, 4, 0.0, seed=0).all()
    one = per_entry_missing(30000, 3, 1.0, seed=0)
    assert (one.sum(dim=1) == 1).all()
    # the kept modality is uniform: each column ~ Binomial(30000, 1/3), std 82, tolerance 450
    counts = one.sum(dim=0)
    assert (counts - 10000).abs().max().item() < 450
    a = per_entry_missing(100, 6, 0.5, seed=1)
    assert torch.equal(a, per_entry_missing(100, 6, 0.5, seed=1))
    assert not torch.equal(a, per_entry_missing(100, 6, 0.5, seed=2))
    with pytest.raises(ValueError, match="prob"):
        per_entry_missing(10, 3, 1.5, seed=0)
    with pytest.raises(TypeError, match="prob"):
        per_entry_missing(10, 3, None, seed=0)


# ---------------------------------------------------------------- modality dropout

def test_modality_dropout_rate_keeps_one_and_subset():
    gen = torch.Generator().manual_seed(11)
    for m, p in ((6, 0.3), (2, 0.5)):
        present = torch.ones(20000, m, dtype=torch.bool)
        out = modality_dropout(present, p, generator=gen)
        assert out.dtype == torch.bool and out.shape == present.shape
        assert out.any(dim=1).all()
        # a full row loses M*p - p^M entries in expectation: fraction p - p^M / M
        # (M=6: 0.29988; M=2: 0.375, far from p = 0.5); std of the mean <= 0.0035, tol 0.015
        dropped = 1 - out.float().mean().item()
        assert abs(dropped - (p - p ** m / m)) < 0.015, (m, p, dropped)


def test_modality_dropout_respects_absent_and_empty_rows():
    gen = torch.Generator().manual_seed(12)
    present = random_missing(3000, 4, 0.5, seed=0)
    present[:10] = False                      # all-absent rows stay all-absent
    out = modality_dropout(present, 0.6, generator=gen)
    assert not (out & ~present).any()         # never turns an absent modality on
    assert not out[:10].any()
    assert out[10:].any(dim=1).all()
    # p = 1: each non-empty row keeps exactly one of its own present modalities, uniformly:
    # rows [T, F, T, F] keep column 0 or 2, each ~ Binomial(20000, 1/2), std 71, tolerance 400
    rows = torch.tensor([[True, False, True, False]]).expand(20000, 4)
    kept = modality_dropout(rows, 1.0, generator=gen)
    assert (kept.sum(dim=1) == 1).all() and not kept[:, [1, 3]].any()
    assert abs(kept[:, 0].sum().item() - 10000) < 400


def test_modality_dropout_zero_seeded_and_errors():
    present = random_missing(100, 3, 0.3, seed=0)
    same = modality_dropout(present, 0.0)
    assert torch.equal(same, present)
    a = modality_dropout(present, 0.4, generator=torch.Generator().manual_seed(3))
    b = modality_dropout(present, 0.4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="present"):
        modality_dropout(present.float(), 0.5)
    with pytest.raises(TypeError, match="present"):
        modality_dropout(present[:, 0], 0.5)
    with pytest.raises(ValueError, match="p must"):
        modality_dropout(present, 1.5)


# ---------------------------------------------------------------- mask files

def _masks():
    return {"eta=0.3": random_missing(40, 6, 0.3, seed=1), "subsets": fixed_subsets(6),
            "empty": torch.zeros(0, 6, dtype=torch.bool)}


def test_save_load_round_trip(tmp_path):
    masks = _masks()
    meta = {"protocol": "random", "rate": 0.3, "seed": 1,
            "modalities": ["fac", "fou", "kar", "mor", "pix", "zer"]}
    path = tmp_path / "sub" / "masks.npz"
    save_masks(path, masks, meta)
    save_masks(path, masks, meta)            # overwriting is fine
    assert sorted(p.name for p in path.parent.iterdir()) == ["masks.npz"]  # no temp left
    loaded, loaded_meta = load_masks(path)
    assert loaded_meta == meta
    assert loaded.keys() == masks.keys()
    for k, v in masks.items():
        assert loaded[k].dtype == torch.bool and torch.equal(loaded[k], v)


def test_save_masks_rejects_bad_input(tmp_path):
    path = tmp_path / "m.npz"
    with pytest.raises(TypeError, match="mask 'a'"):
        save_masks(path, {"a": torch.ones(3, 2)}, {})
    with pytest.raises(ValueError, match="no present"):
        save_masks(path, {"a": torch.zeros(3, 2, dtype=torch.bool)}, {})
    with pytest.raises(ValueError, match="modalities"):
        save_masks(path, {"a": torch.ones(3, 2, dtype=torch.bool)}, {"modalities": ["x"]})
    with pytest.raises(TypeError, match="meta"):
        save_masks(path, {"a": torch.ones(3, 2, dtype=torch.bool)}, {"bad": object()})
    with pytest.raises(ValueError, match="masks"):
        save_masks(path, {}, {})
    assert not path.exists()


def test_load_masks_rejects_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_masks(garbage)

    npy = tmp_path / "single.npy"
    np.save(npy, np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="single.npy.*npz"):
        load_masks(npy)

    good = tmp_path / "good.npz"
    save_masks(good, _masks(), {"protocol": "x"})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_masks(truncated)

    no_meta = tmp_path / "nometa.npz"
    np.savez(no_meta, a=np.ones((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="nometa.npz.*__meta__"):
        load_masks(no_meta)

    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, a=np.ones((3, 2), dtype=np.float32), __meta__=np.array("{}"))
    with pytest.raises(ValueError, match="dtype.npz.*bool"):
        load_masks(wrong_dtype)

    wrong_cols = tmp_path / "cols.npz"
    np.savez(wrong_cols, a=np.ones((3, 2), dtype=bool),
             __meta__=np.array('{"modalities": ["x", "y", "z"]}'))
    with pytest.raises(ValueError, match="cols.npz.*columns"):
        load_masks(wrong_cols)

    bad_json = tmp_path / "json.npz"
    np.savez(bad_json, a=np.ones((3, 2), dtype=bool), __meta__=np.array("{not json"))
    with pytest.raises(ValueError, match="json.npz.*JSON"):
        load_masks(bad_json)
