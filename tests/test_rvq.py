import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rvq import ResidualVQ, codebook_usage, nearest_code  # noqa: E402


def clustered(n, centers, noise, gen):
    idx = torch.randint(0, centers.shape[0], (n,), generator=gen)
    return centers[idx] + noise * torch.randn(n, centers.shape[1], generator=gen)


def test_decode_equals_forward_value_and_embed_shapes():
    torch.manual_seed(0)
    for shared in (True, False):
        rvq = ResidualVQ(dim=8, codebook_size=64, depth=4, shared_codebook=shared)
        rvq.train()
        for _ in range(3):
            rvq(torch.randn(4, 10, 8))
        rvq.eval()
        z = torch.randn(4, 10, 8)
        z_q, codes, _ = rvq(z)
        assert codes.shape == (4, 10, 4) and codes.dtype == torch.long
        assert rvq.embed(codes).shape == (4, 10, 4, 8)
        torch.testing.assert_close(rvq.decode(codes), z_q, atol=1e-6, rtol=0)


def test_per_depth_error_non_increasing_after_training():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, codebook_size=256, depth=6).train()
    for _ in range(30):
        rvq(torch.randn(512, 16, generator=gen))
    rvq.eval()
    z = torch.randn(2048, 16, generator=gen)
    _, codes, _ = rvq(z)
    partial = rvq.embed(codes).cumsum(-2)  # (N, D, C): ẑ_≤d
    err = (z[:, None] - partial).pow(2).sum(-1).mean(0)  # (D,)
    assert torch.all(err[1:] <= err[:-1]), err
    # Depth must pay off on this data, not merely not hurt: the last depth halves the first's error.
    assert err[-1] < 0.5 * err[0], err


def test_ema_recovers_clusters():
    # 12 well-separated clusters, codebook of 16 entries, one depth: after EMA training every
    # cluster center has an entry within 0.05, and the mean squared quantization error is at the
    # noise floor (dim × σ² = 8e-4) up to a factor 2.
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    centers = 3 * torch.randn(12, 8, generator=gen)
    rvq = ResidualVQ(dim=8, codebook_size=16, depth=1, decay=0.9).train()
    for _ in range(100):
        rvq(clustered(1024, centers, 0.01, gen))
    book = rvq.codebook[0]
    dist_to_center = torch.cdist(centers, book).min(1).values
    assert dist_to_center.max() < 0.05, dist_to_center
    rvq.eval()
    x = clustered(4096, centers, 0.01, gen)
    z_q, _, _ = rvq(x)
    assert (x - z_q).pow(2).sum(-1).mean() < 2 * 8 * 0.01**2


def test_dead_codebook_is_revived_by_restarts():
    # Every entry far from the data: without restarts all vectors fall on one entry forever; with
    # restarts the codebook comes back to life (above 60 % of entries used on fresh data).
    gen = torch.Generator().manual_seed(2)
    used = {}
    for restart in (True, False):
        torch.manual_seed(2)
        rvq = ResidualVQ(dim=8, codebook_size=128, depth=2, restart_unused=restart).train()
        rvq.codebook.fill_(100.0)
        rvq.codebook[0, 0] = 50.0
        rvq.codebook_sum.copy_(rvq.codebook)
        for _ in range(20):
            rvq(torch.randn(1024, 8, generator=gen))
        rvq.eval()
        _, codes, _ = rvq(torch.randn(4096, 8, generator=gen))
        used[restart] = codebook_usage(codes[:, 0], 128)["used"]
    assert used[True] > 0.6, used
    assert used[False] <= 2 / 128, used


def test_restart_tiles_small_batches_with_noise():
    # 10 vectors, 64 entries: at most 10 entries are used, the rest die at once and come back as
    # noisy copies of batch vectors (noise std 0.01/√C), all distinct.
    torch.manual_seed(3)
    rvq = ResidualVQ(dim=4, codebook_size=64, depth=1).train()
    x = torch.randn(10, 4)
    rvq(x)
    assert rvq.restarted >= 54
    book = rvq.codebook[0]
    assert torch.unique(book, dim=0).shape[0] == 64
    near = torch.cdist(book, x).min(1).values < 0.05  # within noise of a batch vector
    assert int(near.sum()) >= rvq.restarted


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, codebook_size=32, depth=3).train()
    z = torch.randn(5, 7, 8, requires_grad=True)
    w = torch.randn(5, 7, 8)
    z_q, _, _ = rvq(z)
    (z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w, atol=0, rtol=0)


def test_chunked_search_equals_brute_force():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 32, generator=gen)
    book = torch.randn(300, 32, generator=gen)
    brute = torch.cdist(x.double(), book.double()).argmin(1)
    for chunk in (300, 300 * 7, 2**24):  # 1 row per chunk, 7 rows, everything at once
        assert torch.equal(nearest_code(x, book, chunk_elems=chunk), brute)


def test_search_is_fp32_under_autocast():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    rvq = ResidualVQ(dim=32, codebook_size=512, depth=4).eval()
    z = torch.randn(256, 32, generator=gen)
    _, ref, _ = rvq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes, _ = rvq(z)
    assert torch.equal(codes, ref)


def test_commitment_loss_equals_hand_computation():
    # Hand-built codebook, one vector z = (1, 2); entries (0.9, 1.8), (0.1, 0.12), (0, 0).
    # Depth 1 picks (0.9, 1.8), leaving (0.1, 0.2); depth 2 picks (0.1, 0.12) (dist² 0.0064 vs
    # 0.05 to zero), leaving (0, 0.08); depth 3 picks zero (0.0064 vs 0.0116).
    rvq = ResidualVQ(dim=2, codebook_size=3, depth=3).eval()
    rvq.codebook[0] = torch.tensor([[0.9, 1.8], [0.1, 0.12], [0.0, 0.0]])
    z = torch.tensor([[1.0, 2.0]])
    z_q, codes, commit = rvq(z)
    assert codes.tolist() == [[0, 1, 2]]
    e1 = (0.1**2 + 0.2**2) / 2      # ‖z − ẑ_≤1‖² / C
    e2 = (0.0**2 + 0.08**2) / 2     # ‖z − ẑ_≤2‖² / C
    e3 = e2                         # the zero entry changes nothing
    assert abs(commit.item() - (e1 + e2 + e3) / 3) < 1e-6
    torch.testing.assert_close(z_q, torch.tensor([[1.0, 1.92]]))


def test_no_update_in_eval_and_update_in_train():
    torch.manual_seed(6)
    rvq = ResidualVQ(dim=8, codebook_size=32, depth=2)
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq.eval()
    rvq(torch.randn(64, 8))
    assert all(torch.equal(before[k], v) for k, v in rvq.state_dict().items())
    rvq.train()
    rvq(torch.randn(64, 8))
    assert not torch.equal(before["codebook"], rvq.codebook)


def test_per_depth_codebooks_update_from_their_own_depth():
    # With separate codebooks, book d only moves toward depth-d residuals: feeding data that book 0
    # quantizes exactly leaves nothing for book 1, whose entries then only decay toward the
    # (zero) residuals they are assigned.
    torch.manual_seed(7)
    rvq = ResidualVQ(dim=2, codebook_size=2, depth=2, shared_codebook=False, restart_unused=False)
    rvq.codebook[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rvq.codebook[1] = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    rvq.codebook_sum.copy_(rvq.codebook)
    rvq.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(8, 1)
    rvq(x)
    torch.testing.assert_close(rvq.codebook[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert rvq.codebook[1].abs().max() < 0.5


# -----------------------------------------------------------------------------
# DDP: 2 gloo processes, different data per rank.

def _ddp_worker(rank, world, init_file, out_dir, restart, steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial codebook on every rank, as DDP's broadcast would give
    rvq = ResidualVQ(dim=8, codebook_size=64, depth=3, restart_unused=restart).train()
    gen = torch.Generator().manual_seed(100)
    for step in range(steps):
        batches = [torch.randn(48 + 16 * r, 8, generator=gen) * (1 + r) for r in range(world)]
        torch.manual_seed(1000 * rank + step)  # the restart sampling differs per rank on purpose
        rvq(batches[rank])
    torch.save({k: v.clone() for k, v in rvq.state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_ddp(tmp_path, restart, steps):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), restart, steps),
                       nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_codebooks_bit_identical_with_restarts(tmp_path):
    s0, s1 = _run_ddp(tmp_path, restart=True, steps=6)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # Restarts did happen (64 entries, ≤ 3·112 vectors spread over them: some die each step).
    assert not torch.equal(s0["cluster_size"], torch.ones_like(s0["cluster_size"]))


def test_ddp_equals_one_process_on_concatenated_batch(tmp_path):
    steps = 4
    s0, s1 = _run_ddp(tmp_path, restart=False, steps=steps)
    torch.manual_seed(0)
    ref = ResidualVQ(dim=8, codebook_size=64, depth=3, restart_unused=False).train()
    gen = torch.Generator().manual_seed(100)
    for _ in range(steps):
        batches = [torch.randn(48 + 16 * r, 8, generator=gen) * (1 + r) for r in range(2)]
        ref(torch.cat(batches))
    for k, v in ref.state_dict().items():
        assert torch.equal(s0[k], s1[k]), k
        torch.testing.assert_close(s0[k], v, atol=1e-5, rtol=1e-5)


def test_bench_command_runs_small():
    out = subprocess.run([sys.executable, "rvq.py", "bench", "--batch", "2", "--tokens", "16",
                          "--steps", "1"], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "ms/step" in out.stdout and "peak RSS" in out.stdout


def test_fused_search_picks_the_codes_of_the_plain_formula():
    # nearest_code's one addmm (‖e‖² − 2 x·eᵀ) against the three-pass formula in fp64. Rows whose two
    # nearest codes are within 1e-4 (fp32 rounding can order them either way) are left out; the
    # rest must agree exactly, including vectors that sit next to a code.
    gen = torch.Generator().manual_seed(6)
    book = torch.randn(512, 32, generator=gen)
    x = torch.cat([torch.randn(3000, 32, generator=gen), book[:100] + 1e-3 * torch.randn(100, 32, generator=gen)])
    d = (book.double() ** 2).sum(1)[None] - 2.0 * (x.double() @ book.double().t())  # (N, K)
    two = d.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4  # no near tie between distinct codes
    got = nearest_code(x, book)
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear], d.argmin(1)[clear])
