"""8-bit weights for pruned models, through torchao (docs/quantization.md).

- ``quantize_int8``: torchao's ``quantize_`` with ``Int8WeightOnlyConfig`` on a model's Linear layers, in
  place: symmetric int8 per output row (scale = max |w| of the row / 127.5), so 0 maps to 0 and every pruned
  weight stays exactly zero (``check_zeros`` refuses a model where one does not). Convolutions, embeddings
  and norms stay float32; torchao has no weight-only int8 for them.
- ``int8_state`` / ``load_int8_state``: the quantized model as plain tensors (``<name>.qdata`` int8,
  ``<name>.scale`` float32, the rest as they are) for safetensors, and back into a built model.
- ``prepare_quant_aware``: CONFIG_QUANT_AWARE. torchao's quantization-aware training swaps Linear layers for
  ``FakeQuantizedLinear`` (same parameters, same state_dict names), whose forward rounds the weights to the
  int8 grid ``quantize_int8`` uses, so training sees the int8 model's error and the export keeps its quality.

torchao logs the GPU kernels it cannot load on a CPU machine at import; those lines are silenced here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lib.core.errors import ConfigError, HarnessError

QUANTS = ("none", "int8")
SCHEME = "int8 weight-only, symmetric, one scale per output row (torchao Int8WeightOnlyConfig)"


def torchao() -> Any:
    """The torchao module, imported quietly; one line when it is missing."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao as module
        import torchao.quantization  # noqa: F401
        import torchao.quantization.qat  # noqa: F401
    except ImportError:
        raise HarnessError("torchao is not installed; `make venv` installs it from requirements.txt") from None
    return module


def check_quant(value: str, where: str = "QUANT") -> str:
    if value not in QUANTS:
        raise HarnessError(f"{where}={value!r} is not a quantization; choose one of {', '.join(QUANTS)}")
    return value


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def tied_linears(model: nn.Module) -> list[str]:
    """Linear layers whose weight another module shares (GPT-2's head, tied to the token embedding): left
    float32 and tied, since an int8 copy beside the float32 embedding would store the table twice."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    return [name for name in linear_names(model) if f"{name}.weight" in shared]


def quantize_int8(model: nn.Module, what: str = "the model") -> dict[str, Any]:
    """Quantize ``model``'s Linear weights to int8 in place (CPU, float32); return the card's facts."""
    linears = linear_names(model)
    if not linears:
        raise HarnessError(f"QUANT=int8: {what} ({type(model).__name__}) has no Linear layer, and torchao's int8 "
                           f"weight-only quantization covers Linear layers only; export with QUANT=none")
    ao = torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    tied = tied_linears(model)
    chosen = [name for name in linears if name not in tied]
    before = {f"{name}.weight": model.get_submodule(name).weight.detach().clone() for name in chosen}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _, name: name in chosen)
    zeros = check_zeros(model, before)
    others = [name for name, p in model.named_parameters() if name not in before and p.dim() > 1]
    return {"scheme": SCHEME, "torchao": ao.__version__, "quantized": sorted(before), "float32": others,
            "tied_float32": [f"{name}.weight" for name in tied], "zeros_kept": zeros}


@torch.no_grad()
def check_zeros(model: nn.Module, before: dict[str, torch.Tensor]) -> int:
    """How many weights of the quantized Linear layers were zero before and are still zero (all of them, or
    refused). Weights that only round to zero are not counted: they were not pruned."""
    kept = 0
    for name, weight in before.items():
        qdata = dict(model.named_parameters())[name].qdata
        pruned = weight == 0
        if bool(qdata[pruned].any()):
            raise HarnessError(f"QUANT=int8: {name} has pruned weights that are not zero after quantization; "
                               f"not exported")
        kept += int(pruned.sum())
    return kept


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model's tensors as plain ones: ``<name>.qdata`` and ``<name>.scale`` for int8 weights, a
    tied tensor once (under its first name; building the model ties it again)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "qdata"):
            state[f"{name}.qdata"], state[f"{name}.scale"] = tensor.qdata.contiguous(), tensor.scale.contiguous()
        elif (tensor.data_ptr(), tensor.shape) not in seen:
            seen.add((tensor.data_ptr(), tensor.shape))
            state[name] = tensor
    return state


def load_int8_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``int8_state``'s tensors back into a freshly built ``model``: its int8 Linear weights become torchao
    Int8Tensors again (the forward dequantizes them), the rest loads as usual and tied tensors stay tied."""
    torchao()
    from torchao.quantization import Int8Tensor

    state, quantized = dict(state), []
    for name in [n.removesuffix(".qdata") for n in state if n.endswith(".qdata")]:
        qdata, scale = state.pop(f"{name}.qdata"), state.pop(f"{name}.scale")
        module = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear) or tuple(qdata.shape) != tuple(module.weight.shape):
            raise HarnessError(f"the int8 export's {name} {tuple(qdata.shape)} does not fit the model")
        weight = Int8Tensor(qdata, scale, block_size=[1, qdata.shape[1]], dtype=torch.float32)
        module.weight = nn.Parameter(weight, requires_grad=False)
        quantized.append(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    aliases = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in loaded}
    missing = [n for n in missing if n not in quantized and n not in aliases]
    if missing or unexpected:
        raise HarnessError(f"the int8 export does not fit the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return model


def prepare_quant_aware(model: nn.Module) -> int:
    """CONFIG_QUANT_AWARE: fake-quantize to int8 in the forward (in place), on the grid ``quantize_int8`` uses,
    the Linear weights it quantizes (not a tied head); return how many layers. One line without any."""
    linears = linear_names(model)
    if not linears:
        raise ConfigError(f"CONFIG_QUANT_AWARE: {type(model).__name__} has no Linear layer to fake-quantize; "
                          f"turn QUANT_AWARE off")
    torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    chosen = [name for name in linears if name not in tied_linears(model)]  # the layers the export quantizes
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    quantize_(model, QATConfig(weight_config=weights, step="prepare"), filter_fn=lambda _, name: name in chosen)
    return len(chosen)


def check_quant_aware(device: torch.device, autocast: Any) -> None:
    """One line when torchao's fake quantization cannot run a forward and backward on ``device`` under the
    plan's precision (``autocast``: a context factory), before any training starts."""
    layer = nn.Sequential(nn.Linear(8, 8)).to(device)
    try:
        prepare_quant_aware(layer)
        with autocast():
            out = layer(torch.ones(2, 8, device=device))
        out.float().sum().backward()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"CONFIG_QUANT_AWARE: torchao's fake quantization does not run on {device} in this "
                          f"precision ({line}); turn QUANT_AWARE off or choose CONFIG_DTYPE_FP32") from None
