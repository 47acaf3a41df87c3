"""train.py on the synthetic photos of conftest.py: it learns, resumes exactly, guards its runs; and
download_dataset.sh, offline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import model as model_module
import train
from conftest import ROOT, assert_state_equal, synthetic_photo, train_args
from model import (CheckpointError, ColorDiffusion, Config, load_checkpoint, load_model)


# ---------------------------------------------------------------------------------------------------------
# training

def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_noise_loss(m, lab, n_draws=4):
    """Mean loss over the whole set at several fixed (t, noise) draws: comparable between models."""
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        losses = []
        for _ in range(n_draws):
            t = torch.randint(0, m.config.timesteps, (len(lab),), generator=g)
            noise = torch.randn(len(lab), 2, *lab.shape[2:], generator=g)
            losses.append(m(lab, t=t, noise=noise).item())
    return sum(losses) / len(losses)


def test_short_training_run_lowers_the_loss(photo_dir, shared_cache, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=100, log_every=10))
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == list(range(10, 101, 10))
    assert losses[-1] < 0.75 * losses[0], losses  # measured about 1.10 -> 0.51
    assert any("val_loss" in r for r in log)
    assert os.path.exists(out / "samples_000100.png")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 100 and Config.from_dict(ckpt["config"]).dim_mults == (1, 2)
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    plain = dataset.PhotoDataset(images)
    lab = torch.stack([plain[(i, 16, 16)][0] for i in range(len(images))])
    config = Config.from_dict(ckpt["config"])
    torch.manual_seed(0)
    untrained = ColorDiffusion(config).eval()
    trained = load_model(str(out / "ckpt.pt"), use_ema=False)
    before, after = fixed_noise_loss(untrained, lab), fixed_noise_loss(trained, lab)
    assert after < 0.75 * before, (before, after)


def test_interrupted_then_resumed_run_equals_uninterrupted(photo_dir, shared_cache, tmp_path, monkeypatch):
    N = 5  # 16 training images, batch 8: 2 steps an epoch, so the interruption falls mid-epoch
    full, split = tmp_path / "full", tmp_path / "split"
    train.main(train_args(photo_dir, shared_cache, full, max_steps=2 * N))

    real_lr_at = train.lr_at

    def interrupt_at_N(step, c):  # Ctrl-C at the start of step N
        if step == N:
            raise KeyboardInterrupt
        return real_lr_at(step, c)

    monkeypatch.setattr(train, "lr_at", interrupt_at_N)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(photo_dir, shared_cache, split, max_steps=2 * N))
    assert e.value.code == 130
    assert load_checkpoint(str(split / "ckpt.pt"))["step"] == N
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.main(["--resume", "--out-dir", str(split)])

    a, b = load_checkpoint(str(full / "ckpt.pt")), load_checkpoint(str(split / "ckpt.pt"))
    assert a["step"] == b["step"] == 2 * N
    for key in ("model", "ema", "optimizer"):
        assert_state_equal(a[key], b[key], key)
    # and it did train: the weights moved from their initialization
    torch.manual_seed(0)
    init = ColorDiffusion(Config.from_dict(a["config"])).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)


def test_resume_and_restart_guards(photo_dir, shared_cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError):
        train.main(["--resume", "--out-dir", str(out)])
    train.main(train_args(photo_dir, shared_cache, out, max_steps=2))
    with pytest.raises(ValueError, match="exists"):  # never silently overwrite a run
        train.main(train_args(photo_dir, shared_cache, out, max_steps=4))
    with pytest.raises(ValueError, match="cannot change the model's dim"):
        train.main(["--resume", "--out-dir", str(out), "--dim", "16"])
    train.main(["--resume", "--out-dir", str(out), "--max-steps", "3"])  # a non-model field may change
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3


def test_training_without_validation_images_finishes(photo_dir, shared_cache, tmp_path):
    """--val-percent 0 (or a folder too small to have any validation file): the run still ends with its
    final checkpoint instead of crashing in the evaluation."""
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=3, val_percent=0, eval_every=1))
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    assert not any("val_loss" in r for r in read_log(out))


def test_bad_data_folder_is_a_one_line_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", "/nonexistent",
                        "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: /nonexistent: no such folder"], r.stderr
    assert not os.path.exists(tmp_path / "cache")


def test_numbers_that_are_not_numbers_are_refused(tmp_path, photo_dir, shared_cache):
    """NaN passes every comparison, so each float of the config is checked finite; absurd sizes are refused."""
    for bad in (dict(lr=float("nan")), dict(ema_decay=float("nan")), dict(guidance=float("inf")),
                dict(crop_area=(0.3, float("nan"))), dict(sample_size=100000), dict(image_size=4096),
                dict(sample_eta=float("nan")), dict(sample_steps=100000)):
        with pytest.raises(ValueError, match="config: " + next(iter(bad))):
            Config(**bad)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_args(photo_dir, shared_cache,
                        tmp_path / "run"), "--lr", "nan"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == "error: config: lr must be a finite number, not nan", r.stderr
    assert not (tmp_path / "run").exists()
    train.main(train_args(photo_dir, shared_cache, tmp_path / "ok", max_steps=1))
    with pytest.raises(ValueError, match="guidance must be"):  # an export's sampling settings too
        train.main(["--out-dir", str(tmp_path / "ok"), "--export", str(tmp_path / "x.pt"), "--guidance", "nan"])
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------------------
# download_dataset.sh, offline: a PATH with only the tools it needs, and a fake gdown where one is wanted

SCRIPT = os.path.join(ROOT, "download_dataset.sh")
TOOLS = ("find", "wc", "tr", "ls", "dirname", "mkdir", "mktemp", "rm", "rmdir", "mv", "sed", "cp", "cat")


def _run_download(tmp_path, gdown=None, unzip=True, curl=None, args=()):
    import shutil
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS + (("unzip",) if unzip else ()) + (("tar", "gzip") if curl else ()):
        if not (bin_dir / tool).exists():
            os.symlink(shutil.which(tool), bin_dir / tool)
    # the body of a fake gdown or curl; "$out" is the -O / -o path
    for name, body in (("gdown", gdown), ("curl", curl)):
        if body is not None:
            fake = bin_dir / name
            fake.write_text('#!/bin/bash\nout=""\nwhile [ $# -gt 0 ]; do case "$1" in -O|-o) out="$2";; esac; '
                            f'shift; done\necho called >> "{tmp_path}/{name}_calls"\n{body}\n')
            fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    r = subprocess.run(["/bin/bash", SCRIPT, *args], capture_output=True, text=True, cwd=work,
                       env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
    return r, work / ("imagenette" if args else "img_align_celeba")


def _leftovers(work):
    return [p for p in os.listdir(work) if p.startswith((".celeba_download", ".imagenette_download"))]



def test_download_script_without_gdown_fails_clearly(tmp_path):
    r, dest = _run_download(tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == "error: gdown is not installed; install it with: pip install gdown"
    assert not dest.exists() and not _leftovers(tmp_path / "work")


def test_download_script_without_unzip_fails_clearly(tmp_path):
    r, dest = _run_download(tmp_path, gdown="exit 1", unzip=False)
    assert r.returncode != 0 and r.stderr.startswith("error: unzip is not installed")
    assert not (tmp_path / "gdown_calls").exists() and not dest.exists()


def test_download_script_network_failure(tmp_path):
    r, dest = _run_download(tmp_path, gdown='echo "Failed to retrieve file url" >&2; exit 1')
    assert r.returncode != 0 and "error: the download failed" in r.stderr
    assert not dest.exists() and not _leftovers(tmp_path / "work")
    # an error page saved in place of the zip
    r, dest = _run_download(tmp_path, gdown='echo "<html>quota exceeded</html>" > "$out"')
    assert r.returncode != 0 and "not a valid zip" in r.stderr
    assert not dest.exists() and not _leftovers(tmp_path / "work")


def test_download_script_skips_a_folder_that_has_images(tmp_path):
    dest = tmp_path / "work" / "img_align_celeba"
    dest.mkdir(parents=True)
    synthetic_photo(np.random.default_rng(0)).save(dest / "000001.jpg")
    r, _ = _run_download(tmp_path, gdown="exit 1")
    assert r.returncode == 0 and "already has 1 images" in r.stdout
    assert not (tmp_path / "gdown_calls").exists()


@pytest.mark.skipif(not __import__("shutil").which("unzip"), reason="unzip is not installed")
def test_download_script_unzips_into_the_folder(tmp_path):
    import zipfile
    archive = tmp_path / "celeba.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            img = tmp_path / f"{i:06d}.jpg"
            synthetic_photo(np.random.default_rng(i)).save(img)
            z.write(img, f"img_align_celeba/{img.name}")
    r, dest = _run_download(tmp_path, gdown=f'cp "{archive}" "$out"')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dest)) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert "done: 3 images" in r.stdout and not _leftovers(tmp_path / "work")
    r, _ = _run_download(tmp_path, gdown="exit 1")  # idempotent: the second run downloads nothing
    assert r.returncode == 0 and "already has 3 images" in r.stdout
    assert (tmp_path / "gdown_calls").read_text().count("called") == 1


def test_download_script_fetches_scenes_into_one_flat_folder(tmp_path):
    """--scenes: Imagenette's archive (class folders of train/ and val/), its training photos in one folder."""
    import tarfile
    archive = tmp_path / "imagenette.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, cls, i in (("train", "n01", 1), ("train", "n01", 2), ("train", "n02", 3), ("val", "n01", 4)):
            img = tmp_path / f"{cls}_{i}.JPEG"
            synthetic_photo(np.random.default_rng(i)).save(img, "JPEG")
            tar.add(img, f"imagenette2-160/{split}/{cls}/{img.name}")
    r, dest = _run_download(tmp_path, curl=f'cp "{archive}" "$out"', args=["--scenes"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dest)) == ["n01_1.JPEG", "n01_2.JPEG", "n02_3.JPEG"]  # no val/ photo
    assert "done: 3 images" in r.stdout and "--scene-data imagenette" in r.stdout and not _leftovers(dest.parent)
    r, _ = _run_download(tmp_path, curl="exit 1", args=["--scenes"])
    assert r.returncode == 0 and "already has 3 images" in r.stdout
    assert (tmp_path / "curl_calls").read_text().count("called") == 1
    # offline, or an error page instead of the archive: one line, nothing left behind
    for k, (body, message) in enumerate((("exit 22", "error: the download failed"),
                                          ('echo "<html>" > "$out"', "not a valid .tgz"))):
        (tmp_path / str(k)).mkdir()
        r, dest = _run_download(tmp_path / str(k), curl=body, args=["--scenes"])
        assert r.returncode != 0 and message in r.stderr and not dest.exists() and not _leftovers(dest.parent)


def test_training_records_the_mean_colour_and_sampling_starts_there(photo_dir, shared_cache, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "run"
    train.main(train_args(photo_dir, shared_cache, out, max_steps=2))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    train_ds, _ = dataset.load_split(str(photo_dir), 16, 25, str(shared_cache))
    expected = dataset.mean_ab(train_ds.images)
    assert torch.allclose(torch.tensor(ckpt["config"]["ab_mean"]), expected, atol=1e-4)
    assert expected.abs().max() > 0.01  # the synthetic photos are not grey on average: a real check

    # the sampler's first x_t is sqrt(a_start) * mean (in model space) + sqrt(1 - a_start) * noise
    m = load_model(str(out / "ckpt.pt"))
    seen = {}
    monkeypatch.setitem(model_module.SAMPLERS, "ddim", lambda denoise, x, ac, *a, **k: seen.setdefault("x", x))
    m.sample(torch.zeros(4, 1, 16, 16), sampler="ddim", steps=5, generator=torch.Generator().manual_seed(0))
    a = m.sampling_schedule()[-1].item()
    noise = torch.randn((4, 2, 16, 16), generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(ckpt["config"]["ab_mean"]).view(1, 2, 1, 1) * m.config.ab_scale
    assert torch.allclose(seen["x"], a ** 0.5 * mean + (1 - a) ** 0.5 * noise, atol=1e-6)


def test_init_fine_tunes_from_a_checkpoint_at_another_size_and_can_add_hint_inputs(photo_dir, shared_cache, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.main(train_args(photo_dir, shared_cache, base, max_steps=2))
    export = tmp_path / "shipped.pt"
    train.main(["--out-dir", str(base), "--export", str(export)])
    scenes = tmp_path / "scenes"  # fine-tuned on more than its own photos: blue ones, weighing 3 to 1
    scenes.mkdir()
    for i in range(8):
        Image.new("RGB", (24, 16), (40, 90 + 10 * i, 200)).save(scenes / f"s{i}.png")
    train.main(train_args(photo_dir, shared_cache, tuned, max_steps=1, lr=1e-12, warmup_steps=1, image_size=24)
               + ["--init", str(export), "--hints", "true", "--scene-data", f"{scenes}:3"])
    old, new = load_checkpoint(str(export)), load_checkpoint(str(tuned / "ckpt.pt"))
    assert new["step"] == 1 and new["config"]["hints"] and new["config"]["image_size"] == 24  # another resolution
    # sampling starts from the mean colour of what it was tuned on: the mix, bluer than the photos alone
    train_ds, _ = dataset.load_split([(str(photo_dir), 1.0, False), (str(scenes), 3.0, True)], 24, 25,
                                     str(shared_cache))
    assert torch.allclose(torch.tensor(new["config"]["ab_mean"]), dataset.mix_mean_ab(train_ds), atol=1e-4)
    assert new["config"]["ab_mean"][1] < old["config"]["ab_mean"][1] - 0.1
    conv = "unet.init_conv.weight"  # the hint channels were added, at zero; the rest barely moved (lr 1e-12)
    assert new["model"][conv].shape[1] == old["ema"][conv].shape[1] + 3
    assert new["model"][conv][:, 3:].abs().max() < 1e-6
    assert torch.allclose(new["model"][conv][:, :3], old["ema"][conv].float(), atol=1e-3)
    with pytest.raises(ValueError, match="cannot change the model's dim"):
        train.main(train_args(photo_dir, shared_cache, tmp_path / "x", dim=16) + ["--init", str(export)])
    with pytest.raises(ValueError, match="pass one of them"):
        train.main(["--resume", "--init", str(export), "--out-dir", str(tuned)])
