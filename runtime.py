"""A fast CPU runtime: the networks compiled by OpenVINO, in bf16 where the CPU computes it natively.

A runtime is anything with `.encoder(L) -> feats` and `.unet(x, t, feats, w) -> eps`, as ColorDiffusion itself
has (PyTorch: the reference, and the GPU path); model.sample(runtime=...) runs its networks. OpenVINORuntime
compiles both networks for this CPU: any sampler, any settings, a callback at each step.

ConvertedSampler is a checkpoint's own sampling (model.sample at its config's settings) converted whole into one
network, noise an input: what the command runs by default. Loading it needs neither the checkpoint nor PyTorch,
whose import alone takes 1.3-2 s of a 2.3 s command (docs/experiments.md, section 35), so PyTorch is imported
here only where a network is converted.

Each network is converted once (a few seconds, the first time only) into CACHE and compiled once per input shape;
OpenVINO keeps the compiled blobs there too, so a later process compiles nothing.
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
import warnings
import weakref

from utils import CheckpointError, cpu_has_bf16

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_CONVERTED_STEPS = 16  # a converted sampler unrolls every UNet pass: the shipped teacher's 3 steps are 8 passes
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "color-diffusion")
# what CACHE may hold after a conversion or a compile: each checkpoint, and each version of this code, converts
# into a folder of its own (20-50 MB, and about 25 MB more per input shape compiled), so the least recently used go
CACHE_LIMIT = 2 << 30
IN_PROGRESS = "tmp"  # the prefix of a folder a conversion is still writing (see _save_whole, _prune)
# what a conversion is traced from and saved by: a change to any of them converts again (see _key)
CODE = tuple(os.path.join(HERE, f) for f in ("model.py", "unet.py", "runtime.py"))


def _precision():
    return "bf16" if cpu_has_bf16() else "f32"


def _save_whole(folder, networks, extra=None):
    """Save converted networks {name: network} (and a JSON `extra`) into `folder`, written whole into a temporary
    folder then moved: a crash leaves no half model, and another process converting the same leaves one."""
    import openvino as ov
    try:
        os.makedirs(CACHE, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE, prefix=IN_PROGRESS)
        try:
            for name, network in networks.items():
                ov.save_model(network, os.path.join(tmp, f"{name}.xml"))
            if extra is not None:
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(extra, f)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(keep=folder)
    except OSError as e:
        if not os.path.isdir(folder):  # not another process getting there first: a disk full, say
            raise ValueError(f"cannot write OpenVINO's cache {CACHE} ({e.strerror or e}): set XDG_CACHE_HOME to a "
                             "writable folder, or pass --runtime torch") from None


def _prune(keep):
    """Remove the least recently used of CACHE until it holds at most CACHE_LIMIT bytes: other folders whole (see
    _core), then `keep`'s own compiled blobs, oldest first (a blob removed is compiled again if needed); `keep`'s
    networks, and conversions in progress, stay."""
    def nbytes(folder):
        return sum(f.stat().st_size for f in os.scandir(folder) if f.is_file())
    with contextlib.suppress(OSError):  # best effort: another process may be pruning too
        others = sorted((entry.stat().st_mtime, nbytes(entry.path), entry.path) for entry in os.scandir(CACHE)
                        if entry.is_dir() and entry.path != keep and not entry.name.startswith(IN_PROGRESS))
        blobs = sorted((f.stat().st_mtime, f.stat().st_size, f.path) for f in os.scandir(keep)
                       if f.name.endswith(".blob"))
        total = sum(size for _, size, _ in others) + nbytes(keep)
        for _, size, path in others + blobs:
            if total <= CACHE_LIMIT:
                break
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            total -= size


def fingerprint(model) -> str:
    """A hash of the weights and the fields that shape the network: the cache key of their converted networks
    (no path needed, so a model loaded any way finds its conversion; sampling settings do not matter)."""
    c = model.config
    h = hashlib.sha1(repr([(k, getattr(c, k)) for k in c.model_fields()]).encode())
    import torch
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Network:
    """One converted network, compiled once per tuple of input shapes (static shapes run faster than dynamic
    ones); called with float32 arrays, returns its outputs as float32 arrays."""

    def __init__(self, core, xml):
        self.core, self.network, self.requests = core, core.read_model(xml), {}
        self.folder = os.path.dirname(xml)
        self.outputs = len(self.network.outputs)

    def __call__(self, *inputs):
        shapes = tuple(tuple(i.shape) for i in inputs)
        if shapes not in self.requests:
            network = self.network.clone()
            network.reshape({port: shape for port, shape in zip(network.inputs, shapes)})
            # unpinned threads: pinned ones wait for a core that another process holds (the page's browser: a
            # face 0.21 s against 0.24 s after Colorize, docs/experiments.md section 37); alone, no difference
            config = {"INFERENCE_PRECISION_HINT": _precision(), "ENABLE_CPU_PINNING": False}
            self.requests[shapes] = self.core.compile_model(network, "CPU", config).create_infer_request()
            _prune(self.folder)  # each shape compiled adds a blob of about 25 MB to the cache
        request = self.requests[shapes]
        request.infer(list(inputs))
        return [request.get_output_tensor(k).data.copy() for k in range(self.outputs)]


def _core(folder):
    """An OpenVINO Core that keeps its compiled networks in `folder`, marked as just used (see _prune)."""
    import openvino as ov
    with contextlib.suppress(OSError):  # a read-only cache still runs
        os.utime(folder)
    core = ov.Core()
    core.set_property({"CACHE_DIR": folder})
    return core


class OpenVINORuntime:
    """model's encoder and UNet compiled by OpenVINO: on 2 cores several times PyTorch's speed for one photo
    (benchmark.py). The timestep's embedding is computed in PyTorch, in float32: in a bf16 network the integers
    257-511 round to even ones (docs/experiments.md, section 15)."""

    def __init__(self, model):
        import openvino as ov
        folder = os.path.join(CACHE, _key(CODE, f"{fingerprint(model)}:{ov.__version__}"))
        if not os.path.exists(os.path.join(folder, "unet.xml")):
            self._convert(model, folder)
        self.core = _core(folder)
        self.precision = _precision()
        self._unet = _Network(self.core, os.path.join(folder, "unet.xml"))
        self._encoder = _Network(self.core, os.path.join(folder, "encoder.xml"))
        self.embed = model.unet.embed

    @staticmethod
    def _convert(model, folder):
        import openvino as ov
        import torch

        class UNetCall(torch.nn.Module):  # unet.denoise with the encoder's features as separate inputs
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, x, t_emb, *feats):
                return self.unet.denoise(x, t_emb, list(feats))

        c = model.config
        L = torch.zeros(1, 1, c.image_size, c.image_size)
        x = torch.zeros(1, model.unet.init_conv.in_channels, c.image_size, c.image_size)
        print("note: converting the model for OpenVINO, once for these weights", file=sys.stderr)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about torch.jit are for developers
            t_emb = model.unet.embed(torch.zeros(1, dtype=torch.long), torch.ones(1))
            unet = ov.convert_model(UNetCall(model.unet).float().eval(), example_input=(x, t_emb, *model.encoder(L)))
            encoder = ov.convert_model(model.encoder.float().eval(), example_input=(L,))
        _save_whole(folder, {"unet": unet, "encoder": encoder})

    def encoder(self, L):
        import torch
        return [torch.from_numpy(f) for f in self._encoder(L.detach().float().numpy())]

    def unet(self, x, t, feats, w=None):
        import torch
        with torch.no_grad():
            t_emb = self.embed(t, None if w is None else w.float())
        inputs = [v.detach().float().numpy() for v in (x, t_emb, *feats)]
        return torch.from_numpy(self._unet(*inputs)[0])


class ConvertedSampler:
    """A checkpoint's own sampling, converted whole (see convert_sampler): called with L (N, 1, h, w) and noise
    (N, draws, 2, h, w), float32 arrays, returns ab_n (N, 2, h, w). Its `config` holds the checkpoint's settings,
    as a model's does. Made from its folder and meta.json alone: no PyTorch, no checkpoint."""

    def __init__(self, folder, meta):
        self.config = types.SimpleNamespace(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in meta["config"].items()})
        self.draws = meta["draws"]
        self._network = _Network(_core(folder), os.path.join(folder, "sampler.xml"))

    def __call__(self, L, noise):
        return self._network(L, noise)[0]


def convert_sampler(model, folder):
    """Trace model.sample at its config's settings, PyTorch running the networks and each noise it draws read
    from an input, and save it for OpenVINO into `folder`, with the config and the number of draws."""
    import openvino as ov
    import torch

    class Sample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, L, noise):
            draws = iter(noise.unbind(1))
            return self.model.sample(L, generator=lambda shape: next(draws))

    L, shapes = torch.zeros(2, 1, model.config.image_size, model.config.image_size), []
    print("note: converting the model's sampling for OpenVINO, once for this checkpoint", file=sys.stderr)
    with torch.no_grad(), warnings.catch_warnings():
        model.sample(L, generator=lambda shape: shapes.append(shape) or torch.zeros(shape))  # counts the draws
        warnings.simplefilter("ignore")  # the tracer's warnings about torch.jit are for developers
        network = ov.convert_model(Sample().eval(), example_input=(L, torch.zeros(2, len(shapes), 2, *L.shape[2:])))
    _save_whole(folder, {"sampler": network}, {"config": model.config.to_dict(), "draws": len(shapes)})


def _key(paths, extra) -> str:
    """A hash of the string `extra` and of the files at `paths`: 30 ms for a 20 MB checkpoint."""
    h = hashlib.sha1(extra.encode())
    for path in paths:
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    return h.hexdigest()[:16]


def converted_sampler(checkpoint):
    """The ConvertedSampler of a checkpoint file: from CACHE, or converted into it first (PyTorch is imported
    then). None without OpenVINO, or where the checkpoint's sampling is too long to unroll (ddpm, many steps;
    said in the cache, so that later runs need not load it to know)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    folder = os.path.join(CACHE, "sampler-" + _key((checkpoint, *CODE), ov.__version__))
    if not os.path.exists(os.path.join(folder, "meta.json")):
        from model import load_model
        model = load_model(checkpoint)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its meta.json: someone's partial copy
        if model.config.sampler == "ddpm" or model.config.sample_steps > MAX_CONVERTED_STEPS:
            _save_whole(folder, {}, {"config": model.config.to_dict(), "draws": None})  # draws None: not converted
        else:
            convert_sampler(model, folder)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return None if meta["draws"] is None else ConvertedSampler(folder, meta)


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
