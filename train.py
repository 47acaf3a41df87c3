"""Train Color Diffusion. One process:       python train.py --data img_align_celeba
Many GPUs / machines, unchanged:           torchrun --nproc_per_node 8 train.py --data img_align_celeba

Every flag is a field of model.Config; `--resume` continues <out-dir>/ckpt.pt exactly where it stopped.
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

from dataset import batch_shape, load_split, make_loader, mix_mean_ab
from model import (CheckpointError, ColorDiffusion, Config, ema_update, export_inference_checkpoint, load_checkpoint,
                   load_model, save_checkpoint)
from utils import ArgumentParser, comma_separated, folder_weight, lab_to_rgb, pick_device, use_bf16

def parse_args(argv=None):
    p = ArgumentParser(description="Train the Color Diffusion model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    for f in fields(Config):
        default = getattr(defaults, f.name)
        kind = type(default)
        if kind is bool:
            kind = lambda s: s.lower() in ("1", "true", "yes", "on")  # noqa: E731
        elif kind is tuple:  # comma-separated, each item of the default's type (dim_mults: int, crop_area: float)
            kind = comma_separated(type(default[0]) if default else str)
        # SUPPRESS: only flags given on the command line appear, so --resume can tell them from defaults
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: "
                            f"{','.join(map(str, default)) if isinstance(default, tuple) else default})".lstrip())
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--init", metavar="PATH", help="start a new run from the weights of this checkpoint (training "
                   "or shipped, e.g. checkpoints/photos64.pt): fine-tuning. Its model fields are kept")
    p.add_argument("--export", metavar="PATH", help="write <out-dir>/ckpt.pt's EMA weights (fp16) and config to "
                   "PATH for inference, e.g. checkpoints/photos64.pt, and exit; the sampling flags (--sampler, "
                   "--sample-*, --guidance*) set its sampling defaults")
    args = vars(p.parse_args(argv))
    return args.pop("resume"), args.pop("init"), args.pop("export"), args


def changed_model_fields(given, config, exempt=()):
    """The model fields (Config.model_fields) whose values in `given` differ from `config`'s."""
    return [k for k in Config.model_fields() if k in given and given[k] != getattr(config, k) and k not in exempt]


def add_inputs(weights, model):
    """Weights of a model into one with more input channels (colour hints): the new channels' weights start at
    zero, so the model starts out computing exactly what it did."""
    own = model.state_dict()
    for k, v in weights.items():
        if v.dim() == 4 and own[k].shape[1] > v.shape[1] and own[k].shape[0] == v.shape[0]:
            weights[k] = torch.cat([v, v.new_zeros(v.shape[0], own[k].shape[1] - v.shape[1], *v.shape[2:])], 1)
    return weights


def lr_at(step, c: Config):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(ema, val, device, amp, n_loss=256, n_samples=8):
    """Validation loss with fixed timesteps and noise (comparable across evaluations), and a sample grid with
    the run's sampling settings: rows of greyscale | sample | ground truth. Portrait crops of the validation
    photos' centres, the shape whole CelebA photos are run at."""
    g = torch.Generator(device).manual_seed(1234)
    h, w = batch_shape(ema.config.image_size, 1.25)
    batch = torch.stack([val[(i, h, w)][0] for i in range(min(n_loss, len(val)))]).to(device)
    losses = []
    with amp:
        for chunk in batch.split(64):
            t = torch.randint(0, ema.config.timesteps, (len(chunk),), generator=g, device=device)
            noise = torch.randn((len(chunk), 2, *chunk.shape[2:]), generator=g, device=device)
            losses.append(ema(chunk, t=t, noise=noise).item() * len(chunk))
        truth = batch[:n_samples]
        ab = ema.sample(truth[:, :1], generator=g)
    grey = torch.cat([truth[:, :1], torch.zeros_like(truth[:, 1:])], 1)
    rows = torch.cat([grey, torch.cat([truth[:, :1], ab.float()], 1), truth]).float().cpu().numpy()
    return sum(losses) / len(batch), to_pil_image(make_grid(torch.from_numpy(lab_to_rgb(rows)), nrow=len(truth),
                                                            padding=0))


def run_config(resume, init, given, ckpt_path):
    """(config, the checkpoint resumed or None, the checkpoint fine-tuned from or None) of this run: a resumed
    run's own config with the flags given; a fine-tune's model fields from --init; else the flags."""
    if resume and init:
        raise ValueError("--init starts a new run and --resume continues one: pass one of them")
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        changed = changed_model_fields(given, Config.from_dict(ckpt["config"]))
        if changed:
            raise ValueError(f"cannot change the model's {', '.join(changed)} when resuming")
        return Config.from_dict({**ckpt["config"], **given}), ckpt, None
    init_ckpt = None
    if init:  # the model (its fields and weights) comes from there
        init_ckpt = load_checkpoint(init)
        kept = {k: v for k, v in init_ckpt["config"].items() if k in Config.model_fields()}
        # hint inputs and a student's guidance input can be added (they start at zero), and the network is
        # convolutional, so a fine-tune can train at another resolution
        changeable = ("hints", "guidance_input", "image_size")
        changed = changed_model_fields(given, Config.from_dict(kept), exempt=changeable)
        # the flag, else the checkpoint's, else (an older checkpoint without the field) the field's default
        kept.update({k: given.get(k, kept.get(k, getattr(Config, k))) for k in changeable})
        if changed:
            raise ValueError(f"cannot change the model's {', '.join(changed)} when fine-tuning (--init)")
        given = {**given, **kept}
    if os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out-dir")
    return Config.from_dict(given), None, init_ckpt


def setup_device(config, distributed, local_rank):
    """(device, autocast context); joins the process group under torchrun."""
    device = pick_device(config.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, config.amp) else nullcontext()
    return device, amp


def load_data(config, rank, distributed):
    """(train, val) datasets of the config's folders: rank 0 decodes them into the cache, the others read it."""
    folders = [(*folder_weight(f), scene) for scene, specs in ((False, config.data), (True, config.scene_data))
               for f in specs]
    split = (folders, config.image_size, config.val_percent, config.cache_dir, config.seed, config.crop_area,
             config.scene_crop_area)
    if rank == 0:
        data = load_split(*split)
    if distributed:
        dist.barrier()
    return load_split(*split) if rank != 0 else data


def build(config, device, ckpt, init, init_ckpt):
    """(model, ema, optimizer, teacher or None, step): fresh, fine-tuned from init_ckpt, or resumed from ckpt."""
    torch.manual_seed(config.seed)
    model = ColorDiffusion(config).to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    if init_ckpt is not None:
        weights = add_inputs({k: v.float() for k, v in init_ckpt.get("ema", init_ckpt.get("model")).items()}, model)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("unet.guidance_mlp.") for k in missing):
            raise ValueError(f"{init}: its weights do not fit this model")
        ema.load_state_dict(model.state_dict())
    teacher = None
    if config.teacher:  # guidance distillation: frozen, in the student's precision and memory format
        teacher = load_model(config.teacher, device).requires_grad_(False)
        if teacher.config.guidance_input or changed_model_fields(vars(teacher.config), config,
                                                                 exempt=("guidance_input",)):
            raise ValueError(f"--teacher {config.teacher}: not the model this student was initialised from")
        if config.distil_steps:  # the student samples as the teacher, on every other point of its grid, at its
            # scale throughout: its first step has learned the teacher's first scale and antithetic start
            t = teacher.config
            config.sampler, config.sample_steps, config.sample_eta = "ddim", config.distil_steps, 0.0
            config.sample_min_signal, config.sample_spacing, config.sample_size = (t.sample_min_signal,
                                                                                   t.sample_spacing, t.sample_size)
            config.guidance, config.guidance_first, config.guidance_interval = t.guidance, 0.0, (0.0, 1.0)
            config.sample_antithetic = False
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    return model, ema, opt, teacher, step


def main(argv=None):
    resume, init, export, given = parse_args(argv)
    out_dir = given.get("out_dir", Config.out_dir)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if export:
        given.pop("out_dir", None)
        export_inference_checkpoint(ckpt_path, export, **given)
        print(f"exported the EMA weights of {ckpt_path} to {export} ({os.path.getsize(export) / 2**20:.1f} MB)")
        return
    distributed = "RANK" in os.environ
    rank, world, local_rank = 0, 1, 0
    if distributed:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    config, ckpt, init_ckpt = run_config(resume, init, given, ckpt_path)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} is not divisible by {world} processes")
    device, amp = setup_device(config, distributed, local_rank)
    train_ds, val_ds = load_data(config, rank, distributed)
    if ckpt is None and "ab_mean" not in given:  # where sampling starts (ColorDiffusion.sample): the mix's mean
        # colour, or a student's teacher's, so that it samples as its teacher does
        mean = load_checkpoint(config.teacher)["config"]["ab_mean"] if config.teacher else mix_mean_ab(train_ds)
        config.ab_mean = tuple(round(float(v), 5) for v in mean)
    local_batch = config.batch_size // world
    steps_per_epoch = len(train_ds) // world // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training images are fewer than one batch of {config.batch_size}")
    model, ema, opt, teacher, step = build(config, device, ckpt, init, init_ckpt)
    net = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if distributed else model

    def checkpoint():
        save_checkpoint(ckpt_path, {"config": config.to_dict(), "model": model.state_dict(), "ema": ema.state_dict(),
                                    "optimizer": opt.state_dict(), "step": step})

    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{len(train_ds)} training / {len(val_ds)} validation images, {n_params / 1e6:.1f}M parameters, "
              f"{world} process(es) on {device.type}, bf16 {'on' if isinstance(amp, torch.autocast) else 'off'}, "
              f"{'resuming at' if step else 'starting at'} step {step}", flush=True)
    # Ctrl-C, and the SIGTERM of a cluster's time limit or `kill`, save a checkpoint before exiting
    signal.signal(signal.SIGINT, signal.default_int_handler)  # background jobs start with SIGINT ignored
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log = open(os.path.join(out_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=config.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0, seen, running = time.time(), 0, None
    try:
        while step < config.max_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            for batch, scene in make_loader(train_ds, local_batch, config.image_size, epoch, skip, rank, world,
                                     config.seed, config.num_workers):
                # seed from (step, rank): timesteps, noise and dropout are a function of where we are,
                # so a resumed run draws exactly what the uninterrupted one would have
                torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, config)
                batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with amp:
                    loss = net(batch, teacher=teacher, scene=scene.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
                step += 1
                seen += len(batch) * world
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                if rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}")
                    if step % config.log_every == 0:
                        rate = seen / (time.time() - t0)
                        log.write(json.dumps({"step": step, "loss": round(running, 5), "lr": lr_at(step, config),
                                              "img_per_s": round(rate, 2)}) + "\n")
                        log.flush()
                    # no validation images (a small folder, --val-percent 0): nothing to evaluate
                    if len(val_ds) and (step % config.eval_every == 0 or step == config.max_steps):
                        val_loss, grid = evaluate(ema, val_ds, device, amp)
                        grid.save(os.path.join(out_dir, f"samples_{step:06d}.png"))
                        log.write(json.dumps({"step": step, "val_loss": round(val_loss, 5)}) + "\n")
                        log.flush()
                        bar.write(f"step {step}: train loss {running:.4f}, val loss (EMA) {val_loss:.4f}, "
                                  f"{seen / (time.time() - t0):.1f} img/s")
                    if step % config.ckpt_every == 0 or step == config.max_steps:
                        checkpoint()
                if step >= config.max_steps:
                    break
    except KeyboardInterrupt:
        if rank == 0:
            checkpoint()
            bar.close()
            print(f"\ninterrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume",
                  file=sys.stderr)
        sys.exit(130)
    finally:
        if log:
            log.close()
        if distributed:
            dist.destroy_process_group()
    bar.close()
    if rank == 0:
        print(f"done: {step} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
