"""Evaluate colorization on held-out colour photos: colorize each from its greyscale, compare with the truth.

    python evaluate.py --data ../shared/data/celeba --num-images 64

Metrics (mean over images), for our outputs and for the greyscale baseline (the input itself):
  PSNR      on RGB, higher is better
  dE00      mean CIEDE2000 colour difference per pixel (scikit-image), lower is better
  CF        Hasler-Suesstrunk colourfulness M3 = sigma_rgyb + 0.3 mu_rgyb; dCF = |CF(outputs) - CF(truth)|,
            and its two terms for outputs and truth (a gap in sigma: timid; in mu: a colour cast or greyness)
Writes <out>/eval.md (a markdown table) and <out>/grid.png (rows: greyscale | ours | truth). eval.md also
gives the colour error of the model's x0 at several noise levels (x0_errors), which shows where sampling
can start (Config.sample_min_signal).
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab
from tqdm import tqdm

from dataset import center_crop_resize, is_validation, list_images
from inference import DEFAULT_CHECKPOINT, DEFAULT_ETA, DEFAULT_STEPS, colorize_batch
from model import CheckpointError, load_model, min_signal_check, predict_x0, q_sample
from utils import ImageError, bf16_is_fast, lab_to_rgb, load_image, pick_device, rgb_to_lab, tensor_to_pil


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def colourfulness_parts(rgb):
    """Hasler & Suesstrunk's two terms on 0-255 RGB: the spread of the colours within the picture
    (sigma_rgyb) and the chroma of its mean colour (mu_rgyb). They tell a timid picture from a cast."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.hypot(rg.std(), yb.std()), np.hypot(rg.mean(), yb.mean())


def colourfulness(rgb):
    """Hasler & Suesstrunk (2003), M3 = sigma_rgyb + 0.3 mu_rgyb."""
    spread, chroma = colourfulness_parts(rgb)
    return spread + 0.3 * chroma


def delta_e(a, b):
    return float(deltaE_ciede2000(rgb2lab(a / 255.0), rgb2lab(b / 255.0)).mean())


def greyscale(truth):
    """The truth's own LAB lightness with no colour: the input, and the greyscale baseline."""
    lab = rgb_to_lab(torch.tensor(truth).permute(2, 0, 1)[None] / 255.0)
    lab[:, 1:] = 0
    grey = lab_to_rgb(lab).mean(dim=1, keepdim=True)  # exactly neutral: float error leaves +-1 level otherwise
    return np.asarray(tensor_to_pil(grey.expand(-1, 3, -1, -1)))


def evaluate(model, truths, batch_size=16, seed=0, **sample_kwargs):
    """truths: list of RGB uint8 arrays. Returns (metrics dict, list of output arrays)."""
    rows = {k: [] for k in ("psnr", "de", "cf", "psnr_grey", "de_grey", "cf_grey", "cf_truth",
                            "spread", "chroma", "spread_truth", "chroma_truth")}
    greys = [greyscale(t) for t in truths]
    outputs = []
    for start in tqdm(range(0, len(truths), batch_size), desc="colorizing", leave=False):
        batch = [Image.fromarray(g) for g in greys[start:start + batch_size]]
        results = colorize_batch(model, batch, seed=seed + start, batch_size=batch_size, **sample_kwargs)
        outputs += [np.asarray(r[0]) for r in results]
    for truth, grey, out in zip(truths, greys, outputs):
        rows["psnr"].append(psnr(out, truth))
        rows["de"].append(delta_e(out, truth))
        rows["cf"].append(colourfulness(out))
        rows["psnr_grey"].append(psnr(grey, truth))
        rows["de_grey"].append(delta_e(grey, truth))
        rows["cf_grey"].append(colourfulness(grey))
        rows["cf_truth"].append(colourfulness(truth))
        for key, img in (("", out), ("_truth", truth)):
            spread, chroma = colourfulness_parts(img)
            rows["spread" + key].append(spread)
            rows["chroma" + key].append(chroma)
    m = {k: float(np.mean(v)) for k, v in rows.items()}
    m["dcf"] = abs(m["cf"] - m["cf_truth"])
    return m, outputs


@torch.no_grad()
def x0_errors(model, truths, levels=(0.02, 0.05, 0.1, 0.2, 0.4), seed=0, batch_size=64):
    """At each signal level sqrt(a_t): the mean squared error (in ab/110 units) of the colours the model
    implies from one noised x_t of each truth, next to that of always answering the training data's mean
    colour. Where the model is no better than that constant, sampling gains nothing by starting there."""
    device = next(model.parameters()).device
    c = model.config
    g = torch.Generator(device).manual_seed(seed)
    mean = torch.tensor(c.ab_mean, device=device).view(1, 2, 1, 1)
    ac = model.alphas_cumprod
    errors, mean_error = {s: 0.0 for s in levels}, 0.0
    for start in range(0, len(truths), batch_size):
        rgb = torch.tensor(np.stack(truths[start:start + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        lab = rgb_to_lab(rgb).to(device)
        L, ab = lab[:, :1], lab[:, 1:]
        mean_error += (mean - ab).pow(2).sum().item()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_is_fast(device)):
            denoise = model.denoiser(L)
            for s in levels:
                t = len(model.sampling_schedule(s)) - 1  # where sampling would start for this level
                a = ac[t].item()
                noise = torch.randn(ab.shape, generator=g, device=device)
                x = q_sample(ab * c.ab_scale, torch.full((len(ab),), t, device=device), noise, ac)
                x0 = predict_x0(x, denoise(x, t).float(), a)
                x0 = x0.clamp(-c.ab_scale, c.ab_scale) / c.ab_scale  # clipped, as the samplers do
                errors[s] += (x0 - ab).pow(2).sum().item()
    n = len(truths) * truths[0].shape[0] * truths[0].shape[1] * 2
    return [(s, error / n, mean_error / n) for s, error in errors.items()]


def markdown(m, label):
    return "\n".join([
        "| | PSNR (dB) ↑ | CIEDE2000 ↓ | colourfulness | dCF ↓ |",
        "|---|---|---|---|---|",
        f"| greyscale baseline | {m['psnr_grey']:.2f} | {m['de_grey']:.2f} | {m['cf_grey']:.1f} | "
        f"{abs(m['cf_grey'] - m['cf_truth']):.1f} |",
        f"| {label} | {m['psnr']:.2f} | {m['de']:.2f} | {m['cf']:.1f} | {m['dcf']:.1f} |",
        f"| ground truth | ∞ | 0 | {m['cf_truth']:.1f} | 0 |",
    ])


def grid(truths, outputs, n=8):
    rows = [np.concatenate([greyscale(t) for t in truths[:n]], 1),
            np.concatenate(outputs[:n], 1), np.concatenate(truths[:n], 1)]
    return Image.fromarray(np.concatenate(rows, 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", required=True, help="folder of colour photos (CelebA layout)")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="val: only files of the checkpoint's held-out split (never trained on)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N images: tune sampler settings on other images than those reported")
    p.add_argument("--size", type=int, default=None, help="evaluation resolution (default: the model's)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps")
    p.add_argument("--ddpm", action="store_true", help="the full DDPM loop instead of DDIM")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="DDIM eta")
    p.add_argument("--dynamic-threshold", action="store_true")
    p.add_argument("--min-signal", type=float, help="where sampling starts (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="eval")
    args = p.parse_args(argv)
    if args.guidance is not None and args.guidance < 0:
        p.error("--guidance must be >= 0")
    if args.min_signal is not None:
        ok, message = min_signal_check(args.min_signal, "--min-signal")
        if not ok:
            p.error(message)

    model = load_model(args.checkpoint, pick_device(args.device))
    c = model.config
    names = list_images(args.data)
    if args.split == "val":
        names = [n for n in names if is_validation(n, c.val_percent)]
    truths = []
    for name in names[args.skip:]:
        if len(truths) == args.num_images:
            break
        try:
            img = load_image(os.path.join(args.data, name))
        except ImageError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            continue
        truths.append(np.asarray(center_crop_resize(img, args.size or c.image_size)))
    if not truths:
        raise ValueError(f"{args.data}: no images to evaluate")

    steps = None if args.ddpm else args.steps
    start = c.sample_min_signal if args.min_signal is None else args.min_signal
    guidance = c.guidance if args.guidance is None else args.guidance
    label = "ours, " + ("DDPM, every step" if args.ddpm else f"DDIM {args.steps} steps")
    label += (f", eta {args.eta}" if args.eta and not args.ddpm else "") + \
        (", dyn. thr." if args.dynamic_threshold else "") + f", start at signal {start}" + \
        (f", guidance {guidance}" if c.cond_drop > 0 else "")
    m, outputs = evaluate(model, truths, batch_size=args.batch_size, seed=args.seed, steps=steps, eta=args.eta,
                          dynamic_thresholding=args.dynamic_threshold, min_signal=args.min_signal, guidance=guidance)
    table = markdown(m, label)
    table += (f"\n\nColourfulness in its parts, ours / truth: spread of the colours within a picture "
              f"{m['spread']:.1f} / {m['spread_truth']:.1f}, chroma of a picture's mean colour "
              f"{m['chroma']:.1f} / {m['chroma_truth']:.1f} (see colourfulness_parts).")
    table += "\n\nColour error of the model's x0 by noise level (MSE in ab/110 units; see x0_errors):\n\n" + \
        "| signal sqrt(a_t) | model | mean colour |\n|---|---|---|\n" + \
        "\n".join(f"| {s} | {e:.4f} | {e0:.4f} |" for s, e, e0 in x0_errors(model, truths, seed=args.seed))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        after = f" after the first {args.skip}" if args.skip else ""
        f.write(f"{len(truths)} {args.split} images{after} at {truths[0].shape[1]}x{truths[0].shape[0]}, "
                f"checkpoint {os.path.basename(args.checkpoint)}\n\n{table}\n")
    grid(truths, outputs).save(os.path.join(args.out, "grid.png"))
    print(table)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ImageError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
