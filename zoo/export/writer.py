"""Writing a deployable student (issue 15): a transformers directory that loads without the teacher.

``export_model(module, output)`` takes a built student (a ``DistillationModule`` whose targets are
``Replaced``) and writes, into a temp directory beside ``output`` renamed into place at the end (a half-written
export never looks complete):

- ``config.json``: the teacher's architecture, ``auto_map`` -> ``modeling_zoo.ZooForCausalLM`` and a ``zoo``
  block (format, teacher, recipe, and per replaced module its kind, shapes, ranks and program);
- ``model.safetensors``: the student's tensors only (no dense originals of replaced modules; frozen factors,
  frame rows, signs, permutations and indices included, so nothing is rebuilt from calibration);
- ``modeling_zoo.py`` and the ``fuse_zoo.py`` it imports (torch + transformers only), the tokenizer,
  ``generation_config.json``, ``README.md``.

With ``merge`` every replacement is folded into a dense weight (its program applied to the identity) and
the directory is a plain checkpoint of the teacher's class: allowed only where that loses nothing and
keeps the size, i.e. an affine replacement that stores at least as many numbers as the dense map (LoRA,
coefficient adapters, a full-rank structured student). A compressed student is refused: merging it would
give back a teacher-sized model.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ZooError
from ..core.models import parse_dtype
from ..core.replacement import is_affine
from ..core.surgery import replaced_modules
from . import modeling_zoo
from .spec import describe, exportable

MODELING_FILE = "modeling_zoo.py"
#: its relative import, shipped beside it
FUSE_FILE = "fuse_zoo.py"
#: tensor kinds stored in their own dtype whatever the export dtype
KEPT = {"float32": torch.float32, "float16": torch.float16}


def _under(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def student_parts(model: nn.Module) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """(zoo-block module entries, student state dict) of a model whose targets are ``Replaced``."""
    replaced = replaced_modules(model)
    if not replaced:
        raise ZooError("nothing to export: the model has no replaced modules (build the student first)")
    refused = sorted({f"{type(w.replacement).__name__} ({n})" for n, w in replaced.items()
                      if not exportable(w.replacement)})
    if refused:
        raise ZooError(f"zoo export cannot describe {len(refused)} replacement(s): {', '.join(refused[:4])}"
                       f"{' ...' if len(refused) > 4 else ''}; they have no export_spec()/export_tensors()")
    entries, state = {}, {}
    for name, wrapper in replaced.items():
        entry, tensors = describe(name, wrapper.replacement)
        entries[name] = entry
        state |= {f"{name}.{t}": v for t, v in tensors.items()}
    for key, value in model.state_dict().items():
        if not _under(key, replaced):
            state[key] = value
    return entries, state


def _cast(state: dict[str, torch.Tensor], entries: dict[str, dict], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype``, except those a replacement keeps in fp32 or fp16; indices stay int64, codes
    uint8."""
    kinds = {f"{n}.{t}": meta["dtype"] for n, e in entries.items() for t, meta in e["tensors"].items()}
    out, seen = {}, set()
    for key, value in state.items():
        kind = kinds.get(key, "model")
        value = value.detach().cpu()
        if key in kinds and value.data_ptr() in seen:
            value = value.clone()  # a frame shared by several layers is stored once per layer that reads it
        seen.add(value.data_ptr())
        if kind in ("int64", "uint8"):
            out[key] = value.to(getattr(torch, kind)).contiguous()
        else:
            out[key] = value.to(KEPT.get(kind, dtype)).contiguous()
    return out


def count_parameters(tensors) -> int:
    """Floating-point numbers held, each storage counted once (tied embeddings are one tensor)."""
    seen, total = set(), 0
    for t in tensors:
        if t.is_floating_point() and (t.data_ptr(), t.shape) not in seen:
            seen.add((t.data_ptr(), t.shape))
            total += t.numel()
    return total


def teacher_parameters(model: nn.Module) -> int:
    """The dense teacher's parameter count (the originals of replaced modules, not their replacements)."""
    replaced = replaced_modules(model)
    return count_parameters(p for n, p in model.named_parameters(remove_duplicate=False)
                            if not _under(n, [f"{r}.replacement" for r in replaced]))


#: bytes per number of each stored tensor kind; ``model`` tensors take the export dtype's
KIND_BYTES = {"float32": 4, "float16": 2, "int64": 8, "uint8": 1}


def entry_bytes(entry: dict, float_bytes: int = 2) -> int:
    """Bytes one replaced module's export stores (``float_bytes`` per ``model``-kind number: 2 for bf16/fp16)."""
    return sum(torch.Size(m["shape"]).numel() * KIND_BYTES.get(m["dtype"], float_bytes) for m in entry["tensors"].values())


def size_report(model: nn.Module, float_bytes: int = 2, stored: dict[str, int] | None = None) -> dict[str, float]:
    """What the student's export stores, with floating tensors at ``float_bytes`` each (16-bit by default, as
    students ship): ``replaced_bytes`` of the replaced modules, ``replaced_weights`` of the originals they
    replace, ``bits_per_weight`` (8 x bytes / weights), ``student_bytes`` (the rest of the model added, each
    storage once) and ``teacher_bytes`` (the dense teacher at the same width). ``stored`` gives the bytes of
    modules whose real format is not their export's (``Technique.stored_bytes``). Empty when a replacement has no
    export description."""
    replaced = replaced_modules(model)
    if not replaced or not all(exportable(w.replacement) for w in replaced.values()):
        return {}
    stored = sum((stored or {}).get(n) or entry_bytes(describe(n, w.replacement)[0], float_bytes)
                 for n, w in replaced.items())
    weights = count_parameters(p for w in replaced.values() for p in w.original.parameters())
    rest = count_parameters(p for n, p in model.named_parameters(remove_duplicate=False) if not _under(n, replaced))
    return {"replaced_bytes": stored, "replaced_weights": weights, "bits_per_weight": 8 * stored / weights,
            "student_bytes": stored + rest * float_bytes, "teacher_bytes": teacher_parameters(model) * float_bytes}


def merged_state(model: nn.Module, entries: dict[str, dict], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student as dense weights in the teacher's own layout (see the module docstring for when)."""
    replaced = replaced_modules(model)
    refused = []
    for name, entry in entries.items():
        stored = sum(torch.Size(m["shape"]).numel() for m in entry["tensors"].values() if m["dtype"] not in ("int64", "uint8"))
        dense = (entry["in_features"] or 0) * (entry["out_features"] or 0)
        if entry["module"] != "linear" or not is_affine(replaced[name].replacement):
            refused.append(f"{name} ({entry['kind']}: not an affine map)")
        elif stored < dense:
            refused.append(f"{name} ({entry['kind']}: {stored} numbers where the dense map has {dense})")
    if refused:
        raise ZooError(f"--merge refused: merging would undo the compression or change what the model computes: "
                       f"{'; '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}; export without --merge")
    out = {k: v for k, v in state.items() if not _under(k, entries)}
    for name, entry in entries.items():
        tensors = {t: state[f"{name}.{t}"].double() if state[f"{name}.{t}"].is_floating_point()
                   else state[f"{name}.{t}"] for t in entry["tensors"]}
        with torch.no_grad():
            zero = torch.zeros(1, entry["in_features"], dtype=torch.float64)
            offset = modeling_zoo.run(entry["program"], zero, tensors.__getitem__)[0]
            columns = modeling_zoo.run(entry["program"], torch.eye(entry["in_features"], dtype=torch.float64),
                                       tensors.__getitem__) - offset
        original = replaced[name].original
        out[f"{name}.weight"] = columns.T.contiguous()
        if getattr(original, "bias", None) is not None:
            out[f"{name}.bias"] = offset
        elif offset.abs().max() > 0:
            raise ZooError(f"--merge refused: {name} has a bias but the teacher's layer has none")
    return out


def _assemble(cls: type, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A ``cls(config)`` holding ``state`` (built on the meta device, then the tensors assigned: no copy)."""
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:  # a spec that does not match its own program: a bug, never a silent export
        raise ZooError(f"export does not fit {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def export_model(module, output: str | Path, *, dtype: str | None = None, merge: bool = False,
                 overwrite: bool = False, recipe: dict | None = None, metrics: dict | None = None) -> Path:
    """Write the built student of ``module`` (a ``DistillationModule``) to ``output``; returns the path.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``; default: the model's) is the dtype of the stored
    tensors, except those a replacement keeps in fp32 (sigma, cores). ``recipe`` ({path, config}) and
    ``metrics`` (a run's ``metrics.json``) go into the ``zoo`` block and the model card.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise ZooError(f"output directory {str(output)!r} exists; pass --overwrite to replace it")
    model = module.model
    target = parse_dtype(dtype) if dtype else next(model.parameters()).dtype
    entries, state = student_parts(model)
    teacher_n = teacher_parameters(model)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # the zoo runs the teacher without a cache; generation wants one
    config.dtype = target
    summary: dict = {}
    if merge:
        state, cls = _cast(merged_state(model, entries, state), {}, target), type(model)
    else:
        state = _cast(state, entries, target)
        cls = modeling_zoo.zoo_causal_lm(type(model))
        config.auto_map = {"AutoModelForCausalLM": "modeling_zoo.ZooForCausalLM"}
        config.architectures = ["ZooForCausalLM"]
        config.zoo = {"format": modeling_zoo.FORMAT, "base": type(model).__name__, "teacher": module.teacher,
                      "technique": module.technique_name(), "parts": [p.describe() for p in module.parts],
                      "recipe": recipe or {}, "summary": summary, "modules": entries}
    student = _assemble(cls, config, state)
    student_n = count_parameters(student.parameters())
    summary |= {"teacher_parameters": teacher_n, "student_parameters": student_n,
                "parameter_ratio": student_n / teacher_n, **_measured(metrics)}
    student.generation_config = copy.deepcopy(model.generation_config)

    def extra(tmp: Path) -> None:
        if not merge:
            (tmp / MODELING_FILE).write_text(modeling_file(type(model).__name__))
            shutil.copyfile(Path(modeling_zoo.__file__).with_name(FUSE_FILE), tmp / FUSE_FILE)
        (tmp / "README.md").write_text(model_card(module, summary, recipe, merge, entries))

    return write_directory(student, getattr(module, "tokenizer", None), output, extra)


def write_directory(student: nn.Module, tokenizer, output: Path, extra=None) -> Path:
    """``student.save_pretrained``, the tokenizer and ``extra(dir)``'s files into a temp directory beside ``output``,
    renamed into place at the end: a half-written export never looks complete."""
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        _replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move ``tmp`` to ``output``; an old ``output`` is moved aside first and removed only after."""
    old = output.with_name(f".{output.name}.old{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def modeling_file(base: str) -> str:
    """``modeling_zoo.py`` with its base class set to the teacher's."""
    import transformers

    if not hasattr(transformers, base):
        raise ZooError(f"the teacher's class {base!r} is not exported by transformers; its export cannot load remotely")
    text = Path(modeling_zoo.__file__).read_text()
    line = f'BASE = "{modeling_zoo.BASE}"'
    if line not in text:
        raise ZooError(f"{modeling_zoo.__file__} has no line {line!r}")
    return text.replace(line, f'BASE = "{base}"', 1)


def _measured(metrics: dict | None) -> dict:
    """Heldout KL / ppl of the run, when its metrics.json has them."""
    if not metrics:
        return {}
    final, summary = metrics.get("final", {}), metrics.get("summary", {})
    found = {"heldout_kl": summary.get("heldout_kl_after", final.get("heldout_kl")),
             "heldout_ppl": final.get("heldout_ppl"), "heldout_ppl_teacher": final.get("heldout_ppl_teacher")}
    return {k: v for k, v in found.items() if v is not None}


def model_card(module, summary: dict, recipe: dict | None, merge: bool, entries: dict) -> str:
    kinds = sorted({e["kind"] for e in entries.values()})
    path = (recipe or {}).get("path", "-")
    load = ("AutoModelForCausalLM.from_pretrained(path)  # a plain checkpoint: no remote code"
            if merge else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
                          "# or, with the zoo installed: zoo.from_pretrained(path)")
    lines = [
        f"# {module.technique_name()} student of {module.teacher}", "",
        f"Compressed with zoo (structured replacements + distillation repair) from the teacher `{module.teacher}` by "
        f"the recipe `{path}` ({module.technique_name()}: {', '.join(kinds)} on {len(entries)} "
        f"module{'s' * (len(entries) != 1)}){'; merged into dense weights' if merge else ''}.",
        "", "| | value |", "| --- | --- |",
        f"| teacher | `{module.teacher}` |", f"| recipe | `{path}` |",
        f"| parameters | {summary['student_parameters']:,} (teacher: {summary['teacher_parameters']:,}) |",
        f"| compression ratio (parameters vs teacher) | {summary['parameter_ratio']:.4f} |",
    ]
    for key, label in (("heldout_kl", "heldout KL(teacher || student)"), ("heldout_ppl", "heldout perplexity"),
                       ("heldout_ppl_teacher", "teacher heldout perplexity")):
        if key in summary:
            lines.append(f"| {label} | {summary[key]:.6g} |")
    lines += ["", "Load it:", "", "```python", "from transformers import AutoModelForCausalLM", load, "```", ""]
    return "\n".join(lines)
