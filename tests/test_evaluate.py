"""evaluate.py: the metrics mean what they say, the views re-frame, and a run writes its table and grid."""
import shutil

import numpy as np
import pytest
from PIL import Image

import evaluate
from conftest import open_image
from model import load_model


def test_metrics_on_known_images():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(colour).convert("L").convert("RGB"))
    assert evaluate.colourfulness(grey) == 0 and evaluate.colourfulness(colour) > 50
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    assert evaluate.colourfulness(red) == pytest.approx(0.3 * np.hypot(200, 100))  # no spread, all mean chroma
    psnr, de, gross, cf = evaluate.scores(colour, colour)
    assert de == 0 and gross == 0 and cf == evaluate.colourfulness(colour)
    # a uniform shift of 10 levels: MSE 100 -> PSNR = 10 log10(255^2 / 100)
    flat = np.full((8, 8, 3), 100, np.uint8)
    assert evaluate.scores(flat + 10, flat)[0] == pytest.approx(10 * np.log10(255 ** 2 / 100))
    # the colour alone: a lighter copy of the same colours has no colour error; another hue is a gross error
    skin = np.full((8, 8, 3), (200, 150, 120), np.uint8)
    assert evaluate.scores(np.full((8, 8, 3), (210, 160, 130), np.uint8), skin)[1] < 2
    blue = np.full((8, 8, 3), (120, 150, 220), np.uint8)
    assert evaluate.scores(blue, skin)[2] == 1.0


def test_views_reframe_the_photo():
    photo = Image.new("RGB", (178, 218), (200, 150, 120))
    sizes = {name: evaluate.view(photo, name, 0).size for name in evaluate.VIEWS}
    assert sizes["whole"] == (178, 218)
    assert sizes["tight"][0] == sizes["tight"][1] < 178  # a square around the face
    assert sizes["loose"][0] > 178 and sizes["loose"][1] > 218  # the photo small in a bigger frame
    assert sizes["landscape"][0] > sizes["landscape"][1]
    rotated = np.asarray(evaluate.view(photo, "rotated", 1))
    assert (rotated == (200, 150, 120)).all(), "cropped inside the rotated picture: no empty corners"


def test_face_mask_follows_the_face_through_every_view():
    # a grey photo with a red face square: in every view the mask covers the red pixels and only those
    photo = Image.new("RGB", (178, 218), (128, 128, 128))
    mask = evaluate.face_mask(photo, "whole", 0)
    photo.paste((220, 40, 40), Image.fromarray(mask))
    assert mask.sum() == round(0.62 * 178) ** 2 and not mask[:, :20].any()
    for name in evaluate.VIEWS:
        for k in (0, 1):
            red = np.asarray(evaluate.view(photo, name, k))[..., 0] > 174
            mask = evaluate.face_mask(photo, name, k)
            assert mask.shape == red.shape and (mask == red).mean() > 0.995, name
    assert evaluate.face_mask(photo, "tight", 0).all() and not evaluate.face_mask(photo, "loose", 0).all()


def test_evaluate_writes_table_and_grid_for_several_checkpoints(tiny_checkpoint, photo_dir, tmp_path):
    paths = []
    for name, guidance in (("a", 1.0), ("b", 1.5)):
        shutil.copy(tiny_checkpoint(cond_drop=0.1, guidance=guidance), tmp_path / f"{name}.pt")
        paths += ["--checkpoint", str(tmp_path / f"{name}.pt")]
    out = tmp_path / "eval"
    evaluate.main(paths + ["--data", str(photo_dir), "--num-images", "3", "--steps", "2", "--views",
                           "whole,tight", "--out", str(out)])
    table = (out / "eval.md").read_text()
    assert table.count("greyscale input") == 2  # once per view
    assert "a.pt: sampler ddim, steps 2" in table and "guidance 1.5" in table
    assert table.count("| whole |") == 3 and table.count("| tight |") == 3
    # the face / rest split: both parts of a whole photo, the face alone in a tight crop
    splits = [line.rstrip(" |").split(" | ")[-1] for line in table.splitlines() if ".pt: " in line]
    assert all(len(s.split(" / ")) == 2 for s in splits)
    whole, tight = splits[0].split(" / "), splits[2].split(" / ")  # grouped by view: a, b whole; a, b tight
    assert "–" not in whole and tight[0] != "–" and tight[1] == "–"
    grid = open_image(out / "grid.png")
    assert grid.height > 2 * 2 * 3 * 90  # greyscale | ours | truth for each view and checkpoint
    for bad in (["--views", "sideways"], ["--guidance", "-1"], ["--num-images", "0"], ["--batch-size", "0"],
                ["--samples", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(paths + ["--data", str(photo_dir)] + bad)
        assert e.value.code == 2


def test_scenes_are_reported_beside_portraits_with_views_of_their_own(tiny_checkpoint, photo_dir, tmp_path):
    photo = Image.new("RGB", (160, 120), (90, 140, 200))
    sizes = {name: evaluate.view(photo, name, 0).size for name in evaluate.SCENE_VIEWS}
    assert sizes == {"whole": (160, 120), "centre": (80, 60), "portrait": (90, 120), "landscape": (160, 96)}
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 32), (40 * i, 120, 200)).save(scenes / f"s{i}.png")
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", tiny_checkpoint(), "--data", str(photo_dir), "--scene-data", str(scenes),
                   "--num-images", "3", "--steps", "2", "--views", "whole,tight,centre,whole", "--out", str(out)])
    table = (out / "eval.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if "tiny.pt: " in line}
    # each folder with its own views, its greyscale input beside it; the face split for portraits only
    assert list(rows) == [f"{photo_dir.name}: whole", f"{photo_dir.name}: tight", "scenes: whole", "scenes: centre"]
    assert table.count("greyscale input") == 4 and table.startswith(f"3 photos of {photo_dir.name} and 3 photos "
                                                                     "of scenes")
    assert rows["scenes: whole"].rstrip(" |").endswith("– / –")
    assert "– / –" not in rows[f"{photo_dir.name}: whole"]


def test_samples_average_the_scores_of_several_seeds(tiny_checkpoint, photo_dir):
    """--samples N scores N colorizations of each photo (seeds seed, seed + 1, ...) and averages them: for one
    photo, the mean of the runs at each seed alone (up to batching's float rounding)."""
    model = load_model(tiny_checkpoint())
    photo = evaluate.load_photos(str(photo_dir), 1, 0)
    both, outputs = evaluate.evaluate(model, photo, seed=5, samples=2, steps=2)
    alone = [evaluate.evaluate(model, photo, seed=s, steps=2)[0] for s in (5, 6)]
    assert alone[0]["psnr"] != alone[1]["psnr"] and len(outputs) == 1  # two draws, one output shown
    for k in ("psnr", "de", "cf", "psnr_grey"):
        assert both[k] == pytest.approx((alone[0][k] + alone[1][k]) / 2, rel=1e-3), k


def test_offset_chooses_other_photos(photo_dir):
    a, b = evaluate.load_photos(str(photo_dir), 4, 0), evaluate.load_photos(str(photo_dir), 4, 1)
    assert len(a) == len(b) == 4
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x in a for y in b)


def test_hints_mode_simulates_clicks_and_reports_the_error_there(tiny_checkpoint, photo_dir, tmp_path):
    shutil.copy(tiny_checkpoint(hints=True), tmp_path / "h.pt")
    photo = open_image(next(photo_dir.iterdir())).convert("RGB")
    hint = np.asarray(evaluate.simulated_hints(photo, 3, np.random.default_rng(0), size=4))
    assert hint.shape == (*photo.size[::-1], 4) and 16 <= (hint[..., 3] > 0).sum() <= 48
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(tmp_path / "h.pt"), "--data", str(photo_dir), "--num-images", "3",
                   "--steps", "2", "--hints", "0,2", "--out", str(out)])
    rows = [line.split(" | ") for line in (out / "hints.md").read_text().splitlines() if line.startswith("| h.pt")]
    assert [r[1] for r in rows] == ["0", "2"]
    assert rows[0][4] == "–" and float(rows[1][4]) < 3  # hinted pixels take the hinted colour
    assert all(float(r[5].rstrip(" |")) > 0 for r in rows)  # two samples differ away from the hints
    import xml.etree.ElementTree as ET
    assert ET.parse(out / "hints.svg").getroot().tag.endswith("svg")


def test_bad_numbers_and_missing_photos_are_one_line_errors(photo_dir, capsys):
    for args, message in ((["--data", str(photo_dir), "--guidance", "nan"], "--guidance must be"),
                          (["--data", str(photo_dir), "--eta", "inf"], "--eta must be"),
                          (["--data", str(photo_dir), "--views", "tight,sky"], "--views"),
                          ([], "--data (portraits), --scene-data (scenes)")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, args
