"""Gaussian diffusion on the ab channels, the samplers, EMA, and checkpoints.

The diffusion runs in "model space": ab_n (see utils.py) multiplied by `ab_scale`. Faces have an ab_n
standard deviation near 0.12, far below the unit-variance noise; scaling ab up keeps the colour signal
from drowning in noise at all but the last timesteps. L is never noised.
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from unet import GreyscaleEncoder, UNet


def min_signal_check(value, name):
    """(ok, message) for where sampling starts: a signal level sqrt(a_t) in [0, 1). One check for the config
    and for the command lines that override it."""
    return 0 <= value < 1, f"{name} must be in [0, 1): 0 starts from pure noise at t = T"


def guidance_check(guidance, cond_drop):
    """(ok, message): guidance other than 1 needs the unconditional colours that only cond_drop > 0 trains.
    One check for the config and for a guidance given at sampling time."""
    return guidance == 1 or cond_drop > 0, "guidance other than 1 needs a model trained with cond_drop > 0"


@dataclass
class Config:
    # model (all that inference needs: saved in every checkpoint)
    image_size: int = 64
    dim: int = 32
    dim_mults: tuple = (1, 2, 4, 8)
    dropout: float = 0.0
    attention: bool = True
    timesteps: int = 350
    schedule: str = "cosine"      # "cosine" or "linear" (the original's)
    ab_scale: float = 4.0         # ab_n is multiplied by this before noising
    min_snr_gamma: float = 5.0    # Min-SNR loss weighting min(SNR, gamma) / SNR; 0 = plain MSE
    snr_floor: float = 0.05       # and weight f / SNR where SNR < f, the noisiest steps; 0 = off
    snr_floor_cap: float = 20.0   # at most this weight: 20 keeps the floor's x0 weight down to signal ~0.05
    cond_drop: float = 0.15       # fraction of training images shown without their greyscale (L = 0), so the
                                  # same network also learns the unconditional colours that guidance needs
    sample_min_signal: float = 0.04  # sampling starts at the noisiest t whose sqrt(alphas_cumprod) >= this
    guidance: float = 1.0         # classifier-free guidance scale for sampling; 1 = none (needs cond_drop > 0)
    ab_mean: tuple = (0.0, 0.0)   # mean ab_n of the training images (train.py measures it): sampling starts there
    # data
    data: str = "img_align_celeba"
    cache_dir: str = "cache"
    val_percent: float = 2.0      # files whose name hashes below this percentage are validation, never trained on
    # training
    out_dir: str = "runs/celeba64"
    batch_size: int = 32          # global: split across processes under torchrun
    lr: float = 3e-4              # for the global batch size
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 20400
    log_every: int = 50
    eval_every: int = 400         # validation loss + sample grid
    ckpt_every: int = 200
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"          # auto, cpu, cuda
    amp: str = "auto"             # bf16 autocast: auto (on), on, off

    def __post_init__(self):
        """Reject what would otherwise fail deep inside training or sampling, with a traceback, or silently."""
        levels = 2 ** (len(self.dim_mults) - 1)
        checks = [
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"),
            (self.dim >= 1 and len(self.dim_mults) >= 1 and min(self.dim_mults) >= 1,
             "dim and dim_mults must be positive"),
            (self.image_size >= levels and self.image_size % levels == 0,
             f"image_size must be a multiple of {levels} (the UNet halves it {len(self.dim_mults) - 1} times)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.cond_drop < 1, "cond_drop must be in [0, 1)"),
            (self.guidance >= 0, "guidance must be >= 0"),
            guidance_check(self.guidance, self.cond_drop),
            (self.timesteps >= 2, "timesteps must be at least 2"),
            (self.ab_scale > 0, "ab_scale must be positive"),
            (self.min_snr_gamma >= 0 and self.snr_floor >= 0 and self.snr_floor_cap >= 1,
             "min_snr_gamma and snr_floor must be >= 0, snr_floor_cap >= 1"),
            min_signal_check(self.sample_min_signal, "sample_min_signal"),
            (0 <= self.val_percent < 100, "val_percent must be in [0, 100)"),
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
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def to_dict(self):
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# noise schedules: both return alphas_cumprod (T,), float64

def linear_schedule(T):
    """The original's (denoising-diffusion-pytorch) linear betas, rescaled so any T ends fully noised."""
    scale = 1000 / T
    # clamped as in cosine_schedule: for T <= 20 the last betas reach 1 or more (alphas_cumprod 0 or negative)
    betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def cosine_schedule(T, s=0.008):
    """Nichol & Dhariwal's cosine schedule."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
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
    """The clean sample that predicted noise eps implies at x = x_t, with a = alphas_cumprod[t] (a float)."""
    return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)


def dynamic_threshold(x0, percentile=0.995, bound=1.0):
    """Imagen's dynamic thresholding: clamp each sample to its `percentile` of |x0| (at least `bound`)
    and rescale into [-bound, bound], so saturated pixels cannot drag the whole image off the data range."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=bound)
    s = s.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    return x0.clamp(-s, s) * (bound / s)


def ddim_sample(denoise, x, alphas_cumprod, steps, eta=0.0, generator=None, threshold=None, callback=None):
    """DDIM (Song et al.) from x = x_T over `steps` evenly spaced timesteps. eta=0 is deterministic, eta=1
    adds DDPM's posterior noise; above 1 more of x_t is fresh noise, up to sigma = sqrt(1 - a_prev) (x0 re-noised
    from scratch), the most for which x_{t-1} keeps the forward process's marginals."""
    T = len(alphas_cumprod)
    ts = torch.linspace(T - 1, 0, min(steps, T)).round().long().tolist()
    for i, t in enumerate(ts):
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = denoise(x, t).float()
        x0 = predict_x0(x, eps, a_t)
        if threshold is not None:
            x0 = threshold(x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        var = min(eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), 1 - a_prev)
        sigma = math.sqrt(var)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def ddpm_sample(denoise, x, alphas_cumprod, **kwargs):
    """The ancestral DDPM loop over every timestep of the schedule. DDIM over every timestep with eta=1 is
    exactly DDPM's posterior q(x_{t-1} | x_t, x0) with variance beta-tilde, so one loop serves both."""
    return ddim_sample(denoise, x, alphas_cumprod, steps=len(alphas_cumprod), eta=1.0, **kwargs)


# ---------------------------------------------------------------------------------------------------------

class ColorDiffusion(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        args = dict(dim=config.dim, dim_mults=config.dim_mults, dropout=config.dropout, attention=config.attention)
        self.unet = UNet(**args)
        self.encoder = GreyscaleEncoder(**args)
        self.register_buffer("alphas_cumprod", SCHEDULES[config.schedule](config.timesteps), persistent=False)

    def forward(self, lab, t=None, noise=None):
        """Training loss for a batch of normalized LAB images (N, 3, H, W): MSE of the predicted ab noise.
        Random timesteps and noise unless given. `forward` is the loss so that DistributedDataParallel wraps it."""
        L, ab = lab[:, :1], lab[:, 1:] * self.config.ab_scale
        if self.training and self.config.cond_drop > 0:
            L = L * (torch.rand(len(L), 1, 1, 1, device=L.device) >= self.config.cond_drop)
        if t is None:
            t = torch.randint(0, self.config.timesteps, (lab.shape[0],), device=lab.device)
        if noise is None:
            noise = torch.randn(ab.shape, device=lab.device)
        x_t = q_sample(ab, t, noise, self.alphas_cumprod)
        pred = self.unet(torch.cat([L, x_t], dim=1), t, self.encoder(L))
        loss = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
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
            # The cap: the network's own imprecision in the noise is multiplied by the weight too.
            f = self.config.snr_floor
            loss = loss * (f / snr).clamp(1, self.config.snr_floor_cap)
        return loss.mean()

    loss = forward

    def denoiser(self, L, guidance=1.0):
        """eps = denoise(x_t, t) for fixed greyscale L: the encoder runs here once, not at every step.
        guidance w != 1 is classifier-free guidance (Ho & Salimans 2022): eps_uncond + w (eps - eps_uncond),
        the unconditional eps from cond_drop's null condition L = 0, both in one batch."""
        ok, message = guidance_check(guidance, self.config.cond_drop)
        if not ok:
            raise ValueError(message)
        guided = guidance != 1
        if guided:
            L = torch.cat([L, torch.zeros_like(L)])
        feats = self.encoder(L)

        def denoise(x, t):
            x = torch.cat([x, x]) if guided else x
            t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = self.unet(torch.cat([L, x.to(L.dtype)], dim=1), t, feats)
            if guided:
                cond, uncond = eps.float().chunk(2)
                eps = uncond + guidance * (cond - uncond)
            return eps
        return denoise

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
    def sample(self, L, steps=None, eta=0.0, dynamic_thresholding=False, min_signal=None, guidance=None,
               generator=None, callback=None):
        """L: (N, 1, H, W) in [-1, 1] -> ab_n (N, 2, H, W). steps=None runs the full DDPM loop (every
        timestep from the start, see below: `min_signal`, by default the config's, sets where); otherwise
        DDIM with `steps` steps and `eta`. x0 is clipped to the data range at every step, or dynamically
        thresholded. `guidance`: see `denoiser`, by default the config's. `callback(i, n, x_t, x0)` sees
        model-space tensors."""
        s = self.config.ab_scale
        denoise = self.denoiser(L, self.config.guidance if guidance is None else guidance)
        ac = self.sampling_schedule(min_signal)
        # x_t at the start: sqrt(a) x0 + sqrt(1 - a) noise, with x0 taken as the data's mean colour. The mean
        # colour of x_t is measurable from thousands of pixels, so zero-mean noise would tell the model the
        # picture is on average grey, and it would colour it so (measured: 3 dB PSNR lost, a cold cast).
        a = ac[-1].item()
        mean = torch.tensor(self.config.ab_mean, device=L.device).view(1, 2, 1, 1) * s
        x = math.sqrt(a) * mean + math.sqrt(1 - a) * torch.randn(
            (L.shape[0], 2, *L.shape[2:]), generator=generator, device=L.device)
        # x0 is also kept in the data range (|ab_n| <= 1), or dynamically thresholded
        def threshold(x0):
            return dynamic_threshold(x0, bound=s) if dynamic_thresholding else x0.clamp(-s, s)
        kwargs = dict(generator=generator, callback=callback, threshold=threshold)
        if steps is None:
            x = ddpm_sample(denoise, x, ac, **kwargs)
        else:
            x = ddim_sample(denoise, x, ac, steps, eta=eta, **kwargs)
        return x / s


@torch.no_grad()
def ema_update(ema, model, decay):
    ema_p, p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, p, 1 - decay)


# ---------------------------------------------------------------------------------------------------------
# checkpoints: one file, plain tensors and Python values only, so loading never unpickles code

class CheckpointError(Exception):
    pass


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
    model = ColorDiffusion(config)
    weights = ckpt["ema"] if use_ema and "ema" in ckpt else ckpt.get("model", ckpt.get("ema"))
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.to(device, memory_format=torch.channels_last).eval()


def export_inference_checkpoint(src, dst, sample_min_signal=None, guidance=None):
    """Keep only what inference needs: the EMA weights in fp16 and the config. The sampling defaults, if given,
    replace the run's: where sampling starts and how strongly it is guided are best chosen by evaluation."""
    ckpt = load_checkpoint(src)
    weights = ckpt.get("ema", ckpt.get("model"))
    sampling = {"sample_min_signal": sample_min_signal, "guidance": guidance}
    config = {**ckpt["config"], **{k: v for k, v in sampling.items() if v is not None}}
    config = Config.from_dict(config).to_dict()  # validated before it is written
    save_checkpoint(dst, {"config": config, "ema": {k: v.half() for k, v in weights.items()},
                          "step": ckpt.get("step", 0)})
