"""Text files → token-id samples, tokenized with a Hugging Face ``tokenizer.json``.

Contract:
  * ``.txt``: one text per non-empty line (surrounding whitespace stripped); ``.jsonl``: one JSON object per
    non-empty line with a string field ``text`` and an optional string ``text_pair`` (sentence-pair tasks); a bad
    line raises ``DataError`` naming the file, the line number and the problem; a file with no text is refused;
  * the tokenizer (``tokenizers.Tokenizer.from_file``; a folder holding ``tokenizer.json`` is accepted) runs with
    its own padding disabled and truncation to the sequence length, special tokens added (``encode(text, pair)``);
  * model inputs are filled by name (lower-cased): ``*input_ids*`` or exactly ``input``/``ids`` ← token ids,
    ``*mask*`` ← attention mask, ``*token_type*`` ← type ids (1 on the pair), ``*position*`` ← 0..N-1; any other
    input is refused. Ids, type ids and positions need an integer input; values are cast to the input's dtype;
  * the sequence length: when the model's sequence axis (the last axis of the text inputs) is static, every sample
    is truncated by the tokenizer to ``min(max_length, L)`` and padded to ``L``; otherwise samples keep their own
    length (≤ ``max_length``) and ``Dataset.batches`` pads them per batch;
  * ``pad_values``: ids ← the tokenizer's pad id (its padding config, else ``[PAD]``, else ``<pad>``, else 0),
    mask, type ids and positions ← 0.
``tokenizers`` is imported only when a text file is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.data._checks import dtype_kind, model_inputs, shape_text
from graphprune.data._dataset import Dataset
from graphprune.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl")


def _role(name: str) -> str | None:
    low = name.lower()
    if "input_ids" in low or low in ("input", "ids"):
        return "ids"
    if "mask" in low:
        return "mask"
    if "token_type" in low:
        return "type_ids"
    if "position" in low:
        return "positions"
    return None


def read_texts(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line number, text, pair)`` per record of a ``.txt`` or ``.jsonl`` file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    records: list[tuple[int, str, str | None]] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            records.append((number, line.strip(), None))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with a 'text' field, got {type(obj).__name__}")
        text, pair = obj.get("text"), obj.get("text_pair")
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: field 'text' is missing or not a string")
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{path}:{number}: field 'text_pair' is not a string")
        records.append((number, text, pair))
    if not records:
        raise DataError(f"{path}: no texts (the file is empty)")
    return records


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (or a folder holding one)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for every parse failure
        text = str(e).strip().splitlines()
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({text[0] if text else type(e).__name__})") from e


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id: its padding config, else ``[PAD]``, else ``<pad>``, else 0."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def _text_inputs(path: Path, model: ir.Model) -> tuple[dict[str, str], int | None]:
    """``{input name: role}`` and the static sequence length (None when symbolic)."""
    roles: dict[str, str] = {}
    static: dict[str, int] = {}
    for value in model_inputs(model):
        role = _role(value.name)
        if role is None:
            raise DataError(
                f"{path}: model input {value.name!r} is none of input_ids / attention_mask / token_type_ids / "
                "position_ids; text data cannot fill it"
            )
        if value.shape is not None and len(value.shape) != 2:
            raise DataError(
                f"{path}: text data fills [batch, sequence] inputs; {value.name!r} has shape {shape_text(value.shape)}"
            )
        if value.dtype is not None:
            kind = dtype_kind(value.dtype.numpy())
            if kind not in ("int", "float", "bool") or (role != "mask" and kind != "int"):
                raise DataError(f"{path}: input {value.name!r} ({role}) must be an integer tensor, not {value.dtype}")
        if value.shape is not None and isinstance(value.shape[1], int):
            static[value.name] = value.shape[1]
        roles[value.name] = role
    if "ids" not in roles.values():
        raise DataError(f"{path}: the model has no token-ids input (input_ids) to fill; inputs {list(roles)}")
    if len(set(static.values())) > 1:
        raise DataError(f"{path}: the text inputs have different static sequence lengths {static}")
    return roles, next(iter(static.values()), None)


def load_texts(path: Path, model: ir.Model, *, tokenizer: str | Path | None, max_length: int) -> Dataset:
    """Tokenize every text of ``path`` into one sample for the model's text inputs (see the module doc)."""
    if tokenizer is None:
        raise DataError("text data needs --tokenizer tokenizer.json")
    if max_length < 1:
        raise DataError(f"max length must be at least 1 token (got {max_length})")
    roles, seq = _text_inputs(path, model)
    records = read_texts(path)
    tok = load_tokenizer(tokenizer)
    pad = pad_id(tok)
    limit = min(max_length, seq) if seq is not None else max_length
    specials = tok.num_special_tokens_to_add(any(p is not None for _, _, p in records))
    if limit <= specials:
        raise DataError(
            f"a sequence length of {limit} leaves no room for text: the tokenizer adds {specials} special tokens"
        )
    tok.no_padding()
    tok.enable_truncation(limit)
    dtypes = {v.name: (v.dtype.numpy() if v.dtype is not None else np.dtype(np.int64)) for v in model_inputs(model)}
    pads = {"ids": pad, "mask": 0, "type_ids": 0, "positions": 0}
    samples = []
    for number, text, pair in records:
        try:
            enc = tok.encode(text, pair)
        except Exception as e:  # e.g. max_length shorter than the special tokens of the template
            reason = str(e).strip().splitlines()
            raise DataError(
                f"{path}:{number}: the tokenizer failed ({reason[0] if reason else type(e).__name__})"
            ) from e
        fields = {
            "ids": np.asarray(enc.ids, dtype=np.int64),
            "mask": np.asarray(enc.attention_mask, dtype=np.int64),
            "type_ids": np.asarray(enc.type_ids, dtype=np.int64),
        }
        fields["positions"] = np.arange(len(fields["ids"]), dtype=np.int64)
        if seq is not None:
            for role, arr in fields.items():
                fields[role] = np.pad(arr[:seq], (0, max(0, seq - len(arr))), constant_values=pads[role])
        samples.append({name: fields[role].astype(dtypes[name]) for name, role in roles.items()})
    if seq is None:
        length = f"≤ {limit} tokens"
    elif limit == seq:
        length = f"{seq} tokens (padded)"
    else:
        length = f"≤ {limit} tokens, padded to {seq}"
    pairs = " (pairs)" if any(p is not None for _, _, p in records) else ""
    desc = f"{path.name}: {len(samples)} texts{pairs}, tokenized to {length}"
    return Dataset("user", desc, samples, {name: pads[role] for name, role in roles.items()})
