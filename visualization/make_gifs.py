"""Make the README's GIFs from a checkpoint and held-out faces (validation split, never trained on).

    python visualization/make_gifs.py --data ../shared/data/celeba

forward_diffusion.gif: one face's colour channels being noised, t = 0 .. T (L untouched).
denoising.gif:         several faces colorized from pure colour noise, step by step (DDPM, all T steps).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import center_crop_resize, image_to_lab, is_validation, list_images  # noqa: E402
from inference import DEFAULT_CHECKPOINT, GifRecorder, colorize_batch, model_input  # noqa: E402
from model import load_model, q_sample  # noqa: E402
from utils import load_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder of colour photos")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--faces", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = load_model(args.checkpoint)
    c = model.config
    names = [n for n in list_images(args.data) if is_validation(n, c.val_percent)][:args.faces]
    faces = [center_crop_resize(load_image(os.path.join(args.data, n)), c.image_size) for n in names]

    # forward: the closed form q(x_t | x_0) at evenly spaced t, on the first face
    lab = torch.from_numpy(image_to_lab(faces[0]))[None]
    L, ab = lab[:, :1], lab[:, 1:] * c.ab_scale
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(ab.shape, generator=g)
    forward = GifRecorder(model, L, max_frames=c.timesteps, min_side=128)
    ts = torch.linspace(0, c.timesteps - 1, 40).long()
    for i, t in enumerate(ts):
        forward(i, len(ts), q_sample(ab, t[None], noise, model.alphas_cumprod), None)
    frames = forward.frames
    frames[0].save(os.path.join(HERE, "forward_diffusion.gif"), save_all=True, append_images=frames[1:],
                   loop=0, duration=[1000] + [80] * (len(frames) - 2) + [1000])

    # reverse: greyscale faces -> colour, the full DDPM loop, all faces in one batch
    greys = [f.convert("L") for f in faces]
    reverse = GifRecorder(model, torch.cat([model_input(model, f) for f in greys]), max_frames=40, min_side=128)
    outputs = colorize_batch(model, greys, steps=None, seed=args.seed, callback=reverse, batch_size=len(greys))
    reverse.save(os.path.join(HERE, "denoising.gif"), [o[0] for o in outputs])
    print("wrote visualization/forward_diffusion.gif and visualization/denoising.gif")


if __name__ == "__main__":
    main()
