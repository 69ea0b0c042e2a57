"""A GGUF file as a model: `eval`, `generate`, `serve`, `export`, `adapt --base` and `merge` take a `.gguf`
path (or a folder whose only weights are one GGUF) wherever they take a model folder.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, through the `gguf` package),
dequantized to float32, but its loaded model refuses `save_pretrained` ("quantized with gguf"), and
dequantizing takes longer than loading safetensors. So the file is dequantized once, by transformers,
into a standard checkpoint folder (config, `model.safetensors`, tokenizer, generation config) kept in
the cache under the file's sha256: the next command loads that folder at safetensors speed, and a
folder grown from the file finds it by content (`cached`). What transformers cannot read (an
architecture it has no mapping for, a tensor type the `gguf` package cannot dequantize) is named in
one line before anything is converted.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from ..atomic import atomic_path, write_json
from ..errors import UserError
from ..process import log

SUFFIX = ".gguf"
SOURCE = "gguf_source.json"  # in a dequantized folder: the file it came from (sha256, name, tensor types)
_INDEX = "stat-index.json"   # sha256 by (path, size, mtime): a large file is not hashed on every load


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the one `.gguf` of a folder that holds no other
    weights (no config.json); None when `path` is no GGUF model."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == SUFFIX:
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob(f"*{SUFFIX}"))
        if len(found) > 1:
            raise UserError(f"{path}: {len(found)} GGUF files ({', '.join(f.name for f in found)}); name the one "
                            "to load")
        return found[0] if found else None
    return None


def cache_root() -> Path:
    from ..data.shards import default_cache_dir
    return default_cache_dir() / "gguf"


def cached(sha256: str) -> Path | None:
    """The dequantized folder of the GGUF file with this content, if one was made here."""
    folder = cache_root() / sha256
    return folder if (folder / SOURCE).exists() else None


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered by its path, size and modification time."""
    index_path = cache_root() / _INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    stat, key = path.stat(), str(path.resolve())
    seen = index.get(key)
    if seen and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return seen["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    write_json(index_path, index)
    return index[key]["sha256"]


def describe(path: Path) -> tuple[str, Counter]:
    """(architecture, tensor types and their counts) read from the file's header; what transformers
    cannot read is refused here, in one line naming it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        types = Counter(t.tensor_type for t in reader.tensors)
    except (KeyError, ValueError, IndexError, OSError) as e:  # not GGUF, truncated, or a type this gguf lacks
        raise UserError(f"{path}: not a GGUF file the gguf package can read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("-", "") not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: architecture '{arch}' is not one transformers reads from GGUF (it reads "
                        f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert it with llama.cpp's tools or "
                        "load the original checkpoint")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    unreadable = sorted(t.name for t in types if t not in plain and t not in gguf.quants._type_traits)
    if unreadable:
        raise UserError(f"{path}: tensor type {', '.join(unreadable)} cannot be dequantized by the gguf package "
                        f"{_version('gguf')} that transformers reads GGUF with; requantize the file (e.g. Q8_0, Q4_K) "
                        "with llama.cpp's llama-quantize")
    return arch, Counter({t.name: n for t, n in types.items()})


def dequantized_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder of a GGUF file, made once per content (see the module's docstring)."""
    path = gguf_file(path)
    sha = file_sha256(path)
    folder = cached(sha)
    if folder is not None:
        source = json.loads((folder / SOURCE).read_text())
        log(f"{path}: a GGUF file ({source['architecture']}, {_types(source['tensor_types'])}), as transformers "
            f"dequantized it to float32 once: {folder}")
        return folder
    arch, types = describe(path)
    log(f"{path}: a GGUF file ({arch}, {_types(types)}); dequantizing it to float32 with transformers' GGUF support, "
        f"once (kept in {cache_root() / sha})")
    with atomic_path(cache_root() / sha, folder=True) as tmp:
        _dequantize(path, tmp)
        write_json(tmp / SOURCE, {"sha256": sha, "file": path.name, "architecture": arch, "tensor_types": dict(types),
                                  "transformers": _version("transformers"), "gguf": _version("gguf")})
    return cache_root() / sha


def _dequantize(path: Path, out: Path) -> None:
    """transformers' own reading of the file, saved as the standard checkpoint it is once dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError) as e:  # what describe() could not foresee
        raise UserError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    # The loaded model carries a GGUF quantization config, which save_pretrained refuses; its weights are
    # plain float32 tensors already, so the same architecture without it holds them exactly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _types(types: dict) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(types.items(), key=lambda kv: -kv[1]))


def _version(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
