"""kdkernels.fskd.solve: the batched fp64 ridge solve against float64 numpy."""
import importlib

import numpy as np
import pytest
import torch

from kdkernels import fskd

solve_mod = importlib.import_module("kdkernels.fskd.solve")  # the module, not the function


def as_np(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def rel_err(a, b):
    a, b = as_np(a), as_np(b)
    assert np.isfinite(a).all(), "result has NaN/inf"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def problem(cs, ct, m, seed, dtype=torch.float64, mean=0.0, device="cpu"):
    """Features as (M, C, 1, 1) pixels, T = A S + noise; returns (s, t, stats) (s, t on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(m, cs, generator=g, dtype=torch.float64) + mean
    t = s @ torch.randn(cs, ct, generator=g, dtype=torch.float64) + 0.1 * torch.randn(m, ct, generator=g, dtype=torch.float64)
    s, t = s.to(dtype)[:, :, None, None], t.to(dtype)[:, :, None, None]
    return s, t, fskd.GramStats(cs, ct).update(s.to(device), t.to(device))


def centred_trace(st):
    """trace of the centred covariance sum (s - mean)(s - mean)^T of a GramStats: the ridge unit."""
    return float(np.trace(as_np(st.G)) - np.sum(as_np(st.sum_s) ** 2) / st.count)


def lstsq_q(s, t):
    """Q (Ct, Cs) = argmin ||Q S - T|| by float64 numpy."""
    S = s.double().flatten(1).numpy()
    T = t.double().flatten(1).numpy()
    return np.linalg.lstsq(S, T, rcond=None)[0].T


def ridge_q(G, H, alpha, q0, trace=None):
    """The ridge solution with lam = alpha * trace / C; ``trace`` defaults to the trace of G
    (the centred covariance when G is already centred)."""
    c = G.shape[0]
    lam = alpha * (np.trace(G) if trace is None else trace) / c
    return np.linalg.solve(G + lam * np.eye(c), (H + lam * q0).T).T


def test_matches_numpy_lstsq_alpha0(device):
    cases = [(5, 5), (12, 7), (3, 16), (31, 31)]  # different widths in one batch
    probs = [problem(cs, ct, 400, seed=i, device=device) for i, (cs, ct) in enumerate(cases)]
    qs = fskd.solve([p[2] for p in probs], alpha=0.0, prior="zero")
    assert isinstance(qs, list) and len(qs) == 4
    for (s, t, _), q, (cs, ct) in zip(probs, qs, cases):
        assert q.shape == (ct, cs) and q.dtype == torch.float64 and q.device.type == device.type
        assert rel_err(q, lstsq_q(s, t)) < 1e-8


def test_identity_prior_alpha0_is_plain_least_squares():
    s, t, st = problem(9, 9, 300, seed=5)
    q = fskd.solve(st, alpha=0)  # one GramStats in, one tensor out
    assert isinstance(q, torch.Tensor)
    assert rel_err(q, lstsq_q(s, t)) < 1e-8


def test_fp32_features_match_lstsq_of_the_same_values(device):
    s, t, st = problem(16, 16, 2000, seed=6, dtype=torch.float32, mean=3.0, device=device)
    assert rel_err(fskd.solve(st, alpha=0), lstsq_q(s, t)) < 1e-5


def test_ill_conditioned_large_means_plain_fp32_fails_gramstats_succeeds(device):
    g = torch.Generator().manual_seed(0)
    c, m = 32, 4096
    mu = 1000 * (1 + torch.rand(c, generator=g))
    x = (mu[:, None] + torch.randn(c, m, generator=g)).float()  # (C, M), pre-ReLU-like
    a = torch.randn(c, c, generator=g) / c ** 0.5
    y = (a @ (x - mu[:, None]) + 0.1 * torch.randn(c, m, generator=g) + mu[:, None]).float()
    # plain fp32 Gram: not positive definite any more
    _, info = torch.linalg.cholesky_ex(x @ x.T)
    assert int(info) > 0
    st = fskd.GramStats(c).update(x.T[:, :, None, None].to(device), y.T[:, :, None, None].to(device))
    q = fskd.solve(st, alpha=0)
    ref = np.linalg.lstsq(x.double().numpy().T, y.double().numpy().T, rcond=None)[0].T
    assert rel_err(q, ref) < 1e-5


def test_rank_deficient_is_finite_and_equals_ridge():
    s, t, st = problem(24, 24, 10, seed=7)  # M = 10 pixels < C = 24
    with pytest.warns(RuntimeWarning, match=r"10 pixels for 24 channels: underdetermined"):
        q = fskd.solve(st, alpha=1e-3)
    G, H = st.G.numpy(), st.Hc.numpy()
    assert rel_err(q, ridge_q(G, H, 1e-3, np.eye(24), trace=centred_trace(st))) < 1e-9
    s, t, st = problem(8, 5, 6, seed=8)
    with pytest.warns(RuntimeWarning):
        q = fskd.solve(st, alpha=1e-2, prior="zero")
    assert rel_err(q, ridge_q(st.G.numpy(), st.Hc.numpy(), 1e-2, np.zeros((5, 8)), trace=centred_trace(st))) < 1e-9


@pytest.mark.parametrize("prior", ["identity", "zero"])
def test_padded_batch_equals_per_block_solves(prior, monkeypatch, device):
    # groups by width (>= 0.8 x the widest): {17, 16, 14}, {8, 7}, {3}, {1} / {17, 15}, {8}, {3}
    if prior == "identity":
        widths, n_groups = [(3, 3), (17, 17), (8, 8), (16, 16), (1, 1), (14, 14), (7, 7)], 4
    else:
        widths, n_groups = [(3, 6), (17, 2), (8, 8), (15, 19)], 3
    stats = [problem(cs, ct, 60, seed=10 + i, device=device)[2] for i, (cs, ct) in enumerate(widths)]
    sizes = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, **k: sizes.append(tuple(a.shape)) or real(a, **k))
    batched = fskd.solve(stats, alpha=1e-3, prior=prior)
    assert len(sizes) == n_groups and sizes[0] == (3 if prior == "identity" else 2, 17, 17)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
    for st, q in zip(stats, batched):
        alone = fskd.solve(st, alpha=1e-3, prior=prior)
        assert rel_err(q, alone) < 1e-12
        q0 = np.eye(st.c_out, st.c_in) if prior == "identity" else np.zeros((st.c_out, st.c_in))
        assert rel_err(q, ridge_q(as_np(st.G), as_np(st.Hc), 1e-3, q0, trace=centred_trace(st))) < 1e-9


def test_dead_channels_keep_their_prior():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(50, 6, 2, 2, generator=g, dtype=torch.float64)
    s[:, 2] = 0  # a dead channel (e.g. pruned, or always below the ReLU threshold)
    t = torch.randn(50, 6, 2, 2, generator=g, dtype=torch.float64)
    st = fskd.GramStats(6).update(s, t)
    for prior, col in (("identity", np.eye(6)[:, 2]), ("zero", np.zeros(6))):
        q = fskd.solve(st, alpha=0.0, prior=prior).numpy()
        assert np.isfinite(q).all()
        assert np.array_equal(q[:, 2], col)
        live = [0, 1, 3, 4, 5]
        S = s.transpose(0, 1).reshape(6, -1).numpy()[live].T
        T = t.transpose(0, 1).reshape(6, -1).numpy().T
        assert rel_err(q[:, live], np.linalg.lstsq(S, T, rcond=None)[0].T) < 1e-8
    empty = fskd.GramStats(3).update(torch.zeros(2, 3, 2, 2), torch.randn(2, 3, 2, 2))
    assert np.array_equal(fskd.solve(empty).numpy(), np.eye(3))  # all dead: Q = Q0


def test_dead_channels_in_a_padded_batch():
    """A dead channel in the narrower block of a padded group (widths 6 and 5 share one batch)
    gets its prior column there too, and each block equals its own unpadded solve."""
    g = torch.Generator().manual_seed(12)
    stats = []
    for c in (6, 5):
        s = torch.randn(40, c, 2, 2, generator=g, dtype=torch.float64)
        s[:, 1] = 0
        stats.append(fskd.GramStats(c).update(s, torch.randn(40, c, 2, 2, generator=g, dtype=torch.float64)))
    assert len(solve_mod.width_groups([6, 5])) == 1  # one padded batch
    for prior in ("identity", "zero"):
        batched = fskd.solve(stats, alpha=1e-3, prior=prior)
        for st, q in zip(stats, batched):
            assert rel_err(q, fskd.solve(st, alpha=1e-3, prior=prior)) < 1e-12
            col = np.eye(st.c_in)[:, 1] if prior == "identity" else np.zeros(st.c_in)
            assert np.array_equal(q.numpy()[:, 1], col)


def test_jitter_retries_only_the_failed_entries(monkeypatch):
    good_g = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    bad_g = torch.tensor([[1.0, 1.0], [1.0, 1.0 - 1e-13]], dtype=torch.float64)  # indefinite by a hair
    h = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    sizes = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, **k: sizes.append(a.shape[0]) or real(a, **k))
    with pytest.warns(RuntimeWarning, match="block 1: G is singular"):
        q_good, q_bad = solve_mod.ridge_solve([good_g, bad_g], [h, h], 0.0, False)
    assert sizes[0] == 2 and len(sizes) >= 2 and all(n == 1 for n in sizes[1:])
    assert rel_err(q_good, h.numpy() @ np.linalg.inv(good_g.numpy())) < 1e-14
    assert torch.isfinite(q_bad).all()


def test_unrecoverable_blocks_raise_with_their_name():
    g = torch.eye(3, dtype=torch.float64)
    h = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match=r"second: Cholesky of G \+ lam\*I failed"):
        solve_mod.ridge_solve([g, -g], [h, h], 0.0, False, names=["first", "second"])
    nan_g = g.clone()
    nan_g[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"block 1: the statistics contain NaN or inf"):
        solve_mod.ridge_solve([g, nan_g], [h, h], 1e-4, True)
    _, _, st = problem(4, 4, 30, seed=12)
    st.G[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        fskd.solve(st)


def test_never_calls_lstsq(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.linalg.lstsq must not be used")
    monkeypatch.setattr(torch.linalg, "lstsq", boom)
    _, _, st = problem(6, 6, 3, seed=13)
    with pytest.warns(RuntimeWarning):
        assert torch.isfinite(fskd.solve(st, alpha=1e-4)).all()


def test_solve_syncs_once_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("host syncs are only observable on CUDA (KDKERNELS_TEST_DEVICE=cuda)")
    stats = [problem(c, c, 50, seed=20 + i, device=device)[2] for i, c in enumerate([8, 8, 16, 30, 31])]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            qs = fskd.solve(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1  # the final error check
    assert all(torch.isfinite(q).all() for q in qs)


# ------------------------------------------------------------- unbiased default
def ill_conditioned(seed=0, c=64, n=64, hw=8, spread=4e3, mean=50.0, scale=6.0):
    """Pre-ReLU-like fp32 features: 64 channels around mean 50 whose centred singular
    values spread over ``spread`` (cond(S - mean) = 4e3), and an exactly linear target.
    Returns S (M, C) and T (M, C) as float64 numpy copies of the fp32 values, and the stats."""
    g = torch.Generator().manual_seed(seed)
    m = n * hw * hw
    u, _ = torch.linalg.qr(torch.randn(m, c, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    sv = scale * m ** 0.5 * torch.logspace(-np.log10(spread), 0, c, dtype=torch.float64)
    z = (u * sv) @ v.T
    s = (z - z.mean(0) + mean).float()
    t = (s.double() @ (torch.randn(c, c, generator=g, dtype=torch.float64) / c ** 0.5).T).float()
    to4 = lambda x: x.reshape(n, hw * hw, c).permute(0, 2, 1).reshape(n, c, hw, hw).contiguous()  # noqa: E731
    return s.double().numpy(), t.double().numpy(), fskd.GramStats(c).update(to4(s), to4(t))


def fit_error(S, T, q):
    return float(np.linalg.norm(S @ as_np(q).T - T))


def test_default_equals_lstsq_on_ill_conditioned_features():
    S, T, st = ill_conditioned()
    assert 3e3 < np.linalg.cond(S - S.mean(0)) < 5e3
    centred = np.linalg.norm(T - T.mean(0))
    best = fit_error(S, T, np.linalg.lstsq(S, T, rcond=None)[0].T)
    q = fskd.solve(st)  # the default: no ridge on a well-posed block
    assert fit_error(S, T, q) - best <= 1e-3 * centred
    # an explicit alpha still shrinks toward Q0 = I, relative to the centred covariance
    shrunk = fskd.solve(st, alpha=1e-2)
    assert fit_error(S, T, shrunk) - best > 1e-2 * centred
    cov = as_np(st.G) - np.outer(as_np(st.sum_s), as_np(st.sum_s)) / st.count
    assert rel_err(shrunk, ridge_q(as_np(st.G), as_np(st.Hc), 1e-2, np.eye(64), trace=np.trace(cov))) < 1e-6


def test_explicit_alpha_is_relative_to_the_centred_covariance():
    s, t, st = problem(7, 7, 200, seed=21, mean=40.0)
    S = s.flatten(1).numpy()
    cov_trace = np.trace(np.cov(S.T, bias=True)) * len(S)
    q = fskd.solve(st, alpha=1e-2)
    assert rel_err(q, ridge_q(st.G.numpy(), st.Hc.numpy(), 1e-2, np.eye(7), trace=cov_trace)) < 1e-9


def test_underdetermined_default_warns_and_interpolates():
    s, t, st = problem(24, 24, 10, seed=22, mean=30.0)  # M = 10 < C = 24
    with pytest.warns(RuntimeWarning, match=r"10 pixels for 24 channels: underdetermined"):
        q = fskd.solve(st)
    S, T = s.flatten(1).numpy(), t.flatten(1).numpy()
    assert np.isfinite(as_np(q)).all()
    # a tiny ridge toward Q0 = I: fits the 10 pixels (almost) exactly, the rest stays at the prior
    assert fit_error(S, T, q) <= 1e-3 * np.linalg.norm(T - T.mean(0))
    cov_trace = np.trace(np.cov(S.T, bias=True)) * len(S)
    lam_alpha = solve_mod.UNDERDETERMINED_RIDGE
    assert rel_err(q, ridge_q(st.G.numpy(), st.Hc.numpy(), lam_alpha, np.eye(24), trace=cov_trace)) < 1e-5


def test_singular_g_warns_and_regularises_with_the_centred_scale():
    g = torch.Generator().manual_seed(23)
    s = torch.randn(64, 6, 2, 2, generator=g, dtype=torch.float64) + 20.0
    s[:, 0] = 1.0  # two constant channels, 2x apart: G is exactly singular (pivot 0)
    s[:, 1] = 2.0
    t = torch.randn(64, 6, 2, 2, generator=g, dtype=torch.float64) + 5.0
    st = fskd.GramStats(6).update(s, t)
    _, info = torch.linalg.cholesky_ex(st.G)
    assert int(info) > 0
    with pytest.warns(RuntimeWarning, match=r"block 0: G is singular"):
        q = fskd.solve(st)
    S = s.transpose(0, 1).reshape(6, -1).numpy().T
    T = t.transpose(0, 1).reshape(6, -1).numpy().T
    assert np.isfinite(as_np(q)).all()
    best = fit_error(S, T, np.linalg.lstsq(S, T, rcond=None)[0].T)
    assert fit_error(S, T, q) - best <= 1e-6 * np.linalg.norm(T - T.mean(0))
    assert np.abs(as_np(q)).max() < 1e3  # the jitter is relative to the centred scale: no blow-up


def test_alpha_none_and_bad_alpha():
    _, _, st = problem(5, 5, 100, seed=24)
    assert rel_err(fskd.solve(st, alpha=None), fskd.solve(st, alpha=0.0)) < 1e-12
    with pytest.raises(ValueError, match="alpha"):
        fskd.solve(st, alpha=-1.0)
    with pytest.raises(TypeError, match="alpha"):
        fskd.solve(st, alpha="small")
