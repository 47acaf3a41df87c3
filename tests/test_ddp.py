"""train.py under torchrun: DistributedDataParallel with gloo on CPU, two processes on one machine.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` (a free port is chosen
by the launcher) on a helper script in this folder, with tiny models on the synthetic photos of conftest.py.
"""
import os
import subprocess
import sys

import pytest
import torch

import ddp_step_helper
from conftest import assert_state_equal, train_args
from model import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def torchrun(script, args, cwd, nproc=2, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def test_two_process_step_equals_one_process_step_on_the_whole_batch(tmp_path):
    torchrun("ddp_step_helper.py", [tmp_path], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    # DDP's job: every process ends the step with the same averaged gradient and the same weights
    assert_state_equal(ranks[0]["grads"], ranks[1]["grads"], "grads")
    assert_state_equal(ranks[0]["params"], ranks[1]["params"], "params")

    model, lab, t, noise = ddp_step_helper.make()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, grads, clipped, params = ddp_step_helper.one_step(model, model, lab, t, noise)
    ddp = ranks[0]
    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert grads.keys() == ddp["grads"].keys()
    for n in grads:  # the mean of the two half-batch gradients is the whole batch's gradient
        assert torch.allclose(ddp["grads"][n], grads[n], rtol=1e-4, atol=1e-7), n
    moved = max((params[n] - init[n]).abs().max().item() for n in params)
    assert moved > 1e-4  # the step did something

    # Adam's first update is lr * f(g) with f(g) = g / (|g| + eps), whose slope is eps / (|g| + eps)^2: tiny
    # for real gradients, but up to 1 / eps near g = 0. That matters for the conv biases right before a
    # GroupNorm with one channel per group: their exact gradient is 0, so what they get is rounding noise
    # (~1e-9) that Adam scales up to as much as lr. So each weight may differ by exactly what the difference
    # between the two gradients allows through f, and no more (1e-6 for float error on top).
    lr, eps = 1e-3, 1e-8
    for n in params:
        if n not in clipped:
            assert torch.equal(ddp["params"][n], params[n]), n  # frozen: untouched
            continue
        g1, g2 = ddp["clipped"][n], clipped[n]
        closest_to_zero = torch.where(g1.sign() == g2.sign(), torch.minimum(g1.abs(), g2.abs()), 0.0)
        allowed = 1e-6 + lr * (g1 - g2).abs() * eps / (closest_to_zero + eps) ** 2
        assert ((ddp["params"][n] - params[n]).abs() <= allowed).all(), n
    held = sum(int(((clipped[n].abs() > 1e-6)).sum()) for n in clipped)
    assert held > 0.9 * sum(g.numel() for g in clipped.values())  # nearly all are held to about 1e-6


def test_two_process_training_agrees_across_ranks_and_resumes_exactly(photo_dir, shared_cache, tmp_path):
    # 16 training images, global batch 8 = 4 per process: 2 steps an epoch; N = 3 stops mid-epoch.
    # Warm-up covers all 2N steps so the learning rate does not depend on --max-steps, which the two
    # halves of the resumed run set differently.
    N = 3
    flags = dict(warmup_steps=100, eval_every=2)
    full, split = tmp_path / "full", tmp_path / "split"
    r = torchrun("ddp_train_helper.py", train_args(photo_dir, shared_cache, full, max_steps=2 * N, **flags), tmp_path)
    assert "2 process(es) on cpu" in r.stdout and "starting at step 0" in r.stdout
    torchrun("ddp_train_helper.py", train_args(photo_dir, shared_cache, split, max_steps=N, **flags), tmp_path)
    assert load_checkpoint(str(split / "ckpt.pt"))["step"] == N
    r = torchrun("ddp_train_helper.py", ["--resume", "--out-dir", split, "--max-steps", 2 * N], tmp_path)
    assert f"resuming at step {N}" in r.stdout

    for run in (full, split):
        ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["world"] == ranks[1]["world"] == 2
        for key in ("model", "ema"):  # every rank ends with the same weights, bit for bit
            assert_state_equal(ranks[0][key], ranks[1][key], f"{run.name}.{key}")
        ckpt = load_checkpoint(str(run / "ckpt.pt"))
        assert_state_equal(ckpt["model"], ranks[0]["model"], "checkpoint model")
        assert_state_equal(ckpt["ema"], ranks[0]["ema"], "checkpoint ema")

    a, b = load_checkpoint(str(full / "ckpt.pt")), load_checkpoint(str(split / "ckpt.pt"))
    assert a["step"] == b["step"] == 2 * N
    for key in ("model", "ema", "optimizer"):
        assert_state_equal(a[key], b[key], key)
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])  # it trained; EMA lags
