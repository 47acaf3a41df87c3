"""Gaussian diffusion on the ab channels, the samplers, EMA, and checkpoints.

The diffusion runs in "model space": ab_n (see utils.py) multiplied by `ab_scale`. Faces have an ab_n
standard deviation near 0.12, far below the unit-variance noise; scaling ab up keeps the colour signal
from drowning in noise at all but the last timesteps. L is never noised.
"""
import math
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from unet import GreyscaleEncoder, UNet
from utils import (SAMPLER_NAMES, SAMPLING_LIMITS, SPACINGS, CheckpointError, folder_weight, guidance_check,
                   interval_check, range_check)


def guidance_scales(alphas_cumprod, guidance, interval, first=None):
    """{t: w}, the timesteps classifier-free guidance applies at and their scales: those whose signal level
    sqrt(a_t) is in `interval`, at `guidance`, except `first` = (t, w), a step with its own scale. Steps at
    scale 1 are left out (they need no unconditional pass). One rule for the sampler and for counting passes."""
    scales = {t: guidance for t, s in enumerate(alphas_cumprod.sqrt().tolist()) if interval[0] <= s <= interval[1]}
    if first is not None and first[0] in scales:
        scales[first[0]] = first[1]
    return {t: w for t, w in scales.items() if w != 1}


def _field(default, help, model=False):
    """A Config field: its help is train.py's --help; `model` fields shape the network (fixed when resuming)."""
    return field(default=default, metadata={"help": help, "model": model})


@dataclass
class Config:
    """Everything about a run; saved in every checkpoint, so a checkpoint alone is enough to sample from it."""
    # the model
    image_size: int = _field(64, "training resolution: the short side of the training crops", True)
    dim: int = _field(32, "UNet base width", True)
    dim_mults: tuple = _field((1, 2, 4, 8), "width multiplier per UNet level", True)
    dropout: float = _field(0.0, "dropout in the residual blocks", True)
    attention: bool = _field(True, "linear attention per level, full attention in the middle", True)
    hints: bool = _field(False, "colour hints as 3 more UNet inputs (ab, mask), trained with simulated clicks; "
                                "with --init, added to a model without (zero-initialised)", True)
    guidance_input: bool = _field(False, "the guidance scale is a UNet input: a student that gives the guided "
                                         "prediction in one pass (trained with --teacher)", True)
    timesteps: int = _field(350, "diffusion steps T", True)
    schedule: str = _field("cosine", "noise schedule: cosine, or linear (the original's)", True)
    ab_scale: float = _field(4.0, "ab/110 is multiplied by this before noising", True)
    # the loss
    min_snr_gamma: float = _field(5.0, "Min-SNR loss weighting min(SNR, gamma) / SNR; 0 = plain MSE")
    snr_floor: float = _field(0.05, "up-weight the noise loss of steps with SNR below this, to f / SNR (at "
                                    "most 20x); 0 = off")
    cond_drop: float = _field(0.15, "share of training images shown without their greyscale (L = 0): the "
                                    "unconditional colours that classifier-free guidance needs")
    # sampling: how this checkpoint samples best, chosen by evaluation (train.py --export sets them); every front
    # end uses these unless told otherwise. Checkpoints older than a field sample as they always did.
    sampler: str = _field("ddim", "ddim, dpm++2m (with eta > 0 its SDE variant) or ddpm (every timestep)")
    sample_steps: int = _field(100, "denoising steps of ddim and dpm++2m (UNet pairs when guided)")
    sample_spacing: str = _field("linspace", "the steps' timesteps: linspace (from the noisiest to t = 0, a step "
                                             "that barely changes the sample) or trailing (Lin et al. 2024: the "
                                             "last step lands on the clean sample from t = T / steps)")
    sample_eta: float = _field(1.0, "fresh noise per step: 0 deterministic, 1 DDPM-like")
    sample_min_signal: float = _field(0.04, "sampling starts at the noisiest t whose sqrt(alphas_cumprod) >= this")
    guidance: float = _field(1.0, "classifier-free guidance scale of sampling; 1 = none (needs cond_drop > 0)")
    guidance_first: float = _field(0.0, "the first step's guidance scale, where the colours are chosen: lower "
                                        "than guidance moves colour from faces to the whole photo, which the "
                                        "later steps colour alike; 0 = guidance")
    guidance_interval: tuple = _field((0.0, 1.0), "guidance applies only at steps whose signal level "
                                                  "sqrt(alphas_cumprod) is in this range, the others run the "
                                                  "conditional model alone (one pass); 0,1 = every step")
    sample_antithetic: bool = _field(False, "the first step's clean guess is the mean of those at the start noise "
                                            "and at its negation (antithetic variates): the colours the model "
                                            "reads into the noise cancel, at two more UNet passes (one pair)")
    sample_size: int = _field(0, "short side in pixels the model samples a photo at; 0 = image_size. Larger than "
                                 "the training size gives a face more pixels, as training's zoomed-in crops did")
    ab_mean: tuple = _field((0.0, 0.0), "mean ab/110 of the training photos (measured): sampling starts there")
    teacher: str = _field("", "guidance distillation (Meng et al. 2023): the checkpoint whose guided prediction "
                              "eps_uncond + w (eps - eps_uncond), w in [1, 3], the student learns; with "
                              "--init from it and --guidance-input true")
    distil_steps: int = _field(0, "with --teacher, also fewer steps (progressive distillation, Salimans & Ho "
                                  "2022): the student samples in this many DDIM steps, each one learning two "
                                  "of the teacher's own deterministic ones (distil_grid); 0 = guidance alone")
    distil_scene_guidance: float = _field(0.0, "with --distil-steps: the teacher's guidance for the targets of "
                                               "--scene-data examples, whose colours a face's bold scale gets "
                                               "wrong more often; the student tells them apart by L alone. "
                                               "0 = the teacher's own, as for portraits")
    distil_scene_guidance_first: float = _field(0.0, "and its first step's scale there; 0 = the teacher's own")
    # data
    data: tuple = _field(("img_align_celeba",), "folders of colour portraits, comma-separated, each FOLDER or "
                                               "FOLDER:WEIGHT (its share of the examples; default 1)")
    scene_data: tuple = _field((), "folders of colour photos that are not portraits (landscapes, streets, "
                                   "rooms), each FOLDER or FOLDER:WEIGHT, mixed with --data: cropped as scenes")
    cache_dir: str = _field("cache", "where the decoded photos are kept")
    val_percent: float = _field(2.0, "held-out percentage of files (by file-name hash): the validation loss")
    crop_area: tuple = _field((0.3, 2.6), "training crops' area in multiples of the photo's, log-uniform: below 1 "
                                          "zoomed in (a face filling the frame), above 1 the photo small in a "
                                          "reflect-padded frame")
    scene_crop_area: tuple = _field((0.35, 1.0), "the scene crops' area in multiples of the photo's, log-uniform, "
                                                 "inside the photo and level")
    # training
    out_dir: str = _field("runs/celeba64", "checkpoints, sample grids, log")
    batch_size: int = _field(32, "global batch size (split across torchrun processes)")
    lr: float = _field(3e-4, "peak AdamW learning rate, for the global batch size")
    warmup_steps: int = _field(200, "linear warm-up steps, then cosine decay to a tenth")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    grad_clip: float = _field(1.0, "gradient norm clipping")
    ema_decay: float = _field(0.999, "EMA decay of the weights used for sampling")
    max_steps: int = _field(20400, "optimizer steps in total")
    log_every: int = _field(50, "steps between log lines")
    eval_every: int = _field(400, "steps between validation loss + sample grid")
    ckpt_every: int = _field(200, "steps between checkpoints")
    num_workers: int = _field(0, "DataLoader worker processes")
    seed: int = _field(0, "seed of everything random: the same seed, the same run")
    device: str = _field("auto", "auto, cpu, cuda")
    amp: str = _field("auto", "bf16 autocast: auto (where fast), on, off")

    def __post_init__(self):
        """Reject what would otherwise fail deep inside training or sampling, with a traceback, or silently."""
        if isinstance(self.data, str):  # checkpoints before scene_data: one folder
            self.data = (self.data,)
        for f in fields(self):  # NaN passes every comparison below unnoticed
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple)
                                                                          else (value,))):
                raise ValueError(f"config: {f.name} must be a finite number, not {value}")
        levels = 2 ** (len(self.dim_mults) - 1)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"),
            (self.dim >= 1 and len(self.dim_mults) >= 1 and min(self.dim_mults) >= 1,
             "dim and dim_mults must be positive"),
            (levels <= self.image_size <= 1024 and self.image_size % levels == 0,
             f"image_size must be a multiple of {levels} (the UNet halves it {len(self.dim_mults) - 1} times), "
             "at most 1024"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.cond_drop < 1, "cond_drop must be in [0, 1)"),
            range_check(self.guidance, "guidance", *SAMPLING_LIMITS["guidance"]),
            range_check(self.guidance_first, "guidance_first", *SAMPLING_LIMITS["guidance_first"]),
            (self.guidance_input or not self.teacher, "a student of --teacher needs --guidance-input true"),
            (self.distil_steps == 0 or (self.teacher and self.distil_steps >= 2),
             "distil_steps needs a --teacher, and at least 2 steps (from 1 there is nothing to halve)"),
            (self.distil_steps or not (self.distil_scene_guidance or self.distil_scene_guidance_first),
             "distil_scene_guidance needs distil_steps"),
            range_check(self.distil_scene_guidance, "distil_scene_guidance", *SAMPLING_LIMITS["guidance"]),
            range_check(self.distil_scene_guidance_first, "distil_scene_guidance_first",
                        *SAMPLING_LIMITS["guidance_first"]),
            guidance_check(self.guidance, self.cond_drop),
            guidance_check(self.guidance_first or 1, self.cond_drop),
            interval_check(self.guidance_interval, "guidance_interval"),
            (self.timesteps >= 2, "timesteps must be at least 2"),
            (self.ab_scale > 0, "ab_scale must be positive"),
            (self.min_snr_gamma >= 0 and self.snr_floor >= 0, "min_snr_gamma and snr_floor must be >= 0"),
            range_check(self.sample_min_signal, "sample_min_signal", *SAMPLING_LIMITS["min_signal"]),
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}"),
            range_check(self.sample_steps, "sample_steps", *SAMPLING_LIMITS["steps"]),
            (self.sample_spacing in SPACINGS, f"sample_spacing must be one of {', '.join(SPACINGS)}, "
                                              f"not {self.sample_spacing!r}"),
            range_check(self.sample_eta, "sample_eta", *SAMPLING_LIMITS["eta"]),
            (self.sample_size == 0 or range_check(self.sample_size, "", *SAMPLING_LIMITS["size"])[0],
             "sample_size must be 0 (the training size) or from {} to {}".format(*SAMPLING_LIMITS["size"])),
            (0 <= self.val_percent < 100, "val_percent must be in [0, 100)"),
            (len(self.crop_area) == 2 and 0 < self.crop_area[0] <= self.crop_area[1],
             "crop_area must be two areas, 0 < smallest <= largest"),
            (len(self.scene_crop_area) == 2 and 0 < self.scene_crop_area[0] <= self.scene_crop_area[1] <= 1,
             "scene_crop_area must be two areas, 0 < smallest <= largest <= 1"),
            (len(self.data) >= 1 and all(0 < folder_weight(f)[1] < math.inf for f in self.data + self.scene_data),
             "data needs a folder, and a folder's weight (FOLDER:WEIGHT) must be a positive number"),
            (self.batch_size >= 1 and self.lr > 0 and self.grad_clip > 0,
             "batch_size, lr and grad_clip must be positive"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (min(self.warmup_steps, self.max_steps, self.num_workers, self.weight_decay) >= 0,
             "warmup_steps, max_steps, num_workers and weight_decay must be >= 0"),
            (min(self.log_every, self.eval_every, self.ckpt_every) >= 1, "log/eval/ckpt_every must be at least 1"),
            (self.amp in ("auto", "on", "off"), f"amp must be auto, on or off, not {self.amp!r}"),
            (self.device in ("auto", "cpu") or self.device.split(":")[0] == "cuda",
             f"device must be auto, cpu or cuda[:N], not {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")

    @classmethod
    def model_fields(cls):
        """The fields that shape the network: a resumed or fine-tuned run cannot change them."""
        return tuple(f.name for f in fields(cls) if f.metadata["model"])

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def to_dict(self):
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# noise schedules: both return alphas_cumprod (T,), float64, on the CPU even when a model is built on the meta
# device (load_model): computed, never loaded

def linear_schedule(T):
    """The original's (denoising-diffusion-pytorch) linear betas, rescaled so any T ends fully noised."""
    scale = 1000 / T
    # clamped as in cosine_schedule: for T <= 20 the last betas reach 1 or more (alphas_cumprod 0 or negative)
    betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64, device="cpu").clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def cosine_schedule(T, s=0.008):
    """Nichol & Dhariwal's cosine schedule."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64, device="cpu")
    ac = torch.cos((x / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - ac[1:] / ac[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, 0)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def q_sample(x0, t, noise, alphas_cumprod):
    """Closed-form forward noising: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = alphas_cumprod[t].float().view(-1, *[1] * (x0.dim() - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---------------------------------------------------------------------------------------------------------
# samplers: pure functions of a denoiser eps = denoise(x_t, t) and the schedule

def predict_x0(x, eps, a):
    """The clean sample that predicted noise eps implies at x = x_t, with a = alphas_cumprod[t] (a float, or a
    tensor that broadcasts)."""
    return (x - (1 - a) ** 0.5 * eps) / a ** 0.5


def dynamic_threshold(x0, percentile=0.995, bound=1.0):
    """Imagen's dynamic thresholding: clamp each sample to its `percentile` of |x0| (at least `bound`)
    and rescale into [-bound, bound], so saturated pixels cannot drag the whole image off the data range."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=bound)
    s = s.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    return x0.clamp(-s, s) * (bound / s)


def timesteps(alphas_cumprod, steps, spacing="linspace"):
    """[(t, a_t, a_next)]: `steps` evenly spaced timesteps from the noisiest, a_next = 1 after the last. linspace
    ends at t = 0, whose step only removes noise of std sqrt(1 - a_0) (0.007 on the cosine schedule); trailing
    leaves that step out of the grid, so that every UNet pass moves the sample."""
    T, n = len(alphas_cumprod), min(steps, len(alphas_cumprod))
    ts = torch.linspace(T - 1, 0, n + (spacing == "trailing"))[:n].round().long().tolist()
    a = [alphas_cumprod[t].item() for t in ts] + [1.0]
    return [(t, a[i], a[i + 1]) for i, t in enumerate(ts)]


def distil_grid(alphas_cumprod, steps, spacing="linspace"):
    """The teacher's grid a student of `steps` steps learns from: twice as fine, every other point of it the
    student's own (timesteps(alphas_cumprod, steps, spacing)). linspace grids both end at t = 0: 2 steps - 1."""
    return timesteps(alphas_cumprod, 2 * steps - (spacing == "linspace"), spacing)


def denoised(denoise, x, t, a_t, threshold):
    """(x0, eps) at x = x_t: the model's clean sample, thresholded if asked, and the noise consistent with it
    (a_t: a float, or a tensor that broadcasts)."""
    eps = denoise(x, t).float()
    x0 = predict_x0(x, eps, a_t)
    if threshold is not None:
        x0 = threshold(x0)
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
    return x0, eps


def antithetic_start(denoise, t_start, centre, a_start):
    """denoise, except that at t_start, where x = x_T = centre + sqrt(1 - a) z, it gives the noise whose x0 is
    the mean of the x0 at x and at its mirror centre - sqrt(1 - a) z. At so little signal the model reads part
    of z's low frequencies as colour (a lavender cheek at one seed, a brown one at the next); that part, odd
    in z, cancels, and what is left is the colour the greyscale itself implies."""
    def wrapped(x, t):
        if t != t_start:
            return denoise(x, t)
        eps = (denoise(x, t).float() + denoise(2 * centre - x, t).float()) / 2
        return eps + (x - centre) / math.sqrt(1 - a_start)
    return wrapped


def randn(shape, generator=None, device=None, dtype=None):
    """Standard normal noise of `shape`. `generator`: None, a torch.Generator, a list of numpy Generators, one
    per row, or a callable shape -> noise (runtime.py's converted sampler, whose noise is an input). With numpy's,
    each row's noise comes from its own generator alone, on any device: a photo's colours at a seed depend
    neither on the other photos of a folder nor on what runs the networks (inference.py draws with numpy)."""
    if callable(generator):
        return generator(shape)
    if isinstance(generator, (list, tuple)):
        rows = [g.standard_normal(shape[1:], dtype=np.float32) for g in generator]
        return torch.from_numpy(np.stack(rows)).to(device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def ddim_sample(denoise, x, alphas_cumprod, steps, eta=0.0, generator=None, threshold=None, callback=None,
                spacing="linspace"):
    """DDIM (Song et al.) from x = x_T over `steps` timesteps (see timesteps for `spacing`). eta=0 is
    deterministic, eta=1 adds DDPM's posterior noise; above 1 more of x_t is fresh noise, up to
    sigma = sqrt(1 - a_prev) (x0 re-noised from scratch), the most for which x_{t-1} keeps the forward
    process's marginals."""
    ts = timesteps(alphas_cumprod, steps, spacing)
    for i, (t, a_t, a_prev) in enumerate(ts):
        x0, eps = denoised(denoise, x, t, a_t, threshold)
        var = min(eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), 1 - a_prev)
        sigma = math.sqrt(var)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def ddpm_sample(denoise, x, alphas_cumprod, steps=None, eta=None, spacing=None, **kwargs):
    """The ancestral DDPM loop over every timestep of the schedule (steps, eta, spacing do not apply). DDIM over every
    timestep with eta=1 is exactly DDPM's posterior q(x_{t-1} | x_t, x0) with variance beta-tilde."""
    return ddim_sample(denoise, x, alphas_cumprod, steps=len(alphas_cumprod), eta=1.0, **kwargs)


def dpmpp_2m_sample(denoise, x, alphas_cumprod, steps, eta=0.0, generator=None, threshold=None, callback=None,
                    spacing="linspace"):
    """DPM-Solver++(2M) (Lu et al. 2022): the second-order multistep solver of the probability-flow ODE in
    log-SNR, on the x0 prediction; with eta > 0 its SDE variant (k-diffusion's sample_dpmpp_2m_sde, midpoint),
    eta = 1 the reverse SDE. Written for x = x_t of the variance-preserving process, alpha = sqrt(a_t),
    sigma = sqrt(1 - a_t); h is the step in lambda = log(alpha / sigma)."""
    ts = timesteps(alphas_cumprod, steps, spacing)
    old_x0, h_last = None, None
    for i, (t, a_t, a_next) in enumerate(ts):
        x0, _ = denoised(denoise, x, t, a_t, threshold)
        if a_next >= 1.0:  # the last step lands on the clean sample
            x = x0
        else:
            lam, lam_next = (0.5 * math.log(a / (1 - a)) for a in (a_t, a_next))
            h = lam_next - lam
            eta_h = eta * h
            # second order from the previous x0, but first order into the last timestep: its step in lambda
            # dwarfs the one before, and the extrapolation would overshoot (measured, 10 steps: 6x the error)
            second = old_x0 is not None and i < len(ts) - 2
            d = x0 + (x0 - old_x0) * h / (2 * h_last) if second else x0
            x = (math.sqrt((1 - a_next) / (1 - a_t)) * math.exp(-eta_h) * x
                 - math.sqrt(a_next) * math.expm1(-h - eta_h) * d)
            if eta > 0:
                noise = randn(x.shape, generator, x.device, x.dtype)
                x = x + math.sqrt(1 - a_next) * math.sqrt(-math.expm1(-2 * eta_h)) * noise
            old_x0, h_last = x0, h
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


SAMPLERS = {"ddim": ddim_sample, "dpm++2m": dpmpp_2m_sample, "ddpm": ddpm_sample}
assert tuple(SAMPLERS) == SAMPLER_NAMES  # utils.py's names, for the command lines that run without this file


# ---------------------------------------------------------------------------------------------------------

def random_hints(ab, p_none=0.5, mean_points=10, max_size=3):
    """Simulated colour hints (Zhang et al. 2017) for normalized ab (N, 2, H, W) -> (N, 3, H, W): the hinted ab
    and a mask. Half the images get none (the model must still colour alone); the others a geometric number of
    points, each a square of 1 to max_size pixels showing the true mean colour of that square."""
    N, _, H, W = ab.shape
    hints = torch.zeros(N, 3, H, W, device=ab.device)
    counts = torch.distributions.Geometric(probs=torch.tensor(1 / mean_points)).sample((N,)).long() + 1
    counts = counts * (torch.rand(N) >= p_none)
    for n, count in enumerate(counts.tolist()):
        sizes = torch.randint(1, max_size + 1, (count,)).tolist()
        ys, xs = (torch.rand(count) * H).long().tolist(), (torch.rand(count) * W).long().tolist()
        for size, y, x in zip(sizes, ys, xs):
            y, x = min(y, H - size), min(x, W - size)
            patch = (slice(y, y + size), slice(x, x + size))
            hints[n, :2][(slice(None), *patch)] = ab[n][(slice(None), *patch)].mean(dim=(1, 2), keepdim=True)
            hints[n, 2][patch] = 1
    return hints


def spread_hints(x0, L, ab, mask, sigma_space=0.2, sigma_l=0.1, prior=0.2):
    """x0 (N, 2, H, W) moved to the hinted colours `ab` where `mask` (N, 1, H, W) is set, and toward them
    around each hint, as far as the greyscale L (N, 1, H, W) says it is the same region: each hint's error is
    spread by a bilateral kernel (distance in units of the longer side, lightness in L's [-1, 1]), as Levin et
    al.'s scribbles spread over similar greys. `prior` keeps pixels far from every hint as the model had them."""
    N, _, H, W = x0.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x0.device), torch.arange(W, device=x0.device), indexing="ij")
    grid = torch.stack([ys.flatten(), xs.flatten()], 1).float() / max(H, W)
    out = x0.clone()
    for n in range(N):
        idx = mask[n, 0].flatten().nonzero()[:, 0]
        if len(idx) == 0:
            continue
        grey = L[n, 0].flatten().float()
        w = torch.exp(-torch.cdist(grid, grid[idx]).pow(2) / (2 * sigma_space ** 2)
                      - (grey[:, None] - grey[idx][None]).pow(2) / (2 * sigma_l ** 2))  # (H W, hints)
        error = (ab[n].flatten(1)[:, idx] - x0[n].flatten(1)[:, idx]).float()  # (2, hints)
        out[n] += ((w @ error.T) / (prior + w.sum(1, keepdim=True))).T.reshape(2, H, W).to(x0.dtype)
    return torch.where(mask, ab, out)


class ColorDiffusion(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        args = dict(dim=config.dim, dim_mults=config.dim_mults, dropout=config.dropout, attention=config.attention)
        self.unet = UNet(**args, in_channels=6 if config.hints else 3, guidance_input=config.guidance_input)
        self.encoder = GreyscaleEncoder(**args)
        self.register_buffer("alphas_cumprod", SCHEDULES[config.schedule](config.timesteps), persistent=False)

    def forward(self, lab, t=None, noise=None, teacher=None, scene=None):
        """Training loss for a batch of normalized LAB images (N, 3, H, W): MSE of the predicted ab noise, or
        with a `teacher` (distillation) of its guided prediction at a random scale w, or, with
        config.distil_steps, of the noise with which one DDIM step lands where two of the teacher's own
        (two_steps_eps) do, at config.distil_scene_guidance for the rows `scene` (bool, N) marks. Random
        timesteps (with distil_steps: a point of the student's grid) and noise unless given.
        `forward` is the loss so that DistributedDataParallel wraps it."""
        c = self.config
        L, ab = lab[:, :1], lab[:, 1:] * c.ab_scale
        if self.training and c.cond_drop > 0 and teacher is None:
            L = L * (torch.rand(len(L), 1, 1, 1, device=L.device) >= c.cond_drop)
        halve = teacher is not None and c.distil_steps > 0
        if halve:  # a random point of the student's grid (every other one of the teacher's), one per batch
            grid = distil_grid(teacher.sampling_schedule(), c.distil_steps, teacher.config.sample_spacing)
            i = 2 * int(torch.randint(0, c.distil_steps, ()))
            t = torch.full((len(lab),), grid[i][0], device=lab.device)
        elif t is None:
            t = torch.randint(0, c.timesteps, (lab.shape[0],), device=lab.device)
        if noise is None:
            noise = torch.randn(ab.shape, device=lab.device)
        x_t = q_sample(ab, t, noise, self.alphas_cumprod)
        inputs = [L, x_t]
        if c.hints:  # hints only in training: the validation loss is that of colouring alone
            inputs.append(random_hints(lab[:, 1:]) if self.training else torch.zeros_like(lab))
        w = None
        if c.guidance_input:  # w = 1 without a teacher (the conditional prediction), a random scale in [1, 3] to
            # distil guidance, and with fewer steps the teacher's own: the scale the student samples at
            w = (torch.ones(len(L)) if teacher is None else torch.full((len(L),), teacher.config.guidance) if halve
                 else 1 + 2 * torch.rand(len(L))).to(L.device)
        inputs = torch.cat(inputs, dim=1)
        pred = self.unet(inputs, t, self.encoder(L), w)
        if teacher is None:
            target = noise
        elif halve:  # each row's target once, the scene rows' at their own scale if they have one
            apart = scene is not None and bool(c.distil_scene_guidance or c.distil_scene_guidance_first)
            rows = scene if apart else torch.zeros(len(lab), dtype=torch.bool, device=lab.device)
            target = torch.empty_like(noise)
            for kind, scales in ((~rows, ()), (rows, (c.distil_scene_guidance or None,
                                                      c.distil_scene_guidance_first or None))):
                if kind.any():
                    target[kind] = teacher.two_steps_eps(inputs[kind], grid, i, *scales)
        else:
            target = teacher.guided_eps(inputs, t, w)
        loss = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        a = self.alphas_cumprod[t].float()
        snr = a / (1 - a)
        if self.config.min_snr_gamma > 0:
            # Min-SNR (Hang et al. 2023): the nearly unpredictable noise of low-t steps would otherwise
            # dominate the gradient, at the expense of the noisier steps where the colours are decided
            loss = loss * snr.clamp(max=self.config.min_snr_gamma) / snr
        if self.config.snr_floor > 0:
            # An x0 error there moves the noise only sqrt(SNR) as much, so the plain noise loss barely sees
            # it: measured, the x0 such a model implies at signal 0.05 is worse than the mean colour. At those
            # steps sampling decides each picture's overall colours.
            # The cap of 20: the network's own imprecision in the noise is multiplied by the weight too (a cap
            # of 125 measured no better; docs/experiments.md).
            loss = loss * (self.config.snr_floor / snr).clamp(1, 20)
        return loss.mean()

    loss = forward

    @torch.no_grad()
    def guided_eps(self, inputs, t, w):
        """Classifier-free guided eps for a batch of UNet inputs (L, x_t, [hints]) with a scale per image."""
        inputs = torch.cat([inputs, torch.cat([torch.zeros_like(inputs[:, :1]), inputs[:, 1:]], 1)])
        cond, uncond = self.unet(inputs, torch.cat([t, t]), self.encoder(inputs[:, :1])).float().chunk(2)
        return uncond + w.view(-1, 1, 1, 1) * (cond - uncond)

    @torch.no_grad()
    def two_steps_eps(self, inputs, grid, i, guidance=None, guidance_first=None):
        """Progressive distillation's target (Salimans & Ho 2022): from UNet inputs (L, x_t, [hints]) at point i
        of a grid of this model's sampling_schedule() (distil_grid), two deterministic DDIM steps of its own
        sampling (sampling_denoiser: its guidance scales, unless given, the first step's own, its antithetic
        start; one step, into the clean sample, from the grid's last point), and the eps with which a single
        DDIM step from x_t lands there."""
        s, L, x_t = self.config.ab_scale, inputs[:, :1], inputs[:, 1:3].float()
        denoise, _ = self.sampling_denoiser(L, self.sampling_schedule(), guidance, guidance_first=guidance_first)
        x = x_t
        for t, a, a_next in grid[i:i + 2]:
            x0, eps = denoised(denoise, x, t, a, lambda x0: x0.clamp(-s, s))
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        a = grid[i][1]
        r = math.sqrt((1 - a_next) / (1 - a))  # one DDIM step lands at sqrt(a_next) x0 + r (x_t - sqrt(a) x0)
        x0 = (x - r * x_t) / (math.sqrt(a_next) - r * math.sqrt(a))
        return (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)

    def denoiser(self, L, guidance=1.0, runtime=None, interval=(0.0, 1.0), first=None):
        """eps = denoise(x_t, t) for fixed greyscale L: the encoder runs here once, not at every step.
        guidance w != 1 is classifier-free guidance (Ho & Salimans 2022): eps_uncond + w (eps - eps_uncond),
        the unconditional eps from cond_drop's null condition L = 0, both in one batch; a guidance-distilled
        student (config.guidance_input) takes w as an input and runs once. Guidance applies only at the steps
        whose signal level sqrt(a_t) is in `interval` (Kynkaanniemi et al. 2024); the others run the conditional
        half alone. `first` = (t, w): the step at t guides at w instead (see guidance_scales). A model trained
        with hint inputs gets zeros there: sample() pins and spreads the hints itself, as at a few steps the
        trained inputs pull the rest of a hinted region away from its hint (a red wall clicked twice came out
        green; spreading alone is 0.06-0.19 dB better at 2-10 hints, docs/experiments.md section 20).
        `runtime`: what runs the encoder and the UNet (runtime.py; default: this model, PyTorch)."""
        scales = guidance_scales(self.alphas_cumprod, guidance, interval, first)  # once: no device sync per step
        for w in {guidance, *scales.values()}:
            ok, message = guidance_check(w, self.config.cond_drop)
            if not ok:
                raise ValueError(message)
        runtime = self if runtime is None else runtime
        student, n = self.config.guidance_input, L.shape[0]
        paired = bool(scales) and not student  # a student gives the guided eps in one pass
        if paired:
            L = torch.cat([L, torch.zeros_like(L)])
        feats = runtime.encoder(L)
        extra = [torch.zeros(L.shape[0], 3, *L.shape[2:], device=L.device, dtype=L.dtype)] if self.config.hints \
            else []

        def denoise(x, t):
            w = scales.get(t, 1.0)
            k = 2 * n if w != 1 and paired else n  # rows of L, feats and hint inputs this step uses
            x = torch.cat([x, x]) if k > n else x
            eps = runtime.unet(torch.cat([L[:k], x.to(L.dtype), *(e[:k] for e in extra)], dim=1),
                               torch.full((k,), t, device=x.device, dtype=torch.long), [f[:k] for f in feats],
                               torch.full((n,), float(w), device=x.device) if student else None)
            if k > n:
                cond, uncond = eps.float().chunk(2)
                eps = uncond + w * (cond - uncond)
            return eps
        return denoise

    def sampling_denoiser(self, L, ac, guidance=None, guidance_interval=None, guidance_first=None,
                          antithetic=None, runtime=None):
        """(denoise, centre) of sampling from the last timestep of `ac` (sampling_schedule): the denoiser with
        its guidance (`guidance_first` at that first step; 0: `guidance` there too) and, if asked, the
        antithetic start; and x_T's mean. What is not given is the config's. sample() runs it, and a student's
        targets (two_steps_eps) are its steps."""
        c, a = self.config, ac[-1].item()
        guidance = c.guidance if guidance is None else guidance
        first = c.guidance_first if guidance_first is None else guidance_first
        denoise = self.denoiser(L, guidance, runtime,
                                c.guidance_interval if guidance_interval is None else guidance_interval,
                                first=(len(ac) - 1, first or guidance))
        # x_t at the start: sqrt(a) x0 + sqrt(1 - a) noise, with x0 taken as the data's mean colour. The mean
        # colour of x_t is measurable from thousands of pixels, so zero-mean noise would tell the model the
        # picture is on average grey, and it would colour it so (measured: 3 dB PSNR lost, a cold cast).
        centre = math.sqrt(a) * torch.tensor(c.ab_mean, device=L.device).view(1, 2, 1, 1) * c.ab_scale
        if c.sample_antithetic if antithetic is None else antithetic:
            denoise = antithetic_start(denoise, len(ac) - 1, centre, a)
        return denoise, centre

    def sampling_schedule(self, min_signal=None):
        """alphas_cumprod up to the timestep sampling starts from (by default, config.sample_min_signal's).
        Near t = T the x0 implied by predicted noise is the noise's error amplified 1/sqrt(a_t) times (7000x
        at the cosine schedule's last step): those steps only inject saturated colour. So sampling starts,
        from pure noise, at the noisiest t whose signal level sqrt(a_t) is still sample_min_signal; pure noise
        differs from the true x_t there by at most that fraction of the (small) colour signal."""
        min_signal = self.config.sample_min_signal if min_signal is None else min_signal
        # at least one step, however close to 1 min_signal is
        return self.alphas_cumprod[: max(1, int((self.alphas_cumprod.sqrt() >= min_signal).sum()))]

    @torch.no_grad()
    def sample(self, L, sampler=None, steps=None, eta=None, dynamic_thresholding=False, min_signal=None,
               guidance=None, guidance_interval=None, guidance_first=None, antithetic=None, spacing=None,
               hints=None, generator=None, callback=None, runtime=None):
        """L: (N, 1, H, W) in [-1, 1] -> ab_n (N, 2, H, W). `sampler` (see SAMPLERS), `steps`, `eta`, `min_signal`
        (where sampling starts, see sampling_schedule), `guidance`, `guidance_interval`, `guidance_first` (0: the
        first step guides at `guidance` too), `antithetic` (see antithetic_start) and `spacing` (see timesteps)
        default to the config's;
        `hints` (N, 3, H, W): hinted ab and mask, pinned and spread at every step (spread_hints); `runtime`: see
        `denoiser`; `generator`: one, or one per row (see randn). x0 is clipped to the data range at every step,
        or dynamically thresholded.
        `callback(i, n, x_t, x0)` sees model-space tensors."""
        c, s = self.config, self.config.ab_scale
        sampler = SAMPLERS[c.sampler if sampler is None else sampler]
        steps, eta = c.sample_steps if steps is None else steps, c.sample_eta if eta is None else eta
        ac = self.sampling_schedule(min_signal)
        denoise, centre = self.sampling_denoiser(L, ac, guidance, guidance_interval, guidance_first, antithetic,
                                                 runtime)
        x = centre + math.sqrt(1 - ac[-1].item()) * randn((L.shape[0], 2, *L.shape[2:]), generator, L.device)
        # x0 is also kept in the data range (|ab_n| <= 1), or dynamically thresholded
        def threshold(x0):
            x0 = dynamic_threshold(x0, bound=s) if dynamic_thresholding else x0.clamp(-s, s)
            # the hinted colours are known: every step's x0 takes them, and the regions around them follow
            # (10 clicks: +3 dB PSNR, against +0.2 dB from the trained hint inputs alone; docs/experiments.md)
            if hints is not None:
                x0 = spread_hints(x0, L, hints[:, :2].to(x0.dtype) * s, hints[:, 2:] > 0)
            return x0
        x = sampler(denoise, x, ac, steps, eta=eta, generator=generator, callback=callback, threshold=threshold,
                    spacing=c.sample_spacing if spacing is None else spacing)
        return x / s


@torch.no_grad()
def ema_update(ema, model, decay):
    ema_p, p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, p, 1 - decay)


# ---------------------------------------------------------------------------------------------------------
# checkpoints: one file, plain tensors and Python values only, so loading never unpickles code

def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ({"ema", "model"} & ckpt.keys()):
        raise CheckpointError(f"{path}: not a Color Diffusion checkpoint")
    return ckpt


def load_model(path, device="cpu", use_ema=True):
    """A ready-to-sample model (eval mode, float32) from any checkpoint: training or shipped."""
    ckpt = load_checkpoint(path)
    try:
        config = Config.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.device("meta"):  # no random initialisation (a tenth of a second): every weight is loaded
        model = ColorDiffusion(config)
    weights = ckpt["ema"] if use_ema and "ema" in ckpt else ckpt.get("model", ckpt.get("ema"))
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    except (RuntimeError, AttributeError, TypeError) as e:  # keys or shapes that do not match its own config
        raise CheckpointError(f"{path}: weights do not fit the model ({type(e).__name__})") from None
    return model.to(device, memory_format=torch.channels_last).eval()


SAMPLING_FIELDS = ("sampler", "sample_steps", "sample_spacing", "sample_eta", "sample_min_signal", "guidance",
                   "guidance_first", "guidance_interval", "sample_antithetic", "sample_size", "ab_mean")


def export_inference_checkpoint(src, dst, **sampling):
    """Keep only what inference needs: the EMA weights in fp16 and the config. Sampling settings given (of
    SAMPLING_FIELDS) replace the run's: how a checkpoint samples best is chosen by evaluation."""
    ckpt = load_checkpoint(src)
    weights = ckpt.get("ema", ckpt.get("model"))
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"an export can set only the sampling settings ({', '.join(SAMPLING_FIELDS)}), "
                         f"not {', '.join(sorted(unknown))}")
    config = Config.from_dict({**ckpt["config"], **sampling}).to_dict()  # validated before it is written
    save_checkpoint(dst, {"config": config, "ema": {k: v.half() for k, v in weights.items()},
                          "step": ckpt.get("step", 0)})
