"""
Losses and metrics for training the DualToken tokenizer (paper §3.2, eq. (2)-(4)):
LPIPS-lite (VGG16), a PatchGAN discriminator, GAN losses, the adaptive generator weight, the
semantic loss, and the PSNR / SSIM metrics.

Copyable alone: stdlib + torch; safetensors is imported only where LPIPS weights are read/written.
The LPIPS weights file is made once from the two public files with
    python losses.py convert-lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.safetensors
"""

import argparse
import os
import pickle
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# LPIPS-lite (Zhang et al. 2018, v0.1 "vgg"): the perceptual term of eq. (3)

LPIPS_FORMAT = "dualtoken-lpips-vgg16"  # safetensors metadata, checked on load (STYLE.md #13)
LPIPS_VERSION = "1"
LPIPS_HELP = ("python losses.py convert-lpips --vgg vgg16-397923af.pth --lin vgg.pth "
              "--out lpips_vgg16.safetensors")

# torchvision's vgg16 "D" config; building nn.Sequential from it reproduces torchvision's
# `features` indices (convs at 0,2,5,7,10,12,14,17,19,21,24,26,28) so its state dict maps 1:1.
# We stop at index 29 (relu5_3): the final maxpool (index 30) is never tapped.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (4, 9, 16, 23, 30)  # slice ends: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Frozen perceptual distance. forward(x, y) with x, y in [-1, 1], (B, 3, H, W) -> (B,).
    Build with LPIPS.from_file(path); LPIPS() alone has random VGG weights (tests only)."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        assert len(self.features) == LPIPS_TAPS[-1]
        # lpips NetLinLayer: a 1x1 conv, no bias (released as lin{k}.model.1.weight, [1, C, 1, 1])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        # lpips ScalingLayer: maps [-1, 1] input to the ImageNet normalization VGG was trained with.
        # Constants, not weights: non-persistent so they never appear in (or are expected from) a file.
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        # Placeholder init until weights are loaded: torchvision's VGG init keeps random activations
        # well-scaled, and lins = 1 is lpips' "baseline" variant (plain sum over channels).
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        # Recompute each tap's VGG stage in backward instead of storing it: the gradient reaches the
        # reconstruction through ~30 full-resolution activations of 2B images otherwise
        self.grad_checkpointing = False
        self.requires_grad_(False)
        self.eval()  # no dropout / norm layers, so train() would change nothing; eval states intent

    @classmethod
    def from_file(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LPIPS weights not found: {path}. Make them from the public "
                                    f"torchvision vgg16 and lpips v0.1 vgg.pth files with: {LPIPS_HELP}")
        from safetensors import safe_open  # lazy: the rest of this file needs only torch
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' own error type for a truncated or foreign file
            raise ValueError(f"{path}: not a readable safetensors file ({e}); remake it with: {LPIPS_HELP}") from None
        if meta.get("format") != LPIPS_FORMAT or meta.get("version") != LPIPS_VERSION:
            raise ValueError(f"{path}: not a {LPIPS_FORMAT} v{LPIPS_VERSION} file "
                             f"(metadata {meta}); remake it with: {LPIPS_HELP}")
        model = cls()
        check_state_dict(state, {k: v.shape for k, v in model.state_dict().items()}, path)
        model.load_state_dict(state, strict=True)
        return model

    def forward(self, x, y):
        # (B, 3, H, W) each, in [-1, 1]; one trunk pass over both halves
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W)
        dist, start = 0.0, 0
        for k, end in enumerate(LPIPS_TAPS):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h, d = checkpoint(self._tap, h, k, start, end, use_reentrant=False)
            else:
                h, d = self._tap(h, k, start, end)
            dist, start = dist + d, end
        return dist  # (B,)

    def _tap(self, h, k, start, end):
        # VGG stage k -> (its output (2B, C_k, H_k, W_k), the layer's distance term (B,))
        h = self.features[start:end](h)
        # fp32 here: sum of squares over 512 channels and eps 1e-10 are not bf16-safe
        f = h.float()
        f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # lpips normalize_tensor
        fx, fy = f.chunk(2)
        d = self.lins[k]((fx - fy).pow(2).to(self.lins[k].weight.dtype))  # (B, 1, H_k, W_k)
        return h, d.float().mean(dim=(1, 2, 3))  # spatial mean


def check_state_dict(state, shapes, source):
    """Strict key/shape check with messages that name the key and both shapes (STYLE.md #6)."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing:
        raise ValueError(f"{source}: missing key '{missing[0]}' (expected shape "
                         f"{tuple(shapes[missing[0]])}); {len(missing)} missing in all")
    if unexpected:
        raise ValueError(f"{source}: unexpected key '{unexpected[0]}' (shape "
                         f"{tuple(state[unexpected[0]].shape)}); {len(unexpected)} unexpected in all")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{source}: key '{k}' has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(shape)}")


def _load_pth(path):
    # weights_only: tensors and containers, never pickled code, from files downloaded elsewhere
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before it fails
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a weights file torch.load(weights_only=True) reads ({type(e).__name__})") from None


def convert_lpips(vgg_path, lin_path, out_path):
    """torchvision vgg16-397923af.pth + lpips v0.1 vgg.pth -> one safetensors file for LPIPS."""
    vgg, lin = _load_pth(vgg_path), _load_pth(lin_path)
    # explicit key map: features.N.* keep their names (same indices), classifier.* is dropped,
    # lin{k}.model.1.weight -> lins.{k}.weight (model.0 was lpips' dropout, which has no weights)
    state = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
    check_state_dict(lin, {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)},
                     lin_path)
    for k in range(len(LPIPS_CHANNELS)):
        state[f"lins.{k}.weight"] = lin[f"lin{k}.model.1.weight"]
    with torch.device("meta"):  # shapes only, no allocation
        shapes = {k: v.shape for k, v in LPIPS().state_dict().items()}
    check_state_dict(state, shapes, f"{vgg_path} + {lin_path}")
    from safetensors.torch import save_file
    state = {k: v.float().contiguous() for k, v in state.items()}
    save_file(state, out_path, metadata={"format": LPIPS_FORMAT, "version": LPIPS_VERSION})

# -----------------------------------------------------------------------------
# PatchGAN discriminator: taming-transformers NLayerDiscriminator (pix2pix), the L_G of eq. (3).
# Module layout (`main.N`) matches taming so its checkpoints load. (The official DualToken repo
# swapped in kernel-3 GroupNorm ResNet blocks; DESIGN.md keeps taming's standard layout.)


class ActNorm(nn.Module):
    """Per-channel affine whose init is data-dependent: the first training batch comes out with
    zero mean, unit std per channel (Glow; taming's ActNorm). Under DDP, run one forward before
    wrapping the model, else each rank initializes from its own batch."""

    def __init__(self, num_features):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x):
        # (B, C, H, W)
        if self.training and self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).flatten(1)  # (C, B*H*W)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_(1 / (flat.std(1).view_as(self.scale) + 1e-6))
                self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class PatchGAN(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H/8 - 2, W/8 - 2); 256x256 -> 30x30."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3, norm="batch"):
        super().__init__()
        assert norm in ("batch", "act"), norm
        norm_layer = nn.BatchNorm2d if norm == "batch" else ActNorm
        use_bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant; taming keeps it for ActNorm
        kw, pad = 4, 1
        seq = [nn.Conv2d(in_channels, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2)]  # no norm on layer 1
        mult = 1
        for n in range(1, n_layers + 1):  # 64->128 s2, 128->256 s2, then 256->512 s1
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=pad, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad))  # 1-channel patch logits
        self.main = nn.Sequential(*seq)
        # taming weights_init: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0;
        # conv biases keep PyTorch's default, as in taming
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)

# -----------------------------------------------------------------------------
# GAN losses (taming-transformers vqperceptual.py; the official DualToken train.py uses the same
# hinge d-loss but with leaky_relu in place of relu, and g-loss = -mean(logits_fake))


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real, logits_fake):
    # binary cross-entropy with logits: real -> 1, fake -> 0
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake, non_saturating=False):
    # default: -E[D(x̂)] (taming, official DualToken); non-saturating: -E[log sigmoid(D(x̂))]
    if non_saturating:
        return F.softplus(-logits_fake).mean()
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss, g_loss, last_layer, clamp=(0.3, 10.0)):
    """λ = ‖∇_last rec‖ / (‖∇_last G‖ + 1e-4), clamped and detached (taming / VQGAN eq. (7)).
    The official DualToken train.py clamps to [0.3, 10] (taming uses [0, 1e4]) on the decoder's
    last conv weight, with rec = MSE + LPIPS."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(clamp[0], clamp[1]).detach()

# -----------------------------------------------------------------------------
# Semantic loss: paper eq. (4) is ‖F − F0‖²; the official train.py adds a cosine term to the MSE.


def semantic_loss(z, z_teacher, relative=False):
    # (..., D) each: MSE over all elements + mean over tokens of (1 - cos). The official code uses
    # -cos; 1 - cos has the same gradient and is 0 at the optimum. The teacher is a target, never trained.
    # relative: the MSE divided by the target's mean square, so the loss does not depend on the teacher's
    # activation scale (the micro teacher's layer 7 has rms ≈ 19: its raw MSE drowns every other term).
    z_teacher = z_teacher.detach()
    mse = F.mse_loss(z, z_teacher)
    if relative:
        mse = mse / z_teacher.float().square().mean().clamp(min=1e-12)
    return mse + (1.0 - F.cosine_similarity(z, z_teacher, dim=-1)).mean()

# -----------------------------------------------------------------------------
# Metrics (Table 1 / Table 3 conventions): images in [0, 1], (B, C, H, W), one value per image.
# Average the returned (B,) values over the evaluation set: per-image, then mean.


def psnr(x, y, data_range=1.0):
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)  # (B,) MSE over C, H, W
    return 10.0 * torch.log10(data_range ** 2 / mse)  # (B,) dB; inf for identical images


def ssim(x, y, data_range=1.0, win_size=11, sigma=1.5, k=(0.01, 0.03)):
    """Wang et al. 2004 SSIM, pytorch-msssim convention: separable Gaussian window applied per
    channel with valid (no padding) convolution, mean over channels and positions."""
    B, C, H, W = x.shape
    if H < win_size or W < win_size:
        raise ValueError(f"ssim needs images of at least {win_size}x{win_size}, got {H}x{W}")
    # fp64: var = E[x²] - μ² cancels badly in fp32 on flat regions (3e-5 off on a constant image)
    x, y = x.double(), y.double()
    coords = torch.arange(win_size, dtype=torch.float64, device=x.device) - win_size // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()  # (win,)
    gh = g.view(1, 1, 1, win_size).expand(C, 1, 1, win_size)
    gv = g.view(1, 1, win_size, 1).expand(C, 1, win_size, 1)

    def blur(t):  # (B, C, H, W) -> (B, C, H - win + 1, W - win + 1), depthwise
        return F.conv2d(F.conv2d(t, gv, groups=C), gh, groups=C)

    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    s = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return s.flatten(1).mean(1).float()  # (B,)

# -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    # as tokenizer._Parser (this file imports no other): no abbreviated flags, errors in one line
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"losses.py: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    parser = _Parser(prog="losses.py", description="DualToken losses: weight conversion")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("convert-lpips", help="make the LPIPS-lite safetensors from the public files")
    p.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    p.add_argument("--lin", required=True, help="lpips v0.1 weights/v0.1/vgg.pth")
    p.add_argument("--out", default="lpips_vgg16.safetensors")
    args = parser.parse_args()
    try:
        convert_lpips(args.vgg, args.lin, args.out)
    except (OSError, ValueError, KeyError) as e:
        # a missing, damaged or foreign input (torch.load's weights_only refuses pickled code), an unwritable --out
        print(f"losses.py: error: convert-lpips: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    n = sum(t.numel() for t in LPIPS.from_file(args.out).state_dict().values())
    print(f"wrote {args.out} ({n:,} parameters)")
