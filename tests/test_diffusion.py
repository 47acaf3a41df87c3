"""The diffusion maths, the networks and the samplers, on tiny models (dim 8, two levels, 16 px)."""
import math

import pytest
import torch

import train
from model import (ColorDiffusion, Config, antithetic_start, cosine_schedule, ddim_sample, ddpm_sample, dpmpp_2m_sample,
                   dynamic_threshold, linear_schedule, predict_x0, q_sample, random_hints)
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
    assert torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance=2.5))
    assert not torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance=1.0))
    m.config.cond_drop = 0  # never trained without L: its "unconditional" eps would be meaningless
    with pytest.raises(ValueError, match="cond_drop"):
        _sample(m, L, 0, steps=4)


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
    assert torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance_interval=(0.5, 1.0)))
    assert not torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance_interval=(0.0, 1.0)))


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
    assert torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance_first=2.5))
    assert not torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance_first=1.5))
    m.config.guidance_first = 1.5
    assert torch.equal(_sample(m, L, 0, steps=4), _sample(m, L, 0, steps=4, guidance_first=1.5))
    m.config.guidance, m.config.cond_drop = 1.0, 0  # a first step guided without unconditional colours
    with pytest.raises(ValueError, match="cond_drop"):
        _sample(m, L, 0, steps=4)


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
    plain = _sample(m, L, 0, steps=3)
    assert len(xs) == 3
    xs.clear()
    anti = _sample(m, L, 0, steps=3, antithetic=True)
    assert len(xs) == 4 and not torch.equal(anti, plain)
    a = m.sampling_schedule()[-1].item()
    centre = a ** 0.5 * torch.tensor(m.config.ab_mean).view(1, 2, 1, 1) * tiny_config.ab_scale
    assert torch.allclose(xs[0] + xs[1], 2 * centre.expand_as(xs[0]), atol=1e-6)  # x_T and its mirror
    m.config.sample_antithetic = True
    assert torch.equal(_sample(m, L, 0, steps=3), anti)
    assert torch.equal(_sample(m, L, 0, steps=3, antithetic=False), plain)


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


def _sample(m, L, seed, **kwargs):
    return m.sample(L, generator=torch.Generator().manual_seed(seed), **kwargs)


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


@pytest.mark.parametrize("sampler, eta", [(ddim_sample, 1.0), (ddim_sample, 1.5), (ddim_sample, 100.0),
                                          (dpmpp_2m_sample, 0.0), (dpmpp_2m_sample, 1.0)])
def test_samplers_with_an_oracle_recover_x0_and_keep_the_forward_marginals(sampler, eta):
    """With an oracle denoiser, every x_t a sampler visits must be distributed as q(x_t | x0) = N(sqrt(a) x0,
    1 - a), and it must land on x0: DDIM however large eta (above 1 the fresh noise grows only up to re-noising
    x0 from scratch); DPM-Solver++(2M), deterministic or as the reverse SDE."""
    T = 50
    ac, x0, _, _ = _trajectory_setup(T, shape=(1, 2, 100, 100))
    g = torch.Generator().manual_seed(7)
    xT = math.sqrt(ac[-1].item()) * x0 + math.sqrt(1 - ac[-1].item()) * torch.randn(x0.shape, generator=g)
    seen = []

    def denoise(x, t):
        a = ac[t].item()
        seen.append((x.clone(), a))
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = sampler(denoise, xT, ac, 10, eta=eta, generator=g)
    assert len(seen) == 10 and torch.allclose(out, x0, atol=1e-3)
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



def test_sampling_starts_at_the_noisiest_usable_timestep(tiny_config):
    """The near-zero-SNR tail of the schedule is skipped: the loop starts at the last t whose signal level
    sqrt(alphas_cumprod) is still sample_min_signal; with 0 it runs all T steps."""
    m = ColorDiffusion(tiny_config).eval()
    L = torch.zeros(1, 1, 16, 16)
    ac = m.alphas_cumprod
    for min_signal, expected in [(0.1, int((ac.sqrt() >= 0.1).sum())), (0.0, tiny_config.timesteps)]:
        m.config.sample_min_signal = min_signal
        seen = []
        m.sample(L, sampler="ddpm", callback=lambda i, n, x, x0: seen.append(n))
        assert len(seen) == seen[0] == expected == len(m.sampling_schedule())
    assert int((ac.sqrt() >= 0.1).sum()) < tiny_config.timesteps  # the tail is really there to skip
    # a per-call min_signal overrides the config's, and leaves it alone
    seen = []
    m.sample(L, sampler="ddpm", min_signal=0.1, callback=lambda i, n, x, x0: seen.append(n))
    assert seen[0] == int((ac.sqrt() >= 0.1).sum()) and m.config.sample_min_signal == 0.0


def test_dpmpp_2m_solves_the_ode_more_accurately_than_ddim_in_few_steps():
    """Gaussian data N(0, s^2) has a closed-form optimal denoiser, so both samplers solve the same probability-flow
    ODE: in 15 steps the second-order solver must land much nearer the fine solution than DDIM (first order)
    (measured: 0.013 against 0.19)."""
    ac, s = cosine_schedule(1000)[:900], 0.5  # started where the signal is still measurable, as sampling does
    xT = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        a = ac[t].item()
        x0 = math.sqrt(a) * s ** 2 * x / (a * s ** 2 + 1 - a)
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    exact = ddim_sample(denoise, xT, ac, 900)
    err = {name: (f(denoise, xT, ac, 15) - exact).abs().max().item()
           for name, f in [("ddim", ddim_sample), ("dpm++2m", dpmpp_2m_sample)]}
    assert err["dpm++2m"] < 0.2 * err["ddim"], err


def test_hint_inputs_start_at_zero_and_then_steer_the_prediction(tiny_config):
    """A model given hint inputs by --init computes exactly what it did (zero-initialised channels); once those
    weights move, hints change its prediction, and random_hints shows true colours under a mask."""
    torch.manual_seed(0)
    old = ColorDiffusion(tiny_config).eval()
    hinted = ColorDiffusion(Config(**{**tiny_config.to_dict(), "hints": True})).eval()
    hinted.load_state_dict(train.add_inputs(dict(old.state_dict()), hinted))
    L, x = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 2, 16, 16)
    ab = torch.rand(2, 2, 16, 16) - 0.5
    torch.manual_seed(1)
    hints = random_hints(ab, p_none=0)
    mask = hints[:, 2:] > 0
    assert mask.any() and ((hints[:, :2] - ab).abs() * mask).max() < 1.0  # patch means of the truth
    assert (hints[:, :2] * ~mask).abs().max() == 0

    def eps(m, *extra):  # the UNet's prediction at t = 10 from the inputs training gives it: L, x_t[, hints]
        return m.unet(torch.cat([L, x, *extra], 1), torch.full((2,), 10), m.encoder(L))

    with torch.no_grad():
        assert torch.equal(eps(hinted, hints), eps(old))
        assert torch.equal(hinted.denoiser(L)(x, 10), old.denoiser(L)(x, 10))  # sampling: zero hint inputs
        hinted.unet.init_conv.weight.add_(0.1)
        assert not torch.allclose(eps(hinted, hints), eps(hinted, torch.zeros_like(hints)))


def test_sampling_pins_and_spreads_hints_without_the_trained_hint_inputs(tiny_config):
    """sample() moves x0 to the hints itself and leaves the UNet's hint inputs at zero (at a few steps they
    pulled the rest of a hinted region away from its hint): what those inputs' weights are does not matter."""
    torch.manual_seed(0)
    m = ColorDiffusion(Config(**{**tiny_config.to_dict(), "hints": True})).eval()
    L = torch.rand(1, 1, 16, 16) * 2 - 1
    torch.manual_seed(1)
    hints = random_hints(torch.rand(1, 2, 16, 16) - 0.5, p_none=0)
    hinted = _sample(m, L, 0, steps=3, hints=hints)
    mask = (hints[:, 2:] > 0).expand(-1, 2, -1, -1)
    assert torch.allclose(hinted[mask], hints[:, :2][mask], atol=1e-5)
    assert not torch.allclose(hinted, _sample(m, L, 0, steps=3))
    with torch.no_grad():
        m.unet.init_conv.weight[:, 3:].add_(0.5)  # the hint channels: L, x_t (2), then hints (3)
    assert torch.equal(_sample(m, L, 0, steps=3, hints=hints), hinted)
