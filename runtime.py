"""A fast CPU runtime: the greyscale encoder and the UNet compiled by OpenVINO.

A runtime is anything with `.encoder(L) -> feats` and `.unet(x, t, feats, w) -> eps`, as ColorDiffusion itself
has (PyTorch: the reference, and the GPU path); model.sample(runtime=...) runs its networks. OpenVINORuntime
compiles both networks for this CPU, in bf16 where the CPU computes it natively. Each network is converted once
per set of weights into CACHE (a few seconds, the first time only) and compiled once per input shape; OpenVINO
keeps the compiled blobs there too, so a later process compiles nothing.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
import weakref

import torch
from torch import nn

from utils import bf16_is_fast

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "color-diffusion")


class _UNetCall(nn.Module):
    """model.unet.denoise with the encoder's features as separate inputs: the form OpenVINO converts."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t_emb, *feats):
        return self.unet.denoise(x, t_emb, list(feats))


def fingerprint(model) -> str:
    """A hash of the weights and the fields that shape the network: the cache key of their converted networks
    (no path needed, so a model loaded any way finds its conversion; sampling settings do not matter)."""
    c = model.config
    h = hashlib.sha1(repr([(k, getattr(c, k)) for k in c.model_fields()]).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Network:
    """One converted network, compiled once per tuple of input shapes (static shapes run faster than dynamic
    ones); called with tensors, returns its outputs as float32 tensors."""

    def __init__(self, core, xml, config):
        self.core, self.network, self.config, self.requests = core, core.read_model(xml), config, {}
        self.outputs = len(self.network.outputs)

    def __call__(self, *inputs):
        shapes = tuple(tuple(i.shape) for i in inputs)
        if shapes not in self.requests:
            network = self.network.clone()
            network.reshape({port: shape for port, shape in zip(network.inputs, shapes)})
            self.requests[shapes] = self.core.compile_model(network, "CPU", self.config).create_infer_request()
        request = self.requests[shapes]
        request.infer([i.detach().float().numpy() for i in inputs])
        return [torch.from_numpy(request.get_output_tensor(k).data.copy()) for k in range(self.outputs)]


class OpenVINORuntime:
    """model's encoder and UNet compiled by OpenVINO: on 2 cores several times PyTorch's speed for one photo
    (benchmark.py). The timestep's embedding is computed in PyTorch, in float32: in a bf16 network the integers
    257-511 round to even ones (docs/experiments.md, section 15)."""

    def __init__(self, model):
        import openvino as ov
        key = f"{fingerprint(model)}:{ov.__version__}"
        folder = os.path.join(CACHE, hashlib.sha1(key.encode()).hexdigest()[:16])
        if not os.path.exists(os.path.join(folder, "unet.xml")):
            self._convert(model, folder)
        self.core = ov.Core()
        self.core.set_property({"CACHE_DIR": folder})
        self.precision = "bf16" if bf16_is_fast(torch.device("cpu")) else "f32"
        config = {"INFERENCE_PRECISION_HINT": self.precision}
        self._unet = _Network(self.core, os.path.join(folder, "unet.xml"), config)
        self._encoder = _Network(self.core, os.path.join(folder, "encoder.xml"), config)
        self.embed = model.unet.embed

    @staticmethod
    def _convert(model, folder):
        import openvino as ov
        c = model.config
        L = torch.zeros(1, 1, c.image_size, c.image_size)
        x = torch.zeros(1, model.unet.init_conv.in_channels, c.image_size, c.image_size)
        print("note: converting the model for OpenVINO, once for these weights", file=sys.stderr)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about torch.jit are for developers
            t_emb = model.unet.embed(torch.zeros(1, dtype=torch.long), torch.ones(1))
            unet = ov.convert_model(_UNetCall(model.unet).float().eval(), example_input=(x, t_emb, *model.encoder(L)))
            encoder = ov.convert_model(model.encoder.float().eval(), example_input=(L,))
        os.makedirs(CACHE, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE)  # written whole, then moved: a crash leaves no half model
        ov.save_model(unet, os.path.join(tmp, "unet.xml"))
        ov.save_model(encoder, os.path.join(tmp, "encoder.xml"))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)

    def encoder(self, L):
        return self._encoder(L)

    def unet(self, x, t, feats, w=None):
        with torch.no_grad():
            t_emb = self.embed(t, None if w is None else w.float())
        return self._unet(x, t_emb, *feats)[0]


_RUNTIMES = weakref.WeakKeyDictionary()  # model -> its runtime: converted and compiled once per process


def fast_runtime(model, runtime="auto"):
    """The runtime to sample with: OpenVINORuntime on a CPU ("auto" or "openvino"), the model itself (PyTorch)
    on a GPU or with "torch". Made once per model. Without OpenVINO installed, "auto" says so in one line."""
    if runtime == "torch" or next(model.parameters()).device.type != "cpu":
        return model
    if model not in _RUNTIMES:
        try:
            _RUNTIMES[model] = OpenVINORuntime(model)
        except ImportError:
            if runtime == "openvino":
                raise ValueError("--runtime openvino: OpenVINO is not installed (pip install openvino)") from None
            print("note: OpenVINO is not installed: running on PyTorch, several times slower", file=sys.stderr)
            _RUNTIMES[model] = None  # not the model itself: a value holding its key would keep it alive
    return _RUNTIMES[model] or model
