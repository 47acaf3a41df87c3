"""train.py's main, launched by test_ddp.py under torchrun, that also leaves each rank's final weights.

train.py saves checkpoints from rank 0 only; to check that every rank ends with the same model and EMA,
this wraps train.ema_update to keep a reference to the two modules, and after main returns each rank
writes them to <out-dir>/rank<r>.pt. The arguments are train.py's flags.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

seen = {}
_ema_update = train.ema_update


def ema_update_spy(ema, model, decay):
    seen["ema"], seen["model"] = ema, model
    return _ema_update(ema, model, decay)


if __name__ == "__main__":
    argv = sys.argv[1:]
    train.ema_update = ema_update_spy
    train.main(argv)
    out = argv[argv.index("--out-dir") + 1]
    torch.save({"model": seen["model"].state_dict(), "ema": seen["ema"].state_dict(),
                "world": int(os.environ["WORLD_SIZE"])}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
