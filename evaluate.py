"""Evaluate colorization as users meet it: whole colour photos made greyscale by PIL, colorized through
inference.py's own code path, compared with the truth. Also the same photos re-framed, so robustness to framing
is measured without another data set.

    python evaluate.py --data ../shared/data/celeba_val --scene-data ../shared/data/scenes_val --num-images 100
    python evaluate.py --data ../shared/data/celeba_val --checkpoint old.pt --checkpoint new.pt --steps 20

Views of each portrait (--data): whole; tight (a square around the face); loose (the photo small in a frame 1.6x
its size, reflect-padded); rotated (15 degrees, alternating sign, cropped to the picture); landscape (the full
width, 0.6 of it high). Of each scene (--scene-data): whole; centre (the middle half of each side: a detail);
portrait (the full height, 0.75 of it wide); landscape. Metrics, mean over photos, for ours and for the greyscale
input itself:
  PSNR      on RGB (scikit-image), higher is better
  dE00      CIEDE2000 of the colour alone: output and truth both at the truth's L, lower is better
  gross     the share of pixels whose dE00 exceeds 20: wrong colours, the blotches a mean hides
  CF        Hasler-Suesstrunk colourfulness; dCF = |mean CF(outputs) - mean CF(truth)|
  face/rest CF(outputs) - CF(truth) inside the face square (the tight view's, re-framed with the photo) and
            outside it: a whole-photo CF near the truth's can be a bold face beside muted clothes and rooms
            (portraits only)
Writes <out>/eval.md (the table) and <out>/grid.png (per view and checkpoint: greyscale | ours | truth).
"""
import os
import sys

# first: inference sets OMP_WAIT_POLICY before torch starts OpenMP (see there)
from inference import (DEFAULT_CHECKPOINT, add_sampling_args, check_sampling_args, colorize_batch,
                       load_hints, samples_as_checkpoint, sampling_kwargs, short_side)
import numpy as np
import torch
from PIL import Image, ImageOps
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio
from torchvision.utils import make_grid
from tqdm import tqdm

from model import CheckpointError, load_model
from runtime import converted_sampler, fast_runtime
from utils import ArgumentParser, ImageError, list_images, load_image, pick_device

GROSS = 20  # CIEDE2000 above this is a different colour, not a shade of the right one


def face_box(w, h):
    """The square around the face of a w x h photo: CelebA's aligned faces sit in the middle."""
    s = round(0.62 * w)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def view(img: Image.Image, name: str, k: int) -> Image.Image:
    """One re-framing of an RGB photo (k: the photo's index, for the rotation's sign)."""
    w, h = img.size
    if name == "whole":
        return img
    if name == "tight":
        return img.crop(face_box(w, h))
    if name == "loose":
        arr = np.pad(np.asarray(img), ((round(0.3 * h),) * 2, (round(0.3 * w),) * 2, (0, 0)), mode="reflect")
        return Image.fromarray(arr)
    if name == "rotated":  # 0.75 of each side stays inside the picture at 15 degrees
        rot = img.rotate(15 if k % 2 else -15, resample=Image.BICUBIC)
        return rot.crop((round(0.125 * w), round(0.125 * h), round(0.875 * w), round(0.875 * h)))
    if name == "landscape":
        s = min(h, round(0.6 * w))
        return img.crop((0, (h - s) // 2, w, (h - s) // 2 + s))
    if name == "portrait":
        s = min(w, round(0.75 * h))
        return img.crop(((w - s) // 2, 0, (w - s) // 2 + s, h))
    if name == "centre":
        return img.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))
    raise ValueError(f"unknown view {name!r}")


VIEWS = ("whole", "tight", "loose", "rotated", "landscape")  # of portraits
SCENE_VIEWS = ("whole", "centre", "portrait", "landscape")


def face_mask(photo: Image.Image, name: str, k: int) -> np.ndarray:
    """Where the face square lies in a view of the photo: a mask re-framed as the photo is (in the loose view's
    padding too, where the square's edges are mirrored)."""
    mask = Image.new("RGB", photo.size)
    mask.paste((255, 255, 255), face_box(*photo.size))
    return np.asarray(view(mask, name, k))[..., 0] > 127


def colourfulness(rgb):
    """Hasler & Suesstrunk (2003), M3 = sigma_rgyb + 0.3 mu_rgyb, on 0-255 RGB."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())


def colourfulness_bias(out, truth, sel):
    """Colourfulness of the output minus the truth's, over the pixels `sel` (nan where there are none)."""
    return colourfulness(out[sel]) - colourfulness(truth[sel]) if sel.any() else np.nan


def scores(out, truth):
    """(PSNR, mean CIEDE2000 of the colour alone, share of gross errors, colourfulness) of one output."""
    lab_truth, lab_out = rgb2lab(truth), rgb2lab(out)
    lab_out[..., 0] = lab_truth[..., 0]  # the colour alone: the output's lightness error is not counted twice
    de = deltaE_ciede2000(lab_truth, lab_out)
    with np.errstate(divide="ignore"):  # identical images: PSNR is infinite, as it should be
        psnr = peak_signal_noise_ratio(truth, out, data_range=255)
    return psnr, de.mean(), (de > GROSS).mean(), colourfulness(out)


def sample_scores(out, truth, face=None):
    """scores(out, truth), then the colourfulness bias inside and outside the `face` mask (nan without one)."""
    bias = (np.nan, np.nan) if face is None else (colourfulness_bias(out, truth, face),
                                                  colourfulness_bias(out, truth, ~face))
    return scores(out, truth) + bias


def simulated_hints(photo: Image.Image, n, rng, size=5) -> Image.Image:
    """A simulated user (as Zhang et al. 2017 evaluate): n random squares of `size` pixels revealed in the
    photo's true mean colour there, as an RGBA hint image (inference.load_hints reads it)."""
    arr = np.asarray(photo)
    h, w = arr.shape[:2]
    hint = np.zeros((h, w, 4), np.uint8)
    for _ in range(n):
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        hint[y:y + size, x:x + size, :3] = arr[y:y + size, x:x + size].reshape(-1, 3).mean(0).round()
        hint[y:y + size, x:x + size, 3] = 255
    return Image.fromarray(hint, "RGBA")


def at_hints(out, hint):
    """Mean CIEDE2000 between the output and the hinted colour at the hinted pixels, both at the output's L."""
    mask = np.asarray(hint)[..., 3] > 0
    if not mask.any():
        return np.nan
    lab_out, lab_hint = rgb2lab(out), rgb2lab(np.asarray(hint)[..., :3])
    lab_hint[..., 0] = lab_out[..., 0]
    return deltaE_ciede2000(lab_out[mask], lab_hint[mask]).mean()


def evaluate(model, photos, batch_size=16, seed=0, runtime=None, hints=None, masks=None, samples=1, **sampling):
    """photos: colour PIL images. Colorizes each one's PIL greyscale as inference.py does (`runtime`: what runs
    the networks), `samples` times (seeds apart), scoring each and averaging; with `hints` (per photo, an RGBA
    hint image) if given, then also the error at the hinted pixels, and the diversity away from them (the mean
    CIEDE2000 between two samples there). `masks` (per photo, face_mask): the colourfulness bias inside and
    outside them. Returns ({metric: mean}, each photo's first output)."""
    greys = [p.convert("L") for p in photos]
    n = samples if hints is None else max(samples, 2)
    outputs = []
    for start in tqdm(range(0, len(photos), batch_size), desc="colorizing", leave=False):
        chunk = slice(start, start + batch_size)
        hint = None if hints is None else [load_hints(h, p.size) if h.getextrema()[3][1] else None
                                           for h, p in zip(hints[chunk], photos[chunk])]
        # a photo's own seeds, from its index: sample j of photo k is seed + samples * k + j
        seeds = [seed + samples * k for k in range(start, start + len(greys[chunk]))]
        outputs += colorize_batch(model, greys[chunk], num_samples=n, seed=seeds,
                                  batch_size=batch_size * n, runtime=runtime, hints=hint, **sampling)
    rows = []
    for k, (photo, grey, outs) in enumerate(zip(photos, greys, outputs)):
        truth, outs = np.asarray(photo), [np.asarray(o) for o in outs]
        face = None if masks is None else masks[k]
        # each sample's scores, averaged: with a few seeds a side-by-side comparison is not one draw's luck
        own = np.mean([sample_scores(o, truth, face) for o in outs[:samples]], axis=0)
        row = (*own[:4], *scores(np.asarray(grey.convert("RGB")), truth), colourfulness(truth), *own[4:])
        if hints is not None:
            away = np.asarray(hints[k])[..., 3] == 0
            row += (np.mean([at_hints(o, hints[k]) for o in outs[:samples]]),
                    deltaE_ciede2000(rgb2lab(outs[0]), rgb2lab(outs[1]))[away].mean())
        rows.append(row)
    names = ("psnr", "de", "gross", "cf", "psnr_grey", "de_grey", "gross_grey", "cf_grey", "cf_truth", "bias_face",
             "bias_rest", "hint_de", "diversity")
    # the error at the hints is left out (nan) for photos without any
    m = {k: float(np.nanmean(col)) if np.isfinite(col).any() else np.nan for k, col in zip(names, np.array(rows).T)}
    m["dcf"] = abs(m["cf"] - m["cf_truth"])
    return m, [outs[0] for outs in outputs]


def face_rest(m):
    return " / ".join("–" if np.isnan(m[k]) else f"{m[k]:+.1f}" for k in ("bias_face", "bias_rest"))


def table(results):
    """results: [(label, view, metrics)] -> a markdown table, grouped by view, each view's greyscale baseline
    first."""
    order = list(dict.fromkeys(name for _, name, _ in results))
    results = sorted(results, key=lambda r: order.index(r[1]))  # stable: checkpoints in the order given
    lines = ["| view | | PSNR (dB) ↑ | CIEDE2000 ↓ | gross (dE00 > 20) ↓ | colourfulness (truth) | dCF ↓ "
             "| face / rest: CF - truth |", "|---|---|---|---|---|---|---|---|"]
    shown = set()
    for label, name, m in results:
        if name not in shown:
            shown.add(name)
            lines.append(f"| {name} | greyscale input | {m['psnr_grey']:.2f} | {m['de_grey']:.2f} | "
                         f"{100 * m['gross_grey']:.1f}% | {m['cf_grey']:.1f} ({m['cf_truth']:.1f}) | "
                         f"{abs(m['cf_grey'] - m['cf_truth']):.1f} | |")
        lines.append(f"| {name} | {label} | {m['psnr']:.2f} | {m['de']:.2f} | {100 * m['gross']:.1f}% | "
                     f"{m['cf']:.1f} ({m['cf_truth']:.1f}) | {m['dcf']:.1f} | {face_rest(m)} |")
    return "\n".join(lines)


def hints_table(results):
    lines = ["| checkpoint | hints | PSNR (dB) ↑ | CIEDE2000 ↓ | CIEDE2000 at the hints ↓ "
             "| diversity away from them |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {n} | {m['psnr']:.2f} | {m['de']:.2f} | "
              f"{'–' if np.isnan(m['hint_de']) else format(m['hint_de'], '.2f')} | {m['diversity']:.2f} |"
              for label, n, m in results]
    return "\n".join(lines)


def hints_plot(results, width=480, height=300, pad=50):
    """PSNR against the number of hints, as Zhang et al. plot it: an SVG line per checkpoint (no plotting
    library needed), the x axis on a log(1 + n) scale."""
    xs = sorted({n for _, n, _ in results})
    ys = [m["psnr"] for _, _, m in results]
    lo, hi = np.floor(min(ys)), np.ceil(max(ys))
    X = lambda n: pad + (width - 2 * pad) * np.log1p(n) / np.log1p(max(xs) or 1)  # noqa: E731
    Y = lambda v: height - pad - (height - 2 * pad) * (v - lo) / max(hi - lo, 1e-6)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">simulated hints (clicks)</text>',
           f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
           'PSNR (dB)</text>']
    for n in xs:
        out.append(f'<text x="{X(n):.1f}" y="{height - pad + 16}" text-anchor="middle">{n}</text>')
    for v in np.arange(lo, hi + 0.5):
        out.append(f'<line x1="{pad}" x2="{width - pad}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                   f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for i, label in enumerate(dict.fromkeys(label for label, _, _ in results)):
        pts = " ".join(f"{X(n):.1f},{Y(m['psnr']):.1f}" for lab, n, m in results if lab == label)
        colour = ["#1f77b4", "#d62728", "#2ca02c"][i % 3]
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{pad + 4}" y="{pad - 10 - 14 * i}" fill="{colour}">{label.split(":")[0]}</text>')
    return "\n".join(out + ["</svg>"])


def grid(rows, n=8, height=96):
    """rows: lists of PIL images, one list per grid row; each image scaled to `height`, padded to the widest."""
    tiles = [[np.asarray(img.convert("RGB").resize((round(img.width * height / img.height), height),
                                                   Image.LANCZOS)) for img in row[:n]] for row in rows]
    width = max(t.shape[1] for row in tiles for t in row)
    padded = [torch.from_numpy(np.array(ImageOps.pad(Image.fromarray(t), (width, height), color="white")))
              .permute(2, 0, 1) for row in tiles for t in row]
    g = make_grid(torch.stack(padded), nrow=min(n, len(rows[0])), padding=2, pad_value=255)
    return Image.fromarray(g.permute(1, 2, 0).numpy())


def load_photos(folder, num_images, offset):
    """Every (len // num_images)-th photo of a folder starting at `offset`: spread over all its people."""
    names = list_images(folder)
    stride = max(1, len(names) // num_images)
    photos = []
    for name in names[offset::stride][:num_images]:
        try:
            photos.append(load_image(os.path.join(folder, name)).convert("RGB"))
        except ImageError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    if not photos:
        raise ValueError(f"{folder}: no images to evaluate")
    return photos


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="folder of colour portraits of people the model never trained on (face views)")
    p.add_argument("--scene-data", help="folder of colour photos that are not portraits, never trained on (scene "
                   "views)")
    p.add_argument("--checkpoint", action="append",
                   help="model checkpoint; give several to compare them, each with its own defaults "
                   "(default: the shipped one)")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--offset", type=int, default=0,
                   help="start the evenly spaced choice of photos here: tune on one offset, report on another")
    p.add_argument("--views", help=f"comma-separated, of {', '.join(VIEWS)} (portraits) and "
                   f"{', '.join(SCENE_VIEWS)} (scenes); default: all of them")
    p.add_argument("--hints", help="comma-separated numbers of simulated clicks, e.g. 0,1,2,5,10,20,50: colour "
                   "hints revealed from the truth, whole photos only (writes hints.md and hints.svg)")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="colorizations of each photo (seeds apart), each scored, "
                   "the scores averaged: side-by-side differences of a tenth of a point are otherwise one draw's luck")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", choices=("auto", "openvino", "torch"), default="auto", help="as in inference.py")
    p.add_argument("--out", default="eval")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    views = list(dict.fromkeys(args.views.split(",") if args.views else VIEWS + SCENE_VIEWS))
    if not set(views) <= set(VIEWS + SCENE_VIEWS) or args.num_images < 1 or not 1 <= args.batch_size <= 1024 \
            or not 1 <= args.samples <= 64:
        p.error(f"--views must name some of {', '.join(dict.fromkeys(VIEWS + SCENE_VIEWS))}; --num-images must be "
                "at least 1, --batch-size from 1 to 1024, --samples from 1 to 64")
    if not (args.data or args.scene_data):
        p.error("give the photos to evaluate on: --data (portraits), --scene-data (scenes), or both")
    try:
        clicks = [int(n) for n in args.hints.split(",")] if args.hints else None
        assert clicks is None or min(clicks) >= 0
    except (ValueError, AssertionError):
        p.error("--hints takes comma-separated numbers of clicks, e.g. 0,1,2,5,10")

    # (name, photos, their views, whether the face views' square applies)
    sets = [(os.path.basename(os.path.normpath(folder)), load_photos(folder, args.num_images, args.offset),
             [v for v in views if v in kind_views], faces)
            for folder, kind_views, faces in ((args.data, VIEWS, True), (args.scene_data, SCENE_VIEWS, False))
            if folder]
    device = pick_device(args.device)
    results, rows = [], []
    for path in args.checkpoint or [DEFAULT_CHECKPOINT]:
        model = load_model(path, device)
        # the command's own path: the checkpoint's sampling converted whole, where the command would run it
        colorizer = (converted_sampler(path) if samples_as_checkpoint(args) else None) or model
        runtime = fast_runtime(model, args.runtime) if colorizer is model else None
        c = model.config
        sampling = sampling_kwargs(args)
        shown = {k: (v if v is not None else getattr(c, f)) for k, v, f in
                 [("sampler", args.sampler, "sampler"), ("steps", args.steps, "sample_steps"),
                  ("eta", args.eta, "sample_eta"), ("start", args.min_signal, "sample_min_signal"),
                  ("guidance", args.guidance, "guidance"), ("first step", args.guidance_first, "guidance_first"),
                  ("interval", args.guidance_interval, "guidance_interval"),
                  ("antithetic", args.antithetic, "sample_antithetic")]}
        if not shown["first step"] or shown["first step"] == shown["guidance"]:  # 0: the same as guidance
            shown.pop("first step")
        # the interval says nothing when no step is guided, or every one
        if (shown["guidance"] == 1 and "first step" not in shown) or tuple(shown["interval"]) == (0, 1):
            shown.pop("interval")
        else:
            shown["interval"] = ",".join(map(str, shown["interval"]))
        if shown.pop("antithetic"):
            shown["start"] = f"{shown['start']} (antithetic)"
        shown["size"] = short_side(model, args.size)
        if (args.spacing or c.sample_spacing) == "trailing":
            shown["steps"] = f"{shown['steps']} (trailing)"
        if shown["sampler"] == "ddpm":
            shown.pop("steps"), shown.pop("eta")
        label = f"{os.path.basename(path)}: " + ", ".join(f"{k} {v}" for k, v in shown.items())
        if clicks is not None:  # the same clicks for every checkpoint: a generator per (seed, photo)
            photos = sets[0][1]
            for n in clicks:
                hints = [simulated_hints(p, n, np.random.default_rng([args.seed, k])) for k, p in enumerate(photos)]
                m, outputs = evaluate(model, photos, args.batch_size, args.seed, runtime, hints, samples=args.samples,
                                      **sampling)
                results.append((label, n, m))
                shown_hints = [Image.alpha_composite(p.convert("L").convert("RGBA"), h) for p, h in zip(photos, hints)]
                rows += [shown_hints, outputs]
                print(f"{n} hints, {label}: PSNR {m['psnr']:.2f} dE00 {m['de']:.2f} at hints {m['hint_de']:.2f} "
                      f"diversity {m['diversity']:.2f}", file=sys.stderr)
            rows.append(photos)
            continue
        for split, photos, split_views, faces in sets:
            for name in split_views:
                framed = [view(photo, name, k) for k, photo in enumerate(photos)]
                masks = [face_mask(photo, name, k) for k, photo in enumerate(photos)] if faces else None
                m, outputs = evaluate(colorizer, framed, args.batch_size, args.seed, runtime, masks=masks,
                                      samples=args.samples, **sampling)
                results.append((label, f"{split}: {name}" if len(sets) > 1 else name, m))
                rows += [[f.convert("L") for f in framed], outputs, framed]
                print(f"{split} {name}, {label}: PSNR {m['psnr']:.2f} dE00 {m['de']:.2f} gross "
                      f"{100 * m['gross']:.1f}% dCF {m['dcf']:.1f} face / rest {face_rest(m)}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    if clicks is not None:
        md = hints_table(results)
        with open(os.path.join(args.out, "hints.svg"), "w") as f:
            f.write(hints_plot(results))
    else:
        md = table(results)
    with open(os.path.join(args.out, "hints.md" if clicks is not None else "eval.md"), "w") as f:
        seeds = f"seed {args.seed}" + (f", {args.samples} samples a photo" if args.samples > 1 else "")
        f.write(f"{' and '.join(f'{len(photos)} photos of {split}' for split, photos, _, _ in sets)} "
                f"(offset {args.offset}), {seeds}, greyscale by PIL\n\n{md}\n")
    grid(rows).save(os.path.join(args.out, "grid.png"))
    print(md)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ImageError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
