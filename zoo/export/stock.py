"""A low-bit student in a stock quantized format: compressed-tensors' ``pack-quantized`` checkpoint, which plain
transformers loads (``AutoModelForCausalLM.from_pretrained(dir)``, no remote code) and vLLM serves.

Only a student that is grouped integer weights with scales fits the format: every replaced module a
``zoo.QuantizedLinear`` on one symmetric grid (compressed-tensors' asymmetric group zero points do not load in
transformers with the versions this project tests), without a Hadamard frame or a low-rank correction (the
format has neither), with whole groups (the format has no ragged last group). The checkpoint is written through
compressed-tensors' own API: the teacher's architecture with each target's weight set to the grid's dense
values, the grid's scales as ``weight_scale``, then ``ModelCompressor.compress_model`` packs the codes, which it
recovers exactly (each weight is an integer multiple of its fp16 scale).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..core.errors import ZooError
from ..core.surgery import replaced_modules
from .writer import _assemble, _under, write_directory

FORMATS = ("zoo", "compressed-tensors")


def stock_grid(model) -> tuple[dict, list[str]]:
    """(the one grid's {bits, group}, target names) of a student the stock format can hold; else a ZooError
    naming the first module that does not fit and why."""
    from ..quant import QuantizedLinear

    replaced = replaced_modules(model)
    grids = set()
    for name, wrapper in replaced.items():
        layer = wrapper.replacement
        why = ("is not a low-bit grid" if not isinstance(layer, QuantizedLinear) else
               "has a Hadamard frame" if layer.frame is not None else
               "has a low-rank correction" if layer.A is not None else
               "has asymmetric zero points (symmetric=true fits)" if not layer.grid.symmetric else
               f"has a ragged last group ({layer.in_features} inputs, group {layer.grid.group})"
               if layer.in_features % layer.grid.group else None)
        if why:
            raise ZooError(f"--format compressed-tensors holds grouped integer weights alone: {name} "
                           f"({type(layer).__name__}) {why}; export with --format zoo")
        grids.add((layer.grid.bits, layer.grid.group))
    if not grids:
        raise ZooError("nothing to export: the model has no replaced modules (build the student first)")
    if len(grids) > 1:
        raise ZooError(f"--format compressed-tensors writes one grid; the student has {sorted(grids)} (bits, group)")
    bits, group = grids.pop()
    return {"bits": bits, "group": group}, sorted(replaced)


def export_compressed_tensors(module, output: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the built student of ``module`` (a ``DistillationModule``) as a compressed-tensors checkpoint."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     apply_quantization_config)
    except ImportError as exc:
        raise ZooError("--format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
                       ) from exc
    from ..core.models import parse_dtype

    output = Path(output)
    if output.exists() and not overwrite:
        raise ZooError(f"output directory {str(output)!r} exists; pass --overwrite true to replace it")
    model = module.model
    grid, names = stock_grid(model)
    target = parse_dtype(dtype) if dtype else next(model.parameters()).dtype
    replaced = replaced_modules(model)
    state = {k: v.detach() for k, v in model.state_dict().items() if not _under(k, replaced)}
    scales = {}
    for name, wrapper in replaced.items():
        layer = wrapper.replacement
        with torch.no_grad():
            state[f"{name}.weight"] = layer.grid_weight().to(target)
            if layer.bias is not None:
                state[f"{name}.bias"] = layer.bias.detach()
        scales[name] = layer.scales.detach().half()
    config = copy.deepcopy(model.config)
    config.use_cache, config.dtype = True, target
    student = _assemble(type(model), config, {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()})
    scheme = QuantizationScheme(targets=names, weights=QuantizationArgs(num_bits=grid["bits"], type="int", symmetric=True,
                                                                        strategy="group", group_size=grid["group"]))
    apply_quantization_config(student, QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized"))
    with torch.no_grad():
        for name in names:
            layer = student.get_submodule(name)
            layer.weight_scale.data = scales[name].to(layer.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(student, quantization_format="pack-quantized")
    compressor.compress_model(student)
    student.generation_config = copy.deepcopy(model.generation_config)
    return write_directory(student, getattr(module, "tokenizer", None), output,
                           lambda tmp: compressor.update_config(str(tmp)))
