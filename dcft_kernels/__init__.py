"""dcft_kernels: fused kernels for DCFT, LoRA and DeLoRA adapters.

One structured weight delta ``ΔW = s · (B·C·A) ⊗ K`` serves all three; it is
applied as ``x·ΔWᵀ`` (with exact gradients) without ever building ΔW.
"""
from .functional import (
    dcft_linear,
    delora_linear,
    lora_linear,
    structured_delta_linear,
    structured_delta_weight,
)
from .dcft_checkpoint import load_dcft_checkpoint
from .model import (
    count_trainable_parameters,
    from_pretrained,
    inject_adapters,
    load_adapter,
    load_peft_lora,
    merge_adapters,
    print_trainable_parameters,
    save_adapter,
    unmerge_adapters,
)
from .peft_integration import PeftFusion, fuse_peft, unfuse_peft
from .modules import AdaptedLinear, DCFTLinear, DeLoRALinear, LoKrLinear, LoRALinear
from .params import adapter_parameters, count_adapter_parameters
from .regularizers import mpc_d_penalty, orthogonality_loss, orthogonality_penalty

__version__ = "0.1.0"

__all__ = [
    "AdaptedLinear",
    "DCFTLinear",
    "DeLoRALinear",
    "LoKrLinear",
    "LoRALinear",
    "adapter_parameters",
    "count_adapter_parameters",
    "count_trainable_parameters",
    "from_pretrained",
    "fuse_peft",
    "inject_adapters",
    "load_adapter",
    "load_dcft_checkpoint",
    "load_peft_lora",
    "merge_adapters",
    "print_trainable_parameters",
    "save_adapter",
    "unmerge_adapters",
    "unfuse_peft",
    "PeftFusion",
    "dcft_linear",
    "delora_linear",
    "lora_linear",
    "mpc_d_penalty",
    "orthogonality_loss",
    "orthogonality_penalty",
    "structured_delta_linear",
    "structured_delta_weight",
]
