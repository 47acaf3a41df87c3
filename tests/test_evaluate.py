"""evaluate.py: the metrics mean what they say, and a run writes its table and grid."""
import numpy as np
import pytest
import torch

import evaluate
from model import ColorDiffusion, save_checkpoint


def test_metrics_on_known_images():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = evaluate.greyscale(colour)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert evaluate.colourfulness(grey) == 0
    assert evaluate.colourfulness(colour) > 50  # random RGB noise is very colourful
    # its parts: a flat red picture has chroma but no spread; red and cyan halves average to grey
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    assert evaluate.colourfulness_parts(red) == pytest.approx((0, np.hypot(200, 100)))
    halves = red.copy()
    halves[4:] = [0, 200, 200]
    spread, chroma = evaluate.colourfulness_parts(halves)
    assert spread == pytest.approx(np.hypot(200, 100)) and chroma == pytest.approx(0)
    assert evaluate.colourfulness(halves) == pytest.approx(spread + 0.3 * chroma)
    assert evaluate.psnr(colour, colour) > 90 and evaluate.psnr(colour, grey) < 30
    assert evaluate.delta_e(colour, colour) == 0 and evaluate.delta_e(colour, grey) > 5
    # a uniform shift of 10 levels: MSE 100 -> PSNR = 10 log10(255^2 / 100)
    shifted = np.clip(colour.astype(int) + 10, 0, 255).astype(np.uint8)
    mask = colour < 246
    assert evaluate.psnr(colour[mask], shifted[mask]) == pytest.approx(10 * np.log10(255 ** 2 / 100))


def test_evaluate_writes_table_and_grid(tiny_config, photo_dir, tmp_path):
    torch.manual_seed(0)
    model = ColorDiffusion(tiny_config)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(str(ckpt), {"config": tiny_config.to_dict(), "ema": model.state_dict()})
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(ckpt), "--data", str(photo_dir), "--split", "all", "--num-images", "5",
                   "--steps", "3", "--guidance", "1.5", "--out", str(out)])
    table = (out / "eval.md").read_text()
    assert "5 all images at 16x16" in table and "greyscale baseline" in table and "DDIM 3 steps" in table
    assert "guidance 1.5" in table
    assert "Colourfulness in its parts" in table
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.size == (5 * 16, 3 * 16)  # greyscale | ours | truth rows, one column per image
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--data", str(photo_dir), "--guidance", "-1"])
    assert e.value.code == 2


def test_skip_evaluates_later_images(tiny_config, photo_dir, tmp_path):
    """--skip K leaves out the first K images, so sampler settings can be tuned on images not reported."""
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(str(ckpt), {"config": tiny_config.to_dict(), "ema": ColorDiffusion(tiny_config).state_dict()})
    from PIL import Image
    truth_rows = []
    for skip in (0, 2):
        out = tmp_path / f"eval_{skip}"
        evaluate.main(["--checkpoint", str(ckpt), "--data", str(photo_dir), "--split", "all", "--num-images", "4",
                       "--skip", str(skip), "--steps", "2", "--out", str(out)])
        truth_rows.append(np.asarray(Image.open(out / "grid.png"))[32:])  # the ground-truth row
    # image k of the skipped run is image k + 2 of the first
    assert np.array_equal(truth_rows[1][:, :32], truth_rows[0][:, 32:])
    assert not np.array_equal(truth_rows[1], truth_rows[0])


def test_x0_errors_of_an_oracle_and_of_the_mean(tiny_config, monkeypatch):
    """A denoiser that knows the true noise implies the true colours at every level (error 0); the
    mean-colour column is the plain MSE of the truth's ab against the config's ab_mean."""
    from utils import rgb_to_lab
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    tiny_config.ab_mean = (0.05, -0.02)
    model = ColorDiffusion(tiny_config).eval()
    ab = rgb_to_lab(torch.tensor(np.stack(truths)).permute(0, 3, 1, 2).float() / 255.0)[:, 1:]
    ac, s = model.alphas_cumprod, tiny_config.ab_scale

    batches = iter(ab.split(2))  # the oracle is asked per batch of 2 images, in order

    def oracle(L):
        truth = next(batches)
        return lambda x, t: (x - ac[t].sqrt().float() * truth * s) / (1 - ac[t]).sqrt().float()
    untrained = evaluate.x0_errors(model, truths, batch_size=2)
    monkeypatch.setattr(model, "denoiser", oracle)
    rows = evaluate.x0_errors(model, truths, batch_size=2)  # 2 batches: the means are over all 3 images
    expected_mean = (ab - torch.tensor([0.05, -0.02]).view(1, 2, 1, 1)).pow(2).mean().item()
    assert [r[0] for r in rows] == [0.02, 0.05, 0.1, 0.2, 0.4]
    for (_, err, mean_err), (_, err_untrained, _) in zip(rows, untrained):
        assert err < 1e-6 < err_untrained
        assert mean_err == pytest.approx(expected_mean, rel=1e-4)
