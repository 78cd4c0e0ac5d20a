"""Module B of Turbo-VBI: sum-product on the chain (exact) and the 2-D grid (loopy BP)."""

import time

import numpy as np
import pytest

from tfprune.methods import message_passing as mp

# Loopy BP on a 3x3 grid vs brute-force enumeration, 5 random evidence draws
# in [0.05, 0.95] each; stated tolerance (max abs error of P(s=1), marginal and
# extrinsic) per prior: the reference code's (start, p01, p11) = (0.5, 0.288,
# 0.49): 0.005; TurboVBI's default (0.1, 0.05, 0.6): 0.02; a dense, strongly
# coupled prior (0.3, 0.2, 0.7) is loopy BP's weak spot: 0.25 (measured 0.10
# marginal, 0.23 extrinsic).
GRID_CASES = [((0.5, 0.288, 0.49), 0.005), ((0.1, 0.05, 0.6), 0.02), ((0.3, 0.2, 0.7), 0.25)]


@pytest.mark.parametrize("extrinsic", [False, True])
@pytest.mark.parametrize("start,p01,p11", [(0.3, 0.2, 0.7), (0.5, 0.288, 0.49), (0.1, 0.05, 0.6)])
def test_chain_forward_backward_equals_brute_force(extrinsic, start, p01, p11):
    rng = np.random.default_rng(0)
    evidence = rng.uniform(0.02, 0.98, size=(7, 2))
    got = mp.chain_marginals(evidence, start, p01, p11, extrinsic=extrinsic)
    want = mp.brute_force_marginals(evidence, start, p01, p11, grid=False, extrinsic=extrinsic)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_chain_accepts_one_dimensional_evidence():
    evidence = np.array([0.9, 0.1, 0.5, 0.7])
    got = mp.chain_marginals(evidence, 0.5, 0.3, 0.7)
    want = mp.brute_force_marginals(evidence[:, None], 0.5, 0.3, 0.7, grid=False)[:, 0]
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("extrinsic", [False, True])
def test_grid_with_one_column_is_the_exact_chain(extrinsic):
    evidence = np.random.default_rng(1).uniform(0.05, 0.95, size=(8, 1))
    got, info = mp.grid_marginals(evidence, 0.3, 0.2, 0.7, extrinsic=extrinsic, tol=1e-10,
                                  max_iter=500, return_info=True)
    want = mp.chain_marginals(evidence, 0.3, 0.2, 0.7, extrinsic=extrinsic)
    assert info["converged"]
    np.testing.assert_allclose(got, want, atol=1e-8)


@pytest.mark.parametrize("prior,tol", GRID_CASES)
def test_loopy_bp_on_3x3_grid_is_close_to_brute_force(prior, tol):
    start, p01, p11 = prior
    rng = np.random.default_rng(2)
    for _ in range(5):
        evidence = rng.uniform(0.05, 0.95, size=(3, 3))
        for extrinsic in (False, True):
            got, info = mp.grid_marginals(evidence, start, p01, p11, extrinsic=extrinsic,
                                          tol=1e-8, max_iter=1000, return_info=True)
            want = mp.brute_force_marginals(evidence, start, p01, p11, extrinsic=extrinsic)
            assert info["converged"]
            assert np.max(np.abs(got - want)) < tol


def test_grid_coupling_clusters_support():
    # One weakly active node between strongly active neighbours is pulled up.
    evidence = np.full((3, 3), 0.9)
    evidence[1, 1] = 0.4
    coupled = mp.grid_marginals(evidence, 0.5, 0.1, 0.8)
    chain = mp.chain_marginals(evidence, 0.5, 0.1, 0.8)
    assert coupled[1, 1] > chain[1, 1] > 0.4


def test_grid_is_fast_enough_for_a_lenet_300_kernel():
    evidence = np.where(np.random.default_rng(3).uniform(size=(784, 300)) < 0.1, 0.95, 0.02)
    t = time.perf_counter()
    out, info = mp.grid_marginals(evidence, 0.1, 0.05, 0.6, return_info=True)
    assert time.perf_counter() - t < 15
    assert info["converged"] and out.shape == (784, 300)
    assert np.all((out > 0) & (out < 1))


def test_extreme_evidence_stays_finite():
    evidence = np.array([[0.0, 1.0], [1.0, 0.0], [1e-300, 1 - 1e-16]])
    for fn in (mp.chain_marginals, mp.grid_marginals):
        out = fn(evidence, 0.5, 0.3, 0.7, extrinsic=True)
        assert np.all(np.isfinite(out))


def test_invalid_evidence_is_rejected():
    with pytest.raises(ValueError, match="probabilities"):
        mp.chain_marginals(np.array([0.5, 1.5]), 0.5, 0.3, 0.7)
    with pytest.raises(ValueError, match="too many"):
        mp.brute_force_marginals(np.full((5, 4), 0.5), 0.5, 0.3, 0.7)
