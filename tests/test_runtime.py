"""The OpenVINO runtime and the converted sampler against PyTorch, the fallback, and the command line's start-up:
what it imports, and a default run without PyTorch."""
import builtins
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import runtime
from conftest import ROOT
from model import load_checkpoint, load_model, save_checkpoint

pytest.importorskip("openvino")


@pytest.fixture(scope="module", params=["teacher", "student"])
def tiny(request, tiny_checkpoint, tmp_path_factory):
    """A guided model with hints, and a guidance-distilled student (the scale an input, its embedding not zero
    so that a lost scale would show)."""
    path = tiny_checkpoint(cond_drop=0.1, guidance=1.5, hints=True, guidance_input=request.param == "student")
    if request.param == "student":
        ckpt = load_checkpoint(path)
        ckpt["ema"]["unet.guidance_mlp.2.weight"] = ckpt["ema"]["unet.time_mlp.2.weight"].flip(0)  # its scale
        path = str(tmp_path_factory.mktemp("student") / "student.pt")
        save_checkpoint(path, ckpt)
    return load_model(path), path


def test_openvino_matches_torch(tiny, monkeypatch):
    model, path = tiny
    ov = runtime.OpenVINORuntime(model)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 16, 16), (4, 24, 16)]:  # batch and shape change: compiled again for each
        L = torch.rand(shape[0], 1, *shape[1:], generator=g) * 2 - 1
        x = torch.cat([L, torch.randn(shape[0], 5, *shape[1:], generator=g)], 1)
        t = torch.randint(0, model.config.timesteps, (shape[0],), generator=g)
        w = 1 + 2 * torch.rand(shape[0], generator=g) if model.config.guidance_input else None
        with torch.no_grad():
            feats = model.encoder(L)
            ref = model.unet(x, t, feats, w)
        ov_feats = ov.encoder(L)  # the encoder runs in OpenVINO too
        assert [f.shape for f in ov_feats] == [f.shape for f in feats]
        assert all((a - b).abs().max() < 0.05 * b.abs().max() + 1e-3 for a, b in zip(ov_feats, feats))
        out = ov.unet(x, t, feats, w)
        assert out.shape == ref.shape and out.dtype == torch.float32
        # bf16 inference where the CPU has it: about 2-3 significant digits
        assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
        if w is not None:  # and the scale matters
            assert (ov.unet(x, t, feats, w + 1) - out).abs().max() > 0.1 * ref.abs().max()
    assert len(ov._unet.requests) == len(ov._encoder.requests) == 2
    # threads not pinned to cores: pinned, they wait for a core that another process holds
    for request in [*ov._unet.requests.values(), *ov._encoder.requests.values()]:
        assert request.get_compiled_model().get_property("ENABLE_CPU_PINNING") is False
    # a second instance, of the same weights loaded again, reads the converted networks from the cache
    import openvino
    monkeypatch.setattr(openvino, "convert_model", None)
    again = runtime.OpenVINORuntime(load_model(path))
    assert torch.equal(again.unet(x, t, feats, w), out)


def test_openvino_tells_neighbouring_timesteps_apart(tiny):
    """In bf16 the integers 257-511 round to even ones: a timestep embedded inside a bf16 network saw t = 349
    as 348 (and sin(349 * freq) far off), which made colours bolder. OpenVINO must step from t to t + 1 as
    PyTorch does."""
    model, path = tiny
    ov = runtime.OpenVINORuntime(model)
    g = torch.Generator().manual_seed(2)
    L = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    x = torch.cat([L, torch.randn(1, 5, 16, 16, generator=g)], 1)
    w = torch.full((1,), 1.5) if model.config.guidance_input else None
    with torch.no_grad():
        feats = model.encoder(L)
        ref = [model.unet(x, torch.tensor([t]), feats, w) for t in range(340, 351)]
    out = [ov.unet(x, torch.tensor([t]), feats, w) for t in range(340, 351)]
    for t, (r0, r1, o0, o1) in enumerate(zip(ref, ref[1:], out, out[1:]), 340):
        assert (o1 - o0).abs().mean() > 0.5 * (r1 - r0).abs().mean(), t


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.0, 0.5)])  # every step guided; the noisiest only
def test_colorize_through_openvino_matches_torch(tiny, interval):
    model, path = tiny
    img = Image.fromarray(np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1)))
    kw = dict(seed=0, sampler="dpm++2m", steps=4, amp=False, guidance_interval=interval)
    ours = np.asarray(inference.colorize(model, img, **kw)[0], dtype=float)  # OpenVINO, without being told
    ref = np.asarray(inference.colorize(model, img, runtime=model, **kw)[0], dtype=float)
    assert np.abs(ours - ref).mean() < 3  # levels of 255


def test_without_openvino_torch_runs_and_says_so(tiny, monkeypatch, capsys):
    model, path = tiny
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_openvino)
    model = load_model(path)  # a fresh one: fast_runtime remembers each model's runtime
    assert runtime.fast_runtime(model) is model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OpenVINO is not installed" in err[0]
    with pytest.raises(ValueError, match="not installed"):
        runtime.fast_runtime(load_model(path), "openvino")
    assert runtime.fast_runtime(model, "torch") is model


def test_the_converted_sampler_samples_as_the_checkpoint_does(tiny_checkpoint, monkeypatch, tmp_path):
    """The checkpoint's own sampling, converted whole, against model.sample in PyTorch from the same noise: a
    guided teacher (unconditional pairs, antithetic start, eta > 0: a draw at each step), one with hint inputs
    (zeros, one row per photo) on DPM-Solver++, and a student; other batch sizes and shapes than the traced
    one; and a second load reads the cache, without converting."""
    monkeypatch.setattr(runtime, "CACHE", str(tmp_path))
    for fields in (dict(cond_drop=0.1, guidance=2.0, sample_antithetic=True),
                   dict(cond_drop=0.1, guidance=2.0, hints=True, sampler="dpm++2m"),
                   dict(cond_drop=0.1, guidance=1.5, guidance_input=True)):
        path = tiny_checkpoint(sample_steps=3, sample_eta=1.0, **fields)
        model, converted = load_model(path), runtime.converted_sampler(path)
        assert converted.draws == 3 and converted.config.guidance == fields["guidance"]  # x_T, then 2 steps
        for shape in [(1, 16, 16), (3, 24, 16)]:
            L = np.random.default_rng(shape[0]).uniform(-1, 1, (shape[0], 1, *shape[1:])).astype(np.float32)
            seeds = range(shape[0])
            noise = np.stack([np.random.default_rng(s).standard_normal((3, 2, *shape[1:]), dtype=np.float32)
                              for s in seeds])
            ours = converted(L, noise)
            ref = model.sample(torch.from_numpy(L), generator=[np.random.default_rng(s) for s in seeds]).numpy()
            # bf16 inference where the CPU has it: a random model's colours, saturated, agree to about 1%
            assert ours.shape == ref.shape and np.abs(ours - ref).mean() < 0.01 * np.abs(ref).max(), fields
            other = converted(L, -noise)  # the noise is really an input
            assert np.abs(other - ours).mean() > 0.1 * np.abs(ref).mean()
    import openvino
    monkeypatch.setattr(openvino, "convert_model", None)
    assert runtime.converted_sampler(path).draws == 3


def test_a_conversion_keeps_the_cache_within_its_limit(monkeypatch, tmp_path):
    """After a conversion the least recently used folders go until the cache holds CACHE_LIMIT bytes: the new
    one stays, a conversion in progress (tmp...) stays, and a folder opened for running counts as used."""
    monkeypatch.setattr(runtime, "CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "CACHE_LIMIT", 2500)
    for name, used in (("in_use", 100), ("older", 200), ("old", 300), ("tmp_converting", 50)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sampler.bin").write_bytes(bytes(1000))
        os.utime(tmp_path / name, (used, used))
    runtime._core(str(tmp_path / "in_use"))  # opened now: the most recently used
    runtime._save_whole(str(tmp_path / "new"), {}, {"draws": None})
    assert sorted(os.listdir(tmp_path)) == ["in_use", "new", "old", "tmp_converting"]  # 2000 bytes and meta.json
    runtime._save_whole(str(tmp_path / "newer"), {}, {"draws": None})  # within the limit: nothing goes
    assert sorted(os.listdir(tmp_path)) == ["in_use", "new", "newer", "old", "tmp_converting"]


def test_compiling_a_shape_keeps_the_cache_within_its_limit(monkeypatch, tmp_path):
    """Each shape compiled adds a blob to its folder (a folder of photos of many shapes, thousands of MB): other
    folders go first, then the folder's own blobs, oldest first; its networks stay, and it still runs."""
    import openvino as ov
    import openvino.opset13 as ops
    monkeypatch.setattr(runtime, "CACHE", str(tmp_path))
    x = ops.parameter([-1, 4], np.float32)
    (tmp_path / "net").mkdir()
    ov.save_model(ov.Model([ops.relu(x)], [x]), str(tmp_path / "net" / "net.xml"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sampler.bin").write_bytes(bytes(1000))
    os.utime(tmp_path / "other", (100, 100))
    network = runtime._Network(runtime._core(str(tmp_path / "net")), str(tmp_path / "net" / "net.xml"))
    network(np.ones((1, 4), np.float32))
    blobs = [f for f in os.listdir(tmp_path / "net") if f.endswith(".blob")]
    assert len(blobs) == 1 and os.path.isdir(tmp_path / "other")  # within the limit: nothing went
    os.utime(tmp_path / "net" / blobs[0], (200, 200))  # an old blob
    blob = (tmp_path / "net" / blobs[0]).stat().st_size  # room for the networks and one and a half blobs
    monkeypatch.setattr(runtime, "CACHE_LIMIT", sum(f.stat().st_size for f in os.scandir(tmp_path / "net")) + blob // 2)
    assert network(-np.ones((2, 4), np.float32))[0].tolist() == [[0] * 4] * 2  # a second shape, compiled
    left = sorted(os.listdir(tmp_path / "net"))
    assert not os.path.exists(tmp_path / "other") and blobs[0] not in left  # the other folder, the old blob
    assert "net.xml" in left and "net.bin" in left and len([f for f in left if f.endswith(".blob")]) == 1


def test_the_default_command_runs_without_pytorch(tiny_checkpoint, tmp_path):
    """The command's default (the checkpoint's own sampling, on a CPU) converts the sampler once; from then on it
    never imports PyTorch, and gives the same photo, bit for bit, as the run that converted it. A sampling flag
    takes the networks' path, PyTorch's, even at 0; at the checkpoint's own value, with the same colours at the
    same seed."""
    ckpt = tiny_checkpoint(sample_steps=2, sample_eta=1.0)
    Image.fromarray(np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1))).save(tmp_path / "g.png")
    code = ("import sys, inference; code = inference.main(sys.argv[1:]); "
            "print('torch' in sys.modules, 'model' in sys.modules); sys.exit(code)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}

    def run(out, *flags):
        cmd = [sys.executable, "-c", code, "--image-path", str(tmp_path / "g.png"), "--checkpoint", ckpt,
               "--seed", "3", "--output", str(tmp_path / out), "--device", "cpu", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[-2:], np.asarray(Image.open(tmp_path / out), dtype=float)
    imported, first = run("a.png")
    assert imported == ["True", "True"]  # the first run converts, in PyTorch
    imported, second = run("b.png")
    assert imported == ["False", "False"] and np.array_equal(first, second)
    imported, networks = run("c.png", "--eta", "1.0")  # the same settings, but asked for: the networks' path
    assert imported == ["True", "True"] and np.abs(networks - first).mean() < 3  # levels of 255
    imported, _ = run("d.png", "--eta", "0")  # 0 is asked for too: not the checkpoint's sampling
    assert imported == ["True", "True"]


def test_converting_says_what_is_wrong_in_one_line(tiny_checkpoint, cli, tmp_path, monkeypatch):
    """A folder given as the checkpoint, and a cache that cannot be written, are one line each; the latter says
    what to do, and --runtime torch, which needs no cache, works."""
    Image.new("L", (16, 12), 100).save(tmp_path / "g.png")
    code, out, err = cli("--image-path", tmp_path / "g.png", "--output", tmp_path / "a.png",
                         checkpoint=str(tmp_path))
    assert code == 1 and err.strip() == f"error: {tmp_path}: not a checkpoint file"
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(runtime, "CACHE", str(tmp_path / "file" / "cache"))
    small = tiny_checkpoint(sample_steps=2)
    code, out, err = cli("--image-path", tmp_path / "g.png", "--output", tmp_path / "b.png", checkpoint=small)
    assert code == 1 and len(err.splitlines()) == 2 and "note: converting" in err  # the note, then the error
    assert err.splitlines()[1].startswith("error: cannot write OpenVINO's cache") and "--runtime torch" in err
    code, out, err = cli("--image-path", tmp_path / "g.png", "--output", tmp_path / "b.png", "--runtime", "torch",
                         checkpoint=small)
    assert code == 0 and (tmp_path / "b.png").exists()


def test_the_command_line_imports_only_what_it_uses():
    code = ("import sys, inference; heavy = {'skimage', 'gradio', 'torchvision', 'dataset', 'openvino', 'scipy',"
            "'torch', 'model'}; print(sorted(m for m in heavy if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
