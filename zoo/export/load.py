"""Loading a ``zoo export`` directory with the zoo installed (issue 15): ``zoo.from_pretrained(dir)``.

The model class is ``modeling_zoo.zoo_causal_lm(<teacher class>)`` from this package, the same code the
directory's own ``modeling_zoo.py`` runs under ``trust_remote_code``; a directory missing a file, or whose
weights do not fit its ``zoo`` block, ends in one ``ZooError`` naming what is wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError

from ..core.errors import ZooError
from ..core.models import parse_dtype
from . import modeling_zoo

REQUIRED = ("config.json", "model.safetensors")


def check_export_dir(path: str | Path) -> dict:
    """The ``config.json`` of an export directory, after checking that the files loading needs are there."""
    path = Path(path)
    if not path.is_dir():
        raise ZooError(f"export directory {str(path)!r} does not exist")
    for name in REQUIRED:
        if not (path / name).is_file() and not (name == "model.safetensors" and (path / f"{name}.index.json").is_file()):
            raise ZooError(f"export directory {str(path)!r} is incomplete: it has no {name}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ZooError(f"{str(path / 'config.json')!r} is not valid JSON: {exc}") from None
    if "zoo" in config and not (path / "modeling_zoo.py").is_file():
        raise ZooError(f"export directory {str(path)!r} is incomplete: it has no modeling_zoo.py")
    return config


def from_pretrained(path: str | Path, dtype: str | None = None, device: str | None = None, fuse: bool = True,
                    compile: bool | dict = False, onednn: bool = False):
    """The exported student of ``path`` as a transformers model (eval mode), ``dtype`` its floating dtype
    (default: as stored). A merged (plain) export loads as the teacher's class. ``fuse``: fold each program into
    its fixed form (``modeling_zoo.fuse_model``; False runs the stored programs op by op); ``onednn``: its linear maps
    run oneDNN's kernel on weights reordered once (``modeling_zoo.pack_model``: CPU inference, twice the weights'
    memory); ``compile``: also ``torch.compile`` the forward (True, or torch.compile's keyword arguments)."""
    import transformers

    config_json = check_export_dir(path)
    kwargs = {"dtype": parse_dtype(dtype) if dtype else "auto"}
    if device:
        kwargs["device_map"] = device
    try:
        if "zoo" not in config_json:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
            return modeling_zoo.pack_model(model) if onednn else model
        base = config_json["zoo"].get("base", "")
        if not hasattr(transformers, base):
            raise ZooError(f"{str(path)!r} was exported from a {base!r}, which this transformers does not have")
        cls = modeling_zoo.zoo_causal_lm(getattr(transformers, base))
        model = cls.from_pretrained(str(path), zoo_fuse=fuse, zoo_compile=compile, zoo_onednn=onednn,
                                    **kwargs)
    except SafetensorError as exc:  # a merged export: transformers' own loader; name the file
        raise ZooError(f"{str(Path(path) / 'model.safetensors')!r} is not a readable safetensors file "
                       f"({str(exc).splitlines()[0]}); the export is damaged or incomplete: export it again") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ZooError(f"could not load the export {str(path)!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()
