"""Whole-model tools: inject adapters, count, save/load, merge, import PEFT LoRA checkpoints.

Adapters replace matching ``nn.Linear`` modules in place and share their frozen
weights; everything else in the model is frozen unless named in ``modules_to_save``.
Adapter files are a directory with ``adapter_model.safetensors`` and
``adapter_config.json``.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .modules import AdaptedLinear, DCFTLinear, DeLoRALinear, LoRALinear

METHODS = {"dcft": DCFTLinear, "lora": LoRALinear, "delora": DeLoRALinear}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_CONFIG_ATTR = "dcft_kernels_config"  # set on the model by inject_adapters
# Constructor options each method takes (and that a saved config records).
_OPTIONS = {
    "dcft": ("kernel_size", "rank", "alpha", "dropout", "init", "backend"),
    "lora": ("rank", "alpha", "dropout", "backend"),
    "delora": ("rank", "alpha", "dropout", "backend"),
}


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry matches the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _adapters(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def _method_of(module: AdaptedLinear) -> str:
    return next(k for k, cls in METHODS.items() if type(module) is cls)


def inject_adapters(model: nn.Module, method: str = "dcft", target_modules=("query", "key", "value"),
                    modules_to_save=(), **config) -> nn.Module:
    """Replace the ``nn.Linear`` modules named by ``target_modules`` with adapted ones, in place.

    Args:
        model: any ``nn.Module`` (a Hugging Face model included).
        method: ``"dcft"``, ``"lora"`` or ``"delora"``.
        target_modules: a list of module names or name suffixes (``["query", "value"]``), or a
            regex string that must match the whole module name.
        modules_to_save: names or suffixes of other modules (a classifier head, say) that stay
            trainable and are saved with the adapter.
        **config: options of the adapter class (``kernel_size``, ``rank``, ``alpha``, ``dropout``,
            ``init``, ``backend``).

    Every other parameter of the model is frozen. Returns ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = set(config) - set(_OPTIONS[method])
    if unknown:
        raise TypeError(f"{method} adapters take {list(_OPTIONS[method])}, got unexpected {sorted(unknown)}")
    if isinstance(target_modules, str):
        re.compile(target_modules)  # a bad regex fails here, before the model changes
    names = [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, AdaptedLinear):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; only nn.Linear can be adapted")
    saved = [n for n, _ in model.named_modules() if n and modules_to_save and _matches(n, modules_to_save)]
    if modules_to_save and not saved:
        raise ValueError(f"modules_to_save={modules_to_save!r} matched no module")

    model.requires_grad_(False)
    cls = METHODS[method]
    for name in names:
        _set_submodule(model, name, cls.from_linear(model.get_submodule(name), **config))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, _CONFIG_ATTR, {"method": method, "target_modules": names, "modules_to_save": saved, **config})
    return model


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` as PEFT does."""
    trainable, total = count_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# ---- save / load ------------------------------------------------------------------------------------

def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter file holds: the adapter factors (DeLoRA's frozen random A, B too,
    which the adapter cannot be rebuilt without) and the parameters of ``modules_to_save``."""
    tensors = {}
    for name, module in _adapters(model):
        for key in ("A", "B", "core", "kernel"):
            t = getattr(module, key, None)
            if t is not None:
                tensors[f"{name}.{key}"] = t
    for name in getattr(model, _CONFIG_ATTR, {}).get("modules_to_save", []):
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{name}.{key}"] = t
    return tensors


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the adapter of ``model`` to directory ``path`` (safetensors + JSON config)."""
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None or not _adapters(model):
        raise ValueError("model has no adapters; call inject_adapters first")
    if any(m.merged for _, m in _adapters(model)):
        raise ValueError("unmerge the adapters before saving them")
    from . import __version__

    os.makedirs(path, exist_ok=True)
    tensors = {k: t.detach().contiguous().cpu() for k, t in _adapter_tensors(model).items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({**config, "dcft_kernels_version": __version__}, f, indent=2)


def _expected_shape(method, key, linear: nn.Linear, config):
    rank = config.get("rank", 1 if method == "dcft" else 8)
    d = config.get("kernel_size", 8) if method == "dcft" else 1
    shapes = {"A": (rank, math.ceil(linear.in_features / d)), "B": (math.ceil(linear.out_features / d), rank),
              "core": (rank, rank), "kernel": (d, d)}
    return shapes.get(key)


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` into ``model`` (injecting it first if needed).

    Everything is checked before the model is touched: a wrong method, a missing module or a
    tensor of the wrong shape raises ``ValueError`` and leaves the model as it was. The loaded
    tensors are bit-exact copies of the saved ones. Returns ``model``.
    """
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: unknown adapter method {method!r}")
    options = {k: config[k] for k in _OPTIONS[method] if k in config}
    current = getattr(model, _CONFIG_ATTR, None)
    if current is not None and current["method"] != method:
        raise ValueError(f"model holds {current['method']} adapters but {path} is a {method} adapter")

    modules = {}
    for name in config["target_modules"]:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the model has no module {name!r}") from None
        if isinstance(module, AdaptedLinear):
            if _method_of(module) != method:
                raise ValueError(f"module {name!r} holds a {_method_of(module)} adapter, not {method}")
        elif not isinstance(module, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear")
        modules[name] = module
    saved_state = {}
    for name in config.get("modules_to_save", []):
        try:
            saved_state[name] = model.get_submodule(name).state_dict()
        except AttributeError:
            raise ValueError(f"{path}: the model has no module {name!r}") from None
    for key, t in tensors.items():
        name, _, attr = key.rpartition(".")
        if name in modules:
            want = _expected_shape(method, attr, modules[name], options)
        elif any(key.startswith(m + ".") for m in saved_state):
            owner = next(m for m in saved_state if key.startswith(m + "."))
            ref = saved_state[owner].get(key[len(owner) + 1:])
            want = None if ref is None else tuple(ref.shape)
        else:
            raise ValueError(f"{path}: tensor {key!r} belongs to no adapted or saved module of the model")
        if want is None or tuple(t.shape) != want:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects {want}")

    if current is None:
        inject_adapters(model, method, target_modules=config["target_modules"],
                        modules_to_save=config.get("modules_to_save") or (), **options)
    with torch.no_grad():
        for key, t in tensors.items():
            name, _, attr = key.rpartition(".")
            if name in modules:
                getattr(model.get_submodule(name), attr).copy_(t)
        for owner in saved_state:
            prefix = owner + "."
            model.get_submodule(owner).load_state_dict(
                {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
    return model


# ---- merge -----------------------------------------------------------------------------------------

def merge_adapters(model: nn.Module, unload: bool = True) -> nn.Module:
    """Add every ΔW into its frozen weight.

    ``unload=True`` (default) puts plain ``nn.Linear`` modules back in place: inference then costs
    exactly the original model. ``unload=False`` keeps the adapter modules, merged, so that
    ``unmerge_adapters`` can undo it. Returns ``model``.
    """
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("model has no adapters to merge")
    for name, module in adapters:
        if not module.merged:
            module.merge()
        if unload:
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            _set_submodule(model, name, linear)
    if unload and hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Subtract every merged ΔW again (after ``merge_adapters(model, unload=False)``). Returns ``model``."""
    for _, module in _adapters(model):
        if module.merged:
            module.unmerge()
    return model


# ---- PEFT LoRA import ------------------------------------------------------------------------------

def load_peft_lora(model: nn.Module, peft_dir: str, backend: str = "auto") -> nn.Module:
    """Load a PEFT LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``) into
    ``LoRALinear`` modules, so an existing LoRA trains or serves on these kernels.

    Supports PEFT's ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``target_modules``,
    ``modules_to_save`` and ``fan_in_fan_out`` (the factors are stored the same way either way; only
    ``nn.Linear`` targets are supported). Returns ``model``.
    """
    with open(os.path.join(peft_dir, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{peft_dir}: not a LoRA checkpoint (peft_type={config.get('peft_type')!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{peft_dir}: bias={config['bias']!r} is not supported, only 'none'")
    if config.get("use_dora"):
        raise ValueError(f"{peft_dir}: DoRA checkpoints are not supported")
    tensors = load_file(os.path.join(peft_dir, WEIGHTS_NAME))
    factors, saved = {}, {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if match:
            factors.setdefault(match[1], {})[match[2]] = t
        else:
            saved[name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = t
    if not factors:
        raise ValueError(f"{peft_dir}: no lora_A / lora_B tensors found")
    rank, alpha = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        raise ValueError(f"{peft_dir}: rank_pattern / alpha_pattern are not supported")
    names = sorted(factors)
    for name in names:
        if set(factors[name]) != {"A", "B"}:
            raise ValueError(f"{peft_dir}: module {name!r} lacks lora_A or lora_B")
        A, B = factors[name]["A"], factors[name]["B"]
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"PEFT target {name!r} is a {type(module).__name__}; only nn.Linear is supported")
        if A.shape != (rank, module.in_features) or B.shape != (module.out_features, rank):
            raise ValueError(f"{peft_dir}: {name!r} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, "
                             f"expected ({rank}, {module.in_features}) / ({module.out_features}, {rank})")
    inject_adapters(model, "lora", target_modules=names, rank=rank, alpha=alpha,
                    dropout=float(config.get("lora_dropout", 0.0)), backend=backend)
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            module.A.copy_(factors[name]["A"])
            module.B.copy_(factors[name]["B"])
            if config.get("use_rslora"):
                module.scaling = alpha / math.sqrt(rank)
        for key, t in saved.items():
            owner, _, attr = key.rpartition(".")
            target = model.get_submodule(owner)
            getattr(target, attr).copy_(t)
            target.requires_grad_(True)
    return model
