"""
Residual vector quantization (RVQ) with an EMA codebook and dead-code restart.

DualToken (arXiv 2503.14324, §3.2) quantizes both the pixel and the semantic features of SigLIP with
residual quantization as in RQ-VAE (Lee et al. 2022): a vector z is approximated by a sum of D code
vectors, each chosen to best explain what the previous ones left over,

    r_0 = z,   k_d = argmin_k ‖r_{d-1} − e(k)‖,   r_d = r_{d-1} − e(k_d),   ẑ_≤d = Σ_{d'≤d} e(k_d').

The official configs use one codebook shared by all D depths (16384 × 32), updated by an exponential
moving average of the vectors assigned to each entry instead of by gradients, with entries that
fall out of use restarted from the current batch. Gradients reach the encoder through the
straight-through estimator, and a commitment loss pulls the encoder toward the codes.

This file imports only the standard library and torch so it can be copied alone into other
projects. It works unchanged inside and outside torch.distributed (DDP): codebook statistics are
summed over ranks and restart vectors come from rank 0, so every rank keeps the same codebook.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def nearest_code(x, codebook, chunk_elems=2**24):
    """Index of the nearest codebook row for each row of x, by squared L2 distance.

    x: (N, C), codebook: (K, C) -> (N,) long. Always in fp32 (autocast off): bf16 distances
    between nearby codes tie and flip, which shows up as noisy codebook usage. The N×K distance
    matrix is built in row chunks of at most `chunk_elems` entries (64 MB in fp32), so paper scale
    (32 images × 729 tokens × 8 depths against 16384 codes) never holds the full matrix.
    """
    # (autocast knows only real device types; on meta/fake tensors there is no autocast to leave)
    device_type = x.device.type if x.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        x = x.float()
        codebook = codebook.float()
        e_sq = (codebook * codebook).sum(1)  # (K,)
        rows = max(1, chunk_elems // codebook.shape[0])
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for i in range(0, x.shape[0], rows):
            # ‖x − e‖² = ‖x‖² − 2 x·e + ‖e‖²; ‖x‖² is the same for every code, so it is left out.
            # One addmm writes ‖e‖² − 2 x·eᵀ in a single pass over the (n, K) matrix (the GEMM's
            # epilogue adds the bias), instead of a product, a scaling and a subtraction.
            d = torch.addmm(e_sq[None, :], x[i:i + rows], codebook.t(), alpha=-2.0)  # (n, K)
            out[i:i + rows] = d.argmin(1)
        return out


def codebook_usage(codes, codebook_size):
    """Fraction of entries used and perplexity (exp of the code entropy) over all codes given.

    Perplexity equals codebook_size when every entry is used equally and 1 when one entry is used.
    """
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return {"used": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}


class ResidualVQ(nn.Module):

    def __init__(self, dim, codebook_size, depth, decay=0.99, shared_codebook=True,
                 restart_unused=True, eps=1e-5, chunk_elems=2**24):
        super().__init__()
        if min(dim, codebook_size, depth) < 1:
            raise ValueError(f"ResidualVQ needs dim, codebook_size and depth ≥ 1, got {dim}, {codebook_size}, {depth}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.decay, self.eps, self.chunk_elems = decay, eps, chunk_elems
        self.shared_codebook, self.restart_unused = shared_codebook, restart_unused
        n_books = 1 if shared_codebook else depth
        # The codebooks are buffers, not parameters: they move by EMA (below), not by the optimizer.
        # codebook = codebook_sum / cluster_size (Laplace-smoothed) holds at all times. Starting the
        # cluster sizes at 1 makes the random initial codebook a consistent EMA state; entries the
        # first batch does not use fall below 1 at once and are restarted from data, which acts as
        # a data-dependent initialization.
        embed = torch.randn(n_books, codebook_size, dim)
        self.register_buffer("codebook", embed)                                   # (books, K, C)
        self.register_buffer("codebook_sum", embed.clone())                       # (books, K, C)
        self.register_buffer("cluster_size", torch.ones(n_books, codebook_size))  # (books, K)
        self.restarted = 0  # entries restarted by the last update, for logging

    def book(self, d):
        return 0 if self.shared_codebook else d

    def forward(self, z):
        """z: (..., C) -> (z_q (..., C) straight-through, codes (..., D) long, commit_loss scalar).

        In training mode the codebook is updated once, after quantization, from all depths'
        residuals; the returned z_q and codes refer to the codebook as it was during the search.
        """
        shape = z.shape
        x = z.reshape(-1, self.dim).float()  # (N, C); quantization runs in fp32
        residual = x
        z_hat = torch.zeros_like(x)
        codes, residuals, commit = [], [], 0.0
        # §3.2 / RQ-VAE: at each depth quantize what the previous depths left over.
        for d in range(self.depth):
            book = self.codebook[self.book(d)]
            k = nearest_code(residual, book, self.chunk_elems)  # (N,)
            e = book[k]                                          # (N, C)
            residuals.append(residual)
            codes.append(k)
            residual = residual - e
            z_hat = z_hat + e
            # Commitment to the cumulative reconstruction ẑ_≤d, so every prefix of the code stack is
            # a usable approximation (the RQ-VAE loss): mean over depths of ‖z − sg(ẑ_≤d)‖².
            commit = commit + (x - z_hat.detach()).pow(2).mean()
        commit = commit / self.depth
        codes = torch.stack(codes, dim=-1)  # (N, D)
        if self.training:
            self._ema_update(torch.stack(residuals, 1), codes)
        # Straight-through: the forward value is ẑ, the gradient w.r.t. z is the identity.
        z_q = z + (z_hat.to(z.dtype).reshape(shape) - z).detach()
        return z_q, codes.reshape(*shape[:-1], self.depth), commit

    @torch.no_grad()
    def _ema_update(self, residuals, codes):
        # residuals: (N, D, C) — the vector each depth quantized; codes: (N, D).
        K = self.codebook_size
        self.restarted = 0
        for b in range(self.codebook.shape[0]):
            depths = list(range(self.depth)) if self.shared_codebook else [b]
            vec = residuals[:, depths].reshape(-1, self.dim)  # (M, C)
            idx = codes[:, depths].reshape(-1)                # (M,)
            counts = torch.bincount(idx, minlength=K).float()                         # (K,)
            sums = torch.zeros(K, self.dim, device=vec.device).index_add_(0, idx, vec)  # (K, C)
            if _distributed():
                # Every rank must see the statistics of the global batch, or the codebooks drift
                # apart rank by rank while the gradients (all-reduced by DDP) stay in sync.
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            self.cluster_size[b].mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.codebook_sum[b].mul_(self.decay).add_(sums, alpha=1 - self.decay)
            if self.restart_unused:
                self._restart_dead(b, vec)
            # Laplace smoothing keeps a (rarely) empty entry from dividing by zero.
            n = self.cluster_size[b].sum()
            size = (self.cluster_size[b] + self.eps) / (n + K * self.eps) * n
            self.codebook[b].copy_(self.codebook_sum[b] / size[:, None])

    @torch.no_grad()
    def _restart_dead(self, b, vec):
        # An entry whose EMA cluster size fell below 1 gets a random vector of the current batch,
        # with cluster size 1 so it stands on its own until the EMA decides again (RQ-VAE).
        K = self.codebook_size
        if vec.shape[0] < K:
            # Fewer vectors than entries: tile them with tiny noise so restarted entries differ.
            reps = math.ceil(K / vec.shape[0])
            vec = vec.repeat(reps, 1)
            vec = vec + torch.randn_like(vec) * (0.01 / math.sqrt(self.dim))
        fresh = vec[torch.randperm(vec.shape[0], device=vec.device)[:K]].contiguous()  # (K, C)
        if _distributed():
            dist.broadcast(fresh, src=0)  # one set of restart vectors for all ranks
        dead = self.cluster_size[b] < 1.0  # (K,), identical on all ranks after the all-reduce
        self.restarted += int(dead.sum())
        self.codebook_sum[b][dead] = fresh[dead]
        self.cluster_size[b][dead] = 1.0

    def embed(self, codes):
        # codes: (..., D) -> per-depth vectors (..., D, C)
        if self.shared_codebook:
            return self.codebook[0][codes]
        return torch.stack([self.codebook[d][codes[..., d]] for d in range(self.depth)], dim=-2)

    def decode(self, codes):
        # codes: (..., D) -> Σ_d e(k_d), (..., C): the quantized vector ẑ
        return self.embed(codes).sum(-2)

    def usage(self, codes):
        """Logging figures for the given codes: fraction of entries `used`, `perplexity`, and the
        number of entries `restarted` by the last training update."""
        return {**codebook_usage(codes, self.codebook_size), "restarted": self.restarted}


# -----------------------------------------------------------------------------
# python rvq.py bench [--device cpu|cuda]: forward + EMA update time and peak memory at paper scale
# (32 images × 27×27 tokens, 8 depths, shared 16384 × 32 codebook).

if __name__ == "__main__":
    import argparse
    import resource
    import time

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("cmd", choices=["bench"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=27 * 27)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=32, codebook_size=16384, depth=8).to(dev).train()
    z = torch.randn(args.batch, args.tokens, 32, device=dev, requires_grad=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        z_q, codes, commit = rvq(z)
        (z_q.sum() + commit).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n = args.batch * args.tokens
    print(f"RVQ bench: {n} vectors x 8 depths vs 16384 x 32 shared codebook on {dev}, "
          f"{torch.get_num_threads()} threads")
    print(f"forward+update+backward: {1000 * sum(times[1:]) / args.steps:.1f} ms/step "
          f"({n * args.steps / sum(times[1:]):.0f} vectors/s)")
    if dev.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    else:
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {rss1:.0f} MiB (+{rss1 - rss0:.0f} MiB over the inputs and codebook); "
              f"distance chunk: {2**24 * 4 / 2**20:.0f} MiB")
    print(f"usage after {args.steps + 1} steps: {rvq.usage(codes)}")
