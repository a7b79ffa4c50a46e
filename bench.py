"""
Speed and memory figures of the DualToken reference, each against a reference measured in the same run.

    python bench.py                                   # (i)-(iv) at CPU-sized shapes, ours only, one line each
    python bench.py --compare                         # each against its reference, same weights, same run
    python bench.py --only position,decode --compare  # some of them
    python bench.py --memory stage1:so400m --batch_size 32 --grad_checkpointing
    python bench.py --memory stage2:dualtoken-3b --batch_size 8 --seq_len 821 --grad_checkpointing --world 8 --fsdp

(i) position: one text→image position (the LLM step + both depth heads drawing their D codes, CFG
    rows) against one text token (LLM step + vocabulary head) at the same shapes and rows; also the
    depth sampler of before (all slots and classifiers rerun per depth) and the parameter-read floor.
(ii) decode: greedy Qwen2.generate; --compare: against transformers' generate on the same weights.
(iii) siglip: the SigLIP vision forward; --compare: against transformers' SiglipVisionModel, same weights.
(iv) rvq: ResidualVQ forward + EMA update; --compare: against vector-quantize-pytorch's ResidualVQ.
--memory: peak memory of one training step per rank, traced with fake tensors (no memory, no GPU):
    every tensor storage the step creates is counted while alive; bf16 autocast runs on the CPU's autocast
    (the CUDA one casts the same ops); DDP adds its gradient buckets; FSDP is the traced step with the
    parameter, gradient and optimizer states divided by the ranks plus the unsharded units it gathers.

Timings are medians over interleaved repeats (A, B, A, B, ...), so a busy machine slows both alike.
(i) needs no reference. The references of (ii)-(iv) (transformers, vector-quantize-pytorch) are
test-only requirements (requirements-dev.txt), imported only under --compare; a missing one is said in
one line and that figure is printed without its ratio.
"""

import argparse
import copy
import statistics
import time
import weakref
from dataclasses import replace

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from unified import Qwen2, Qwen2Config, UnifiedConfig, UnifiedModel, sample_logits

aten = torch.ops.aten


def timed(fns, reps):
    """Run each callable of fns once to warm up, then reps rounds of all of them in turn -> median
    seconds per call of each."""
    times = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(reps):
        for t, f in zip(times, fns):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def reference(args, module):
    """The reference package for --compare, or None: not asked for, or not installed (said in one line)."""
    if not args.compare:
        return None
    try:
        return __import__(module)
    except ImportError:
        print(f"(--compare: {module} is not installed, pip install -r requirements-dev.txt; ours alone below)")
        return None


def figures(t, unit, ref):
    """{"ours": s, [variants], [ref]: s} -> "ours A, REF B = r×; variant C = r×": every ratio is to the
    reference; without it (not compared) the variants' are to ours."""
    base = t.get(ref)
    line = f"ours {unit(t['ours'])}" + (f", {ref} {unit(base)} = {t['ours'] / base:.2f}×" if base else "")
    for k, v in t.items():
        if k not in ("ours", ref):
            line += f"; {k} {unit(v)} = " + (f"{v / base:.2f}×" if base else f"{v / t['ours']:.2f}× ours")
    return line


def recompute_sample_codes(model, h, guidance=None, temperature=1.0, top_k=None, top_p=None, generator=None):
    """UnifiedModel.sample_codes before the depth-slot cache, kept as the reference: at each depth the
    depth transformer reruns over all slots so far and every slot's classifier runs (D(D+1)/2 slot
    passes and classifier slices per head instead of D); the unconditional rows run at guidance 1 too."""
    B = h.shape[0] // 2 if guidance is not None else h.shape[0]
    out = []
    for head, codebook in ((model.pix_head, model.pix_codebook), (model.sem_head, model.sem_codebook)):
        if head is None:
            out.append(None)
            continue
        codes = torch.zeros(h.shape[0], 0, dtype=torch.long, device=h.device)
        for _ in range(model.config.rvq_depth):
            logits = head(h, codebook[codes])[:, -1].float()  # (R, K)
            if guidance is not None:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            k = sample_logits(logits, temperature, top_k, top_p, generator)
            if guidance is not None:
                k = torch.cat((k, k))
            codes = torch.cat((codes, k[:, None]), dim=1)
        out.append(codes[:B])
    return tuple(out)


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# (i) one image position vs one text token

@torch.no_grad()
def bench_position(args):
    llm = replace(Qwen2Config.preset(args.llm), **({"n_layer": args.layers} if args.layers else {}))
    config = UnifiedConfig(llm=llm, depth_layers=args.depth_layers, depth_heads=llm.n_head,
                           codebook_size=args.codebook_size, rvq_depth=args.rvq_depth)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    R, ctx = args.rows, args.context
    guidance = 3.0 if R == 2 else None  # 2 rows = one image with classifier-free guidance
    m = model.llm
    m.setup_cache(R, ctx + 1)
    m.hidden(torch.randint(1000, (R, ctx)), input_pos=torch.arange(ctx), kv_len=ctx)  # a filled context
    pos = torch.tensor([ctx])
    tok = torch.randint(1000, (R, 1))
    codes = torch.randint(config.codebook_size, (R, config.rvq_depth))

    def text():  # the LLM step at position ctx and the greedy next token
        return m.head(m.hidden(tok, input_pos=pos, kv_len=ctx + 1)[:, -1]).argmax(-1)

    def step(sampler):
        def image():  # the visual position's LLM step, then both heads draw its codes
            v = model.visual_embed(codes, codes, torch.zeros(R, dtype=torch.long))[:, None]
            h = m.hidden(input_embeds=v, input_pos=pos, kv_len=ctx + 1)[:, -1]
            return sampler(model, h, guidance, 0.0)
        return image

    t_text, t_new, t_old = timed([text, step(lambda mod, *a: mod.sample_codes(*a)), step(recompute_sample_codes)],
                                 args.reps)
    m.clear_cache()
    # parameter reads at batch 1-2 decoding (memory-bound): the LLM's blocks once either way; a text
    # token adds the vocabulary head, a position each head's layers once per slot + one classifier slice
    D, heads = config.rvq_depth, [h for h in (model.pix_head, model.sem_head) if h is not None]
    blocks = count(m.layers)
    head_reads = sum(D * count(h.layers) + D * h.classifier[0].numel() + count(h.in_h) + count(h.in_code)
                     for h in heads)
    floor = (blocks + head_reads) / (blocks + m.tok_embeddings.weight.numel())
    print(f"(i) position vs text token [{args.llm}{f', {llm.n_layer} layers' if args.layers else ''}, heads "
          f"{config.depth_layers}×{config.depth_dim} wide, {D} depths × {config.codebook_size} entries, {R} rows, "
          f"context {ctx}]: text {1e3 * t_text:.1f} ms, position {1e3 * t_new:.1f} ms = {t_new / t_text:.1f}× "
          f"(sampler of before: {1e3 * t_old:.1f} ms = {t_old / t_text:.1f}×; parameter-read floor {floor:.1f}×)")


# ----------------------------------------------------------------------------------------------
# (ii) greedy decode vs transformers

@torch.no_grad()
def bench_decode(args):
    cfg = Qwen2Config.preset(args.decode_llm)
    torch.manual_seed(0)
    ours, hf = Qwen2(cfg).eval(), None
    if reference(args, "transformers"):  # their model at random init, its weights loaded into ours
        from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM, logging
        logging.set_verbosity_error()
        hf = Qwen2ForCausalLM(HFConfig(**cfg.to_hf())).eval()
        keys = ours.hf_key_map()
        ours.load_hf_state_dict({k: v for k, v in hf.state_dict().items() if k in keys})
    idx = torch.randint(min(1000, cfg.vocab_size), (1, args.prompt_len))
    n = args.new_tokens

    fns = {"ours": lambda: ours.generate(idx, n)}
    if args.compile:  # sample.py --compile's cached step; compiled before timing (one warm-up call)
        from sample import compile_llm_step
        fast = copy.deepcopy(ours)
        compile_llm_step(fast, idx.device)
        fns["compiled"] = lambda: fast.generate(idx, n)
    if hf is not None:
        fns["transformers"] = lambda: hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                  pad_token_id=0)
    out = [f() for f in fns.values()]
    same = all(torch.equal(o, out[0]) for o in out[1:])
    t = dict(zip(fns, timed(list(fns.values()), args.reps)))
    print(f"(ii) greedy decode [{args.decode_llm}, prompt {args.prompt_len}, {n} new tokens, batch 1]: "
          + figures(t, lambda v: f"{1e3 * v / n:.1f} ms/token", "transformers")
          + (f" (same tokens: {'yes' if same else 'NO'})" if len(fns) > 1 else ""))


# ----------------------------------------------------------------------------------------------
# (iii) SigLIP vision forward vs transformers

@torch.no_grad()
def bench_siglip(args):
    from tokenizer import SIGLIP_PRESETS, SigLIP, SigLIPConfig
    # the preset's vision tower (its first siglip_layers layers); a 1-layer text tower, which is not timed
    c = replace(SIGLIP_PRESETS[args.siglip], text_layers=1, vocab_size=1000,
                **({"layers": args.siglip_layers} if args.siglip_layers else {}))
    torch.manual_seed(0)
    ours, hf = SigLIP(c).eval(), None
    if reference(args, "transformers"):  # their model at random init, its weights loaded into ours
        from transformers import SiglipConfig, SiglipModel, logging
        logging.set_verbosity_error()  # (the 1000-token text vocabulary lacks CLIP's eos id; the text tower is unused)
        hf = SiglipModel(SiglipConfig(**c.to_hf())).eval()
        ours = SigLIP(SigLIPConfig.from_hf(hf.config.to_dict())).eval()
        ours.load_hf_state_dict(hf.state_dict())
    x = torch.rand(args.images, 3, c.image_size, c.image_size) * 2 - 1

    fns, diff = {"ours": lambda: ours.encode_image(x)}, ""
    if hf is not None:
        fns["transformers"] = lambda: hf.vision_model(pixel_values=x).pooler_output
        diff = f" (pooled max |diff| {(fns['transformers']() - fns['ours']()).abs().max().item():.1e})"
    t = dict(zip(fns, timed(list(fns.values()), args.reps)))
    print(f"(iii) SigLIP vision forward [{args.siglip}, {c.layers} layers, {args.images} image(s) of "
          f"{c.image_size} px]: " + figures(t, lambda v: f"{1e3 * v:.0f} ms", "transformers") + diff)


# ----------------------------------------------------------------------------------------------
# (iv) RVQ vs vector-quantize-pytorch

@torch.no_grad()
def bench_rvq(args):
    from rvq import ResidualVQ
    torch.manual_seed(0)
    K, D = args.codebook_size, args.rvq_depth
    ours = ResidualVQ(32, K, D).train()
    z = torch.randn(args.rvq_batch, 27 * 27, 32)
    fns = {"ours": lambda: ours(z)}
    if reference(args, "vector_quantize_pytorch"):
        from vector_quantize_pytorch import ResidualVQ as TheirRVQ
        # the same method in their terms: one codebook for all depths, EMA 0.99, restarts below 1
        theirs = TheirRVQ(dim=32, num_quantizers=D, codebook_size=K, shared_codebook=True, decay=0.99,
                          threshold_ema_dead_code=1).train()
        fns["vector-quantize-pytorch"] = lambda: theirs(z)
    t = dict(zip(fns, timed(list(fns.values()), args.reps)))
    print(f"(iv) RVQ forward + EMA update [{args.rvq_batch}×729 vectors, {D} depths, shared {K}×32]: "
          + figures(t, lambda v: f"{1e3 * v:.0f} ms", "vector-quantize-pytorch"))


# ----------------------------------------------------------------------------------------------
# --memory: peak memory per rank of one training step, traced with fake tensors

def gib(n):
    return n / 2**30


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, over the tensors created while active (fake ones
    too: a fake tensor has a storage size and no data). A storage counts from its first op output
    to its last reference."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                key = st._cdata  # the storage itself, alive as long as this entry
                if key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)


class DataDependent(TorchDispatchMode):
    """Answers the ops whose output shape depends on tensor values (boolean-mask indexing, nonzero,
    masked_select, .item()), which fake tensors cannot run: record=True runs a step on real tensors
    and writes down each one's size, in order; replay gives a fake step the same sizes. The values
    they depend on (token ids, targets) are the same at every model width, so a tiny real model
    records what the full-size fake one replays."""

    def __init__(self, record, sizes=None):
        super().__init__()
        self.record, self.sizes = record, [] if record else list(sizes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default) and any(i is not None and i.dtype == torch.bool for i in args[1]):
            if self.record:
                self.sizes.append([int(i.sum()) if i is not None and i.dtype == torch.bool else None for i in args[1]])
                return func(*args, **kwargs)
            # a k-dim boolean mask = k long index tensors of its True count
            idx = []
            for i, n in zip(args[1], self.sizes.pop(0)):
                idx += [torch.zeros(n, dtype=torch.long, device=i.device)] * i.dim() if n is not None else [i]
            return func(args[0], idx, *args[2:], **kwargs)
        if func in (aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default):
            if self.record:
                out = func(*args, **kwargs)
                self.sizes.append(out.shape if isinstance(out, torch.Tensor) else out)
                return out
            size = self.sizes.pop(0)
            if func is aten._local_scalar_dense.default:
                return size
            dtype = torch.long if func is aten.nonzero.default else args[0].dtype
            return torch.zeros(size, dtype=dtype, device=args[0].device)
        return func(*args, **kwargs)


def stage1_step(name, args):
    """-> (the trained module, every module, optimizers, a training step) of tokenizer.py's preset."""
    import tokenizer as T
    from losses import LPIPS, PatchGAN, adaptive_gan_weight, generator_loss, hinge_d_loss, semantic_loss
    tc = replace(T.TRAIN_PRESETS[name], batch_size=args.batch_size or T.TRAIN_PRESETS[name].batch_size)
    c = T.TOKENIZER_PRESETS[tc.model]
    model = T.DualTokenizer(c).train()
    # the EMA update and restarts index by value (fake tensors cannot); they hold a few (N, D, 32) tensors
    model.pix_rvq.eval(), model.sem_rvq.eval()
    T._freeze_untrained(model, tc)
    model.grad_checkpointing = args.grad_checkpointing
    teacher = T.SigLIP(c.siglip).requires_grad_(False).eval()
    disc, lpips = PatchGAN(norm=tc.disc_norm).train(), LPIPS()
    lpips.grad_checkpointing = args.grad_checkpointing
    S = c.siglip.image_size
    x = torch.rand(tc.batch_size, 3, S, S) * 2 - 1

    def step():  # tokenizer.train_tokenizer's step with the GAN on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            f0, p0 = model.teacher_targets(teacher, x)
            recon = out.recon.float()
            mse, lp = F.mse_loss(recon, x), lpips(recon, x).mean()
            loss = (tc.sem_weight * (tc.sem_layer_weight * semantic_loss(out.sem.float(), f0.float())
                                     + tc.sem_pool_weight * semantic_loss(out.pooled.float(), p0.float()))
                    + tc.commit_weight * (out.commit_pix + out.commit_sem) + tc.mse_weight * mse + tc.lpips_weight * lp)
            disc.requires_grad_(False)
            g_loss = generator_loss(disc(out.recon))
            disc.requires_grad_(True)
            lam = adaptive_gan_weight(mse + tc.lpips_weight * lp, g_loss, model.decoder.conv_out.weight)
            (loss + tc.gan_weight * lam * g_loss).backward()
            d_loss = hinge_d_loss(disc(x), disc(out.recon.detach()))
        d_loss.backward()  # then the optimizers step (their states are counted, not traced)

    return [model, disc], [model, teacher, disc, lpips], step, list(model.siglip.vision.blocks), f"batch {tc.batch_size} of {S} px"


def stage2_batch(config, B, T, answer):
    """A stage-2 micro-batch of B sequences of T tokens: half generation, half understanding, each
    with one image after its prompt. Targets: a generation row's visual positions (+ <|vision_end|>,
    <|im_end|>), an understanding row's answer."""
    P = config.grid ** 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(config.special_tokens.values()), (B, T), generator=g)  # plain text tokens
    start = T - P - answer
    ids[:, start:start + P] = config.special_tokens["<|image_pad|>"]
    text = torch.full((B, T), -100, dtype=torch.long)
    vis = torch.full((B, T), -100, dtype=torch.long)
    for b in range(B):
        if b < B // 2:
            vis[b, start - 1:start + P - 1] = torch.arange(P) + b * P
            text[b, start + P - 1:start + P + 1] = 0
        else:
            text[b, start + P:T - 1] = 0
    codes = torch.randint(config.codebook_size, (B * P, config.rvq_depth), generator=g)
    return ids, codes, text, vis


def stage2_step(config, args, batch):
    import unified as U
    model = U.UnifiedModel(config).train()
    for part in (model.llm, model.pix_head, model.sem_head):
        if part is not None:
            part.grad_checkpointing = args.grad_checkpointing

    def step():  # unified._train's step up to the optimizer's (its states are counted, not traced)
        ids, codes, text, vis = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses = model(ids, codes, codes, text, vis)
        losses["loss"].backward()

    heads = [h for h in (model.pix_head, model.sem_head) if h is not None]
    return [model], [model], step, [*model.llm.layers, *(b for h in heads for b in h.layers)]  # --fsdp's units


def bench_memory(args):
    import unified as U
    stage, _, name = args.memory.partition(":")
    if stage == "stage2":
        config = U.UnifiedConfig.preset(name)
        B = args.batch_size or 8
        real = stage2_batch(config, B, args.seq_len, args.answer_tokens)
        # the value-dependent sizes, from the same step of a tiny real model (same codes, positions, vocabulary)
        tiny = replace(config, llm=replace(config.llm, dim=64, intermediate_size=64, n_layer=1, n_head=2,
                                           n_kv_head=1, head_dim=None), depth_dim=32, depth_mlp=32, depth_heads=2,
                       codebook_size=64)
        ids, codes, text, vis = real
        with DataDependent(record=True) as rec:
            stage2_step(tiny, args, lambda: (ids, codes % 64, text, vis))[2]()
        what = f"batch {B} × {args.seq_len} tokens, {(real[2] != -100).float().mean():.1%} text targets"
    elif stage != "stage1":
        raise SystemExit(f"--memory {args.memory!r}: stage1:PRESET (tokenizer.py) or stage2:PRESET (unified.py)")
    with FakeTensorMode() as fake:
        if stage == "stage1":
            trained, modules, step, units, what = stage1_step(name, args)
            sizes = []
        else:
            trained, modules, step, units = stage2_step(config, args, lambda: tuple(fake.from_tensor(t) for t in real))
            sizes = rec.sizes
        with DataDependent(record=False, sizes=sizes), PeakMemory() as mem:
            step()
    trained_n = sum(p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    # parameters and buffers, and the optimizers' two fp32 moments per trained parameter, are held
    # through the step; gradients appear in backward (traced)
    held = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) + 8 * trained_n
    total = held + mem.peak
    states = 16 * trained_n  # fp32 parameters, gradients and AdamW's moments: what FSDP shards
    W = args.world
    if args.fsdp:
        # each unit's fp32 parameters and gradients are whole while it runs, two units at a time
        # (prefetch), and the root (everything outside the units) stays gathered through the step
        unit = max(count(u) for u in units)
        root = count(trained[0]) - sum(count(u) for u in units)
        per_rank = total - states * (1 - 1 / W) + 8 * (2 * unit + root)
        how = f"FSDP over {W} ranks (estimate: states / {W} + gathered units)"
    else:
        per_rank = total + 4 * trained_n * (W > 1)  # DDP's gradient buckets, one fp32 copy of the gradients
        how = f"DDP over {W} ranks (+ {gib(4 * trained_n):.1f} GiB of gradient buckets)" if W > 1 else "one process"
    print(f"--memory {args.memory} [{what}, bf16 autocast, activation checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}]: parameters, buffers and AdamW moments {gib(held):.1f} GiB "
          f"+ step peak {gib(mem.peak):.1f} GiB (gradients {gib(4 * trained_n):.1f}, the rest activations and "
          f"temporaries) = {gib(total):.1f} GiB in one process; per rank, {how}: {gib(per_rank):.1f} GiB")
    return per_rank


# ----------------------------------------------------------------------------------------------

BENCHES = {"position": bench_position, "decode": bench_decode, "siglip": bench_siglip, "rvq": bench_rvq}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES))
    p.add_argument("--compare", action="store_true",
                   help="(ii)-(iv): also time transformers / vector-quantize-pytorch on the same weights")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--llm", default="qwen2.5-0.5b", help="Qwen2 preset of (i), the heads as wide")
    p.add_argument("--layers", type=int, default=0, help="(i): the LLM's layers (0: the preset's)")
    p.add_argument("--depth_layers", type=int, default=3)
    p.add_argument("--codebook_size", type=int, default=16384)
    p.add_argument("--rvq_depth", type=int, default=8)
    p.add_argument("--rows", type=int, default=2, help="(i): 2 = one image with CFG, 1 = without")
    p.add_argument("--context", type=int, default=256, help="(i): cached positions before the step")
    p.add_argument("--decode_llm", default="shapes", help="Qwen2 preset of (ii) (qwen2.5-0.5b: ~2 min on a CPU)")
    p.add_argument("--compile", action="store_true", help="(ii): also the torch.compile'd step of sample.py --compile")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--siglip", default="so400m")
    p.add_argument("--siglip_layers", type=int, default=2, help="(iii): vision layers (0: the preset's)")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--rvq_batch", type=int, default=2, help="(iv): images of 27×27 vectors")
    p.add_argument("--memory", default="", help="stage1:PRESET or stage2:PRESET: trace instead of timing")
    p.add_argument("--batch_size", type=int, default=0, help="--memory: 0 = the preset's (stage 2: 8)")
    p.add_argument("--seq_len", type=int, default=821)
    p.add_argument("--answer_tokens", type=int, default=48)
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory:
        return bench_memory(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU fp32")
    for name in args.only.split(","):
        if name not in BENCHES:
            raise SystemExit(f"--only: unknown {name!r}; known: {', '.join(BENCHES)}")
        BENCHES[name](args)


if __name__ == "__main__":
    main()
