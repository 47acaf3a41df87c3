"""One optimizer step of ColorDiffusion on a fixed batch, with fixed timesteps and noise.

Launched by test_ddp.py under torchrun: each of the WORLD_SIZE processes takes its contiguous share of the
batch and steps through DistributedDataParallel (gloo, CPU), then writes rank<r>.pt into the folder given
as its one argument. Imported by the test, `make` and `one_step` give the single-process reference.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ColorDiffusion, Config  # noqa: E402

BATCH = 8


def make():
    """The same model (seeded init) and the same batch, t and noise in every process."""
    torch.manual_seed(0)
    # cond_drop 0: which images lose their greyscale is a random draw too, and t and noise are fixed here
    config = Config(image_size=16, dim=8, dim_mults=(1, 2), timesteps=50, cond_drop=0.0)
    model = ColorDiffusion(config)
    g = torch.Generator().manual_seed(1)
    lab = torch.rand(BATCH, 3, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, config.timesteps, (BATCH,), generator=g)
    noise = torch.randn(BATCH, 2, 16, 16, generator=g)
    return model, lab, t, noise


def one_step(net, model, lab, t, noise):
    """train.py's step (AdamW, clipping). Returns the loss, the gradients before and after clipping (what
    DDP averaged, and what AdamW used), and the new weights."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    loss = net(lab, t=t, noise=noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    clipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.detach(), grads, clipped, {n: p.detach().clone() for n, p in model.named_parameters()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, lab, t, noise = make()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss, grads, clipped, params = one_step(DistributedDataParallel(model), model, lab[share], t[share], noise[share])
    dist.all_reduce(loss)
    torch.save({"loss": loss / world, "grads": grads, "clipped": clipped, "params": params, "world": world},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
