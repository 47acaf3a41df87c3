"""Tests of the core: colour conversion, diffusion maths, samplers, networks, checkpoints, data, training.

Everything runs on CPU with tiny models (dim 8, two levels, 16 px) on the synthetic photos of conftest.py.
"""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import model as model_module
import train
import utils
from conftest import BAD_FILES, N_IMAGES, ROOT, assert_state_equal, synthetic_photo, train_args
from model import (CheckpointError, ColorDiffusion, Config, cosine_schedule, ddim_sample, ddpm_sample,
                   dynamic_threshold, export_inference_checkpoint, linear_schedule, load_checkpoint, load_model,
                   q_sample, save_checkpoint)
from unet import GreyscaleEncoder, UNet, level_dims


# ---------------------------------------------------------------------------------------------------------
# LAB conversion

def random_rgb(seed=0, n=4, size=32):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, size, size, generator=g)
    rgb[0, :, 0, 0], rgb[0, :, 0, 1] = 0.0, 1.0  # black and white, the ends of the L range
    return rgb


def test_lab_round_trip_is_exact_to_float_error():
    rgb = random_rgb()
    back = utils.lab_to_rgb(utils.rgb_to_lab(rgb))
    assert back.shape == rgb.shape
    assert (back - rgb).abs().max().item() < 1e-4  # measured about 5e-6 in float32


def test_rgb_to_lab_agrees_with_scikit_image():
    from skimage.color import rgb2lab
    rgb = random_rgb(1)
    ours = utils.rgb_to_lab(rgb).double()
    ref = torch.from_numpy(rgb2lab(rgb.permute(0, 2, 3, 1).double().numpy())).permute(0, 3, 1, 2)
    ref = torch.cat([ref[:, :1] / 50 - 1, ref[:, 1:] / utils.AB_NORM], dim=1)
    # normalized units: 1e-4 is 0.005 L levels / 0.011 ab units, far below a visible difference
    assert (ours - ref).abs().max().item() < 1e-4
    # and the normalization really maps the L range onto [-1, 1]
    assert ours[0, 0, 0, 0].item() == pytest.approx(-1, abs=1e-5)
    assert ours[0, 0, 0, 1].item() == pytest.approx(1, abs=1e-5)


def test_lab_to_rgb_clips_out_of_gamut_colours():
    lab = torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)  # a=+110, b=-110: outside sRGB
    rgb = utils.lab_to_rgb(lab)
    assert torch.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1


# ---------------------------------------------------------------------------------------------------------
# schedules and forward noising

@pytest.mark.parametrize("schedule", [linear_schedule, cosine_schedule])
@pytest.mark.parametrize("T", [10, 20, 50, 350])
def test_schedules_decrease_to_full_noise(schedule, T):
    a = schedule(T)
    assert a.shape == (T,) and a.dtype == torch.float64
    assert (a > 0).all() and (a <= 1).all()
    assert (a[1:] < a[:-1]).all()
    assert a[0] > 0.95  # the first step barely noises (0.97 for the cosine schedule at T=10)
    assert a[-1] < 1e-3  # the last is (nearly) pure noise


def test_q_sample_matches_closed_form_statistics():
    ac = cosine_schedule(50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    n = 20000
    for t in (0, 10, 25, 49):
        noise = torch.randn(n, 2, 4, 4, generator=g)
        xt = q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t), noise, ac)
        a = ac[t].item()
        mean, var = xt.mean(0), xt.var(0)
        # standard errors: sqrt((1-a)/n) for the mean, about sqrt(2/n)*(1-a) for the variance; 6 sigma
        assert (mean - math.sqrt(a) * x0[0]).abs().max() < 6 * math.sqrt((1 - a) / n) + 1e-6
        assert (var - (1 - a)).abs().max() < 6 * math.sqrt(2 / n) * (1 - a) + 1e-6
    # per-sample timesteps: each row uses its own t
    t = torch.tensor([0, 49])
    noise = torch.randn(2, 2, 4, 4, generator=g)
    xt = q_sample(x0.expand(2, -1, -1, -1), t, noise, ac)
    for i in range(2):
        a = ac[t[i]].float()
        assert torch.allclose(xt[i], a.sqrt() * x0[0] + (1 - a).sqrt() * noise[i], atol=1e-6)


def test_loss_noises_only_ab_and_passes_L_unchanged(tiny_config, monkeypatch):
    torch.manual_seed(0)
    m = ColorDiffusion(Config(**{**tiny_config.to_dict(), "cond_drop": 0.0}))  # L always shown
    g = torch.Generator().manual_seed(1)
    lab = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([0, 17, 49])
    noise = torch.randn(3, 2, 16, 16, generator=g)
    seen = {}
    unet_forward, enc_forward = m.unet.forward, m.encoder.forward

    def spy_unet(x, tt, feats):
        seen["unet_in"], seen["t"] = x.detach().clone(), tt.clone()
        out = unet_forward(x, tt, feats)
        seen["pred"] = out.detach().clone()
        return out

    def spy_enc(L):
        seen["enc_in"] = L.detach().clone()
        return enc_forward(L)

    monkeypatch.setattr(m.unet, "forward", spy_unet)
    monkeypatch.setattr(m.encoder, "forward", spy_enc)
    m(lab, t=t, noise=noise)
    x = seen["unet_in"]
    assert x.shape == (3, 3, 16, 16)
    assert torch.equal(x[:, :1], lab[:, :1])  # L goes in exactly as given: never noised
    assert torch.equal(seen["enc_in"], lab[:, :1])
    expected_ab = q_sample(lab[:, 1:] * tiny_config.ab_scale, t, noise, m.alphas_cumprod)
    assert torch.equal(x[:, 1:], expected_ab)  # ab is scaled and noised with the given t and noise
    assert torch.equal(seen["t"], t)
    per_sample = (seen["pred"] - noise).pow(2).mean(dim=(1, 2, 3))
    a = m.alphas_cumprod[t].float()
    snr = a / (1 - a)
    weight = snr.clamp(max=tiny_config.min_snr_gamma) / snr  # Min-SNR: 1 at low SNR, gamma/SNR above it
    assert weight.min() < 1 and weight.max() == 1
    for f, cap in ((m.config.snr_floor, m.config.snr_floor_cap), (0.5, 2.0), (0.05, 125.0)):
        m.config.snr_floor, m.config.snr_floor_cap = f, cap  # the noisiest steps weigh f / SNR more, at most cap
        floor = (f / snr).clamp(1, cap)
        assert floor.max() == cap and floor.min() == 1  # t=49 is pure noise, t=0 nearly clean
        assert m(lab, t=t, noise=noise).item() == pytest.approx((per_sample * weight * floor).mean().item(), rel=1e-6)
    m.config.snr_floor = 0  # Min-SNR alone
    assert m(lab, t=t, noise=noise).item() == pytest.approx((per_sample * weight).mean().item(), rel=1e-6)
    m.config.min_snr_gamma = m.config.snr_floor = 0  # off: the plain MSE of the noise
    assert m(lab, t=t, noise=noise).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)


def test_cond_drop_hides_L_from_some_training_images_only(tiny_config, monkeypatch):
    """cond_drop shows a random share of a training batch with L = 0 (the null condition) to both the UNet
    and the encoder, the same rows to both; evaluation (the EMA's validation loss) always sees L."""
    m = ColorDiffusion(Config(**{**tiny_config.to_dict(), "cond_drop": 0.5}))
    lab = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = {}
    unet_forward, enc_forward = m.unet.forward, m.encoder.forward
    monkeypatch.setattr(m.unet, "forward",
                        lambda x, t, f: (seen.update(unet=x[:, :1].clone()), unet_forward(x, t, f))[1])
    monkeypatch.setattr(m.encoder, "forward", lambda L: (seen.update(enc=L.clone()), enc_forward(L))[1])
    torch.manual_seed(0)
    m(lab)
    dropped = (seen["enc"] == 0).flatten(1).all(1)
    kept = (seen["enc"] == lab[:, :1]).flatten(1).all(1)
    assert torch.equal(dropped, ~kept) and 16 < int(dropped.sum()) < 48  # about half, each row all or nothing
    assert torch.equal(seen["unet"], seen["enc"])
    m.eval()
    m(lab)
    assert torch.equal(seen["enc"], lab[:, :1]) and torch.equal(seen["unet"], lab[:, :1])


def test_guidance_extrapolates_from_the_unconditional_prediction(tiny_config):
    """guidance w: eps_uncond + w (eps_cond - eps_uncond), eps_uncond being the model's eps with L = 0;
    w = 1 is the plain model, and sample() takes the config's w unless given one."""
    torch.manual_seed(0)
    m = ColorDiffusion(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    L = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    x = torch.randn(2, 2, 16, 16, generator=g)
    with torch.no_grad():
        cond, uncond = m.denoiser(L)(x, 20), m.denoiser(torch.zeros_like(L))(x, 20)
        assert not torch.allclose(cond, uncond)
        for w in (0.0, 1.0, 2.5):
            assert torch.allclose(m.denoiser(L, w)(x, 20), uncond + w * (cond - uncond), atol=1e-5), w
    m.config.guidance = 2.5
    assert torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance=2.5))
    assert not torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance=1.0))
    m.config.cond_drop = 0  # never trained without L: its "unconditional" eps would be meaningless
    with pytest.raises(ValueError, match="cond_drop"):
        _sample(m, L, 0, steps=4)


# ---------------------------------------------------------------------------------------------------------
# networks

@pytest.mark.parametrize("dim,dim_mults,size,attention,dropout", [
    (8, (1, 2), (16, 16), True, 0.0),
    (8, (1, 2, 4), (32, 32), False, 0.1),
    (16, (1, 2), (32, 48), True, 0.1),
    (8, (1, 2, 4), (48, 32), True, 0.0),
    (8, (1, 2, 2), (48, 48), False, 0.0),
])
def test_unet_and_encoder_shapes(dim, dim_mults, size, attention, dropout):
    torch.manual_seed(0)
    H, W = size
    unet = UNet(dim, dim_mults, dropout, attention)
    enc = GreyscaleEncoder(dim, dim_mults, dropout, attention)
    L = torch.randn(2, 1, H, W)
    feats = enc(L)
    dims = level_dims(dim, dim_mults)
    assert len(feats) == len(dim_mults) == len(unet.downs)
    for n, (f, (d_in, _)) in enumerate(zip(feats, dims)):
        assert f.shape == (2, d_in, H // 2 ** n, W // 2 ** n)
        # the UNet's first block at this level takes its own d_in channels plus the encoder's
        assert unet.downs[n].block1.conv1.in_channels == 2 * f.shape[1]
    x = torch.cat([L, torch.randn(2, 2, H, W)], dim=1)
    t = torch.tensor([0, 49])
    out = unet(x, t, feats)
    assert out.shape == (2, 2, H, W) and torch.isfinite(out).all()
    unet.eval(), enc.eval()
    with torch.no_grad():
        a, b = unet(x, t, enc(L)), unet(x, t, enc(L))
    assert torch.equal(a, b)  # eval mode is deterministic, dropout or not
    if dropout:
        unet.train(), enc.train()
        with torch.no_grad():
            assert not torch.equal(unet(x, t, enc(L)), unet(x, t, enc(L)))


def test_every_trainable_parameter_gets_a_gradient(tiny_config):
    """DistributedDataParallel requires it: a trainable parameter outside the loss graph hangs training."""
    torch.manual_seed(0)
    m = ColorDiffusion(Config(**{**tiny_config.to_dict(), "dim_mults": (1, 2, 4)}))
    m(torch.rand(2, 3, 16, 16) * 2 - 1).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert sum(p.requires_grad for p in m.encoder.parameters()) > 0  # the encoder is trained


# ---------------------------------------------------------------------------------------------------------
# samplers

def test_dynamic_threshold_bounds_and_leaves_in_range_untouched():
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(2, 2, 8, 8, generator=g) * 7.8 - 3.9
    assert torch.equal(dynamic_threshold(inside, bound=4.0), inside)
    wild = torch.randn(3, 2, 8, 8, generator=g) * 10
    out = dynamic_threshold(wild, bound=4.0)
    assert out.abs().max() <= 4.0 + 1e-5
    assert torch.allclose(out.flatten(1).abs().max(1).values, torch.full((3,), 4.0), atol=1e-5)
    # per sample: a saturated sample does not rescale an in-range one next to it
    mixed = torch.stack([inside[0], wild[0]])
    out = dynamic_threshold(mixed, bound=4.0)
    assert torch.equal(out[0], inside[0]) and out[1].abs().max() <= 4.0 + 1e-5
    # monotone: the ordering of values within a sample is kept (up to the clamp at the percentile)
    s = torch.quantile(wild[0].abs().flatten(), 0.995)
    assert torch.allclose(out[1], wild[0].clamp(-s, s) * 4.0 / s, atol=1e-6)


def _trajectory_setup(T=50, shape=(2, 2, 8, 8), seed=0):
    ac = cosine_schedule(T)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(*shape, generator=g) * 4 - 2
    eps = torch.randn(*shape, generator=g)
    xT = math.sqrt(ac[-1].item()) * x0 + math.sqrt(1 - ac[-1].item()) * eps
    return ac, x0, eps, xT


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_true_noise_recovers_x0(steps):
    ac, x0, eps, xT = _trajectory_setup()
    visited = []

    def denoise(x, t):
        a = ac[t].item()
        # DDIM with eta=0 must keep x on the forward trajectory of (x0, eps) at every visited timestep
        assert torch.allclose(x, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, atol=2e-4), t
        visited.append(t)
        return eps

    x0_preds = []
    out = ddim_sample(denoise, xT.clone(), ac, steps, callback=lambda i, n, x, x0p: x0_preds.append(x0p))
    assert torch.allclose(out, x0, atol=1e-3)
    assert len(visited) == len(x0_preds) == steps
    assert visited[0] == 49 and visited == sorted(set(visited), reverse=True)
    assert steps == 1 or visited[-1] == 0  # one step jumps from T-1 straight to x0
    for p in x0_preds:
        assert torch.allclose(p, x0, atol=1e-3)


def test_ddpm_runs_T_steps_with_the_true_posterior():
    """With an oracle denoiser, each ancestral step must draw x_{t-1} from DDPM's posterior q(x_{t-1}|x_t,x0):
    mean mu~(x_t, x0) and variance beta~_t (textbook formulas, computed independently here)."""
    T = 50
    ac, x0, _, _ = _trajectory_setup(T, shape=(1, 2, 100, 100))
    g = torch.Generator().manual_seed(5)
    xT = math.sqrt(ac[-1].item()) * x0 + math.sqrt(1 - ac[-1].item()) * torch.randn(x0.shape, generator=g)
    inputs, outputs, ts = [], [], []

    def denoise(x, t):
        a = ac[t].item()
        inputs.append(x.clone())
        ts.append(t)
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = ddpm_sample(denoise, xT, ac, generator=g, callback=lambda i, n, x, x0p: outputs.append(x.clone()))
    assert len(outputs) == T and ts == list(range(T - 1, -1, -1))
    assert torch.allclose(out, x0, atol=1e-3)
    n = x0.numel()
    for i in (0, 10, 25, 40, 48):
        t = ts[i]
        a_t, a_prev = ac[t].item(), ac[t - 1].item()
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        mu = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * inputs[i]
        var = (1 - a_prev) / (1 - a_t) * beta
        r = (outputs[i] - mu).double()
        assert abs(r.mean().item()) < 6 * math.sqrt(var / n)
        assert r.var().item() == pytest.approx(var, rel=6 * math.sqrt(2 / n))


@pytest.mark.parametrize("eta", [1.0, 1.5, 100.0])
def test_ddim_any_eta_keeps_the_forward_marginals(eta):
    """With an oracle denoiser, every x_t DDIM visits must be distributed as q(x_t | x0) = N(sqrt(a) x0, 1 - a),
    however large eta: above 1 the fresh noise grows only up to re-noising x0 from scratch."""
    T = 50
    ac, x0, _, _ = _trajectory_setup(T, shape=(1, 2, 100, 100))
    g = torch.Generator().manual_seed(7)
    xT = math.sqrt(ac[-1].item()) * x0 + math.sqrt(1 - ac[-1].item()) * torch.randn(x0.shape, generator=g)
    seen = []

    def denoise(x, t):
        a = ac[t].item()
        seen.append((x.clone(), a))
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = ddim_sample(denoise, xT, ac, 10, eta=eta, generator=g)
    assert torch.allclose(out, x0, atol=1e-3)
    n = x0.numel()
    for x, a in seen[1:]:
        r = ((x - math.sqrt(a) * x0) / math.sqrt(1 - a)).double()
        assert abs(r.mean().item()) < 6 / math.sqrt(n)
        assert r.var().item() == pytest.approx(1.0, rel=6 * math.sqrt(2 / n))


def test_ddim_thresholding_keeps_x_consistent_and_in_range():
    """With thresholding, the clipped x0 and the noise implied by it must still decompose x_t exactly, and
    each DDIM step must move along that pair; the final sample lies within the bound."""
    ac, x0, eps, xT = _trajectory_setup()  # x0 in [-2, 2]
    bound = 1.0
    inputs, steps = [], []

    def denoise(x, t):
        inputs.append((x.clone(), t))
        return eps

    out = ddim_sample(denoise, xT.clone(), ac, 8, threshold=lambda z: dynamic_threshold(z, bound=bound),
                      callback=lambda i, n, x, x0p: steps.append((x.clone(), x0p.clone())))
    assert out.abs().max() <= bound + 1e-5
    for i, ((x_t, t), (x_prev, x0_thr)) in enumerate(zip(inputs, steps)):
        assert x0_thr.abs().max() <= bound + 1e-5
        a_t = ac[t].item()
        a_prev = ac[inputs[i + 1][1]].item() if i + 1 < len(inputs) else 1.0
        eps_thr = (x_t - math.sqrt(a_t) * x0_thr) / math.sqrt(1 - a_t)
        assert torch.allclose(x_prev, math.sqrt(a_prev) * x0_thr + math.sqrt(1 - a_prev) * eps_thr, atol=1e-4)
    # an x0 already within the bound is not affected by thresholding
    small = x0 / 4
    xT = math.sqrt(ac[-1].item()) * small + math.sqrt(1 - ac[-1].item()) * eps
    a = ddim_sample(lambda x, t: eps, xT, ac, 8, threshold=lambda z: dynamic_threshold(z, bound=bound))
    b = ddim_sample(lambda x, t: eps, xT, ac, 8)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, small, atol=1e-3)


def test_ddim_eta_is_reproducible_with_a_generator():
    ac, x0, eps, xT = _trajectory_setup()
    denoise = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = ddim_sample(denoise, xT, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(denoise, xT, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = ddim_sample(denoise, xT, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# checkpoints

class NotATensor:  # a pickled object: weights_only loading must refuse it
    pass


def _two_models(config):
    torch.manual_seed(0)
    m = ColorDiffusion(config)
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make EMA and model differ, so choosing the right one matters
    # load_model returns channels_last models: the same layout, so the same kernels and the same bits
    return (x.eval().to(memory_format=torch.channels_last) for x in (m, ema))


def _sample(m, L, seed, **kwargs):
    return m.sample(L, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_checkpoint_round_trip_gives_identical_samples(tiny_config, tmp_path):
    m, ema = _two_models(tiny_config)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"config": tiny_config.to_dict(), "model": m.state_dict(), "ema": ema.state_dict(),
                                "optimizer": {}, "step": 7})
    assert not os.path.exists(f"{path}.tmp")
    L = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    loaded = load_model(str(path))
    assert not loaded.training and loaded.config == tiny_config
    for kwargs in (dict(steps=5), dict(steps=5, eta=1.0, dynamic_thresholding=True), dict(steps=None)):
        assert torch.equal(_sample(loaded, L, 0, **kwargs), _sample(ema, L, 0, **kwargs)), kwargs
    raw = load_model(str(path), use_ema=False)
    assert torch.equal(_sample(raw, L, 0, steps=5), _sample(m, L, 0, steps=5))
    assert not torch.equal(_sample(raw, L, 0, steps=5), _sample(ema, L, 0, steps=5))
    # different generator seeds give different samples: the equality above is not vacuous
    assert not torch.equal(_sample(loaded, L, 0, steps=5), _sample(loaded, L, 1, steps=5))


def test_exported_checkpoint_is_fp16_ema_and_samples_closely(tiny_config, tmp_path):
    m, ema = _two_models(tiny_config)
    src, dst = tmp_path / "ckpt.pt", tmp_path / "model.pt"
    save_checkpoint(str(src), {"config": tiny_config.to_dict(), "model": m.state_dict(), "ema": ema.state_dict(),
                               "optimizer": {"junk": torch.zeros(1000)}, "step": 7})
    export_inference_checkpoint(str(src), str(dst))
    ck = load_checkpoint(str(dst))
    assert set(ck) == {"config", "ema", "step"} and ck["step"] == 7
    assert all(v.dtype == torch.float16 for v in ck["ema"].values() if v.is_floating_point())
    assert os.path.getsize(dst) < os.path.getsize(src)
    loaded = load_model(str(dst))
    # exactly the EMA weights rounded to fp16
    rounded = copy.deepcopy(ema)
    rounded.load_state_dict({k: v.half().float() for k, v in ema.state_dict().items()})
    L = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    a = _sample(loaded, L, 0, steps=10)
    assert torch.equal(a, _sample(rounded, L, 0, steps=10))
    # and close to the full-precision EMA's samples (in [-1, 1]). An untrained network's x0 sits at the
    # clip boundary, where fp16 rounding can move a few pixels off it, so the bound is on the mean.
    b = _sample(ema, L, 0, steps=10)
    assert (a - b).abs().mean().item() < 1e-2
    # train.py --export can replace the sampling start (chosen by evaluation); nothing else changes
    assert loaded.config == tiny_config
    train.main(["--out-dir", str(tmp_path), "--export", str(dst), "--sample-min-signal", "0.07"])
    assert load_model(str(dst)).config == Config(**{**tiny_config.to_dict(), "sample_min_signal": 0.07})
    with pytest.raises(ValueError, match="sample_min_signal must be in"):
        train.main(["--out-dir", str(tmp_path), "--export", str(tmp_path / "bad.pt"), "--sample-min-signal", "1.5"])
    assert not (tmp_path / "bad.pt").exists()
    train.main(["--out-dir", str(tmp_path), "--export", str(dst), "--guidance", "1.5"])
    assert load_model(str(dst)).config == Config(**{**tiny_config.to_dict(), "guidance": 1.5})


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "quadratic", "schedule must be one of"), ("image_size", 60, "multiple of 8"),
    ("timesteps", 1, "timesteps"), ("ab_scale", 0.0, "ab_scale"), ("sample_min_signal", 1.0, "sample_min_signal"),
    ("ema_decay", 1.0, "ema_decay"), ("batch_size", 0, "batch_size"), ("amp", "maybe", "amp"),
    ("device", "tpu", "device"), ("val_percent", 100.0, "val_percent"), ("dim_mults", (1, 0), "dim_mults"),
    ("cond_drop", 1.0, "cond_drop"), ("guidance", -1.0, "guidance")])
def test_config_rejects_values_that_would_fail_later(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config(**{field: value})


def test_guidance_needs_a_model_trained_for_it():
    Config(cond_drop=0.1, guidance=2.0)
    with pytest.raises(ValueError, match="cond_drop > 0"):
        Config(cond_drop=0.0, guidance=2.0)


def test_bad_config_value_is_a_one_line_error_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--schedule", "quadratic",
                        "--data", "/nonexistent", "--out-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["error: config: schedule must be one of linear, cosine, not 'quadratic'"]
    assert not os.path.exists(tmp_path / "run")


def test_sampling_schedule_keeps_at_least_one_step(tiny_config):
    m = ColorDiffusion(tiny_config)
    assert m.alphas_cumprod[0].sqrt() < 0.99999  # no timestep has that much signal...
    assert len(m.sampling_schedule(0.99999)) == 1  # ...yet sampling still runs its last step


def test_load_checkpoint_rejects_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(garbage))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a Color Diffusion checkpoint"):
        load_model(str(other))
    invalid = tmp_path / "invalid.pt"
    torch.save({"config": {"schedule": "quadratic"}, "ema": {}}, invalid)
    with pytest.raises(CheckpointError, match="invalid.pt: config: schedule must be one of"):
        load_model(str(invalid))
    code = tmp_path / "code.pt"
    torch.save({"config": {}, "model": NotATensor()}, code)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(code))


# ---------------------------------------------------------------------------------------------------------
# data

def test_build_cache_decodes_the_folder(photo_dir, tmp_path, monkeypatch):
    lab, names = dataset.build_cache(str(photo_dir), 16, str(tmp_path), workers=1)
    assert names == sorted(os.listdir(photo_dir)) and len(names) == N_IMAGES
    assert lab.shape == (N_IMAGES, 3, 16, 16) and lab.dtype == torch.float16
    assert lab[:, 0].min() >= -1 and lab[:, 0].max() <= 1
    assert lab[:, 1:].abs().max() < 1.2
    # the same LAB as utils' converter on the centre-cropped, resized image (fp16 storage error only)
    img = dataset.center_crop_resize(utils.load_image(photo_dir / names[3]), 16)
    ref = utils.rgb_to_lab(utils.pil_to_tensor(img))[0]
    assert (lab[3].float() - ref).abs().max() < 2e-3
    assert lab[:, 1:].float().std() > 0.05  # colourful data, not a greyscale accident
    # a second call reads the cache file instead of decoding again
    monkeypatch.setattr(dataset, "Pool", None)
    lab2, names2 = dataset.build_cache(str(photo_dir), 16, str(tmp_path), workers=1)
    assert torch.equal(lab, lab2) and names == names2


def test_build_cache_skips_bad_files_with_one_warning_each(bad_dir, tmp_path, capsys):
    lab, names = dataset.build_cache(str(bad_dir), 16, str(tmp_path), workers=1)
    assert names == ["good_1.jpg", "good_2.png"] and lab.shape == (2, 3, 16, 16)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(BAD_FILES), err
    for name in BAD_FILES:
        hits = [line for line in err if name in line]
        assert len(hits) == 1 and hits[0].startswith("warning: skipping"), (name, err)
    assert "greyscale" in next(line for line in err if "grey.jpg" in line)
    assert "Traceback" not in "\n".join(err)


def test_build_cache_with_no_usable_image_is_a_clear_error(tmp_path):
    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("nope")
    with pytest.raises(ValueError, match="no usable colour images"):
        dataset.build_cache(str(folder), 16, str(tmp_path / "cache"), workers=1)
    with pytest.raises(FileNotFoundError):
        dataset.build_cache(str(tmp_path / "missing"), 16, str(tmp_path / "cache"), workers=1)


def test_is_greyscale():
    rng = np.random.default_rng(0)
    colour = synthetic_photo(rng)
    assert not dataset.is_greyscale(colour)
    grey = colour.convert("L")
    assert dataset.is_greyscale(grey) and dataset.is_greyscale(grey.convert("LA"))
    assert dataset.is_greyscale(grey.convert("RGB"))
    arr = np.asarray(grey.convert("RGB")).astype(np.int16)
    noisy = (arr + rng.integers(-1, 2, arr.shape)).clip(0, 255).astype(np.uint8)  # JPEG-like chroma noise
    assert dataset.is_greyscale(Image.fromarray(noisy))
    patched = np.asarray(grey.convert("RGB")).copy()
    patched[:10, :10] = (200, 40, 40)  # a red patch on 5% of a grey picture is colour
    assert not dataset.is_greyscale(Image.fromarray(patched))


def test_validation_split_is_deterministic_and_disjoint(photo_dir, shared_cache):
    names = [f"{i:06d}.jpg" for i in range(20000)]
    split = [dataset.is_validation(n, 2.0) for n in names]
    assert split == [dataset.is_validation(n, 2.0) for n in reversed(names)][::-1]  # by name, not by position
    assert 0.015 < sum(split) / len(split) < 0.025
    assert not any(dataset.is_validation(n, 0.0) for n in names[:500])
    assert all(dataset.is_validation(n, 100.0) for n in names[:500])
    # a larger percentage only moves files into validation, never out
    assert all(dataset.is_validation(n, 10.0) for n, v in zip(names, split) if v)

    lab, files = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    train_ds, val_ds = dataset.load_split(str(photo_dir), 16, 25.0, str(shared_cache))
    expected_val = [f for f in files if dataset.is_validation(f, 25.0)]
    assert 0 < len(val_ds) == len(expected_val) < N_IMAGES
    assert len(train_ds) + len(val_ds) == N_IMAGES
    rows = lambda t: {tuple(x.flatten().tolist()) for x in t}  # noqa: E731
    assert rows(train_ds.lab).isdisjoint(rows(val_ds.lab))
    assert rows(val_ds.lab) == rows(lab[[files.index(f) for f in expected_val]])
    assert train_ds.train and not val_ds.train


def test_augmentation_is_a_function_of_seed_epoch_index(shared_cache, photo_dir):
    lab, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    a, b = dataset.LabDataset(lab, train=True, seed=3), dataset.LabDataset(lab, train=True, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    for i in (0, 5, 11):
        assert torch.equal(a[i], b[i]) and torch.equal(a[i], a[i])
    b.set_epoch(3)
    assert any(not torch.equal(a[i], b[i]) for i in range(len(lab)))
    c = dataset.LabDataset(lab, train=True, seed=4)
    c.set_epoch(2)
    assert any(not torch.equal(a[i], c[i]) for i in range(len(lab)))
    plain = dataset.LabDataset(lab)
    assert torch.equal(plain[4], lab[4].float())
    for i in range(len(lab)):
        x = a[i]
        assert x.shape == (3, 16, 16) and x[0].min() >= -1 and x[0].max() <= 1
        # the augmentation is a flip and mild jitter: ab stays within 10% of the (possibly flipped) original
        orig = lab[i].float()
        best = min((x[1:] - o[1:]).abs().max().item() for o in (orig, orig.flip(-1)))
        assert best <= 0.1 * orig[1:].abs().max().item() + 1e-6


def test_make_loader_shards_and_skips(shared_cache, photo_dir):
    lab, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    ds = dataset.LabDataset(lab)
    full = torch.cat(list(dataset.make_loader(ds, 4, epoch=1, world_size=1, seed=0)))
    shards = [torch.cat(list(dataset.make_loader(ds, 4, epoch=1, rank=r, world_size=2, seed=0))) for r in (0, 1)]
    rows = lambda t: [tuple(x.flatten().tolist()) for x in t]  # noqa: E731
    assert len(rows(full)) == len(set(rows(full))) == N_IMAGES
    assert set(rows(shards[0])).isdisjoint(rows(shards[1]))
    assert len(shards[0]) == len(shards[1]) == N_IMAGES // 2
    other_epoch = torch.cat(list(dataset.make_loader(ds, 4, epoch=2, world_size=1, seed=0)))
    assert not torch.equal(full, other_epoch)  # reshuffled every epoch
    batches = list(dataset.make_loader(ds, 4, epoch=1, world_size=1, seed=0))
    resumed = list(dataset.make_loader(ds, 4, epoch=1, skip_batches=2, world_size=1, seed=0))
    assert len(resumed) == len(batches) - 2
    assert all(torch.equal(x, y) for x, y in zip(resumed, batches[2:]))


# ---------------------------------------------------------------------------------------------------------
# training

def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_noise_loss(m, lab, n_draws=4):
    """Mean loss over the whole set at several fixed (t, noise) draws: comparable between models."""
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        losses = []
        for _ in range(n_draws):
            t = torch.randint(0, m.config.timesteps, (len(lab),), generator=g)
            noise = torch.randn(len(lab), 2, *lab.shape[2:], generator=g)
            losses.append(m(lab, t=t, noise=noise).item())
    return sum(losses) / len(losses)


def test_short_training_run_lowers_the_loss(photo_dir, shared_cache, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=100, log_every=10))
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == list(range(10, 101, 10))
    assert losses[-1] < 0.75 * losses[0], losses  # measured about 1.10 -> 0.51
    assert any("val_loss" in r for r in log)
    assert os.path.exists(out / "samples_000100.png")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 100 and Config.from_dict(ckpt["config"]).dim_mults == (1, 2)
    lab, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    lab = lab.float()
    config = Config.from_dict(ckpt["config"])
    torch.manual_seed(0)
    untrained = ColorDiffusion(config).eval()
    trained = load_model(str(out / "ckpt.pt"), use_ema=False)
    before, after = fixed_noise_loss(untrained, lab), fixed_noise_loss(trained, lab)
    assert after < 0.75 * before, (before, after)


def test_interrupted_then_resumed_run_equals_uninterrupted(photo_dir, shared_cache, tmp_path, monkeypatch):
    N = 5  # 16 training images, batch 8: 2 steps an epoch, so the interruption falls mid-epoch
    full, split = tmp_path / "full", tmp_path / "split"
    train.main(train_args(photo_dir, shared_cache, full, max_steps=2 * N))

    real_lr_at = train.lr_at

    def interrupt_at_N(step, c):  # Ctrl-C at the start of step N
        if step == N:
            raise KeyboardInterrupt
        return real_lr_at(step, c)

    monkeypatch.setattr(train, "lr_at", interrupt_at_N)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(photo_dir, shared_cache, split, max_steps=2 * N))
    assert e.value.code == 130
    assert load_checkpoint(str(split / "ckpt.pt"))["step"] == N
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.main(["--resume", "--out-dir", str(split)])

    a, b = load_checkpoint(str(full / "ckpt.pt")), load_checkpoint(str(split / "ckpt.pt"))
    assert a["step"] == b["step"] == 2 * N
    for key in ("model", "ema", "optimizer"):
        assert_state_equal(a[key], b[key], key)
    # and it did train: the weights moved from their initialization
    torch.manual_seed(0)
    init = ColorDiffusion(Config.from_dict(a["config"])).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)


def test_resume_and_restart_guards(photo_dir, shared_cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError):
        train.main(["--resume", "--out-dir", str(out)])
    train.main(train_args(photo_dir, shared_cache, out, max_steps=2))
    with pytest.raises(ValueError, match="exists"):  # never silently overwrite a run
        train.main(train_args(photo_dir, shared_cache, out, max_steps=4))
    with pytest.raises(ValueError, match="cannot change the model's dim"):
        train.main(["--resume", "--out-dir", str(out), "--dim", "16"])
    train.main(["--resume", "--out-dir", str(out), "--max-steps", "3"])  # a non-model field may change
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3


def test_training_without_validation_images_finishes(photo_dir, shared_cache, tmp_path):
    """--val-percent 0 (or a folder too small to have any validation file): the run still ends with its
    final checkpoint instead of crashing in the evaluation."""
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=3, val_percent=0, eval_every=1))
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    assert not any("val_loss" in r for r in read_log(out))


def test_bad_data_folder_is_a_one_line_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", "/nonexistent",
                        "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: /nonexistent: no such folder"], r.stderr
    assert not os.path.exists(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------
# download_dataset.sh, offline: a PATH with only the tools it needs, and a fake gdown where one is wanted

SCRIPT = os.path.join(ROOT, "download_dataset.sh")
TOOLS = ("find", "wc", "tr", "ls", "dirname", "mkdir", "mktemp", "rm", "rmdir", "mv", "sed", "cp", "cat")


def _run_download(tmp_path, gdown=None, unzip=True):
    import shutil
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS + (("unzip",) if unzip else ()):
        if not (bin_dir / tool).exists():
            os.symlink(shutil.which(tool), bin_dir / tool)
    if gdown is not None:  # the body of a fake gdown; "$out" is the -O path
        fake = bin_dir / "gdown"
        fake.write_text('#!/bin/bash\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = -O ] && out="$2"; shift; done\n'
                        f'echo called >> "{tmp_path}/gdown_calls"\n{gdown}\n')
        fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    r = subprocess.run(["/bin/bash", SCRIPT], capture_output=True, text=True, cwd=work,
                       env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
    return r, work / "img_align_celeba"


def _leftovers(work):
    return [p for p in os.listdir(work) if p.startswith(".celeba_download")]


def test_download_script_syntax():
    r = subprocess.run(["/bin/bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_download_script_without_gdown_fails_clearly(tmp_path):
    r, dest = _run_download(tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == "error: gdown is not installed; install it with: pip install gdown"
    assert not dest.exists() and not _leftovers(tmp_path / "work")


def test_download_script_without_unzip_fails_clearly(tmp_path):
    r, dest = _run_download(tmp_path, gdown="exit 1", unzip=False)
    assert r.returncode != 0 and r.stderr.startswith("error: unzip is not installed")
    assert not (tmp_path / "gdown_calls").exists() and not dest.exists()


def test_download_script_network_failure(tmp_path):
    r, dest = _run_download(tmp_path, gdown='echo "Failed to retrieve file url" >&2; exit 1')
    assert r.returncode != 0 and "error: the download failed" in r.stderr
    assert not dest.exists() and not _leftovers(tmp_path / "work")
    # an error page saved in place of the zip
    r, dest = _run_download(tmp_path, gdown='echo "<html>quota exceeded</html>" > "$out"')
    assert r.returncode != 0 and "not a valid zip" in r.stderr
    assert not dest.exists() and not _leftovers(tmp_path / "work")


def test_download_script_skips_a_folder_that_has_images(tmp_path):
    dest = tmp_path / "work" / "img_align_celeba"
    dest.mkdir(parents=True)
    synthetic_photo(np.random.default_rng(0)).save(dest / "000001.jpg")
    r, _ = _run_download(tmp_path, gdown="exit 1")
    assert r.returncode == 0 and "already has 1 images" in r.stdout
    assert not (tmp_path / "gdown_calls").exists()


@pytest.mark.skipif(not __import__("shutil").which("unzip"), reason="unzip is not installed")
def test_download_script_unzips_into_the_folder(tmp_path):
    import zipfile
    archive = tmp_path / "celeba.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            img = tmp_path / f"{i:06d}.jpg"
            synthetic_photo(np.random.default_rng(i)).save(img)
            z.write(img, f"img_align_celeba/{img.name}")
    r, dest = _run_download(tmp_path, gdown=f'cp "{archive}" "$out"')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dest)) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert "done: 3 images" in r.stdout and not _leftovers(tmp_path / "work")
    r, _ = _run_download(tmp_path, gdown="exit 1")  # idempotent: the second run downloads nothing
    assert r.returncode == 0 and "already has 3 images" in r.stdout
    assert (tmp_path / "gdown_calls").read_text().count("called") == 1


def test_sampling_starts_at_the_noisiest_usable_timestep(tiny_config):
    """The near-zero-SNR tail of the schedule is skipped: the loop starts at the last t whose signal level
    sqrt(alphas_cumprod) is still sample_min_signal; with 0 it runs all T steps."""
    m = ColorDiffusion(tiny_config).eval()
    L = torch.zeros(1, 1, 16, 16)
    ac = m.alphas_cumprod
    for min_signal, expected in [(0.1, int((ac.sqrt() >= 0.1).sum())), (0.0, tiny_config.timesteps)]:
        m.config.sample_min_signal = min_signal
        seen = []
        m.sample(L, steps=None, callback=lambda i, n, x, x0: seen.append(n))
        assert len(seen) == seen[0] == expected == len(m.sampling_schedule())
    assert int((ac.sqrt() >= 0.1).sum()) < tiny_config.timesteps  # the tail is really there to skip
    # a per-call min_signal overrides the config's, and leaves it alone
    seen = []
    m.sample(L, steps=None, min_signal=0.1, callback=lambda i, n, x, x0: seen.append(n))
    assert seen[0] == int((ac.sqrt() >= 0.1).sum()) and m.config.sample_min_signal == 0.0


def test_training_records_the_mean_colour_and_sampling_starts_there(photo_dir, shared_cache, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=2))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    train_ds, _ = dataset.load_split(str(photo_dir), 16, 25, str(shared_cache))
    expected = train_ds.lab[:, 1:].float().mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(ckpt["config"]["ab_mean"]), expected, atol=1e-4)
    assert expected.abs().max() > 0.01  # the synthetic photos are not grey on average: a real check

    # the sampler's first x_t is sqrt(a_start) * mean (in model space) + sqrt(1 - a_start) * noise
    m = load_model(str(out / "ckpt.pt"))
    seen = {}
    monkeypatch.setattr(model_module, "ddim_sample", lambda denoise, x, ac, *a, **k: seen.setdefault("x", x))
    m.sample(torch.zeros(4, 1, 16, 16), steps=5, generator=torch.Generator().manual_seed(0))
    a = m.sampling_schedule()[-1].item()
    noise = torch.randn((4, 2, 16, 16), generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(ckpt["config"]["ab_mean"]).view(1, 2, 1, 1) * m.config.ab_scale
    assert torch.allclose(seen["x"], a ** 0.5 * mean + (1 - a) ** 0.5 * noise, atol=1e-6)
