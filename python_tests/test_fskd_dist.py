"""GramStats.all_reduce across 2 gloo processes on CPU equals single-process statistics."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdkernels import fskd

from _util import free_port

WORLD = 2


def rank_data(rank):
    """Rank-local features with rank-dependent means (so the ranks' shifts differ)."""
    g = torch.Generator().manual_seed(100 + rank)
    s = torch.randn(3 + rank, 5, 6, 4, generator=g) + 10.0 * (rank + 1)
    t = torch.randn(3 + rank, 3, 6, 4, generator=g) - 2.0 * rank
    return s, t


def tiny_pair():
    """(student, teacher): conv+BN nets differing in their conv weights."""
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).eval()
    student = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).eval()
    return student, teacher


def rank_images(rank):
    g = torch.Generator().manual_seed(200 + rank)
    return [torch.randn(2 + rank, 3, 5, 5, generator=g) for _ in range(2)]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        s, t = rank_data(rank)
        st = fskd.GramStats(5, 3)
        st.update(s[:2], t[:2]).update(s[2:], t[2:])
        st.all_reduce()
        late = fskd.GramStats(5, 3)  # only rank 0 has data for this one
        if rank == 0:
            late.update(s, t)
        late.all_reduce()
        q = fskd.solve(st, alpha=1e-4, prior="zero")
        student, teacher = tiny_pair()
        merged = fskd.distill(student, teacher, [("0", "1", "1")], rank_images(rank), all_reduce=True,
                              progress=False)
        joint = fskd.distill(student, teacher, [("0", "1", "1")], rank_images(rank), all_reduce=True,
                             schedule="joint", joint_steps=5, progress=False)
        torch.save({"G": st.G, "Hc": st.Hc, "sum_s": st.sum_s, "sum_t": st.sum_t, "count": st.count,
                    "late_G": late.G, "late_count": late.count, "q": q,
                    "merged_w": merged[0].weight.detach(), "merged_b": merged[1].bias.detach(),
                    "joint_w": joint[0].weight.detach()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_ranks_equals_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # what each rank holds before the reduction, recomputed here with the same updates
    per_rank = []
    for rank in range(WORLD):
        s, t = rank_data(rank)
        per_rank.append(fskd.GramStats(5, 3).update(s[:2], t[:2]).update(s[2:], t[2:]))
    single = fskd.GramStats(5, 3)  # one process seeing all the data
    for rank in range(WORLD):
        single.update(*rank_data(rank))
    only0 = fskd.GramStats(5, 3).update(*rank_data(0))
    exact = fskd.GramStats(5, 3)  # fp64 features: fp64 products
    for rank in range(WORLD):
        exact.update(*(x.double() for x in rank_data(rank)))
    q64 = fskd.solve(exact, alpha=1e-4, prior="zero")
    student, teacher = tiny_pair()
    one = fskd.distill(student, teacher, [("0", "1", "1")], rank_images(0) + rank_images(1), progress=False)
    joint_one = fskd.distill(student, teacher, [("0", "1", "1")], rank_images(0) + rank_images(1),
                             schedule="joint", joint_steps=5, progress=False)
    joint_ranks = [torch.load(tmp_path / f"rank{rank}.pt")["joint_w"] for rank in range(WORLD)]
    assert torch.equal(joint_ranks[0], joint_ranks[1])  # the ranks took the same steps
    want = joint_one[0].weight.detach()
    assert float((joint_ranks[0] - want).norm() / want.norm()) < 1e-4
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["count"] == single.count == (3 + 4) * 24
        for key in ("G", "Hc", "sum_s", "sum_t"):
            summed = getattr(per_rank[0], key) + getattr(per_rank[1], key)
            assert torch.equal(got[key], summed), key  # a sum of two fp64 numbers is exact
            want = getattr(single, key)  # differs only by fp32 rounding of other shifts
            assert float((got[key] - want).norm() / want.norm()) < 1e-6, key
        assert got["late_count"] == only0.count and torch.equal(got["late_G"], only0.G)
        assert float((got["q"] - q64).norm() / q64.norm()) < 1e-6
        # distill(all_reduce=True) on each rank's images == distill on all images in one process
        for key, want in (("merged_w", one[0].weight.detach()), ("merged_b", one[1].bias.detach())):
            assert float((got[key] - want).norm() / want.norm()) < 1e-5, key
