"""CelebA-style folders of colour photos as normalized LAB tensors.

Decoding a JPEG and converting it to LAB costs more than a training step's share of a small model on
CPU, so a folder is decoded once, with scikit-image's rgb2lab, into a cache of fp16 LAB tensors at the
training size (`cache/<folder>_<hash>_<size>.pt`). Augmentation then works on those tensors.
"""
import hashlib
import os
import sys
import zlib
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from skimage.color import rgb2lab
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import AB_NORM, ImageError, load_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def is_greyscale(img: Image.Image, tolerance: int = 3) -> bool:
    """True if a photo has no colour: a greyscale mode, or RGB whose channels never differ by more than
    `tolerance` levels (greyscale JPEGs saved as RGB carry a little chroma noise)."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return bool(np.percentile(spread, 99) <= tolerance)


def list_images(folder):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)


def is_validation(name: str, val_percent: float) -> bool:
    """Deterministic split by file name: the same file is always on the same side, on every machine."""
    return zlib.crc32(name.encode()) % 10000 < val_percent * 100


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.convert("RGB").resize((size, size), Image.BICUBIC, box=box)


def image_to_lab(img: Image.Image) -> np.ndarray:
    """PIL RGB -> normalized LAB (3, H, W) float32, with scikit-image."""
    lab = rgb2lab(np.asarray(img, dtype=np.float32) / 255.0).astype(np.float32)
    lab[..., 0] = lab[..., 0] / 50 - 1
    lab[..., 1:] /= AB_NORM
    return lab.transpose(2, 0, 1)


def _decode(args):
    path, size = args
    try:
        img = load_image(path)
    except ImageError as e:
        return None, str(e)
    if is_greyscale(img):
        return None, f"{path}: greyscale, has no colour to learn from"
    return image_to_lab(center_crop_resize(img, size)).astype(np.float16), None


def build_cache(folder, image_size, cache_dir="cache", workers=None):
    """Decode every usable image of `folder` once; returns (lab fp16 tensor (N, 3, S, S), file names).
    Unusable files (not images, truncated, greyscale) are skipped with one warning each."""
    folder = os.path.abspath(folder)
    names = list_images(folder)
    key = hashlib.sha1(f"{folder}:{len(names)}:{names[:1]}:{names[-1:]}".encode()).hexdigest()[:8]
    path = os.path.join(cache_dir, f"{os.path.basename(folder)}_{key}_{image_size}.pt")
    if os.path.exists(path):
        cache = torch.load(path, weights_only=True)
        return cache["lab"], cache["names"]
    jobs = [(os.path.join(folder, n), image_size) for n in names]
    with Pool(workers or os.cpu_count()) as pool:
        results = pool.map(_decode, jobs, chunksize=64)
    kept, arrays = [], []
    for name, (arr, err) in zip(names, results):
        if err:
            print(f"warning: skipping {err}", file=sys.stderr)
        else:
            kept.append(name)
            arrays.append(arr)
    if not arrays:
        raise ValueError(f"{folder}: no usable colour images")
    lab = torch.from_numpy(np.stack(arrays))
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"lab": lab, "names": kept}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return lab, kept


class LabDataset(Dataset):
    """Normalized LAB images from a cache tensor. With `train`, each item gets a horizontal flip and a
    mild jitter (lightness contrast/brightness, colour saturation) drawn from (seed, epoch, index), so a
    resumed run sees exactly the augmentations the uninterrupted one would have."""

    def __init__(self, lab, train=False, seed=0):
        self.lab, self.train, self.seed, self.epoch = lab, train, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.lab)

    def __getitem__(self, i):
        x = self.lab[i].float()
        if not self.train:
            return x
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        flip, contrast, bright, sat = torch.rand(4, generator=g).tolist()
        if flip < 0.5:
            x = x.flip(-1)
        L, ab = x[:1], x[1:]
        L = ((L - L.mean()) * (0.9 + 0.2 * contrast) + L.mean() + 0.1 * (bright - 0.5)).clamp(-1, 1)
        return torch.cat([L, ab * (0.9 + 0.2 * sat)])


def load_split(folder, image_size, val_percent, cache_dir="cache", seed=0):
    """(train, val) LabDatasets over a folder, split by file name."""
    lab, names = build_cache(folder, image_size, cache_dir)
    val = torch.tensor([is_validation(n, val_percent) for n in names], dtype=torch.bool)
    return LabDataset(lab[~val], train=True, seed=seed), LabDataset(lab[val])


def make_loader(dataset, batch_size, epoch=0, skip_batches=0, rank=0, world_size=1, seed=0, num_workers=0):
    """One epoch of batches: this rank's shard of a per-epoch shuffle (DistributedSampler, which also works
    with no process group), starting after `skip_batches` batches so a resumed run continues mid-epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=True, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)
