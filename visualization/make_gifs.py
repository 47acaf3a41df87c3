"""Make the README's GIFs and hint figure from a checkpoint and whole photos of people it never trained on.

    python visualization/make_gifs.py --data ../shared/data/celeba_val

forward_diffusion.gif: one photo's colour channels being noised, t = 0 .. T (L untouched).
denoising.gif:         several photos colorized from colour noise, step by step (the faithful DDPM loop,
                       unguided as the original's: the checkpoint's guidance is chosen for a few steps).
hints.png:             a photo with two clicks on its background, in the true colour there: greyscale with the
                       clicks | without hints | with them | the truth.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.nn.functional as F  # noqa: E402

from PIL import Image, ImageDraw  # noqa: E402

from inference import (TEACHER_CHECKPOINT, colorize, colorize_batch, greyscale_rgb, load_hints,  # noqa
                       model_input, model_size)
from gif import GifRecorder  # noqa: E402
from model import load_model, q_sample  # noqa: E402
from utils import list_images, load_image, rgb_to_lab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder of colour photos of people the model never trained on")
    p.add_argument("--checkpoint", default=TEACHER_CHECKPOINT, help="a model that guides: the GIF runs the "
                   "faithful loop unguided (default: the shipped teacher)")
    p.add_argument("--faces", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hint-photo", default="004150.jpg", help="the photo of hints.png (a red background)")
    args = p.parse_args()

    model = load_model(args.checkpoint)
    c = model.config
    faces = [load_image(os.path.join(args.data, n)).convert("RGB") for n in list_images(args.data)[:args.faces]]

    # forward: the closed form q(x_t | x_0) at evenly spaced t, on the first photo at the model's resolution
    rgb = torch.from_numpy(greyscale_rgb(faces[0])[0].copy())
    small = F.interpolate(rgb, model_size(model, *rgb.shape[-2:]), mode="bicubic", antialias=True)
    lab = torch.from_numpy(rgb_to_lab(small.numpy()))
    L, ab = lab[:, :1], lab[:, 1:] * c.ab_scale
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(ab.shape, generator=g)
    forward = GifRecorder(model, L.numpy(), max_frames=c.timesteps, min_side=128)
    ts = torch.linspace(0, c.timesteps - 1, 40).long()
    for i, t in enumerate(ts):
        forward(i, len(ts), q_sample(ab, t[None], noise, model.alphas_cumprod), None)
    frames = forward.frames
    frames[0].save(os.path.join(HERE, "forward_diffusion.gif"), save_all=True, append_images=frames[1:],
                   loop=0, duration=[1000] + [80] * (len(frames) - 2) + [1000])

    # reverse: greyscale faces -> colour, the full DDPM loop, unguided, all faces in one batch
    greys = [f.convert("L") for f in faces]
    reverse = GifRecorder(model, np.concatenate([model_input(model, f) for f in greys]), max_frames=40, min_side=128)
    outputs = colorize_batch(model, greys, sampler="ddpm", guidance=1.0, guidance_first=0.0, seed=args.seed,
                             callback=reverse, batch_size=len(greys))
    reverse.save(os.path.join(HERE, "denoising.gif"), [o[0] for o in outputs])
    print("wrote visualization/forward_diffusion.gif and visualization/denoising.gif")
    hint_figure(model, load_image(os.path.join(args.data, args.hint_photo)).convert("RGB"), args.seed)
    print("wrote visualization/hints.png")


def hint_figure(model, photo, seed, clicks=((0.08, 0.25), (0.92, 0.2)), radius=4):
    """Clicks at fractions of the photo's size, each a dot in the photo's true colour there."""
    hints = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(hints)
    for fx, fy in clicks:
        x, y = round(fx * photo.width), round(fy * photo.height)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=photo.getpixel((x, y)))
    grey = photo.convert("L")
    plain = colorize(model, grey, seed=seed)[0]
    hinted = colorize(model, grey, seed=seed, hints=load_hints(hints, photo.size))[0]
    shown = Image.alpha_composite(grey.convert("RGBA"), hints).convert("RGB")
    figure = Image.new("RGB", (4 * photo.width, photo.height))
    for k, img in enumerate((shown, plain, hinted, photo)):
        figure.paste(img, (k * photo.width, 0))
    figure.save(os.path.join(HERE, "hints.png"))


if __name__ == "__main__":
    main()
