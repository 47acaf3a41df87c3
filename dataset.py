"""Folders of colour photos as training examples: the L of a greyscale version, and the true ab.

Users bring whole photos at any framing, greyscale made by scanners and photo editors: faces, and the world
around them. So each folder is decoded once into a cache of whole photos (RGB uint8, aspect kept, short side
CACHE_SCALE x the training size: `cache/<folder>_<hash>_<size>.pt`); several folders are mixed by weight
(`folder:weight`), and every training example is drawn from them afresh:
  - a random resized crop: of a portrait, from the face filling the frame to the face small in it (the photo
    reflect-padded around it), sometimes a little rotated; of a scene, a part of the photo as it is (level, no
    padding), so its sky stays above its ground; portrait, square or landscape, flipped half the time;
  - a greyscale made the ways real ones are: LAB's L, Rec. 601 luma (PIL's convert("L")), Rec. 709, or a
    film-like spectral mix, then gamma, contrast, blur, grain and JPEG artefacts;
  - the model sees the L of that greyscale and learns the crop's true ab.
Each example's randomness is drawn from (seed, epoch, index) and each batch's shape from (seed, epoch, batch),
so a resumed run sees exactly what the uninterrupted one would have.
"""
import hashlib
import io
import math
import os
import sys
import zlib
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils import ImageError, is_greyscale, lab_to_rgb, lightness, list_images, load_image, rgb_to_lab

CACHE_SCALE = 2  # cached photos' short side, in training sizes: zoomed-in crops keep their detail
CROP_AREA = (0.3, 2.6)  # the training crops' area in multiples of the photo's (Config.crop_area)
SCENE_CROP_AREA = (0.35, 1.0)  # and a scene's (Config.scene_crop_area)
ASPECTS = (1.0, 1.25, 0.8, 1.5, 2 / 3)  # height / width of a batch: square, portrait, landscape
LUMA = {"rec601": (0.299, 0.587, 0.114), "rec709": (0.2126, 0.7152, 0.0722)}


def is_validation(name: str, val_percent: float) -> bool:
    """Deterministic split by file name: the same file is always on the same side, on every machine."""
    return zlib.crc32(name.encode()) % 10000 < val_percent * 100


def batch_shape(image_size, aspect, multiple=8):
    """(h, w) of a batch with this aspect: short side image_size, each side a multiple of `multiple`."""
    if aspect >= 1:
        return round(image_size * aspect / multiple) * multiple, image_size
    return image_size, round(image_size / aspect / multiple) * multiple


def _decode(args):
    path, short_side = args
    try:
        img = load_image(path)
    except ImageError as e:
        return None, str(e)
    if is_greyscale(img):
        return None, f"{path}: greyscale, has no colour to learn from"
    w, h = img.size
    s = short_side / min(w, h)
    img = img.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)), None  # numpy: tensors would cross as fds


def build_cache(folder, image_size, cache_dir="cache", workers=None):
    """Decode every usable image of `folder` once; returns (list of RGB uint8 tensors (3, H, W) whose short side
    is CACHE_SCALE * image_size, file names). Unusable files (not images, truncated, greyscale) are skipped
    with one warning each."""
    folder = os.path.abspath(folder)
    names = list_images(folder)
    short_side = CACHE_SCALE * image_size
    key = hashlib.sha1(f"{folder}:{len(names)}:{names[:1]}:{names[-1:]}".encode()).hexdigest()[:8]
    path = os.path.join(cache_dir, f"{os.path.basename(folder)}_{key}_rgb{short_side}.pt")
    if os.path.exists(path):
        cache = torch.load(path, weights_only=True)
        return cache["rgb"], cache["names"]
    jobs = [(os.path.join(folder, n), short_side) for n in names]
    with Pool(workers or os.cpu_count()) as pool:
        results = pool.map(_decode, jobs, chunksize=64)
    kept, images = [], []
    for name, (img, err) in zip(names, results):
        if err:
            print(f"warning: skipping {err}", file=sys.stderr)
        else:
            kept.append(name)
            images.append(torch.from_numpy(img))
    if not images:
        raise ValueError(f"{folder}: no usable colour images")
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"rgb": images, "names": kept}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return images, kept


def random_crop(img, h, w, g, areas=CROP_AREA, scene=False):
    """A random resized crop of img (3, H, W) uint8 to (h, w): its area `areas` times the photo's, log-uniform
    (above 1 the photo is small in a reflect-padded frame, as a face in a portrait with room around it), the
    batch's aspect +-10%, anywhere that keeps most of the photo in view, sometimes rotated up to 12 degrees;
    flipped half the time. A `scene` is cropped inside the photo, level: a mirrored sky below the ground, or a
    tilted horizon, is not a scene anyone photographs."""
    H, W = img.shape[-2:]
    area, jitter, cx, cy, rotate, angle, flip = torch.rand(7, generator=g).tolist()
    area = math.exp(math.log(areas[0]) + area * math.log(areas[1] / areas[0])) * H * W
    ratio = (w / h) * math.exp(0.2 * (jitter - 0.5))
    pad = 0 if scene else min(H, W) // 2 - 1  # reflect padding must be smaller than the image
    cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if scene:  # shrunk to fit, aspect kept
        fit = min(1.0, W / cw, H / ch)
        cw, ch = cw * fit, ch * fit
    cw, ch = min(cw, W + 2 * pad), min(ch, H + 2 * pad)
    # inside the padded photo, so that no crop shows torchvision's zero fill
    left = min(max((W - cw) / 2 + (cx - 0.5) * abs(W - cw), -pad), W + pad - cw)
    top = min(max((H - ch) / 2 + (cy - 0.5) * abs(H - ch), -pad), H + pad - ch)
    if pad:
        img = TF.pad(img, [pad], padding_mode="reflect")
    if rotate < 0.3 and not scene:
        img = TF.rotate(img, 24 * (angle - 0.5), interpolation=v2.InterpolationMode.BILINEAR,
                        center=[left + pad + cw / 2, top + pad + ch / 2])
    img = TF.resized_crop(img, round(top + pad), round(left + pad), round(ch), round(cw), [h, w], antialias=True)
    return img.flip(-1) if flip < 0.5 else img


def random_greyscale(rgb, g):
    """A greyscale version of rgb (3, h, w) in [0, 1], made as a scanner, a photo editor or film might, as
    (1, h, w) in [0, 1]. LAB's L is one choice among several luma weightings; tone, blur, grain and JPEG
    artefacts follow, each some of the time."""
    kind, gamma, contrast, bright, blur, sigma, grain, amount, jpeg, quality = torch.rand(10, generator=g).tolist()
    if kind < 0.25:  # LAB's L, as the grey whose L it is
        lab = rgb_to_lab(rgb[None].numpy())
        lab[:, 1:] = 0
        grey = torch.from_numpy(lab_to_rgb(lab))[0].mean(0, keepdim=True)
    elif kind < 0.75:  # PIL's convert("L") and most editors (Rec. 601), or HDTV luma (Rec. 709)
        grey = torch.tensordot(torch.tensor(LUMA["rec601" if kind < 0.6 else "rec709"]), rgb, dims=1)[None]
    else:  # film: orthochromatic to panchromatic, a random spectral mix around Rec. 601
        weights = torch.tensor(LUMA["rec601"]) * torch.exp(0.6 * torch.randn(3, generator=g))
        grey = torch.tensordot(weights / weights.sum(), rgb, dims=1)[None]
    if gamma < 0.5:  # gamma 0.74-1.35
        grey = grey.clamp(0, 1) ** math.exp(0.6 * (2 * gamma - 0.5))
    if contrast < 0.5:  # contrast 0.8-1.2, brightness +-0.05
        grey = (grey - grey.mean()) * (0.8 + 0.8 * contrast) + grey.mean() + 0.1 * (bright - 0.5)
    if blur < 0.2:
        grey = TF.gaussian_blur(grey, [5, 5], [0.3 + 0.7 * sigma])
    if grain < 0.3:
        grey = grey + (0.005 + 0.025 * amount) * torch.randn(grey.shape, generator=g)
    grey = grey.clamp(0, 1)
    if jpeg < 0.3:
        grey = jpeg_roundtrip(grey, int(30 + 60 * quality))
    return grey


def jpeg_roundtrip(grey, quality):
    """(1, h, w) in [0, 1] through a JPEG file of this quality and back: its block artefacts."""
    buf = io.BytesIO()
    Image.fromarray((grey[0] * 255).round().byte().numpy(), "L").save(buf, "JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buf), dtype=np.float32))[None] / 255


def grey_to_l(grey):
    """(1, h, w) greyscale in [0, 1] -> its normalized L, as inference computes it (R = G = B)."""
    return torch.from_numpy(lightness(grey.expand(3, -1, -1)[None].numpy()))[0]


class PhotoDataset(Dataset):
    """Training examples from cached photos. An item is (index, h, w): the batch's shape travels with each
    index (see make_loader). Returns ((3, h, w), scene): the L of a greyscale version, then the true ab
    (normalized LAB); and whether it came from a scene folder (a student's targets may treat it otherwise).
    With `train`, the crop and the greyscale are random (drawn from (seed, epoch, index)); without, the photo's
    centre at the batch's aspect, and LAB's own L.
    `parts`: [(count, weight, scene)] of the folders `images` concatenates, in order (default: one folder of
    portraits). Each epoch then draws len(images) examples, every folder its weight's share of them (a small
    folder's photos repeat, a large one's take turns across epochs), in a shuffled order of (seed, epoch)."""

    def __init__(self, images, train=False, seed=0, crop_area=CROP_AREA, scene_crop_area=SCENE_CROP_AREA,
                 parts=None):
        self.images, self.train, self.seed = images, train, seed
        self.crop_area, self.scene_crop_area = crop_area, scene_crop_area
        self.parts = parts or [(len(images), 1.0, False)]
        self.scene = [scene for count, _, scene in self.parts for _ in range(count)]
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order = mix_order(self.parts, self.seed, epoch) if len(self.parts) > 1 else range(len(self.images))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, h, w = item
        img, scene = self.images[self.order[i]], self.scene[self.order[i]]
        if not self.train:
            H, W = img.shape[-2:]
            s = min(H / h, W / w)
            crop = TF.resized_crop(img, round((H - h * s) / 2), round((W - w * s) / 2), round(h * s), round(w * s),
                                   [h, w], antialias=True)
            return torch.from_numpy(rgb_to_lab(crop[None].numpy() / np.float32(255)))[0], scene
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        rgb = random_crop(img, h, w, g, self.scene_crop_area if scene else self.crop_area, scene).float() / 255
        lab = torch.from_numpy(rgb_to_lab(rgb[None].numpy()))[0]
        return torch.cat([grey_to_l(random_greyscale(rgb, g)), lab[1:]]), scene


def mix_order(parts, seed, epoch):
    """One epoch of indices into the concatenated folders `parts` = [(count, weight, scene)]: each folder its
    weight's share of the total, drawn from a permutation of its own (repeated when it is too small), shuffled."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    total, weights = sum(p[0] for p in parts), [p[1] for p in parts]
    counts = [round(total * w / sum(weights)) for w in weights]
    counts[-1] = total - sum(counts[:-1])
    order, start = [], 0
    for (n, _, _), k in zip(parts, counts):
        perm = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-k // n))]) if k > 0 else torch.zeros(0)
        order += (start + perm[:k].long()).tolist()
        start += n
    return [order[j] for j in torch.randperm(total, generator=g).tolist()]


def mean_ab(images, n=2000):
    """Mean normalized ab of (up to n evenly spaced) photos: sampling starts from it (ColorDiffusion.sample)."""
    step = max(1, len(images) // n)
    means = [rgb_to_lab(img[None].numpy() / np.float32(255))[0, 1:].mean(axis=(1, 2)) for img in images[::step]]
    return torch.from_numpy(np.stack(means).mean(0))


def mix_mean_ab(ds):
    """The mean colour of a PhotoDataset's mix: each folder's mean_ab at its weight's share."""
    total, start = sum(w for _, w, _ in ds.parts), 0
    mean = torch.zeros(2)
    for count, w, _ in ds.parts:
        mean += mean_ab(ds.images[start:start + count]) * w / total
        start += count
    return mean


def load_split(folders, image_size, val_percent, cache_dir="cache", seed=0, crop_area=CROP_AREA,
               scene_crop_area=SCENE_CROP_AREA):
    """(train, val) PhotoDatasets over folders [(path, weight, scene)] (or one path: portraits), each split by
    file name."""
    if isinstance(folders, str):
        folders = [(folders, 1.0, False)]
    sides = {True: ([], []), False: ([], [])}  # validation?: (images, parts)
    for path, weight, scene in folders:
        images, names = build_cache(path, image_size, cache_dir)
        val = [is_validation(n, val_percent) for n in names]
        for side, (kept, parts) in sides.items():
            chosen = [x for x, v in zip(images, val) if v == side]
            if chosen:
                kept += chosen
                parts.append((len(chosen), weight, scene))
    kw = dict(seed=seed, crop_area=crop_area, scene_crop_area=scene_crop_area)
    (train, train_parts), (val, val_parts) = sides[False], sides[True]
    return (PhotoDataset(train, train=True, parts=train_parts, **kw), PhotoDataset(val, parts=val_parts, **kw))


def make_loader(dataset, batch_size, image_size, epoch=0, skip_batches=0, rank=0, world_size=1, seed=0,
                num_workers=0):
    """One epoch of batches: this rank's shard of a per-epoch shuffle (DistributedSampler, which also works
    with no process group), starting after `skip_batches` batches so a resumed run continues mid-epoch. Each
    batch has one shape, drawn from ASPECTS by (seed, epoch, batch): the same on every rank."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    indices = list(sampler)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    n = len(indices) // batch_size
    shapes = [batch_shape(image_size, ASPECTS[k]) for k in torch.randint(len(ASPECTS), (n,), generator=g).tolist()]
    batches = [[(i, *shapes[b]) for i in indices[b * batch_size:(b + 1) * batch_size]] for b in range(n)]
    return DataLoader(dataset, batch_sampler=batches[skip_batches:], num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
