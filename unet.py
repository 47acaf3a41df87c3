"""The denoising UNet and the greyscale encoder (adapted from lucidrains' denoising-diffusion-pytorch).

UNet input:  L (1 channel) concatenated with noised ab (2 channels), and the timestep.
UNet output: the predicted ab noise (2 channels).
The encoder is the first half of a UNet run on L alone; its feature map at each level is concatenated
into the UNet's downsampling path at that level. It has no timestep, so it runs once per image.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU; the time embedding (if any) scales and shifts the first."""

    def __init__(self, dim_in, dim_out, time_dim=None, dropout=0.0):
        super().__init__()
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2)) if time_dim else None
        self.conv1, self.norm1 = nn.Conv2d(dim_in, dim_out, 3, padding=1), norm(dim_out)
        self.conv2, self.norm2 = nn.Conv2d(dim_out, dim_out, 3, padding=1), norm(dim_out)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, t_emb=None):
        h = self.norm1(self.conv1(x))
        if self.time is not None:
            scale, shift = self.time(t_emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (scale + 1) + shift
        h = self.dropout(F.silu(h))
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over all pixels (quadratic; used at the lowest resolution only)."""

    def __init__(self, dim, heads=4, dim_head=32, linear=False):
        super().__init__()
        if linear:  # hidden width = channels: at high resolution a fixed 4x32 would dominate the compute
            dim_head = max(dim // heads, 8)
        self.heads, self.linear = heads, linear
        self.norm = norm(dim)
        self.qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (qkv heads d) h w -> qkv b heads d (h w)", qkv=3,
                            heads=self.heads).unbind(0)
        if self.linear:  # linear attention: softmax over features for q, over pixels for k; O(n)
            q, k = q.softmax(dim=-2) * q.shape[-2] ** -0.5, k.softmax(dim=-1)
            context = torch.einsum("bhdn,bhen->bhde", k, v)
            out = torch.einsum("bhde,bhdn->bhen", context, q)
        else:
            out = F.scaled_dot_product_attention(*(rearrange(z, "b heads d n -> b heads n d") for z in (q, k, v)))
            out = rearrange(out, "b heads n d -> b heads d n")
        return x + self.out(rearrange(out, "b heads d (h w) -> b (heads d) h w", h=h, w=w))


def downsample(dim_in, dim_out):
    return nn.Conv2d(dim_in, dim_out, 4, stride=2, padding=1)


def upsample(dim_in, dim_out):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


def level_dims(dim, dim_mults):
    """(in, out) widths per level: a level computes at `in` channels, then resizes to `out` for the next."""
    dims = [dim] + [dim * m for m in dim_mults]
    return list(zip(dims[:-1], dims[1:]))


class Level(nn.Module):
    def __init__(self, dim_in, dim_out, time_dim, dropout, attention, is_last, cond=False):
        super().__init__()
        self.block1 = ResnetBlock(dim_in * (2 if cond else 1), dim_in, time_dim, dropout)
        self.block2 = ResnetBlock(dim_in, dim_in, time_dim, dropout)
        self.attn = Attention(dim_in, linear=True) if attention else nn.Identity()
        self.resize = nn.Conv2d(dim_in, dim_out, 3, padding=1) if is_last else downsample(dim_in, dim_out)


class GreyscaleEncoder(nn.Module):
    """First half of a UNet on L alone: returns one feature map per level, at that level's resolution."""

    def __init__(self, dim=64, dim_mults=(1, 2, 4), dropout=0.0, attention=True):
        super().__init__()
        self.init_conv = nn.Conv2d(1, dim, 7, padding=3)
        dims = level_dims(dim, dim_mults)
        self.levels = nn.ModuleList(
            Level(i, o, None, dropout, attention, is_last=n == len(dims) - 1) for n, (i, o) in enumerate(dims))
        # nothing follows the last level: a resize there would be a parameter with no gradient, which also
        # stalls DistributedDataParallel
        self.levels[-1].resize = nn.Identity()

    def forward(self, L):
        x, feats = self.init_conv(L), []
        for level in self.levels:
            x = level.attn(level.block2(level.block1(x)))
            feats.append(x)
            x = level.resize(x)
        return feats


class UNet(nn.Module):
    def __init__(self, dim=64, dim_mults=(1, 2, 4), dropout=0.0, attention=True, in_channels=3, out_channels=2,
                 guidance_input=False):
        super().__init__()
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self.guidance_mlp = None
        if guidance_input:  # a guidance-distilled student: the scale joins the timestep's embedding (Meng et al.)
            self.guidance_mlp = nn.Sequential(nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
            nn.init.zeros_(self.guidance_mlp[-1].weight)  # starts as the teacher's conditional model
            nn.init.zeros_(self.guidance_mlp[-1].bias)
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)
        dims = level_dims(dim, dim_mults)
        last = len(dims) - 1
        self.downs = nn.ModuleList(
            Level(i, o, time_dim, dropout, attention, is_last=n == last, cond=True) for n, (i, o) in enumerate(dims))
        mid = dims[-1][1]
        self.mid1 = ResnetBlock(mid, mid, time_dim, dropout)
        self.mid_attn = Attention(mid) if attention else nn.Identity()
        self.mid2 = ResnetBlock(mid, mid, time_dim, dropout)
        self.ups = nn.ModuleList()
        for n, (i, o) in reversed(list(enumerate(dims))):
            up = nn.Module()
            up.block1 = ResnetBlock(o + i, o, time_dim, dropout)
            up.block2 = ResnetBlock(o + i, o, time_dim, dropout)
            up.attn = Attention(o, linear=True) if attention else nn.Identity()
            up.resize = upsample(o, i) if n > 0 else nn.Conv2d(o, i, 3, padding=1)
            self.ups.append(up)
        self.final = ResnetBlock(dim * 2, dim, time_dim, dropout)
        self.final_conv = nn.Conv2d(dim, out_channels, 1)
        self.dim = dim

    def forward(self, x, t, cond_feats, w=None):
        """x: (N, 3, H, W) L + noised ab; t: (N,) timesteps; cond_feats: the encoder's list of features;
        w: (N,) guidance scales, for a model with guidance_input."""
        return self.denoise(x, self.embed(t, w), cond_feats)

    def embed(self, t, w=None):
        """The timestep's embedding (and the guidance scale's). Apart from denoise so that a bf16 runtime can
        take it from float32: in bf16, t = 349 is 348 and sin(349 * freq) is noise (colours came out bolder)."""
        t_emb = self.time_mlp(sinusoidal_embedding(t, self.dim))
        if self.guidance_mlp is not None:
            t_emb = t_emb + self.guidance_mlp(sinusoidal_embedding(100 * w, self.dim))  # w = 1.75 as "t" 175
        return t_emb

    def denoise(self, x, t_emb, cond_feats):
        x = self.init_conv(x)
        r, skips = x, []
        for level, feat in zip(self.downs, cond_feats):
            x = level.block1(torch.cat([x, feat], dim=1), t_emb)
            skips.append(x)
            x = level.attn(level.block2(x, t_emb))
            skips.append(x)
            x = level.resize(x)
        x = self.mid2(self.mid_attn(self.mid1(x, t_emb)), t_emb)
        for up in self.ups:
            x = up.block1(torch.cat([x, skips.pop()], dim=1), t_emb)
            x = up.attn(up.block2(torch.cat([x, skips.pop()], dim=1), t_emb))
            x = up.resize(x)
        return self.final_conv(self.final(torch.cat([x, r], dim=1), t_emb))
