"""Corpus: read a domain's records from a local file or a Hugging Face dataset and render them to text.

Sources: `.jsonl`, `.jsonl.gz`, `.txt`/`.txt.gz` (documents separated by `<|endoftext|>`, or else by
blank lines), `.parquet`, or a hub dataset id such as `roneneldan/TinyStories` (loaded with
`datasets`; needs network). Every bad input stops with a UserError naming the file, line and field.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..domains import Domain
from ..errors import UserError, where

ENDOFTEXT = "<|endoftext|>"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz", ".parquet")


@dataclass
class Corpus:
    """Rendered documents of one domain, plus a fingerprint of where they came from (for caching)."""
    domain: Domain
    source: str
    documents: list[str]
    fingerprint: str

    @property
    def num_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)


def is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: Path, line: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where(path, line)}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); expected UTF-8 text") from None


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                text = _decode(raw, path, lineno).strip()
                if not text:
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno}); "
                                    "expected one JSON object per line") from None
                except RecursionError:
                    raise UserError(f"{where(path, lineno)}: invalid JSON (nested too deeply for Python's parser); "
                                    "expected one JSON object per line") from None
                except ValueError:  # Python refuses to convert integers of more digits than this
                    raise UserError(f"{where(path, lineno)}: invalid JSON (a number with too many digits: at most "
                                    f"{sys.get_int_max_str_digits()})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{where(path, lineno)}: expected a JSON object, got {type(record).__name__}")
                yield record, where(path, lineno)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _read_txt(path: Path) -> Iterator[tuple[dict, str]]:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    text = _decode(data, path, None).replace("\r\n", "\n")
    pieces = text.split(ENDOFTEXT) if ENDOFTEXT in text else re.split(r"\n[ \t]*\n", text)
    for i, piece in enumerate(pieces, 1):
        if piece.strip():
            yield {"text": piece.strip()}, f"{path}: document {i}"


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read as parquet ({e})") from None
    for i, record in enumerate(table.to_pylist(), 1):
        yield record, f"{path}: row {i}"


def _read_hub(dataset_id: str, split: str, limit: int | None) -> tuple[Iterator[tuple[dict, str]], str]:
    import datasets
    spec = f"{split}[:{limit}]" if limit else split
    try:
        ds = datasets.load_dataset(dataset_id, split=spec)
    except Exception as e:  # offline, unknown id, unknown split: all user-facing
        raise UserError(f"cannot load hub dataset '{dataset_id}' split '{spec}': {e}") from None
    rows = ((record, f"{dataset_id}[{split}] row {i}") for i, record in enumerate(ds, 1))
    return rows, f"hub:{dataset_id}:{spec}:{ds._fingerprint}"


def read_records(source: str | os.PathLike, split: str = "train",
                 limit: int | None = None) -> tuple[Iterator[tuple[dict, str]], str]:
    """(records with their locations, a content fingerprint) for a local file or a hub dataset id."""
    source = str(source)
    if is_hub_id(source):
        return _read_hub(source, split, limit)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file (expected one of {', '.join(LOCAL_SUFFIXES)} "
                        "or a Hugging Face dataset id like 'roneneldan/TinyStories')")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a data file ({', '.join(LOCAL_SUFFIXES)})")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        reader = _read_jsonl
    elif name.endswith((".txt", ".txt.gz")):
        reader = _read_txt
    elif name.endswith(".parquet"):
        reader = _read_parquet
    else:
        raise UserError(f"{path}: unsupported file type; expected one of {', '.join(LOCAL_SUFFIXES)}")
    records = reader(path)
    if limit:
        records = (r for i, r in zip(range(limit), records))
    return records, f"file:{file_sha256(path)}:{limit}"


def load_corpus(source: str | os.PathLike, domain: Domain, split: str = "train",
                limit: int | None = None) -> Corpus:
    """Read and render every record; an empty corpus is an error."""
    records, fingerprint = read_records(source, split, limit)
    documents = []
    for record, loc in records:
        text = domain.render(record, loc)
        if text:
            documents.append(text)
    if not documents:
        raise UserError(f"{source}: empty corpus (no non-empty {domain.name} documents)")
    return Corpus(domain, str(source), documents, fingerprint)


def split_holdout(corpus: Corpus, fraction: float = 0.01, max_docs: int = 500) -> tuple[Corpus, Corpus]:
    """A deterministic held-out slice for validation when the user gives no validation file
    (hub datasets such as corbt/all-recipes have only a train split)."""
    n = len(corpus.documents)
    k = min(max_docs, max(1, int(n * fraction))) if n > 1 else 0
    if k == 0:
        raise UserError(f"{corpus.source}: only {n} document(s); give a separate validation file")
    train = Corpus(corpus.domain, corpus.source, corpus.documents[:-k], corpus.fingerprint + ":train")
    held = Corpus(corpus.domain, corpus.source, corpus.documents[-k:], corpus.fingerprint + f":holdout{k}")
    return train, held


def load_train_val(source: str, domain: Domain, val_source: str | None = None, limit: int | None = None,
                   val_limit: int | None = None) -> tuple[Corpus, Corpus]:
    """A domain's training and validation corpora: the validation file when given, else a held-out slice.
    `limit` / `val_limit` keep only the first documents of each."""
    corpus = load_corpus(source, domain, limit=limit)
    if val_source:
        return corpus, load_corpus(val_source, domain, split="validation", limit=val_limit)
    train, held = split_holdout(corpus)
    if val_limit and val_limit < len(held.documents):
        held = Corpus(domain, held.source, held.documents[:val_limit], held.fingerprint + f":first{val_limit}")
    return train, held


def default_data_dir() -> Path | None:
    """Where the bundled corpora live: $EXPANDLM_DATA, else ../shared/data beside the checkout or cwd."""
    candidates = [os.environ.get("EXPANDLM_DATA"), "../shared/data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None
