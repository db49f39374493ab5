"""Whole-model tools: inject adapters, count, save/load, merge, import PEFT LoRA checkpoints.

Adapters replace matching ``nn.Linear`` modules in place and share their frozen
weights; everything else in the model is frozen unless named in ``modules_to_save``.
Adapter files are a directory with ``adapter_model.safetensors`` and
``adapter_config.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import full, writes_files
from .modules import AdaptedLinear, DCFTLinear, DeLoRALinear, LoKrLinear, LoRALinear, linear_dims

METHODS = {"dcft": DCFTLinear, "lora": LoRALinear, "delora": DeLoRALinear, "lokr": LoKrLinear}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_CONFIG_ATTR = "dcft_kernels_config"  # set on the model by inject_adapters
# Constructor options each method takes (and that a saved config records).
_OPTIONS = {
    "dcft": ("kernel_size", "rank", "alpha", "dropout", "init", "activation", "backend"),
    "lora": ("rank", "alpha", "rslora", "dropout", "activation", "backend"),
    "delora": ("rank", "alpha", "dropout", "activation", "backend"),
    "lokr": ("rank", "alpha", "decompose_factor", "decompose_both", "rank_dropout", "module_dropout",
             "rank_dropout_scale", "activation", "backend"),
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


def _default_targets(model: nn.Module):
    """PEFT's per-architecture LoRA targets for a transformers model (None when unknown)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return None
    return mapping.get(model_type)


def _target_names(model: nn.Module, target_modules, modules_to_save) -> list[str]:
    if target_modules is None:
        target_modules = _default_targets(model)
        if target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(f"target_modules not given and no default is known for {type(model).__name__} "
                             f"(model_type={model_type!r}; the defaults come from PEFT's mapping when peft is "
                             "installed); pass module names, a regex or 'all-linear'")
    if target_modules == "all-linear":
        # As PEFT: every linear layer but the output layer (and the modules trained whole).
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in model.named_modules() if n and linear_dims(m) is not None and m is not output
                and not (modules_to_save and _matches(n, modules_to_save))]
    if isinstance(target_modules, str):
        re.compile(target_modules)  # a bad regex fails here, before the model changes
    return [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]


def inject_adapters(model: nn.Module, method: str = "dcft", target_modules=None, modules_to_save=(),
                    **config) -> nn.Module:
    """Replace the linear modules named by ``target_modules`` with adapted ones, in place.

    Args:
        model: any ``nn.Module`` (a Hugging Face model included).
        method: ``"dcft"``, ``"lora"``, ``"delora"`` or ``"lokr"``.
        target_modules: a list of module names or name suffixes (``["query", "value"]``), a
            regex string that must match the whole module name, ``"all-linear"`` (every
            ``nn.Linear`` / ``Conv1D`` but the output layer), or None (default): the
            architecture's usual targets, from PEFT's mapping for transformers models
            (``["query", "value"]`` for BERT, ``["c_attn"]`` for GPT-2, ...).
        modules_to_save: names or suffixes of other modules (a classifier head, say) that stay
            trainable and are saved with the adapter.
        **config: options of the adapter class (``kernel_size``, ``rank``, ``alpha``, ``dropout``,
            ``init``, ``backend``).

    Every other parameter of the model is frozen. Returns ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    _validate_options(method, config)
    existing = getattr(model, _CONFIG_ATTR, None)
    if existing is not None:
        # One adapter config per model: a second call would overwrite the first's record and
        # leave save_adapter writing a file that load_adapter cannot read back.
        raise ValueError(f"model already has {existing['method']!r} adapters on {len(existing['target_modules'])} "
                         "modules; inject_adapters adds one adapter set per model (build mixed models from the "
                         "module classes' from_linear)")
    names = _target_names(model, target_modules, modules_to_save)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}")
    for name in names:
        module = model.get_submodule(name)
        if linear_dims(module) is None:
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; only nn.Linear and "
                            "transformers' Conv1D can be adapted")
    saved = [n for n, _ in model.named_modules() if n and modules_to_save and _matches(n, modules_to_save)]
    if modules_to_save and not saved:
        raise ValueError(f"modules_to_save={modules_to_save!r} matched no module")

    model.requires_grad_(False)
    cls = METHODS[method]
    for name in names:
        _set_submodule(model, name, cls.from_linear(model.get_submodule(name), **config))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    adapter_config = {"method": method, "target_modules": names, "modules_to_save": saved, **config}
    setattr(model, _CONFIG_ATTR, adapter_config)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        # Recorded in config.json by transformers' save_pretrained, so that from_pretrained below
        # can rebuild the adapters (transformers alone would drop their tensors as unexpected keys).
        hf_config.dcft_kernels_adapter = adapter_config
    return model


def _validate_options(method: str, options: dict) -> None:
    """Raise for unknown or bad adapter options, touching no model (a throwaway module on 'meta')."""
    unknown = set(options) - set(_OPTIONS[method])
    if unknown:
        raise TypeError(f"{method} adapters take {list(_OPTIONS[method])}, got unexpected {sorted(unknown)}")
    _meta_adapter(method, 16, 16, options)


def _meta_adapter(method: str, in_features: int, out_features: int, options: dict) -> AdaptedLinear:
    """A throwaway adapter on the 'meta' device: validates ``options`` and tells the factor shapes,
    with no memory and no model touched. Its size warnings are left to the real layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return METHODS[method](in_features, out_features, device="meta", **options)


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
        for key, t in module.factor_tensors().items():
            tensors[f"{name}.{key}"] = t
    for name in getattr(model, _CONFIG_ATTR, {}).get("modules_to_save", []):
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{name}.{key}"] = t
    return tensors


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the adapter of ``model`` to directory ``path`` (safetensors + JSON config).

    Under ``torch.distributed`` only rank 0 writes. A model sharded with FSDP2's ``fully_shard``
    is gathered to full tensors first, which is a collective: call ``save_adapter`` on every rank
    (the file equals the unsharded model's). With DDP, calling it on rank 0 alone is enough.

    Atomic: both files are written to a temporary directory beside ``path``, which then replaces
    ``path``; a failure at any point leaves a previous adapter at ``path`` (or, if the process dies
    between the two renames, in ``path`` + ``.old``) and never a half-written one.
    """
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None or not _adapters(model):
        raise ValueError("model has no adapters; call inject_adapters first")
    if any(m.merged for _, m in _adapters(model)):
        raise ValueError("unmerge the adapters before saving them")
    from . import __version__

    tensors = {k: full(t.detach()).contiguous().cpu() for k, t in _adapter_tensors(model).items()}
    if not writes_files():
        return
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME))
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump({**config, "dcft_kernels_version": __version__}, f, indent=2)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory; a clear error for anything unreadable."""
    config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} does not exist: {path} is not an adapter saved by save_adapter")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is not a valid adapter config ({exc})") from None
    try:
        tensors = load_file(weights_file)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights_file} is not a valid adapter file ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a valid adapter config (not a JSON object)")
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"{config_file}: unknown adapter method {method!r}; expected one of {sorted(METHODS)}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{config_file}: 'target_modules' must be a non-empty list of module names, got {targets!r}")
    return config, tensors


def _check_adapter(model: nn.Module, path: str, config: dict, tensors: dict[str, torch.Tensor]):
    """Check the file against the modules the model has (or would get) before anything changes.

    Returns ``(options, inject)``: the adapter options, and whether the model still needs them
    injected. Every mismatch is a ValueError naming the layer, the expected and the found.
    """
    method = config["method"]
    options = {k: config[k] for k in _OPTIONS[method] if k in config}
    current = getattr(model, _CONFIG_ATTR, None)
    if current is not None and current["method"] != method:
        raise ValueError(f"model holds {current['method']} adapters but {path} is a {method} adapter")
    inject = current is None
    if inject:
        _validate_options(method, options)

    expected: dict[str, tuple[tuple, torch.dtype | None]] = {}  # tensor name -> (shape, dtype)
    for name in config["target_modules"]:
        module = _get(model, name, path)
        if isinstance(module, AdaptedLinear):
            if _method_of(module) != method:
                raise ValueError(f"{path}: module {name!r} holds a {_method_of(module)} adapter, not {method}")
            if module.merged:
                raise ValueError(f"{path}: module {name!r} is merged; call unmerge_adapters(model) before loading")
            for key, opt in (("rank", "rank"), ("kernel_size", "kernel_size"), ("alpha", "alpha"),
                             ("rslora", "rslora"), ("activation", "activation"),
                             ("decompose_factor", "decompose_factor"), ("decompose_both", "decompose_both")):
                if opt in options and getattr(module, key, options[opt]) != options[opt]:
                    raise ValueError(f"{path}: module {name!r} has {key}={getattr(module, key)!r}, the file has "
                                     f"{options[opt]!r}")
            for key, t in module.factor_tensors().items():
                expected[f"{name}.{key}"] = (tuple(t.shape), t.dtype)
        elif linear_dims(module) is not None:
            if not inject:
                raise ValueError(f"{path}: module {name!r} is a plain {type(module).__name__} in a model injected "
                                 "with adapters")
            for key, shape in _factor_shapes(method, module, options).items():
                expected[f"{name}.{key}"] = (shape, module.weight.dtype)
        else:
            raise ValueError(f"{path}: module {name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
    for name in config.get("modules_to_save") or []:
        for key, t in _get(model, name, path).state_dict().items():
            expected[f"{name}.{key}"] = (tuple(t.shape), t.dtype)

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]][0]})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]!r} belongs to no adapter or saved module of the model")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects {shape}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{path}: tensor {key!r} has dtype {t.dtype}, the model expects {dtype}")
    return options, inject


def _get(model, name, path):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path}: the model has no module {name!r}") from None


def _factor_shapes(method, linear: nn.Module, options) -> dict[str, tuple]:
    """The factor shapes an adapter of ``method`` with ``options`` would get on ``linear``."""
    in_features, out_features, _ = linear_dims(linear)
    meta = _meta_adapter(method, in_features, out_features, options)
    return {key: tuple(t.shape) for key, t in meta.factor_tensors().items()}


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` into ``model`` (injecting it first if needed).

    All or nothing: every tensor name, shape and dtype, the method and the options (rank,
    kernel size, alpha) are checked against the modules the model has, or would get, before
    anything changes. A missing or extra tensor, a mismatch, a merged module or an unreadable file
    raises ``ValueError`` (``FileNotFoundError`` for a missing file) and leaves every parameter
    and module of the model as it was. The loaded tensors are bit-exact copies of the saved ones.
    Returns ``model``.
    """
    config, tensors = _read_adapter(path)
    options, inject = _check_adapter(model, path, config, tensors)
    _apply_adapter(model, config, tensors, options, inject, config.get("modules_to_save") or [])
    return model


def _apply_adapter(model, config, tensors, options, inject, saved_modules):
    """After ``_check_adapter``: inject if needed, then copy the factors and the saved modules' tensors."""
    if inject:
        inject_adapters(model, config["method"], target_modules=config["target_modules"],
                        modules_to_save=config.get("modules_to_save") or (), **options)
    with torch.no_grad():
        for name in config["target_modules"]:
            for key, t in model.get_submodule(name).factor_tensors().items():
                t.copy_(tensors[f"{name}.{key}"])
        for owner in saved_modules:
            prefix = owner + "."
            model.get_submodule(owner).load_state_dict(
                {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})


def from_pretrained(model_class, path: str, **kwargs) -> nn.Module:
    """Load a model saved with transformers' ``save_pretrained`` after ``inject_adapters``, adapters
    included: ``model_class.from_pretrained(path, **kwargs)`` loads the base weights (and warns that
    the adapter tensors were unused: it has no modules for them), then the adapters recorded in
    ``config.json`` are injected and their tensors read from the same safetensors files.

    Plain ``model_class.from_pretrained`` on such a directory gives the *base* model: the
    fine-tuned adapter is not applied. Use this function, or ``save_adapter`` / ``load_adapter``.
    """
    model = model_class.from_pretrained(path, **kwargs)
    config = getattr(model.config, "dcft_kernels_adapter", None)
    if not config:
        raise ValueError(f"{path}: config.json records no dcft_kernels adapter (was inject_adapters called "
                         "before save_pretrained?)")
    del model.config.dcft_kernels_adapter  # inject_adapters records it again
    tensors = _read_pretrained_tensors(path, config)
    # The saved modules' tensors are ordinary model weights: transformers has loaded them already.
    options, inject = _check_adapter(model, path, {**config, "modules_to_save": []}, tensors)
    _apply_adapter(model, config, tensors, options, inject, saved_modules=[])
    return model


def _read_pretrained_tensors(path: str, config: dict) -> dict[str, torch.Tensor]:
    """The adapter factors from ``model.safetensors`` (or its shards) written by save_pretrained."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    wanted = {f"{name}.{key}" for name in config["target_modules"] for key in ("A", "B", "core", "kernel")}
    tensors = {}
    for file in files:
        full = os.path.join(path, file)
        try:
            with safe_open(full, framework="pt") as f:
                for key in f.keys():
                    if key in wanted:
                        tensors[key] = f.get_tensor(key)
        except Exception as exc:
            raise ValueError(f"{full} is not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors


# ---- merge -----------------------------------------------------------------------------------------

def merge_adapters(model: nn.Module, unload: bool = True) -> nn.Module:
    """Add every ΔW into its frozen weight.

    ``unload=True`` (default) puts plain ``nn.Linear`` (or ``Conv1D``) modules back: inference then costs
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
            if module.weight_is_in_by_out:
                from transformers.pytorch_utils import Conv1D

                linear = Conv1D(module.out_features, module.in_features)
            else:
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                   device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            _set_submodule(model, name, linear)
    if unload and hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
        if hasattr(getattr(model, "config", None), "dcft_kernels_adapter"):
            del model.config.dcft_kernels_adapter  # a merged model saves and loads as a plain one
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
    owners = sorted({key.rpartition(".")[0] for key in saved})
    for key in saved:
        owner, _, attr = key.rpartition(".")
        target = _get(model, owner, peft_dir)
        if attr not in target.state_dict() or target.state_dict()[attr].shape != saved[key].shape:
            raise ValueError(f"{peft_dir}: saved tensor {key!r} does not fit module {owner!r}")
    # Exact names, so that a saved module is not matched again by suffix elsewhere in the model.
    inject_adapters(model, "lora", target_modules="|".join(re.escape(n) for n in names),
                    modules_to_save="|".join(re.escape(n) for n in owners) if owners else (), rank=rank, alpha=alpha,
                    rslora=bool(config.get("use_rslora", False)), dropout=float(config.get("lora_dropout", 0.0)),
                    backend=backend)
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            module.A.copy_(factors[name]["A"])
            module.B.copy_(factors[name]["B"])
        for key, t in saved.items():
            owner, _, attr = key.rpartition(".")
            model.get_submodule(owner).state_dict()[attr].copy_(t)
    return model
