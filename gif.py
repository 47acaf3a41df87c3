"""The denoising process as an animated GIF (inference.py --save-gif, visualization/make_gifs.py)."""
import math

import numpy as np
from PIL import Image

from utils import array_to_pil, fit_to_gamut, lab_to_rgb, save_image


class GifRecorder:
    """A colorize() callback that keeps at most `max_frames` steps as frames: the model's greyscale L with
    the current x_t (or x0 prediction) as colour, samples side by side, upscaled (nearest) for visibility."""

    def __init__(self, model, L_small, show="xt", max_frames=60, min_side=256):
        self.L, self.scale = np.asarray(L_small, np.float32), model.config.ab_scale
        self.show, self.max_frames = show, max_frames
        self.zoom = max(1, math.ceil(min_side / min(L_small.shape[-2:])))
        self.frames = []

    def render(self, ab):
        ab = ab.float().cpu().numpy()
        rgb = lab_to_rgb(fit_to_gamut(np.concatenate([np.broadcast_to(self.L, (len(ab), *self.L.shape[1:])), ab], 1)))
        img = array_to_pil(np.concatenate(list(rgb), axis=-1))  # samples side by side
        return img.resize((img.width * self.zoom, img.height * self.zoom), Image.NEAREST)

    def __call__(self, i, n, x_t, x0):
        stride = math.ceil(n / self.max_frames)
        if i % stride == 0 or i == n - 1:
            self.frames.append(self.render((x_t if self.show == "xt" else x0) / self.scale))

    def save(self, path, outputs):
        """Save the frames, ending on the final full-resolution outputs (held for 2 s)."""
        w, h = self.frames[-1].size
        tile = (w // len(outputs), h)
        final = Image.new("RGB", (w, h))
        for k, out in enumerate(outputs):
            final.paste(out.convert("RGB").resize(tile, Image.LANCZOS), (k * tile[0], 0))
        frames = self.frames + [final]
        save_image(frames[0], path, save_all=True, append_images=frames[1:], loop=0,
                   duration=[80] * (len(frames) - 1) + [2000])
