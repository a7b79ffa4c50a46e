import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses

ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# metrics


def test_psnr_known_answers():
    x = torch.rand(3, 3, 16, 16) * 0.8 + 0.1  # stays in [0, 1] after +-0.1
    err = torch.tensor([0.1, -0.01, 0.0]).view(3, 1, 1, 1)
    p = losses.psnr(x + err, x)
    assert p.shape == (3,)
    # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB; MSE 1e-4 -> 40 dB; identical -> inf
    assert p[0].item() == pytest.approx(20.0, abs=1e-4)
    assert p[1].item() == pytest.approx(40.0, abs=1e-3)
    assert math.isinf(p[2].item())
    # data range 2 (e.g. [-1, 1] images) adds 20 log10(2) dB
    assert losses.psnr(x + 0.1, x, data_range=2.0)[0].item() == pytest.approx(20 + 20 * math.log10(2), abs=1e-4)


def test_ssim_identical_is_one_and_constant_known_answer():
    x = torch.rand(2, 3, 20, 24)
    assert torch.allclose(losses.ssim(x, x), torch.ones(2), atol=1e-6)
    # constant images: variances are 0, so SSIM is the luminance term (2ab + c1) / (a² + b² + c1)
    a, b, c1 = 0.5, 0.6, 0.01 ** 2
    s = losses.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        losses.ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))


def _ssim_numpy(x, y, win=11, sigma=1.5, k1=0.01, k2=0.03, L=1.0):
    # independent reference: a direct (non-separable) 2-D Gaussian window, one valid position at a time
    c = np.arange(win) - win // 2
    g = np.exp(-c ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    out = []
    for xi, yi in zip(x, y):  # images
        vals = []
        for xc, yc in zip(xi, yi):  # channels
            H, W = xc.shape
            for i in range(H - win + 1):
                for j in range(W - win + 1):
                    px, py = xc[i:i + win, j:j + win], yc[i:i + win, j:j + win]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx = (w * (px - mx) ** 2).sum()
                    vy = (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_matches_references():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 18, 20, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 18, 20, generator=g)).clamp(0, 1)
    s = losses.ssim(x, y)
    ref = _ssim_numpy(x.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(s.numpy(), ref, atol=1e-5)
    assert 0.2 < ref.min() < 0.95  # a non-trivial case

    from pytorch_msssim import ssim as ssim_ref  # requirements-dev.txt
    kw = dict(data_range=1.0, size_average=False, win_size=11, win_sigma=1.5, K=(0.01, 0.03))
    torch.testing.assert_close(s, ssim_ref(x, y, **kw), atol=1e-5, rtol=0)  # its fp32 path
    # same math in fp64 (ours always runs in fp64): agreement to fp32 rounding of the result
    torch.testing.assert_close(s.double(), ssim_ref(x.double(), y.double(), **kw), atol=1e-7, rtol=0)

# -----------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    return losses.LPIPS()


def test_lpips_identity_symmetry_positivity(lpips_model):
    m = lpips_model
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(m(x, x), torch.zeros(2))
    dxy, dyx = m(x, y), m(y, x)
    assert dxy.shape == (2,)
    torch.testing.assert_close(dxy, dyx, rtol=1e-6, atol=0)
    assert (dxy > 0).all()
    # slightly perturbed image is closer than an unrelated one
    assert (m(x, x + 0.01 * torch.randn(x.shape, generator=g)) < dxy).all()


def test_lpips_gradient_reaches_input_not_weights(lpips_model):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    lpips_model(x * 2 - 1, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


def test_lpips_matches_hand_vgg_taps(lpips_model):
    # Independent of nn.Sequential slicing: run torchvision's vgg16 `features` by index
    # (conv at 0,2,5,7,10,12,14,17,19,21,24,26,28; pool after 2, 7, 14, 21) and tap the ReLU
    # after convs 2, 7, 14, 21, 28 = relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    sd = lpips_model.state_dict()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def taps(t):
        h, out = (t - shift) / scale, []
        for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
            if i in (5, 10, 17, 24):
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
            if i in (2, 7, 14, 21, 28):
                out.append(h)
        return out

    total = 0.0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lins.{k}.weight"].view(1, -1, 1, 1)
        total = total + ((a - b).pow(2) * w).sum(1).mean()
    torch.testing.assert_close(lpips_model(x, y)[0], total, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def public_layout_files(tmp_path_factory):
    # random weights in the two public layouts: torchvision vgg16 state dict and lpips v0.1 vgg.pth
    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in losses.LPIPS().state_dict().items()}
    vgg = {k: torch.randn(s, generator=g) for k, s in shapes.items() if k.startswith("features.")}
    assert len(vgg) == 26
    # classifier.* must be dropped; tiny stand-ins for the real 4096-wide layers
    vgg.update({"classifier.0.weight": torch.randn(8, 16), "classifier.0.bias": torch.randn(8),
                "classifier.6.weight": torch.randn(10, 8), "classifier.6.bias": torch.randn(10)})
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, d / "vgg16-397923af.pth")
    torch.save(lin, d / "vgg.pth")
    return d, vgg, lin


def _check_round_trip(out, vgg, lin):
    from safetensors.torch import load_file
    got = load_file(out)
    expected = {k: v for k, v in vgg.items() if k.startswith("features.")}
    expected.update({f"lins.{k}.weight": lin[f"lin{k}.model.1.weight"] for k in range(5)})
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    m = losses.LPIPS.from_file(out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, expected[k]), k
    return m


def test_convert_lpips_round_trip_function(public_layout_files, tmp_path):
    d, vgg, lin = public_layout_files
    out = tmp_path / "lpips_vgg16.safetensors"
    losses.convert_lpips(d / "vgg16-397923af.pth", d / "vgg.pth", out)
    m = _check_round_trip(out, vgg, lin)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert m(x, x).item() == 0.0


def test_convert_lpips_round_trip_cli(public_layout_files, tmp_path):
    d, vgg, lin = public_layout_files
    out = tmp_path / "cli.safetensors"
    r = subprocess.run([sys.executable, "losses.py", "convert-lpips", "--vgg", str(d / "vgg16-397923af.pth"),
                        "--lin", str(d / "vgg.pth"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    _check_round_trip(out, vgg, lin)


def test_lpips_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert-lpips"):
        losses.LPIPS.from_file(tmp_path / "nope.safetensors")


def test_lpips_wrong_shape_names_key(lpips_model, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in lpips_model.state_dict().items()}
    state["lins.2.weight"] = torch.ones(1, 128, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, path, metadata={"format": losses.LPIPS_FORMAT, "version": losses.LPIPS_VERSION})
    with pytest.raises(ValueError, match=r"'lins\.2\.weight' has shape \(1, 128, 1, 1\), expected \(1, 256, 1, 1\)"):
        losses.LPIPS.from_file(path)


def test_lpips_file_without_format_metadata_rejected(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="dualtoken-lpips-vgg16"):
        losses.LPIPS.from_file(path)


def test_check_state_dict_missing_and_unexpected():
    shapes = {"a": (2, 3), "b": (4,)}
    with pytest.raises(ValueError, match=r"missing key 'b' \(expected shape \(4,\)\)"):
        losses.check_state_dict({"a": torch.zeros(2, 3)}, shapes, "f")
    with pytest.raises(ValueError, match=r"unexpected key 'c' \(shape \(1,\)\)"):
        losses.check_state_dict({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, shapes, "f")


def test_convert_lpips_rejects_wrong_lin_keys(public_layout_files, tmp_path):
    d, _, lin = public_layout_files
    bad = dict(lin)
    bad["lin3.model.0.weight"] = bad.pop("lin3.model.1.weight")  # e.g. a no-dropout re-save
    torch.save(bad, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match=r"missing key 'lin3\.model\.1\.weight'"):
        losses.convert_lpips(d / "vgg16-397923af.pth", tmp_path / "bad_lin.pth", tmp_path / "o.safetensors")

# -----------------------------------------------------------------------------
# PatchGAN + GAN losses


def test_patchgan_256_gives_30x30_and_taming_layout():
    torch.manual_seed(0)
    d = losses.PatchGAN()
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    # taming NLayerDiscriminator keys: no norm/bias-free first conv, BatchNorm convs without bias
    keys = set(d.state_dict())
    bn = {f"main.{i}.{n}" for i in (3, 6, 9) for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == {"main.0.weight", "main.0.bias", "main.2.weight", "main.5.weight", "main.8.weight",
                    "main.11.weight", "main.11.bias"} | bn
    convs = [m for m in d.main if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == \
        [(3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    # init N(0, 0.02) for convs (2M samples in the 256->512 conv), N(1, 0.02) for BatchNorm weights
    assert abs(convs[3].weight.std().item() - 0.02) < 5e-4 and abs(convs[3].weight.mean().item()) < 1e-4
    bn_w = d.main[9].weight
    assert abs(bn_w.mean().item() - 1.0) < 0.005 and abs(bn_w.std().item() - 0.02) < 0.004
    assert torch.equal(d.main[9].bias, torch.zeros(512))


def test_patchgan_actnorm_data_dependent_init():
    torch.manual_seed(0)
    d = losses.PatchGAN(ndf=8, norm="act")
    assert d.main[2].bias is not None  # taming keeps conv bias with ActNorm
    seen = []
    d.main[3].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = torch.randn(4, 3, 32, 32)
    assert d(x).shape == (4, 1, 2, 2)
    o = seen[0].transpose(0, 1).flatten(1)  # (C, B*H*W): zero mean, unit std per channel after init
    assert o.mean(1).abs().max() < 1e-5 and (o.std(1) - 1).abs().max() < 1e-4
    loc = d.main[3].loc.clone()
    d(torch.randn(4, 3, 32, 32) * 3)
    assert torch.equal(d.main[3].loc, loc)  # initialized once only


def test_gan_losses_known_answers():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    z = torch.zeros(2, 1, 3, 3)
    assert losses.vanilla_d_loss(z, z).item() == pytest.approx(math.log(2))
    assert losses.vanilla_d_loss(torch.full((4,), 30.0), torch.full((4,), -30.0)).item() < 1e-12
    assert losses.generator_loss(fake).item() == pytest.approx(1 / 3)
    assert losses.generator_loss(z, non_saturating=True).item() == pytest.approx(math.log(2))
    # non-saturating: gradient stays large where the discriminator is confident the sample is fake
    f = torch.tensor([-10.0], requires_grad=True)
    losses.generator_loss(f, non_saturating=True).backward()
    assert f.grad.item() == pytest.approx(-1.0, abs=1e-4)

# -----------------------------------------------------------------------------
# adaptive weight, semantic loss


def test_adaptive_weight_matches_hand_formula_and_clamps():
    torch.manual_seed(0)
    last = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    c = 0.1 * torch.randn(5, 3)
    out = last(x)  # (5, 3) = x Wᵀ + b
    rec = 0.5 * out.pow(2).sum()  # ∂/∂W = outᵀ x
    g = (c * out).sum()  # ∂/∂W = cᵀ x
    with torch.no_grad():
        hand = (out.T @ x).norm() / ((c.T @ x).norm() + 1e-4)
    assert 0.3 < hand < 10  # inside the default clamp, so the formula is what is tested
    w = losses.adaptive_gan_weight(rec, g, last.weight)
    torch.testing.assert_close(w, hand, rtol=1e-5, atol=0)
    assert not w.requires_grad
    assert losses.adaptive_gan_weight(rec, 1e-3 * g, last.weight).item() == pytest.approx(10.0)
    assert losses.adaptive_gan_weight(rec, 1e3 * g, last.weight).item() == pytest.approx(0.3)
    assert losses.adaptive_gan_weight(rec, 1e3 * g, last.weight, clamp=(0.0, 1e4)).item() < 0.3
    (rec + w * g).backward()  # the graph is retained for the real backward
    assert last.weight.grad is not None


def test_semantic_loss_known_answers():
    z = torch.randn(2, 7, 16, requires_grad=True)
    assert losses.semantic_loss(z, z.detach().clone()).item() == pytest.approx(0.0, abs=1e-6)
    # orthogonal unit vectors: 1 - cos = 1, MSE = ‖e1 - e2‖² / D = 2 / D
    D = 4
    a = torch.zeros(3, 5, D); a[..., 0] = 1
    b = torch.zeros(3, 5, D); b[..., 1] = 1
    assert losses.semantic_loss(a, b).item() == pytest.approx(1.0 + 2.0 / D)
    # relative: the MSE over the target's mean square (1 / D here) -> 2; and invariant to a common scale
    assert losses.semantic_loss(a, b, relative=True).item() == pytest.approx(1.0 + 2.0)
    assert losses.semantic_loss(30 * z, 30 * z.detach() + 3, relative=True).item() == \
        pytest.approx(losses.semantic_loss(z, z.detach() + 0.1, relative=True).item(), rel=1e-5)
    # the teacher is a target: no gradient flows into it
    t = torch.randn(2, 7, 16, requires_grad=True)
    losses.semantic_loss(z, t).backward()
    assert t.grad is None and z.grad is not None


def test_lpips_checkpointing_gives_the_same_distance_and_input_gradient(lpips_model):
    # grad_checkpointing recomputes each VGG stage in backward: same forward, same gradient
    gen = torch.Generator().manual_seed(8)
    x0, y = torch.rand(2, 3, 48, 48, generator=gen) * 2 - 1, torch.rand(2, 3, 48, 48, generator=gen) * 2 - 1
    out = []
    for ckpt in (False, True):
        lpips_model.grad_checkpointing = ckpt
        x = x0.clone().requires_grad_(True)
        d = lpips_model(x, y)
        d.sum().backward()
        out.append((d.detach(), x.grad))
    lpips_model.grad_checkpointing = False
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-7, rtol=1e-5)
    assert out[0][1].abs().sum() > 0
