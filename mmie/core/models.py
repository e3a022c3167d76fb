"""Loading models: the embedded default, local folders, GGUF files, hub ids and tiny test models.

Every stage loads its model through :func:`loaded`, a context manager that releases the model
(and the CUDA cache) when the block ends, so a loop over seeds never holds two models.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from mmie.core import profile
from mmie.core.artifacts import ModelIdentity
from mmie.core.distributed import local_device, world
from mmie.core.errors import ModelError
from mmie.core.identity import mmie_home  # noqa: F401  (part of this module's API)
from mmie.core.model_sources import SOURCES, resolve_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The automatic placements transformers' from_pretrained accepts for device_map.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_DEVICES = ("cpu", "disk", "mps")  # besides GPU indices

# Where the decoder blocks live, by architecture family; tried in order.
BLOCK_PATHS = (
    "model.layers",                 # Llama, Qwen2, Mistral, Gemma 1-3 (text), Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "language_model.model.layers",
    "transformer.h",                # GPT-2, GPT-J
    "gpt_neox.layers",              # GPT-NeoX, Pythia
    "model.decoder.layers",         # OPT
    "transformer.layers",
)


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model.

    name: 'default' (embedded Gemma 3 270M), a local HF folder, a .gguf file, a hub id, or
        tiny:llama / tiny:qwen2 / tiny:gemma3 (random weights, for tests).
    device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.
    dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
    device_map: None, or auto / balanced / balanced_low_0 / sequential to split a large model
        over the available devices (accelerate places whole decoder blocks; blocks that do not
        fit are offloaded to CPU or disk and computed on the main device).
    max_memory: per-device cap for device_map, e.g. ``{"0": "2GiB", "cpu": "20GiB"}`` (GPU
        index, cpu, disk or mps -> size with a unit, or bytes); see :func:`parse_max_memory`.
    offload_dir: folder for blocks offloaded to disk (needed only when they do not fit).
    attn_implementation: None lets transformers choose; a failing choice falls back to eager.
    load_in_8bit: 8-bit weights through bitsandbytes (optional extra 'gpu').
    blocks_path: dotted path of the decoder-block ModuleList for unknown architectures.
    """

    name: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: Mapping[str, str] | None = None
    offload_dir: str | None = None
    attn_implementation: str | None = None
    load_in_8bit: bool = False
    blocks_path: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name is empty")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' not in auto, {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device '{self.device}' not in auto, cpu, cuda, cuda:N")
        if self.device_map not in (None, *DEVICE_MAPS):
            raise ValueError(f"device_map '{self.device_map}' not in {', '.join(DEVICE_MAPS)}")
        if (self.max_memory or self.offload_dir) and not self.device_map:
            raise ValueError("max_memory and offload_dir need a device_map "
                             f"({', '.join(DEVICE_MAPS)})")
        if self.max_memory is not None:
            check_max_memory(self.max_memory)

    def memory_limits(self) -> dict[int | str, str | int] | None:
        """max_memory as accelerate wants it: GPU indices as ints, plain byte counts as ints."""
        if not self.max_memory:
            return None
        return {int(k) if k.isdigit() else k: int(v) if v.isdigit() else v
                for k, v in self.max_memory.items()}

    def torch_device(self) -> torch.device:
        """The device to load on; under a launcher each process takes its own GPU."""
        if self.device == "auto":
            return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {self.device} asked for, but no CUDA device is available")
        device = torch.device(self.device)
        if device.index is not None and world().distributed:
            # every rank would load onto the same GPU and NCCL refuses duplicate devices
            raise ModelError(f"--device {self.device} under a launcher: each process takes "
                             "cuda:LOCAL_RANK; pass --device cuda (or auto)")
        return local_device(device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        cuda = self.torch_device().type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


@dataclass
class LoadedModel:
    """A model with its tokenizer, identity and decoder blocks."""

    model: nn.Module
    tokenizer: object
    identity: ModelIdentity
    blocks: nn.ModuleList
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def block_device(self, layer: int) -> torch.device:
        """Where decoder block ``layer`` computes: SAEs, probes and edits for it go there."""
        return module_device(self.blocks[layer], default=self.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _lookup(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def resolve_blocks(model: nn.Module, blocks_path: str | None = None) -> nn.ModuleList:
    """The list of decoder blocks, or an error naming the candidates and the override."""
    base = unwrap(model)
    for path in (blocks_path,) if blocks_path else BLOCK_PATHS:
        node = _lookup(base, path)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    candidates = [f"{name} ({len(mod)})" for name, mod in base.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 1]
    where = f"'{blocks_path}' is not a ModuleList" if blocks_path else "unknown layout"
    raise ModelError(f"cannot find the decoder blocks of {type(base).__name__} ({where}); "
                     f"module lists: {', '.join(candidates) or 'none'}; pass --blocks-path")


def get_decoder(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (hidden states, no logits)."""
    base = unwrap(model)
    body = getattr(base, "base_model", None)
    if body is None or body is base:
        raise ModelError(f"{type(base).__name__} has no separate decoder body")
    return body


def lm_head(model: nn.Module) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(unwrap(model)).__name__} has no output embeddings")
    return head


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device accelerate's dispatch hook gives ``module``, if it has one."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)  # an int means that CUDA device
    return None


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where ``module`` computes, also when accelerate split or offloaded the model.

    An offloaded module's parameters sit on ``meta`` (or on the CPU while it computes on a GPU)
    outside its forward, so the parameters' device is not trusted: the first dispatch hook on
    the module or a submodule decides, then the first non-meta tensor, then ``default``.
    """
    for sub in module.modules():
        if (device := hook_device(sub)) is not None:
            return device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    if default is None:
        raise ModelError(f"cannot tell where {type(module).__name__} computes: no dispatch hook "
                         "and no materialised parameters")
    return default


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, an offloaded module's own weights are real tensors on its execution device.

    Code that reads a module's weights instead of calling it (the LM head's matrix for chunked
    log-probs) bypasses accelerate's hook and would see ``meta``; this runs the hook's loading
    step for the block and puts the weights back on exit. A no-op for modules not offloaded.
    """
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: where the input embeddings compute (works for split models)."""
    return module_device(unwrap(model).get_input_embeddings())


def parse_max_memory(text: str) -> dict[str, str]:
    """``'0=2GiB,cpu=20GiB'`` -> ``{'0': '2GiB', 'cpu': '20GiB'}``, checked (ValueError)."""
    limits: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not device or not size:
            raise ValueError(f"max memory '{item}' is not DEVICE=SIZE (e.g. 0=2GiB,cpu=20GiB)")
        device = device.lower().removeprefix("cuda:")
        if device in limits:
            raise ValueError(f"max memory names device '{device}' twice")
        limits[device] = size
    if not limits:
        raise ValueError("max memory is empty; expected DEVICE=SIZE pairs like 0=2GiB,cpu=20GiB")
    check_max_memory(limits)
    return limits


def check_max_memory(limits: Mapping[str, str]) -> None:
    from accelerate.utils import convert_file_size_to_int

    for device, size in limits.items():
        if not (str(device).isdigit() or device in MEMORY_DEVICES):
            raise ValueError(f"max memory device '{device}' is not a GPU index or one of "
                             f"{', '.join(MEMORY_DEVICES)}")
        size = str(size)
        try:
            ok = size.isdigit() or convert_file_size_to_int(size) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"max memory size '{size}' for '{device}' is not bytes or a size "
                             "in KB, MB, GB, KiB, MiB or GiB (e.g. 2GiB, 500MB)")


def d_model_of(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "hidden_size", None) or text.n_embd)


def identity_of(name: str, model: nn.Module, fingerprint: dict, n_layers: int) -> ModelIdentity:
    config = unwrap(model).config
    text = getattr(config, "text_config", None) or config
    return ModelIdentity(name=name, arch=type(unwrap(model)).__name__, n_layers=n_layers,
                         d_model=d_model_of(config), vocab_size=int(text.vocab_size),
                         fingerprint=fingerprint)


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"  # generation and last-token reads assume left padding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@profile.phase("model_load")
def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a model as ``spec`` says; prefer :func:`loaded`, which also releases it."""
    source = resolve_source(spec.name)
    model, tokenizer, fingerprint = SOURCES[source.kind](source, spec)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _prepare_tokenizer(tokenizer)
    blocks = resolve_blocks(model, spec.blocks_path)
    identity = identity_of(source.display, model, fingerprint, len(blocks))
    return LoadedModel(model, tokenizer, identity, blocks, spec)


def release(obj: LoadedModel | nn.Module | None) -> None:
    """Drop references we hold and return cached GPU memory."""
    if isinstance(obj, LoadedModel):
        obj.model = None
    del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded(spec: ModelSpec) -> Iterator[LoadedModel]:
    """Load a model for the duration of a block; released on exit, also on error."""
    handle = load_model(spec)
    try:
        yield handle
    finally:
        release(handle)


def with_name(spec: ModelSpec, name: str) -> ModelSpec:
    return replace(spec, name=name)
