"""kdkernels.fskd.GramStats: streaming fp64 sums from shifted fp32 tile products."""
import pytest
import torch

from kdkernels import fskd
from kdkernels.fskd import stats as stats_mod


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "result has NaN/inf"
    return float((a - b).norm() / b.norm())


def exact(s, t):
    """fp64 G, Hc, sum_s, sum_t of (N, C, ...) features, the plain way."""
    n, cs, ct = s.shape[0], s.shape[1], t.shape[1]
    s2 = s.double().reshape(n, cs, -1).transpose(0, 1).reshape(cs, -1)
    t2 = t.double().reshape(n, ct, -1).transpose(0, 1).reshape(ct, -1)
    return s2 @ s2.T, t2 @ s2.T, s2.sum(1), t2.sum(1)


def centred(g, a, b, m):
    """sum (x - mean)(y - mean)^T from uncentred sums: what the solve actually sees."""
    return g - torch.outer(a, b) / m


@pytest.mark.parametrize("shape_s, ct", [
    ((1, 3, 1, 1), 3),       # batch 1, one pixel
    ((2, 5, 7, 7), 4),       # Cs != Ct
    ((3, 7, 13, 5), 7),      # non-square, prime sizes
    ((2, 3, 50, 50), 2),     # 5000 pixels: two tiles
    ((11, 6), 6),            # (N, C) features
])
def test_matches_fp64_sums(shape_s, ct, device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(shape_s, generator=g, dtype=torch.float64) + 3.0).to(device)
    t = (torch.randn((shape_s[0], ct) + tuple(shape_s[2:]), generator=g, dtype=torch.float64) - 2.0).to(device)
    st = fskd.GramStats(shape_s[1], ct)
    st.update(s[:1], t[:1])
    if shape_s[0] > 1:  # streaming over two batches (an empty batch raises: test_bad_inputs.py)
        st.update(s[1:], t[1:])
    G, H, a, b = exact(s, t)
    m = s.numel() // shape_s[1]
    assert st.count == m
    assert st.G.dtype == torch.float64 and st.G.shape == (shape_s[1], shape_s[1])
    assert st.Hc.shape == (ct, shape_s[1])
    for got, want in ((st.G, G), (st.Hc, H), (st.sum_s, a), (st.sum_t, b)):
        assert rel_err(got, want) < 1e-12


def test_fp32_large_means_keep_the_spread(device):
    # pre-ReLU-like: mean 1000, spread 1. The centred Gram is what the solve needs.
    g = torch.Generator().manual_seed(1)
    cs, m = 16, 3000
    mu = 1000 * (1 + torch.rand(cs, 1, 1, generator=g))
    s = (mu + torch.randn(m // 30, cs, 5, 6, generator=g)).float().to(device)
    t = (0.5 * s.cpu() + torch.randn(s.shape, generator=g)).float().to(device)
    st = fskd.GramStats(cs)
    for chunk in range(0, s.shape[0], 25):
        st.update(s[chunk:chunk + 25], t[chunk:chunk + 25])
    G, H, a, b = exact(s, t)
    want_g, want_h = centred(G, a, a, m), centred(H, b, a, m)
    assert rel_err(centred(st.G, st.sum_s, st.sum_s, st.count), want_g) < 1e-5
    assert rel_err(centred(st.Hc, st.sum_t, st.sum_s, st.count), want_h) < 1e-5
    # the plain fp32 Gram loses the spread entirely
    s2 = s.cpu().transpose(0, 1).reshape(cs, -1)
    naive = (s2 @ s2.T).double()
    assert rel_err(centred(naive, a, a, m), want_g) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype, device):
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(4, 6, 5, 5, generator=g) + 4).to(device, dtype)
    t = torch.randn(4, 3, 5, 5, generator=g).to(device, dtype)
    st = fskd.GramStats(6, 3).update(s, t)
    G, H, a, b = exact(s, t)  # of the very same rounded values
    assert rel_err(st.G, G) < 1e-6
    assert rel_err(st.Hc, H) < 1e-5
    assert rel_err(st.sum_t, b) < 1e-5


def test_mixed_dtypes_and_channels_last():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, 6, 6, generator=g).to(memory_format=torch.channels_last)
    t = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    st = fskd.GramStats(4).update(s, t)
    G, H, _, _ = exact(s, t)
    assert rel_err(st.G, G) < 1e-12 and rel_err(st.Hc, H) < 1e-12  # fp64 path


def test_device_argument():
    st = fskd.GramStats(3, device="cpu")
    assert st.device == torch.device("cpu") and st.count == 0
    assert float(st.G.abs().sum()) == 0.0  # an empty batch raises: see test_bad_inputs.py
    assert "count=0" in repr(st)


def test_update_runs_with_ieee_fp32_matmul_and_restores_flags(monkeypatch, device):
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    if not hasattr(backend, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision flag")
    seen = []
    real_bmm = torch.bmm

    def spy(*args, **kwargs):
        seen.append(backend.fp32_precision)
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    saved = backend.fp32_precision
    backend.fp32_precision = "tf32" if device.type == "cuda" else "bf16"
    try:
        fskd.GramStats(2).update(torch.randn(2, 2, 3, 3, device=device), torch.randn(2, 2, 3, 3, device=device))
        assert seen == ["ieee"]
        assert backend.fp32_precision == ("tf32" if device.type == "cuda" else "bf16")
    finally:
        backend.fp32_precision = saved


def test_update_never_syncs_on_cuda(device):
    if device.type != "cuda":
        pytest.skip("host syncs are only observable on CUDA (KDKERNELS_TEST_DEVICE=cuda)")
    s, t = torch.randn(4, 8, 9, 9, device=device), torch.randn(4, 8, 9, 9, device=device)
    st = fskd.GramStats(8)
    torch.cuda.set_sync_debug_mode("error")
    try:
        st.update(s, t).update(s, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert st.count == 2 * 4 * 81


def test_one_gemm_per_update(monkeypatch):
    calls = []
    real_bmm, real_mm = torch.bmm, torch.matmul
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm") or real_bmm(*a, **k))
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: calls.append("matmul") or real_mm(*a, **k))
    fskd.GramStats(5, 3).update(torch.randn(2, 5, 70, 70), torch.randn(2, 3, 70, 70))  # 3 tiles
    assert calls == ["bmm"]


def test_all_reduce_needs_a_process_group():
    # argument checks of GramStats live in test_bad_inputs.py
    with pytest.raises(RuntimeError, match=r"process group"):
        fskd.GramStats(3).all_reduce()


def test_tile_size_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64) * 2 + 5
    t = torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64)
    one = fskd.GramStats(4, 2).update(s, t)
    monkeypatch.setattr(stats_mod, "TILE_PIXELS", 7)  # 35 tiles, the last one padded
    many = fskd.GramStats(4, 2).update(s, t)
    assert rel_err(many.G, one.G) < 1e-13 and rel_err(many.Hc, one.Hc) < 1e-13
    assert rel_err(many.sum_s, one.sum_s) < 1e-13 and many.count == one.count == 243


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sample_chunks_do_not_change_the_result(monkeypatch, dtype):
    """A batch too large for the cache is processed in chunks of whole samples (3, 3 and 1
    samples here, the larger ones in 2 padded tiles): the same sums as in one piece."""
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(7, 4, 9, 9, generator=g, dtype=torch.float64) * 2 + 5).to(dtype)
    t = torch.randn(7, 2, 9, 9, generator=g, dtype=torch.float64).to(dtype)
    one = fskd.GramStats(4, 2).update(s, t)
    per_sample = (4 + 1 + 2) * 81 * s.element_size()
    monkeypatch.setattr(stats_mod, "CHUNK_MIN_BYTES", per_sample)  # any batch of 2+ samples is chunked
    monkeypatch.setattr(stats_mod, "CHUNK_BYTES", 3 * per_sample)
    monkeypatch.setattr(stats_mod, "TILE_PIXELS", 150)
    chunked = fskd.GramStats(4, 2).update(s, t).update(s[:1], t[:1])
    one.update(s[:1], t[:1])
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for name in ("G", "Hc", "sum_s", "sum_t"):
        assert rel_err(getattr(chunked, name), getattr(one, name)) < tol, name
    assert chunked.count == one.count == 8 * 81


def test_fp64_products_on_request_match_lstsq_on_ill_conditioned_features():
    """The fp32 shifted products cost ~1e-4 of ||T - mean(T)|| on cond(S - mean) = 4e3 features
    with means 50 (within the contract's 1e-3); compute_dtype=float64 removes that cost."""
    import sys, os
    import numpy as np
    sys.path.insert(0, os.path.dirname(__file__))
    from test_fskd_solve import fit_error, ill_conditioned

    S, T, st32 = ill_conditioned()
    n = 64
    to4 = lambda x: torch.from_numpy(x).float().reshape(n, 64, 64).permute(0, 2, 1).reshape(n, 64, 8, 8)  # noqa: E731
    st64 = fskd.GramStats(64, compute_dtype=torch.float64).update(to4(S), to4(T))  # fp32 inputs
    assert st64.compute_dtype == torch.float64 and st32.compute_dtype is None
    centred_norm = np.linalg.norm(T - T.mean(0))
    best = fit_error(S, T, np.linalg.lstsq(S, T, rcond=None)[0].T)
    fp32 = fit_error(S, T, fskd.solve(st32)) - best
    fp64 = fit_error(S, T, fskd.solve(st64)) - best
    assert 1e-6 * centred_norm < fp32 <= 1e-3 * centred_norm
    assert fp64 <= 1e-7 * centred_norm
    with pytest.raises(ValueError, match="compute_dtype"):
        fskd.GramStats(3, compute_dtype=torch.float16)
