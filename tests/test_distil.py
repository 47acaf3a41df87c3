"""Distillation in train.py (Meng et al. 2023; Salimans & Ho 2022): a student learns its teacher's guided
prediction in one pass, and two of its teacher's own sampling steps in one, scenes at their own scale."""
import pytest
import torch

import dataset
import model as model_module
import train
from conftest import train_args
from model import ColorDiffusion, Config, load_model


def test_guidance_distillation_learns_the_teachers_guided_prediction_in_one_pass(photo_dir, shared_cache, tmp_path):
    """Meng et al. 2023: a student with the guidance scale as an input, initialised from the teacher (so it starts
    as the teacher's conditional model), learns eps_uncond + w (eps - eps_uncond) and samples with one UNet pass
    per step instead of a pair."""
    base, student_dir, teacher_path = tmp_path / "base", tmp_path / "student", str(tmp_path / "teacher.pt")
    train.main(train_args(photo_dir, shared_cache, base, max_steps=30))
    train.main(["--out-dir", str(base), "--export", teacher_path])
    init_path = str(tmp_path / "init.pt")  # the same weights, another start colour: the teacher's must win
    train.main(["--out-dir", str(base), "--export", init_path, "--ab-mean", "0.2,-0.1"])
    train.main(train_args(photo_dir, shared_cache, student_dir, max_steps=60, warmup_steps=1, lr=3e-4)
               + ["--init", init_path, "--guidance-input", "true", "--teacher", teacher_path])
    teacher, student = load_model(teacher_path), load_model(str(student_dir / "ckpt.pt"), use_ema=False)
    assert student.config.ab_mean == teacher.config.ab_mean != (0.2, -0.1)  # it samples as its teacher does
    start = ColorDiffusion(student.config).eval()  # the student at step 0: the teacher, and a zero guidance_mlp
    assert start.load_state_dict(teacher.state_dict(), strict=False).missing_keys[0].startswith("unet.guidance_mlp")
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    lab = torch.stack([dataset.PhotoDataset(images)[(i, 16, 16)][0] for i in range(8)])
    L, x = lab[:, :1], torch.randn(8, 2, 16, 16)
    with torch.no_grad():
        assert torch.allclose(start.denoiser(L, guidance=2.5)(x, 10), teacher.denoiser(L)(x, 10), atol=1e-5)

        def loss(m):  # the distillation loss at fixed timesteps, noise and scales
            torch.manual_seed(0)
            return sum(m(lab, t=torch.full((8,), t), teacher=teacher).item() for t in range(0, 50, 5))
        before, after = loss(start), loss(student)
    assert after < 0.85 * before, (before, after)  # measured 0.47 -> 0.35 in 60 steps
    calls = []
    student.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    student.sample(L, steps=3, guidance=2.5)
    assert calls == [8, 8, 8]  # one pass of the batch per step
    with pytest.raises(ValueError, match="needs --guidance-input"):
        train.main(train_args(photo_dir, shared_cache, tmp_path / "x") + ["--teacher", teacher_path])


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_two_steps_target_lands_where_two_of_the_teachers_own_steps_land(spacing):
    """Progressive distillation's target, against the samplers themselves: one DDIM step with the target eps lands
    where sample()'s first two deterministic steps land (the first at its own scale, from the antithetic start),
    and later where ddim_sample's next two guided ones do (from the grid's last point: one, to the clean sample)."""
    torch.manual_seed(0)
    # 51 timesteps: sampling starts at t = 48, so both grids' points are integers, later ones a grid of their own
    teacher = ColorDiffusion(Config(dim=8, dim_mults=(1, 2), timesteps=51, guidance=2.0, guidance_first=1.5,
                                    sample_antithetic=True, ab_mean=(0.1, -0.05), sample_spacing=spacing)).eval()
    L, s, ac = torch.rand(3, 1, 16, 16) * 2 - 1, teacher.config.ab_scale, teacher.sampling_schedule()
    grid = model_module.distil_grid(ac, 3, spacing)  # a student of 3 steps
    assert [p[0] for p in grid[::2]] == [p[0] for p in model_module.timesteps(ac, 3, spacing)]
    for i in range(0, len(grid), 2):
        landed, n_steps = [], min(2, len(grid) - i)
        if i == 0:  # x_T as sample() draws it, and its own steps
            a = grid[0][1]
            x_t = a ** 0.5 * torch.tensor([0.1, -0.05]).view(1, 2, 1, 1) * s + (1 - a) ** 0.5 * torch.randn(
                (3, 2, 16, 16), generator=torch.Generator().manual_seed(1))
            teacher.sample(L, steps=len(grid), eta=0.0, generator=torch.Generator().manual_seed(1),
                           callback=lambda k, n, x, x0: landed.append(x))
        else:
            x_t = torch.randn(3, 2, 16, 16)
            model_module.ddim_sample(teacher.denoiser(L, guidance=2.0), x_t, ac[: grid[i][0] + 1], len(grid) - i,
                                     threshold=lambda x0: x0.clamp(-s, s), spacing=spacing,
                                     callback=lambda k, n, x, x0: landed.append(x))
        eps = teacher.two_steps_eps(torch.cat([L, x_t], 1), grid, i)
        a = grid[i][1]
        a_next = grid[i + n_steps][1] if i + n_steps < len(grid) else 1.0
        x0 = model_module.predict_x0(x_t, eps, a)
        gap = (a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps - landed[n_steps - 1]).abs().max()
        assert gap < 1e-4, (i, gap)


def test_a_students_scene_examples_learn_the_teacher_at_their_own_scale(monkeypatch):
    """--distil-scene-guidance: the targets of the batch's scene rows are the teacher's own two steps at that
    scale (as a teacher whose defaults those are takes them), the portraits' at the teacher's; the student's
    scale input is the same for both (it tells them apart by L alone)."""
    torch.manual_seed(0)
    kw = dict(dim=8, dim_mults=(1, 2), timesteps=51, sample_antithetic=True, sample_spacing="trailing")
    teacher = ColorDiffusion(Config(**kw, guidance=2.0, guidance_first=1.5)).eval()
    at_scene_scale = ColorDiffusion(Config(**kw, guidance=1.2, guidance_first=1.1)).eval()
    at_scene_scale.load_state_dict(teacher.state_dict())
    student = ColorDiffusion(Config(**kw, guidance_input=True, teacher="t.pt", distil_steps=2, min_snr_gamma=0,
                                    snr_floor=0, distil_scene_guidance=1.2, distil_scene_guidance_first=1.1)).eval()
    lab, scene = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([True, False, True, False])
    calls, outputs = [], []
    own = teacher.two_steps_eps
    monkeypatch.setattr(teacher, "two_steps_eps", lambda *a, **k: calls.append(a) or own(*a, **k))
    student.unet.register_forward_hook(lambda m, i, o: outputs.append(i[:1] + i[3:] + (o,)))

    def loss(scene):
        torch.manual_seed(1)
        return student(lab, teacher=teacher, scene=scene).item()
    assert loss(None) == loss(torch.zeros(4, dtype=torch.bool))
    mixed = loss(scene)
    (inputs, w, pred), (grid, i) = outputs[-1], calls[-1][1:3]
    assert [len(a[0]) for a in calls[-2:]] == [2, 2]  # a call per kind of row: no row's target computed twice
    expected = own(inputs, grid, i)
    at_scene = at_scene_scale.two_steps_eps(inputs[scene], grid, i)
    assert (at_scene - expected[scene]).abs().max() > 0.01  # the scales differ enough to tell
    expected[scene] = at_scene
    assert w.tolist() == [2.0] * 4
    assert mixed == pytest.approx((pred - expected).pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="distil_scene_guidance needs distil_steps"):
        Config(distil_scene_guidance=2.0)


def test_progressive_distillation_halves_the_steps(photo_dir, shared_cache, tmp_path):
    """--distil-steps N: the student learns in N deterministic DDIM steps what the guided teacher does in
    2N - 1, in one UNet pass each, and its checkpoint samples that way."""
    base, student_dir, teacher_path = tmp_path / "base", tmp_path / "student", str(tmp_path / "teacher.pt")
    train.main(train_args(photo_dir, shared_cache, base, max_steps=30))
    train.main(["--out-dir", str(base), "--export", teacher_path, "--guidance", "2", "--guidance-first", "1.5",
                "--sample-antithetic", "true", "--sample-spacing", "trailing"])
    train.main(train_args(photo_dir, shared_cache, student_dir, max_steps=60, warmup_steps=1, lr=3e-4)
               + ["--init", teacher_path, "--guidance-input", "true", "--teacher", teacher_path,
                  "--distil-steps", "2"])
    teacher, student = load_model(teacher_path), load_model(str(student_dir / "ckpt.pt"), use_ema=False)
    c = student.config  # its first step has learned the teacher's first scale and antithetic start
    assert (c.sample_steps, c.sample_eta, c.sample_spacing, c.guidance) == (2, 0.0, "trailing", 2.0)
    assert (c.guidance_first, c.sample_antithetic) == (0.0, False)
    start = ColorDiffusion(c).eval()
    start.load_state_dict(teacher.state_dict(), strict=False)
    images, _ = dataset.build_cache(str(photo_dir), 16, str(shared_cache))
    lab = torch.stack([dataset.PhotoDataset(images)[(i, 16, 16)][0] for i in range(8)])

    def loss(m):  # the distillation loss at fixed points, noise and scales
        torch.manual_seed(0)
        return sum(m(lab, teacher=teacher).item() for _ in range(4))
    with torch.no_grad():
        before, after = loss(start), loss(student)
    assert after < 0.85 * before, (before, after)
    calls = []
    student.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    student.sample(lab[:, :1])
    assert calls == [8, 8]  # two steps, one pass of the batch each
    with pytest.raises(ValueError, match="distil_steps needs a --teacher"):
        train.main(train_args(photo_dir, shared_cache, tmp_path / "x") + ["--distil-steps", "2"])
