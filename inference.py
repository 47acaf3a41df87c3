"""Colorize photos with a trained Color Diffusion checkpoint.

    python inference.py --image-path photo.jpg --output photo_color.png

The model predicts ab at its own resolution (short side = the training size); ab is then upsampled to the
input's full size and recombined with the input's own full-resolution L, so no detail is lost.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import load_model
from utils import lab_to_rgb, rgb_to_lab, tensor_to_pil

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "celeba64.pt")
DEFAULT_STEPS = 50


def greyscale_rgb(img: Image.Image) -> tuple[torch.Tensor, Image.Image | None]:
    """Any PIL image -> ((1, 3, H, W) float RGB in [0, 1], alpha channel or None).
    Colour photos keep their RGB here: only their L is used. 16-bit greyscale keeps its precision."""
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = img.getchannel("A")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        rgb = torch.from_numpy(arr).clamp(0, 1)[None, None].expand(1, 3, *arr.shape)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        rgb = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return rgb.contiguous(), alpha


def model_resolution(h, w, image_size, multiple=8):
    """The size the model runs at: short side = image_size (the training scale), aspect kept, each side a
    multiple of `multiple` so every UNet level divides evenly."""
    s = image_size / min(h, w)
    return (max(multiple, round(h * s / multiple) * multiple), max(multiple, round(w * s / multiple) * multiple))


@torch.inference_mode()
def colorize(model, img: Image.Image, steps=DEFAULT_STEPS, eta=0.0, num_samples=1, seed=None,
             dynamic_thresholding=False, callback=None, amp=True):
    """Colorize one image: returns `num_samples` PIL images (RGB, or RGBA if the input had alpha) at the
    input's exact size. steps=None runs the full DDPM loop. callback(i, n, x_t, x0) sees each step."""
    device = next(model.parameters()).device
    rgb, alpha = greyscale_rgb(img)
    H, W = rgb.shape[-2:]
    L_full = rgb_to_lab(rgb)[:, :1]
    h, w = model_resolution(H, W, model.config.image_size, 2 ** (len(model.config.dim_mults) - 1))
    # antialiased resize of the image, then its L: the same path the training data took
    L_small = rgb_to_lab(F.interpolate(rgb, (h, w), mode="bicubic", antialias=True).clamp(0, 1))[:, :1]
    L_small = L_small.to(device).expand(num_samples, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        ab = model.sample(L_small, steps=steps, eta=eta, dynamic_thresholding=dynamic_thresholding,
                          generator=generator, callback=callback)
    outputs = []
    for k in range(num_samples):  # one at a time: a full-size 4000x4000 LAB image is large
        ab_full = F.interpolate(ab[k:k + 1].float().cpu(), (H, W), mode="bilinear", align_corners=False)
        out = tensor_to_pil(lab_to_rgb(torch.cat([L_full, ab_full], dim=1)))
        if alpha is not None:
            out.putalpha(alpha)
        outputs.append(out)
    return outputs
