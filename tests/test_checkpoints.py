"""Checkpoints and the config: round trips, export, validation, bad files."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import inference
import train
from conftest import ROOT, open_image
from model import (CheckpointError, ColorDiffusion, Config, export_inference_checkpoint, load_checkpoint, load_model,
                   save_checkpoint)


# ---------------------------------------------------------------------------------------------------------
# checkpoints

class NotATensor:  # a pickled object: weights_only loading must refuse it
    pass


def _two_models(config):
    torch.manual_seed(0)
    m = ColorDiffusion(config)
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # make EMA and model differ, so choosing the right one matters
    # load_model returns channels_last models: the same layout, so the same kernels and the same bits
    return (x.eval().to(memory_format=torch.channels_last) for x in (m, ema))


def _sample(m, L, seed, **kwargs):
    return m.sample(L, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_checkpoint_round_trip_gives_identical_samples(tiny_config, tmp_path):
    m, ema = _two_models(tiny_config)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"config": tiny_config.to_dict(), "model": m.state_dict(), "ema": ema.state_dict(),
                                "optimizer": {}, "step": 7})
    assert not os.path.exists(f"{path}.tmp")
    L = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    loaded = load_model(str(path))
    assert not loaded.training and loaded.config == tiny_config
    for kwargs in (dict(steps=5), dict(steps=5, eta=1.0, dynamic_thresholding=True), dict(sampler="ddpm"),
                   dict(sampler="dpm++2m", steps=4, eta=1.0)):
        assert torch.equal(_sample(loaded, L, 0, **kwargs), _sample(ema, L, 0, **kwargs)), kwargs
    raw = load_model(str(path), use_ema=False)
    assert torch.equal(_sample(raw, L, 0, steps=5), _sample(m, L, 0, steps=5))
    assert not torch.equal(_sample(raw, L, 0, steps=5), _sample(ema, L, 0, steps=5))
    # different generator seeds give different samples: the equality above is not vacuous
    assert not torch.equal(_sample(loaded, L, 0, steps=5), _sample(loaded, L, 1, steps=5))


def test_exported_checkpoint_is_fp16_ema_and_samples_closely(tiny_config, tmp_path):
    m, ema = _two_models(tiny_config)
    src, dst = tmp_path / "ckpt.pt", tmp_path / "model.pt"
    save_checkpoint(str(src), {"config": tiny_config.to_dict(), "model": m.state_dict(), "ema": ema.state_dict(),
                               "optimizer": {"junk": torch.zeros(1000)}, "step": 7})
    export_inference_checkpoint(str(src), str(dst))
    ck = load_checkpoint(str(dst))
    assert set(ck) == {"config", "ema", "step"} and ck["step"] == 7
    assert all(v.dtype == torch.float16 for v in ck["ema"].values() if v.is_floating_point())
    assert os.path.getsize(dst) < os.path.getsize(src)
    loaded = load_model(str(dst))
    # exactly the EMA weights rounded to fp16
    rounded = copy.deepcopy(ema)
    rounded.load_state_dict({k: v.half().float() for k, v in ema.state_dict().items()})
    L = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    a = _sample(loaded, L, 0, steps=10)
    assert torch.equal(a, _sample(rounded, L, 0, steps=10))
    # and close to the full-precision EMA's samples (in [-1, 1]). An untrained network's x0 sits at the
    # clip boundary, where fp16 rounding can move a few pixels off it, so the bound is on the mean.
    b = _sample(ema, L, 0, steps=10)
    assert (a - b).abs().mean().item() < 1e-2
    # train.py --export can replace the sampling start (chosen by evaluation); nothing else changes
    assert loaded.config == tiny_config
    train.main(["--out-dir", str(tmp_path), "--export", str(dst), "--sample-min-signal", "0.07"])
    assert load_model(str(dst)).config == Config(**{**tiny_config.to_dict(), "sample_min_signal": 0.07})
    with pytest.raises(ValueError, match="sample_min_signal must be a number from 0 to"):
        train.main(["--out-dir", str(tmp_path), "--export", str(tmp_path / "bad.pt"), "--sample-min-signal", "1.5"])
    assert not (tmp_path / "bad.pt").exists()
    train.main(["--out-dir", str(tmp_path), "--export", str(dst), "--guidance", "1.5", "--sampler", "dpm++2m",
                "--sample-steps", "8", "--sample-eta", "0", "--sample-size", "24", "--guidance-interval", "0.5,0.9",
                "--sample-antithetic", "true", "--guidance-first", "1.2"])
    assert load_model(str(dst)).config == Config(**{**tiny_config.to_dict(), "guidance": 1.5, "guidance_first": 1.2,
                                                    "sampler": "dpm++2m",
                                                    "sample_steps": 8, "sample_eta": 0.0, "sample_size": 24,
                                                    "guidance_interval": (0.5, 0.9), "sample_antithetic": True})
    with pytest.raises(ValueError, match="guidance_interval must be"):
        train.main(["--out-dir", str(tmp_path), "--export", str(tmp_path / "bad.pt"), "--guidance-interval", "0.9,0.5"])
    with pytest.raises(ValueError, match="only the sampling settings"):
        train.main(["--out-dir", str(tmp_path), "--export", str(dst), "--dim", "16"])


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "quadratic", "schedule must be one of"), ("image_size", 60, "multiple of 8"),
    ("timesteps", 1, "timesteps"), ("ab_scale", 0.0, "ab_scale"), ("sample_min_signal", 1.0, "sample_min_signal"),
    ("ema_decay", 1.0, "ema_decay"), ("batch_size", 0, "batch_size"), ("amp", "maybe", "amp"),
    ("device", "tpu", "device"), ("val_percent", 100.0, "val_percent"), ("dim_mults", (1, 0), "dim_mults"),
    ("cond_drop", 1.0, "cond_drop"), ("guidance", -1.0, "guidance"), ("sampler", "euler", "sampler must be one of"),
    ("sample_steps", 0, "sample_steps"), ("sample_size", -1, "sample_size"), ("sample_spacing", "leading", "spacing"),
    ("guidance_first", -1.0, "guidance_first")])
def test_config_rejects_values_that_would_fail_later(field, value, message):
    with pytest.raises(ValueError, match=message):
        Config(**{field: value})


def test_guidance_needs_a_model_trained_for_it():
    Config(cond_drop=0.1, guidance=2.0)
    with pytest.raises(ValueError, match="cond_drop > 0"):
        Config(cond_drop=0.0, guidance=2.0)
    Config(cond_drop=0.0, guidance_first=1.0)  # 1 is no guidance; 0 is guidance's scale
    with pytest.raises(ValueError, match="cond_drop > 0"):
        Config(cond_drop=0.0, guidance_first=2.0)


def test_bad_config_value_is_a_one_line_error_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--schedule", "quadratic",
                        "--data", "/nonexistent", "--out-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["error: config: schedule must be one of linear, cosine, not 'quadratic'"]
    assert not os.path.exists(tmp_path / "run")


def test_sampling_schedule_keeps_at_least_one_step(tiny_config):
    m = ColorDiffusion(tiny_config)
    assert m.alphas_cumprod[0].sqrt() < 0.99999  # no timestep has that much signal...
    assert len(m.sampling_schedule(0.99999)) == 1  # ...yet sampling still runs its last step


def test_load_checkpoint_rejects_bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(garbage))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a Color Diffusion checkpoint"):
        load_model(str(other))
    invalid = tmp_path / "invalid.pt"
    torch.save({"config": {"schedule": "quadratic"}, "ema": {}}, invalid)
    with pytest.raises(CheckpointError, match="invalid.pt: config: schedule must be one of"):
        load_model(str(invalid))
    code = tmp_path / "code.pt"
    torch.save({"config": {}, "model": NotATensor()}, code)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(code))


def test_an_older_checkpoint_samples_as_it_always_did():
    """A config saved before the sampling fields existed (and with a knob since removed) loads, and samples
    with DDIM 100, eta 1: the defaults of its day."""
    old = {k: v for k, v in Config().to_dict().items() if k not in ("sampler", "sample_steps", "sample_eta", "hints")}
    c = Config.from_dict({**old, "snr_floor_cap": 20.0})
    assert (c.sampler, c.sample_steps, c.sample_eta, c.hints) == ("ddim", 100, 1.0, False)
    assert "image_size" in Config.model_fields() and "lr" not in Config.model_fields()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "checkpoints"))))
def test_shipped_checkpoints_load_and_colorize(name):
    """Every checkpoint in checkpoints/ is small, loads alone (config and weights in one file) and colours a face's
    skin warm: the LAB a of a mid-grey colorized photo is positive on average, as skin's is."""
    import numpy as np

    from utils import rgb_to_lab
    path = os.path.join(ROOT, "checkpoints", name)
    assert os.path.getsize(path) < 50 * 2**20
    model = load_model(path)
    grey = open_image(os.path.join(ROOT, "examples", "004150.jpg")).convert("L")
    out = inference.colorize(model, grey, seed=0)[0]
    assert out.size == grey.size
    lab = rgb_to_lab(np.asarray(out, dtype=np.float32).transpose(2, 0, 1)[None] / 255)
    assert lab[0, 1].mean() > 0.02, lab[0, 1].mean()  # a/110: warm, not grey


def test_missing_default_checkpoint(tmp_path, monkeypatch, capsys):
    Image.new("L", (16, 16), 128).save(tmp_path / "ok.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", str(tmp_path / "checkpoints" / "photos64_distilled.pt"))
    assert inference.main(["--image-path", "ok.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no model at") and "--checkpoint" in err and len(err.splitlines()) == 1


def test_the_default_and_its_teacher():
    """No --checkpoint: the 2-pass student; --teacher, and the faithful --ddpm loop (which a student that learned
    2-step jumps cannot run), its teacher; a checkpoint given is used whatever else is."""
    parse = lambda *a: inference.parse_args(["--image-path", "x.png", *a]).checkpoint  # noqa: E731
    assert parse() == inference.DEFAULT_CHECKPOINT and inference.DEFAULT_CHECKPOINT.endswith("_distilled.pt")
    assert parse("--teacher") == parse("--ddpm") == parse("--teacher", "--steps", "4") == inference.TEACHER_CHECKPOINT
    assert parse("--ddpm", "--checkpoint", "a.pt") == "a.pt"
    with pytest.raises(SystemExit):
        parse("--teacher", "--checkpoint", "a.pt")
