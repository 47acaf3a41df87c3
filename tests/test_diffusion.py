"""The diffusion maths (schedules, forward noising, the loss, guidance) and the networks, on tiny models (dim 8,
two levels, 16 px). The samplers: test_samplers.py."""
import math

import pytest
import torch

from conftest import seeded_sample
from model import ColorDiffusion, Config, antithetic_start, cosine_schedule, linear_schedule, predict_x0, q_sample
from unet import GreyscaleEncoder, UNet, level_dims


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

    def spy_unet(x, tt, feats, w=None):
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
    for f in (m.config.snr_floor, 0.5):
        m.config.snr_floor = f  # the noisiest steps weigh f / SNR more, at most 20 times
        floor = (f / snr).clamp(1, 20)
        assert floor.max() == 20 and floor.min() == 1  # t=49 is pure noise, t=0 nearly clean
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
                        lambda x, t, f, w=None: (seen.update(unet=x[:, :1].clone()), unet_forward(x, t, f))[1])
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
    assert torch.equal(seeded_sample(m, L, 0, steps=4), seeded_sample(m, L, 0, steps=4, guidance=2.5))
    assert not torch.equal(seeded_sample(m, L, 0, steps=4), seeded_sample(m, L, 0, steps=4, guidance=1.0))
    m.config.cond_drop = 0  # never trained without L: its "unconditional" eps would be meaningless
    with pytest.raises(ValueError, match="cond_drop"):
        seeded_sample(m, L, 0, steps=4)


def test_guidance_interval_guides_only_its_steps(tiny_config):
    """Outside guidance_interval a step is the conditional model alone, in one UNet pass over the N rows;
    inside it the guided pair (2N rows). sample() takes the config's interval unless given one."""
    torch.manual_seed(0)
    m = ColorDiffusion(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    L = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    x = torch.randn(2, 2, 16, 16, generator=g)
    rows = []
    m.unet.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    signal = m.alphas_cumprod.sqrt()
    t_noisy, t_clean = int((signal < 0.3).nonzero()[0]), int((signal > 0.7).nonzero()[-1])
    with torch.no_grad():
        cond, guided = m.denoiser(L)(x, t_noisy), m.denoiser(L, 2.5)(x, t_noisy)
        late = m.denoiser(L, 2.5, interval=(0.5, 1.0))
        assert torch.equal(late(x, t_noisy), cond) and not torch.allclose(guided, cond)
        assert torch.allclose(late(x, t_clean), m.denoiser(L, 2.5)(x, t_clean), atol=1e-5)
    assert rows == [2, 4, 2, 4, 4]
    m.config.guidance = 2.5
    m.config.guidance_interval = (0.5, 1.0)
    plain = seeded_sample(m, L, 0, steps=4)
    assert torch.equal(plain, seeded_sample(m, L, 0, steps=4, guidance_interval=(0.5, 1.0)))
    assert not torch.equal(plain, seeded_sample(m, L, 0, steps=4, guidance_interval=(0.0, 1.0)))


def test_guidance_first_gives_the_first_step_its_own_scale(tiny_config):
    """guidance_first w1 guides the first step (where sampling starts) at w1 and the later ones at guidance w;
    0, the default, is w everywhere, so checkpoints from before the field sample as they did."""
    torch.manual_seed(0)
    m = ColorDiffusion(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    L = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    x = torch.randn(2, 2, 16, 16, generator=g)
    t_first, t_later = len(m.sampling_schedule()) - 1, 5
    with torch.no_grad():
        cond, uncond = m.denoiser(L), m.denoiser(torch.zeros_like(L))
        both = m.denoiser(L, 2.5, first=(t_first, 1.5))
        for t, w in ((t_first, 1.5), (t_later, 2.5)):
            assert torch.allclose(both(x, t), uncond(x, t) + w * (cond(x, t) - uncond(x, t)), atol=1e-5), t
        # the first step at 1 needs no unconditional half: one pass over the N rows
        rows = []
        hook = m.unet.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
        out = m.denoiser(L, 2.5, first=(t_first, 1.0))(x, t_first)
        hook.remove()
        assert torch.equal(out, cond(x, t_first)) and rows == [2]
    m.config.guidance = 2.5
    assert torch.equal(seeded_sample(m, L, 0, steps=4), seeded_sample(m, L, 0, steps=4, guidance_first=2.5))
    assert not torch.equal(seeded_sample(m, L, 0, steps=4), seeded_sample(m, L, 0, steps=4, guidance_first=1.5))
    m.config.guidance_first = 1.5
    assert torch.equal(seeded_sample(m, L, 0, steps=4), seeded_sample(m, L, 0, steps=4, guidance_first=1.5))
    m.config.guidance, m.config.cond_drop = 1.0, 0  # a first step guided without unconditional colours
    with pytest.raises(ValueError, match="cond_drop"):
        seeded_sample(m, L, 0, steps=4)


def test_antithetic_start_cancels_the_colour_read_into_the_start_noise():
    """A model whose first guess echoes the start noise z (0.3 z, odd in z) and also bends it (0.1 z^2): with
    antithetic_start its first x0 is the truth plus the even part only, whatever the seed; other steps are
    the model's own."""
    a, t0 = 0.0016, 9
    centre = a ** 0.5 * torch.tensor([0.1, -0.2]).view(1, 2, 1, 1)
    truth = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        z = (x - centre) / (1 - a) ** 0.5
        return (x - a ** 0.5 * (truth + 0.3 * z + 0.1 * z ** 2)) / (1 - a) ** 0.5
    wrapped = antithetic_start(denoise, t0, centre, a)
    for seed in range(3):
        z = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
        x = centre + (1 - a) ** 0.5 * z
        assert torch.allclose(predict_x0(x, wrapped(x, t0), a), truth + 0.1 * z ** 2, atol=1e-4), seed
        assert not torch.allclose(predict_x0(x, denoise(x, t0), a), truth + 0.1 * z ** 2, atol=0.1)
        assert torch.equal(wrapped(x, t0 - 1), denoise(x, t0 - 1))


def test_sample_evaluates_an_antithetic_first_step_twice(tiny_config):
    """sample(antithetic=True) runs the first step's UNet on the start noise and on its mirror, every other step
    once; sample() takes the config's setting unless given one."""
    torch.manual_seed(0)
    m = ColorDiffusion(tiny_config).eval()
    m.config.ab_mean = (0.05, 0.1)
    L = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    xs = []
    m.unet.register_forward_hook(lambda mod, args, out: xs.append(args[0][:, 1:3].clone()))
    plain = seeded_sample(m, L, 0, steps=3)
    assert len(xs) == 3
    xs.clear()
    anti = seeded_sample(m, L, 0, steps=3, antithetic=True)
    assert len(xs) == 4 and not torch.equal(anti, plain)
    a = m.sampling_schedule()[-1].item()
    centre = a ** 0.5 * torch.tensor(m.config.ab_mean).view(1, 2, 1, 1) * tiny_config.ab_scale
    assert torch.allclose(xs[0] + xs[1], 2 * centre.expand_as(xs[0]), atol=1e-6)  # x_T and its mirror
    m.config.sample_antithetic = True
    assert torch.equal(seeded_sample(m, L, 0, steps=3), anti)
    assert torch.equal(seeded_sample(m, L, 0, steps=3, antithetic=False), plain)


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
