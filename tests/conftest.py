"""Shared fixtures for the core tests: a tiny synthetic photo folder, a folder of broken files, a tiny Config.

Everything is generated from a fixed seed in pytest's temporary directory: no test needs the real CelebA
data, the network, or the repository's own runs/ and cache/ folders.
"""
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)  # the test machine has 2 cores, shared with other work
# OpenVINO conversions of the tests' tiny models go to a temporary cache, not the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="color_diffusion_test_cache_")

N_IMAGES = 24
IMAGE_W, IMAGE_H = 40, 48


def synthetic_photo(rng: np.random.Generator, w=IMAGE_W, h=IMAGE_H) -> Image.Image:
    """A smooth colourful 'photo': two-colour linear gradient plus a coloured ellipse (a 'face')."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1, c2 = rng.uniform(0.1, 0.9, (3, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / w + np.sin(angle) * y / h)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    rx, ry = rng.uniform(0.15, 0.3) * w, rng.uniform(0.2, 0.35) * h
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    img[inside] = 0.3 * img[inside] + 0.7 * c2
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """24 RGB JPEGs of 40x48 (not square, so the centre crop is exercised), deterministic from a seed."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1234)
    for i in range(N_IMAGES):
        synthetic_photo(rng).save(folder / f"img_{i:03d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="session")
def bad_dir(tmp_path_factory):
    """Two good photos and four unusable files: build_cache must skip the latter with a warning each."""
    folder = tmp_path_factory.mktemp("bad_photos")
    rng = np.random.default_rng(99)
    synthetic_photo(rng).save(folder / "good_1.jpg", quality=95)
    synthetic_photo(rng).save(folder / "good_2.png")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "empty.png").write_bytes(b"")
    full = folder / "full.jpg"
    synthetic_photo(rng, 64, 64).save(full, quality=95)
    data = full.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    full.unlink()
    synthetic_photo(rng).convert("L").save(folder / "grey.jpg", quality=95)
    return folder


BAD_FILES = ("text.jpg", "empty.png", "truncated.jpg", "grey.jpg")


TINY_MODEL = dict(dim=8, dim_mults=(1, 2), image_size=16, timesteps=20)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make(**fields) -> the path of a random-init checkpoint of a tiny model (dim 8, two levels, 16 px, 20
    timesteps) with those Config fields changed. The same fields give the same file, made once a session."""
    from model import ColorDiffusion, Config, save_checkpoint
    made = {}

    def make(**fields):
        key = tuple(sorted(fields.items()))
        if key not in made:
            config = Config(**{**TINY_MODEL, **fields})
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
            save_checkpoint(str(path), {"config": config.to_dict(), "ema": ColorDiffusion(config).state_dict()})
            made[key] = str(path)
        return made[key]
    return make


@pytest.fixture
def tiny_config(tmp_path):
    from model import Config
    return Config(image_size=16, dim=8, dim_mults=(1, 2), timesteps=50, batch_size=8, lr=1e-3,
                  cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), device="cpu", amp="off")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, photo_dir):
    """A cache folder with photo_dir already decoded at 16 px, shared by the training tests so that
    each run (and each torchrun rank) just reads it."""
    from dataset import build_cache
    cache = tmp_path_factory.mktemp("cache")
    build_cache(str(photo_dir), 16, str(cache), workers=1)
    return cache


def train_args(data, cache, out, **flags):
    """train.py flags for a tiny CPU run on the synthetic photos; keyword arguments override."""
    base = dict(image_size=16, dim=8, dim_mults="1,2", timesteps=50, batch_size=8, lr=1e-3, warmup_steps=10,
                val_percent=25, amp="off", device="cpu", log_every=1000, eval_every=1000, ckpt_every=1000,
                num_workers=0, seed=0)
    base.update(flags)
    args = ["--data", str(data), "--cache-dir", str(cache), "--out-dir", str(out)]
    for k, v in base.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def open_image(path) -> Image.Image:
    """Image.open, read whole and its file closed (a lazily read file left open is a ResourceWarning)."""
    with Image.open(path) as img:
        img.load()
    return img


def seeded_sample(m, L, seed, **kwargs):
    """m.sample(L) with a generator of this seed: the same call, the same colours."""
    return m.sample(L, generator=torch.Generator().manual_seed(seed), **kwargs)


def assert_state_equal(a, b, path="state"):
    """Recursive exact comparison of checkpoint pieces (tensors with torch.equal)."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ---------------------------------------------------------------------------------------------------------
# the command line (test_inference.py, test_folders.py)

@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture
def cli(ckpt, capsys, monkeypatch, tmp_path):
    """cli(*args) -> (exit status, stdout, stderr); runs in tmp_path, so default outputs land there."""
    monkeypatch.chdir(tmp_path)

    import inference

    def run(*args, checkpoint=ckpt):
        code = inference.main([str(a) for a in args] + ["--checkpoint", checkpoint])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def photo(w, h, seed=0, mode="L"):
    """A greyscale test picture with structure in both directions (gradients plus noise), so a wrong
    orientation or a shifted L shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    v = 0.6 * x / max(w - 1, 1) + 0.3 * (y / max(h - 1, 1)) ** 2 + 0.1 * rng.random((h, w))
    grey = Image.fromarray((v.clip(0, 1) * 255).round().astype(np.uint8), "L")
    return grey if mode == "L" else grey.convert(mode)


def lightness(img) -> np.ndarray:
    """CIE L (0-100) of a PIL image, or of an (H, W) array of grey levels in [0, 1]."""
    from utils import rgb_to_lab
    if isinstance(img, np.ndarray):
        rgb = np.broadcast_to(img.astype(np.float32), (1, 3, *img.shape))
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255
    return (rgb_to_lab(rgb)[0, 0] + 1) * 50


def assert_same_lightness(out_path, expected_L):
    """The output keeps the input's lightness detail: only 8-bit rounding separates them."""
    out_L = lightness(open_image(out_path))
    assert out_L.shape == expected_L.shape
    diff = np.abs(out_L - expected_L)
    assert diff.max() < 1.0 and diff.mean() < 0.25, (diff.max(), diff.mean())
