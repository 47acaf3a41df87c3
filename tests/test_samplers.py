"""The samplers as pure functions (against an oracle denoiser and the true posterior), and sampling with a tiny
model: where it starts, thresholding, reproducibility."""
import math

import pytest
import torch

from model import (ColorDiffusion, cosine_schedule, ddim_sample, ddpm_sample, dpmpp_2m_sample, dynamic_threshold,
                   timesteps)

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


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_trailing_spacing_is_linspace_without_its_t0_step(sampler, steps):
    """A trailing grid of `steps` is the linspace grid of steps + 1 without its last step (t = 0, which only
    removes noise of std sqrt(1 - a_0)): the same UNet passes but one, landing on the clean sample."""
    ac, x0, eps, xT = _trajectory_setup()
    linspace, trailing = timesteps(ac, steps + 1), timesteps(ac, steps, "trailing")
    assert [t for t, _, _ in trailing] == [t for t, _, _ in linspace[:-1]] and trailing[-1][0] > 0
    assert trailing[-1][2] == 1.0 and [a for _, a, _ in trailing[1:]] == [a for _, _, a in trailing[:-1]]
    visited = []

    def denoise(x, t):
        visited.append(t)
        return eps
    out = sampler(denoise, xT.clone(), ac, steps, spacing="trailing")
    assert visited == [t for t, _, _ in trailing] and torch.allclose(out, x0, atol=1e-3)


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


def test_sample_takes_the_configs_spacing_unless_given_one(tiny_config):
    """sample(spacing=...) overrides the config's sample_spacing; a trailing grid never visits t = 0."""
    m = ColorDiffusion(tiny_config).eval()
    L = torch.zeros(1, 1, 16, 16)
    grids = {}
    for config_spacing, spacing in [("linspace", None), ("trailing", None), ("linspace", "trailing")]:
        m.config.sample_spacing, ts = config_spacing, []
        hook = m.unet.register_forward_hook(lambda mod, args, out: ts.append(int(args[1][0])))
        m.sample(L, steps=3, spacing=spacing)
        hook.remove()
        grids[config_spacing, spacing] = ts
    assert grids["linspace", None][-1] == 0 and len(grids["linspace", None]) == 3
    trailing = [t for t, _, _ in timesteps(m.sampling_schedule(), 3, "trailing")]
    assert grids["trailing", None] == grids["linspace", "trailing"] == trailing and 0 not in trailing


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
