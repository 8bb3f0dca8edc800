"""Data for the TinyStories pipeline: story sources, tokenizers, token caches, the dataset.

Four pieces, used in this order by the training phases:

* A *source* (:func:`resolve_source`) streams stories: ``"embedded"``, the real
  TinyStories sample shipped inside the package (5,979 stories of
  ``roneneldan/TinyStories``, xz-compressed, CDLA-Sharing-1.0; the default, offline);
  ``"hf"``, the Hugging Face dataset's train and validation splits (needs ``datasets``
  and the hub); or the path of a TinyStories-format ``.txt`` file (stories separated by
  ``<|endoftext|>``). Sources are read in blocks, never as a whole file.
* :func:`build_tokenizer` gives a :class:`ByteTokenizer` (always available) or a
  :class:`BPETokenizer` (needs the optional ``tokenizers`` package).
* :class:`TokenCache` holds a source's stories tokenized: one flat array of story
  tokens (the end-of-text ids are implied by the story offsets, so the byte tokenizer's
  cache is ``uint8``; other vocabularies ``uint16`` when they fit, else ``uint32``) and
  the story offsets. A file or hub source is tokenized once, streamed in blocks, into a
  memory-mapped cache keyed by the file's path, size and mtime and the tokenizer
  (:func:`token_cache`); a damaged cache (size or checksum) is rebuilt. The embedded
  sample is small and is tokenized in memory.
* :class:`TokenDataset` splits the stories (by story, never inside one) into train and
  validation sets, or takes a separate validation source, and serves random training
  windows and fixed validation windows straight from the cache, so RAM stays bounded
  by the batch, not the corpus.

:func:`prepare_data` puts them together for a :class:`~growkit.train.config.TrainConfig`.

Example:
    >>> import torch
    >>> from growkit.train.data import load_texts, build_tokenizer, TokenDataset
    >>> texts, desc = load_texts("embedded", max_stories=200)
    >>> tok = build_tokenizer("byte")
    >>> ds = TokenDataset.from_texts(texts, tok, val_fraction=0.1, seed=0)
    >>> x, y = ds.get_batch("train", 4, 64, torch.Generator().manual_seed(0))
    >>> tuple(x.shape)
    (4, 64)
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import lzma
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import torch

from growkit.files import atomic_write, atomic_write_text
from growkit.validate import real_number, whole_number

__all__ = [
    "EOT_TOKEN",
    "HF_DATASET",
    "EMBEDDED",
    "SAMPLE_PATH",
    "SAMPLE_NOTICE_PATH",
    "SAMPLE_N_STORIES",
    "TOKENIZER_FILE",
    "DataSourceError",
    "StorySource",
    "resolve_source",
    "check_source",
    "iter_stories",
    "load_texts",
    "read_story_file",
    "split_indices",
    "split_stories",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "TokenCache",
    "token_cache",
    "TokenDataset",
    "default_cache_dir",
    "prepare_data",
]

EOT_TOKEN = "<|endoftext|>"
HF_DATASET = "roneneldan/TinyStories"
TOKENIZER_FILE = "tokenizer.json"

#: Name of the packaged source.
EMBEDDED = "embedded"
_ASSETS = Path(__file__).resolve().parent / "assets"
#: The packaged sample: real TinyStories stories, xz-compressed.
SAMPLE_PATH = _ASSETS / "tinystories_sample.txt.xz"
#: Its dataset notice: source, authors and license (CDLA-Sharing-1.0).
SAMPLE_NOTICE_PATH = _ASSETS / "TINYSTORIES_NOTICE.txt"
SAMPLE_N_STORIES = 5979

_HF_SOURCES = ("hf", HF_DATASET)
_SPLITS = ("train", "val")
_SOURCE_HINT = ("pass 'embedded' (the packaged TinyStories sample), 'hf' or the path "
                "of a TinyStories .txt file")
#: Characters read per block when streaming a story file.
_READ_CHARS = 1 << 22
#: A "story" longer than this is a file without separators; refusing it bounds RAM.
_MAX_STORY_CHARS = 1 << 26
#: Text per tokenizer batch when encoding a stream (bounds RAM while caching).
_ENCODE_BATCH_CHARS = 1 << 23
_CACHE_FORMAT = 1
_HASH_BLOCK = 1 << 24

PathLike = Union[str, "os.PathLike[str]"]


class DataSourceError(ValueError):
    """A data argument is unusable (missing, a directory, empty, holds no stories).

    The message names the argument (``--data``, ``TrainConfig.val_data``, ...).
    """


class MissingDataFileError(DataSourceError, FileNotFoundError):
    """The data file does not exist (both a ValueError and a FileNotFoundError)."""


# ---------------------------------------------------------------------------
# Reading stories
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    whole_number(value, name, min=1)  # TypeError for a bool or a fraction


def iter_stories(f: io.TextIOBase) -> Iterator[str]:
    """Streams the stories of an open text file, reading it in blocks.

    Stories are separated by ``<|endoftext|>`` (on its own line in the released files,
    but a separator inside a line is honoured too). Each story is stripped of
    surrounding whitespace and empty ones are dropped; line breaks inside a story are
    kept. RAM is bounded by the block size plus the longest story.

    Raises:
        ValueError: If a story exceeds 64 Mi characters (a file without separators).
    """
    carry = ""
    while True:
        block = f.read(_READ_CHARS)
        if not block:
            break
        parts = (carry + block).split(EOT_TOKEN)
        carry = parts.pop()
        if len(carry) > _MAX_STORY_CHARS:
            raise ValueError(
                f"found more than {_MAX_STORY_CHARS:,} characters without a {EOT_TOKEN} "
                "separator; TinyStories files separate stories with that line")
        for part in parts:
            part = part.strip()
            if part:
                yield part
    carry = carry.strip()
    if carry:
        yield carry


def _open_text(path: Path) -> io.TextIOBase:
    # Undecodable bytes become U+FFFD rather than aborting a long read.
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _iter_file(path: Path, max_stories: int | None = None) -> Iterator[str]:
    with _open_text(path) as f:
        yield from itertools.islice(iter_stories(f), max_stories)


@dataclass
class StorySource:
    """Where stories come from.

    Attributes:
        kind: ``"embedded"``, ``"file"`` or ``"hf"``.
        description: One line for logs and ``summary.json``.
        open: Returns a fresh iterator over the stories, in order (streamed).
        identity: What the stories depend on (path, size, mtime, ...), the key of the
            on-disk token cache; ``None`` for a source tokenized in memory.
        name: A short name for cache files.
    """

    kind: str
    description: str
    open: Callable[[], Iterator[str]]
    identity: dict[str, Any] | None = None
    name: str = "stories"

    def __iter__(self) -> Iterator[str]:
        return self.open()


def check_source(spec: PathLike, arg: str = "source") -> None:
    """Checks a source argument without reading it; raises naming ``arg``.

    Raises:
        DataSourceError: (a ValueError) for an empty string, a directory or an empty
            file; :class:`MissingDataFileError` (also a FileNotFoundError) for a path
            that does not exist.
    """
    key = os.fspath(spec).strip() if isinstance(spec, (str, os.PathLike)) else None
    if not key:
        raise DataSourceError(f"{arg}={spec!r}: {_SOURCE_HINT}")
    if isinstance(spec, str) and (key == EMBEDDED or key in _HF_SOURCES):
        return
    p = Path(spec).expanduser()
    if not p.exists():
        raise MissingDataFileError(f"{arg}={os.fspath(spec)!r}: no such file; {_SOURCE_HINT}")
    if p.is_dir():
        example = "validation.txt" if "val" in arg else "train.txt"
        raise DataSourceError(
            f"{arg}={os.fspath(spec)!r} is a directory; pass the .txt file inside it "
            f"(for example {str(p / example)!r})")
    if p.stat().st_size == 0:
        raise DataSourceError(
            f"{arg}={os.fspath(spec)!r} is an empty file; expected TinyStories text "
            f"(stories separated by {EOT_TOKEN} lines)")


def _embedded_source(max_stories: int | None) -> StorySource:
    if not SAMPLE_PATH.is_file():
        raise DataSourceError(
            f"the packaged TinyStories sample {str(SAMPLE_PATH)!r} is missing (a broken "
            "install?); reinstall growkit or pass --data PATH")
    n = SAMPLE_N_STORIES if max_stories is None else min(max_stories, SAMPLE_N_STORIES)
    return StorySource(
        kind=EMBEDDED,
        description=f"embedded TinyStories sample ({HF_DATASET}, CDLA-Sharing-1.0): "
                    f"{n} stories",
        open=lambda: _iter_file(SAMPLE_PATH, max_stories),
        identity=None, name="embedded")


def _file_source(spec: PathLike, arg: str, max_stories: int | None) -> StorySource:
    check_source(spec, arg)
    p = Path(spec).expanduser()
    st = p.stat()
    cap = "" if max_stories is None else f" (first {max_stories} stories)"
    return StorySource(
        kind="file", description=f"file {os.fspath(spec)}{cap}",
        open=lambda: _iter_file(p, max_stories),
        identity={"kind": "file", "path": str(p.resolve()), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "max_stories": max_stories},
        name=p.stem or "stories")


def _hf_source(split: str, max_stories: int | None) -> StorySource:
    hint = (f"or pass the path of a TinyStories .txt file (stories separated by "
            f"{EOT_TOKEN}), or use the packaged sample (--data embedded)")
    try:
        import datasets  # optional: only this source needs it
    except ImportError as e:
        raise RuntimeError(
            f"source='hf' needs the `datasets` package: pip install datasets; {hint}"
        ) from e
    spec = split if max_stories is None else f"{split}[:{max_stories}]"
    try:
        ds = datasets.load_dataset(HF_DATASET, split=spec)
    except Exception as e:  # network, auth, cache: all mean the same to the caller
        raise RuntimeError(
            f"could not load {HF_DATASET!r} ({spec} split) from the Hugging Face hub "
            f"({e}); check the network, {hint}") from e

    def stories() -> Iterator[str]:
        # Arrow-backed: batches of rows, never the whole column as a Python list.
        if hasattr(ds, "iter"):
            batches = ds.iter(batch_size=1024)
        else:
            batches = ({"text": [row["text"]]} for row in ds)
        for batch in batches:
            for t in batch["text"]:
                if t and t.strip():
                    yield t.strip()

    fingerprint = getattr(ds, "_fingerprint", None)
    return StorySource(
        kind="hf", description=f"hf {HF_DATASET} ({spec} split)", open=stories,
        identity={"kind": "hf", "dataset": HF_DATASET, "split": spec,
                  "fingerprint": fingerprint if fingerprint else f"rows={len(ds)}"},
        name=f"hf-{split}")


def resolve_source(
    spec: PathLike = EMBEDDED,
    *,
    arg: str = "source",
    split: str = "train",
    max_stories: int | None = None,
) -> StorySource:
    """The :class:`StorySource` a data argument names.

    Args:
        spec: ``"embedded"`` (the packaged sample), ``"hf"`` or
            ``"roneneldan/TinyStories"`` (the hub; needs ``datasets``), or the path of
            a TinyStories-format ``.txt`` (or ``.txt.xz``) file. A local file literally
            named ``hf`` must be passed as ``"./hf"``.
        arg: The argument's name, used in error messages.
        split: The hub split (``"train"`` or ``"validation"``); ignored otherwise.
        max_stories: Keep only the first this many stories; ``None`` keeps all.

    Raises:
        DataSourceError: A ValueError naming ``arg``: empty, a directory, an empty file;
            for a missing file a :class:`MissingDataFileError`.
        RuntimeError: If the hub source is asked for but unavailable.
    """
    _check_positive_int("max_stories", max_stories, allow_none=True)
    check_source(spec, arg)
    if isinstance(spec, str):
        key = spec.strip()
        if key == EMBEDDED:
            return _embedded_source(max_stories)
        if key in _HF_SOURCES:
            return _hf_source(split, max_stories)
    return _file_source(spec, arg, max_stories)


def read_story_file(path: PathLike, max_stories: int | None = None) -> list[str]:
    """Reads the stories of a TinyStories-format text file into a list.

    For small files (tests, tokenizer training on a sample); the pipeline streams
    files into a :class:`TokenCache` instead.

    Raises:
        FileNotFoundError: (a :class:`MissingDataFileError`) if ``path`` does not exist.
        ValueError: If ``path`` is a directory or ``max_stories`` is not positive.
    """
    _check_positive_int("max_stories", max_stories, allow_none=True)
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingDataFileError(f"story file not found: {os.fspath(path)!r}")
    if p.is_dir():
        raise DataSourceError(
            f"story file {os.fspath(path)!r} is a directory; pass the .txt file inside it "
            f"(for example {str(p / 'train.txt')!r})")
    return list(_iter_file(p, max_stories))


def load_texts(
    source: PathLike = EMBEDDED,
    *,
    max_stories: int | None = None,
    arg: str = "source",
) -> tuple[list[str], str]:
    """Loads the stories of a source into a list and says which source ran.

    A convenience for small sources; :func:`prepare_data` streams instead.

    Returns:
        ``(stories, description)``, e.g. ``"embedded TinyStories sample (...): 5979
        stories"``.

    Raises:
        ValueError: (:class:`DataSourceError`) naming ``arg`` if the source is empty, a
            directory, an empty file or holds no stories, or a count is not positive;
            a missing file raises :class:`MissingDataFileError`, also a
            FileNotFoundError.
        RuntimeError: If the hub source is asked for but unavailable.
    """
    src = resolve_source(source, arg=arg, max_stories=max_stories)
    texts = list(src.open())
    if not texts:
        raise DataSourceError(
            f"{arg}={os.fspath(source)!r}: the file holds no stories (expected text with "
            f"stories separated by {EOT_TOKEN})")
    desc = src.description
    if src.kind != EMBEDDED:
        desc = f"{desc}: {len(texts)} stories"
    return texts, desc


# ---------------------------------------------------------------------------
# Story-level split
# ---------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (a bijection; wraps modulo 2**64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_indices(n: int, val_fraction: float = 0.05, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Chooses which of ``n`` stories are validation stories.

    Each story gets a key, a SplitMix64 hash of its index and the seed; the
    ``round(n * val_fraction)`` smallest keys (at least one story on each side) are
    the validation stories. Integer arithmetic only, so a seed gives the same split on
    every platform and numpy version, in O(n) memory for millions of stories.

    Returns:
        ``(train_idx, val_idx)``, both sorted ``int64`` arrays.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 1) or ``n < 2``.
    """
    if real_number(val_fraction, "val_fraction", above=0) >= 1:
        raise ValueError(f"val_fraction must be a finite number > 0 and < 1, got {val_fraction!r}")
    if n < 2:
        raise ValueError(
            f"need at least 2 stories to split into train and validation, got {n}; "
            f"load more data (is the file separated by {EOT_TOKEN} lines?)")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    salt = int(_splitmix64(np.array([int(seed) & _M64], dtype=np.uint64))[0])
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(salt))
    # Keys are distinct (a bijection of distinct inputs), so the n_val smallest are one
    # well-defined set, whatever order argpartition leaves them in.
    val = np.sort(np.argpartition(keys, n_val - 1)[:n_val]).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val


def split_stories(
    texts: Sequence[str], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Splits whole stories (never tokens) into train and validation sets.

    The same choice as :func:`split_indices` (and so as :class:`TokenDataset`), so a
    story is entirely on one side and validation loss measures unseen text. Each side
    keeps the stories in their original order.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 1) or there are fewer than two
            stories.
    """
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    return [texts[i] for i in train_idx], [texts[i] for i in val_idx]


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

def _ids_array(ids, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids,
                     dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    return arr


def _join_with_eot(flat: np.ndarray, lengths: np.ndarray, eot_id: int) -> np.ndarray:
    """Interleaves documents (concatenated in ``flat``) with an end-of-text id after each.

    Scattering into a preallocated array avoids a Python loop per document.
    """
    out = np.empty(flat.size + lengths.size, dtype=np.int64)
    is_eot = np.zeros(out.size, dtype=bool)
    is_eot[np.cumsum(lengths + 1) - 1] = True
    out[is_eot] = eot_id
    out[~is_eot] = flat
    return out


class Tokenizer:
    """Interface shared by the tokenizers of this module.

    Attributes:
        kind: ``"byte"`` or ``"bpe"``.
        vocab_size: Number of ids; every id is in ``[0, vocab_size)``.
        eot_id: The end-of-text id that separates stories in a token stream.
    """

    kind: str = ""
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Encodes plain text (no end-of-text id is added)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text; the end-of-text id appears as ``<|endoftext|>``."""
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes documents into their concatenated ids and per-document lengths.

        Returns:
            ``(flat, lengths)``: a 1-D integer array of every document's ids, without
            end-of-text ids, and an ``int64`` array of the documents' lengths.
        """
        ids = [self.encode(t) for t in texts]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(lengths.sum()))
        return flat, lengths

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes documents into one stream, each followed by the end-of-text id.

        Args:
            texts: The documents.

        Returns:
            A 1-D ``int64`` array: ``doc0 EOT doc1 EOT ...``.
        """
        if not texts:
            return np.zeros(0, dtype=np.int64)
        flat, lengths = self.encode_flat(texts)
        return _join_with_eot(flat, lengths, self.eot_id)

    def storage_dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id a story's text encodes to.

        End-of-text ids are not stored (a :class:`TokenCache` implies them), so the
        byte tokenizer's 256 byte values fit ``uint8``.
        """
        top = self.vocab_size - 1
        for dt in (np.uint8, np.uint16, np.uint32):
            if top <= np.iinfo(dt).max:
                return np.dtype(dt)
        return np.dtype(np.int64)  # pragma: no cover - no vocabulary is this large

    def fingerprint(self) -> str:
        """A string that changes whenever the text -> ids mapping would change."""
        raise NotImplementedError

    def save(self, directory: PathLike) -> Path:
        """Saves the tokenizer as ``<directory>/tokenizer.json`` and returns that path."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (ids 0-255) plus one end-of-text id (256).

    Needs no training and no extra package, and never meets an unknown symbol, which
    is why it is the default: any text round-trips exactly.
    """

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eot_id = 256

    def encode(self, text: str) -> list[int]:
        """Encodes ``text`` as its UTF-8 bytes.

        Args:
            text: Any string. The literal text ``<|endoftext|>`` is encoded as its
                bytes, not as the end-of-text id.

        Returns:
            One id per byte.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids; invalid UTF-8 becomes U+FFFD, the end-of-text id ``<|endoftext|>``.

        Args:
            ids: Token ids (a list, array or 1-D tensor).

        Returns:
            The text.

        Raises:
            ValueError: If an id is outside ``[0, 257)``.
        """
        arr = _ids_array(ids, self.vocab_size)
        cuts = np.flatnonzero(arr == self.eot_id)
        out, start = [], 0
        # Each byte run is decoded on its own so that a multi-byte character cut by
        # an end-of-text id is replaced rather than glued across it.
        for cut in list(cuts) + [arr.size]:
            out.append(arr[start:cut].astype(np.uint8).tobytes().decode("utf-8", "replace"))
            start = cut + 1
        return EOT_TOKEN.join(out)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: the bytes of all documents joined once, as ``uint8``."""
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        return np.frombuffer(b"".join(encoded), dtype=np.uint8), lengths

    def storage_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def fingerprint(self) -> str:
        return f"byte/{self.vocab_size}/{self.eot_id}"

    def save(self, directory: PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        meta = {"growkit_tokenizer": "byte", "format": 1,
                "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot_token": EOT_TOKEN}
        atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
        return path


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "the BPE tokenizer needs the optional `tokenizers` package: "
            "pip install tokenizers (or pip install 'growkit[hf]'); "
            "or use the byte tokenizer") from e
    return tokenizers


TextsArg = Union[Sequence[str], Callable[[], Iterable[str]]]


def _texts_iter(texts: TextsArg) -> Iterable[str]:
    return texts() if callable(texts) else texts


def _bpe_cache_key(texts: TextsArg, vocab_size: int, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"growkit-bpe/2/{vocab_size}/{version}\0".encode())
    n = 0
    for t in _texts_iter(texts):
        b = t.encode("utf-8")
        # Length prefixes keep ["ab", "c"] and ["a", "bc"] from hashing alike.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


class BPETokenizer(Tokenizer):
    """Byte-level BPE from the Hugging Face ``tokenizers`` package (optional).

    Byte-level means the base alphabet is the 256 byte values, so there are no
    unknown tokens; ``<|endoftext|>`` is a special token. Build one with
    :meth:`train` or :func:`load_tokenizer`.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` that has ``<|endoftext|>`` as a token.

    Raises:
        ValueError: If the tokenizer lacks ``<|endoftext|>``.
    """

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        eot = tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise ValueError(f"BPE tokenizer has no {EOT_TOKEN} token")
        self._tok = tokenizer
        self.eot_id = int(eot)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(
        cls, texts: TextsArg, vocab_size: int, cache_dir: PathLike | None = None
    ) -> "BPETokenizer":
        """Trains a byte-level BPE tokenizer, or loads it from the cache.

        The cache file is ``<cache_dir>/bpe-<vocab_size>-<hash>.json``, the hash
        covering the training texts, ``vocab_size`` and the ``tokenizers`` version,
        so a cached tokenizer is reused only for exactly the same inputs.

        Args:
            texts: Training stories (pass the training split, not validation): a
                sequence, or a callable returning a fresh iterable each call (a
                streamed source is read twice: once to hash, once to train).
            vocab_size: Target vocabulary size including the 256 byte symbols and
                ``<|endoftext|>``; small corpora may yield fewer ids.
            cache_dir: Where to cache; ``None`` disables caching.

        Returns:
            The tokenizer.

        Raises:
            ImportError: If ``tokenizers`` is not installed.
            ValueError: If ``vocab_size`` is at most 257 or ``texts`` is empty.
        """
        tokenizers = _require_tokenizers()
        _check_positive_int("vocab_size", vocab_size)
        if vocab_size <= 257:
            raise ValueError(
                f"BPE vocab_size must exceed 257 (256 bytes + {EOT_TOKEN}), got "
                f"{vocab_size}; use the byte tokenizer for a byte vocabulary")
        first = next(iter(_texts_iter(texts)), None)
        if first is None:
            raise ValueError("BPETokenizer.train: no training texts")

        cache_path = None
        if cache_dir is not None:
            key = _bpe_cache_key(texts, int(vocab_size), tokenizers.__version__)
            cache_path = Path(cache_dir) / f"bpe-{int(vocab_size)}-{key[:16]}.json"
            if cache_path.is_file():
                try:
                    return cls(tokenizers.Tokenizer.from_file(str(cache_path)))
                except Exception:
                    pass  # unreadable cache entry: retrain and overwrite it

        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            special_tokens=[EOT_TOKEN],
            # Seeding the full byte alphabet keeps every byte encodable even if the
            # training text never contains it.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        data = _texts_iter(texts)
        length = len(data) if hasattr(data, "__len__") else None
        tok.train_from_iterator(iter(data), trainer=trainer, length=length)
        if cache_path is not None:
            atomic_write_text(cache_path, tok.to_str())
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """Encodes ``text``.

        Note that, unlike the byte tokenizer, the literal text ``<|endoftext|>``
        inside ``text`` becomes the end-of-text id (``tokenizers`` matches special
        tokens in raw text).
        """
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        arr = _ids_array(ids, self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Uses ``encode_batch``, which runs in parallel inside ``tokenizers``."""
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(lengths.sum()))
        return flat, lengths

    def fingerprint(self) -> str:
        return "bpe/" + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: PathLike) -> Path:
        """Saves as ``<directory>/tokenizer.json`` in the ``tokenizers`` format."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str())
        return path


def build_tokenizer(
    kind: str = "byte",
    texts: TextsArg | None = None,
    vocab_size: int | None = None,
    cache_dir: PathLike | None = None,
) -> Tokenizer:
    """Builds the tokenizer a run asks for.

    Args:
        kind: ``"byte"`` or ``"bpe"``.
        texts: Training stories for BPE (see :meth:`BPETokenizer.train`); ignored for
            bytes.
        vocab_size: BPE vocabulary size; ignored for bytes (always 257).
        cache_dir: BPE cache directory (see :meth:`BPETokenizer.train`).

    Returns:
        The tokenizer.

    Raises:
        ValueError: On an unknown ``kind`` or missing BPE arguments.
        ImportError: For ``"bpe"`` without the ``tokenizers`` package.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None or vocab_size is None:
            raise ValueError("build_tokenizer('bpe') needs texts and vocab_size")
        return BPETokenizer.train(texts, vocab_size, cache_dir=cache_dir)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Loads a tokenizer saved by :meth:`Tokenizer.save`.

    Args:
        path: A run directory holding ``tokenizer.json``, or the file itself.

    Returns:
        A :class:`ByteTokenizer` or :class:`BPETokenizer`.

    Raises:
        FileNotFoundError: If there is no tokenizer file.
        ValueError: If the file is not a tokenizer this module wrote.
        ImportError: For a BPE tokenizer without the ``tokenizers`` package.
    """
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer file at {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(p)!r} is not a tokenizer file")
    if data.get("growkit_tokenizer") == "byte":
        tok = ByteTokenizer()
        if data.get("vocab_size") != tok.vocab_size or data.get("eot_id") != tok.eot_id:
            raise ValueError(f"{str(p)!r}: byte tokenizer with unexpected vocab/eot ids")
        return tok
    if "model" in data:
        tokenizers = _require_tokenizers()
        return BPETokenizer(tokenizers.Tokenizer.from_str(text))
    raise ValueError(f"{str(p)!r} is not a tokenizer file this module wrote")


# ---------------------------------------------------------------------------
# Token caches
# ---------------------------------------------------------------------------

def _encode_stream(stories: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype,
                   emit: Callable[[np.ndarray], None]) -> np.ndarray:
    """Encodes stories in batches of about 8 MiB of text; ``emit`` gets each batch's ids.

    Returns the stories' lengths (``int64``). RAM: one batch of text and its ids.
    """
    lengths: list[np.ndarray] = []
    batch: list[str] = []
    chars = 0
    top = np.iinfo(dtype).max

    def flush() -> None:
        nonlocal chars
        flat, lens = tokenizer.encode_flat(batch)
        if flat.size and int(flat.max()) > top:
            raise ValueError(f"token id {int(flat.max())} does not fit the cache dtype {dtype}")
        emit(np.ascontiguousarray(flat, dtype=dtype))
        lengths.append(lens)
        batch.clear()
        chars = 0

    for story in stories:
        batch.append(story)
        chars += len(story)
        if chars >= _ENCODE_BATCH_CHARS:
            flush()
    if batch:
        flush()
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class _CacheInvalid(Exception):
    pass


class _NoStories(ValueError):
    pass


class TokenCache:
    """The stories of a source, tokenized: flat story tokens and story offsets.

    Story ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``; its end-of-text id is not
    stored but implied (a stream view appends it), which is why the byte tokenizer's
    cache is ``uint8``. On disk a cache is three files sharing a stem: ``.tokens``
    (the raw array), ``.offsets`` (``int64``, ``n_stories + 1``) and ``.json`` (dtype,
    counts, the source identity, the tokenizer fingerprint and a BLAKE2b checksum of
    both arrays). The JSON is written last, so its presence marks a complete cache;
    each file is written atomically.

    Attributes:
        tokens: 1-D array (an ``np.memmap`` for an on-disk cache).
        offsets: ``int64`` story offsets into ``tokens``.
        eot_id: The tokenizer's end-of-text id.
        digest: Checksum of the content (tokens and offsets).
        path: The stem of the on-disk files, or None for a cache in memory.
        status: ``"memory"``, ``"built"``, ``"loaded"`` or ``"rebuilt (<why>)"``.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, *, eot_id: int, digest: str,
                 path: Path | None = None, status: str = "memory") -> None:
        self.tokens = tokens
        self.offsets = offsets
        self.eot_id = int(eot_id)
        self.digest = digest
        self.path = path
        self.status = status

    @property
    def n_stories(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def n_tokens(self) -> int:
        """Tokens with one end-of-text id per story (what a stream of it holds)."""
        return int(self.offsets[-1]) + self.n_stories

    def story(self, i: int) -> np.ndarray:
        """The ids of story ``i`` (no end-of-text id)."""
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def stream(self) -> np.ndarray:
        """All stories as one ``int64`` stream, each followed by the end-of-text id."""
        return _join_with_eot(np.asarray(self.tokens, dtype=np.int64),
                              np.diff(self.offsets), self.eot_id)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_stories(cls, stories: Iterable[str], tokenizer: Tokenizer) -> "TokenCache":
        """Tokenizes stories into a cache held in memory (small sources)."""
        dtype = tokenizer.storage_dtype()
        chunks: list[np.ndarray] = []
        lengths = _encode_stream(stories, tokenizer, dtype, chunks.append)
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        offsets = _offsets(lengths)
        h = hashlib.blake2b(digest_size=16)
        h.update(tokens.tobytes())
        h.update(offsets.tobytes())
        return cls(tokens, offsets, eot_id=tokenizer.eot_id, digest=h.hexdigest())

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Tokenizer) -> "TokenCache":
        """:meth:`from_stories` for a list of texts (kept as given, not stripped)."""
        return cls.from_stories(texts, tokenizer)

    @staticmethod
    def _paths(stem: Path) -> tuple[Path, Path, Path]:
        return (stem.with_name(stem.name + ".tokens"), stem.with_name(stem.name + ".offsets"),
                stem.with_name(stem.name + ".json"))

    @classmethod
    def build(cls, stories: Iterable[str], tokenizer: Tokenizer, stem: PathLike,
              identity: dict[str, Any] | None = None) -> "TokenCache":
        """Tokenizes stories into an on-disk cache at ``stem`` (streamed, RAM bounded).

        Raises:
            ValueError: If there are no stories.
        """
        stem = Path(stem)
        tok_path, off_path, meta_path = cls._paths(stem)
        meta_path.unlink(missing_ok=True)  # no meta until the new arrays are in place
        dtype = tokenizer.storage_dtype()
        result: dict[str, Any] = {}

        def write_tokens(tmp: str) -> None:
            h = hashlib.blake2b(digest_size=16)
            with open(tmp, "wb") as f:
                def emit(arr: np.ndarray) -> None:
                    b = arr.tobytes()
                    h.update(b)
                    f.write(b)
                lengths = _encode_stream(stories, tokenizer, dtype, emit)
            if lengths.size == 0:
                raise _NoStories("holds no stories")
            result["offsets"] = _offsets(lengths)
            result["tokens_digest"] = h.hexdigest()

        atomic_write(tok_path, write_tokens)
        offsets = result["offsets"]
        atomic_write(off_path, lambda tmp: offsets.tofile(tmp))
        meta = {
            "growkit_token_cache": _CACHE_FORMAT,
            "identity": identity,
            "tokenizer": tokenizer.fingerprint(),
            "eot_id": tokenizer.eot_id,
            "dtype": dtype.str,
            "n_stories": int(offsets.size - 1),
            "n_story_tokens": int(offsets[-1]),
            "tokens_digest": result["tokens_digest"],
            "offsets_digest": _file_digest(off_path),
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        return cls.open(stem, tokenizer, identity, status="built")

    @classmethod
    def open(cls, stem: PathLike, tokenizer: Tokenizer, identity: dict[str, Any] | None = None,
             status: str = "loaded") -> "TokenCache":
        """Opens an on-disk cache, memory-mapped, after checking sizes and checksums.

        Raises:
            ValueError: If the cache is missing, incomplete, truncated, corrupted or
                made for another source or tokenizer (the message says which).
        """
        tok_path, off_path, meta_path = cls._paths(Path(stem))
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _CacheInvalid("no cache yet") from None
        except (OSError, ValueError) as e:
            raise _CacheInvalid(f"unreadable metadata: {e}") from None
        if not isinstance(meta, dict) or meta.get("growkit_token_cache") != _CACHE_FORMAT:
            raise _CacheInvalid("unknown cache format")
        if meta.get("tokenizer") != tokenizer.fingerprint() or \
                meta.get("eot_id") != tokenizer.eot_id:
            raise _CacheInvalid("made with another tokenizer")
        if identity is not None and meta.get("identity") != identity:
            raise _CacheInvalid("made from another version of the source")
        try:
            dtype = np.dtype(meta["dtype"])
            n_stories, n_tok = int(meta["n_stories"]), int(meta["n_story_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise _CacheInvalid(f"incomplete metadata: {e}") from None
        for path, want in ((tok_path, n_tok * dtype.itemsize), (off_path, (n_stories + 1) * 8)):
            have = path.stat().st_size if path.is_file() else None
            if have != want:
                raise _CacheInvalid(f"{path.name} holds {have} bytes, expected {want} "
                                    "(truncated or damaged)")
        if _file_digest(off_path) != meta.get("offsets_digest") or \
                _file_digest(tok_path) != meta.get("tokens_digest"):
            raise _CacheInvalid("checksum mismatch (corrupted)")
        offsets = np.fromfile(off_path, dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != n_tok or np.any(np.diff(offsets) < 0):
            raise _CacheInvalid("inconsistent story offsets")
        tokens = np.memmap(tok_path, dtype=dtype, mode="r", shape=(n_tok,)) if n_tok \
            else np.zeros(0, dtype=dtype)
        mm = getattr(tokens, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            # Training reads random windows: no read-ahead around each one.
            mm.madvise(mmap.MADV_RANDOM)
        digest = hashlib.blake2b(
            f"{meta['tokens_digest']}/{meta['offsets_digest']}".encode(), digest_size=16
        ).hexdigest()
        return cls(tokens, offsets, eot_id=tokenizer.eot_id, digest=digest,
                   path=Path(stem), status=status)

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return (f"TokenCache({self.n_stories} stories, {self.n_tokens:,} tokens, "
                f"{self.tokens.dtype}, {where}, {self.status})")


def _cache_stem(source: StorySource, tokenizer: Tokenizer, cache_dir: PathLike) -> Path:
    key = hashlib.sha256(json.dumps(
        {"format": _CACHE_FORMAT, "source": source.identity,
         "tokenizer": tokenizer.fingerprint()}, sort_keys=True).encode()).hexdigest()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)[:40]
    return Path(cache_dir) / f"{name}-{key[:16]}"


def token_cache(source: StorySource, tokenizer: Tokenizer, cache_dir: PathLike | None,
                arg: str = "source") -> TokenCache:
    """The tokenized stories of ``source``: from its cache, or built (and cached).

    A source with an identity (a file, the hub) is cached under ``cache_dir`` in files
    named by a hash of its identity (for a file: resolved path, size, mtime) and the
    tokenizer; a cache that fails its size or checksum test is rebuilt. A source
    without one (the packaged sample), or ``cache_dir=None``, is tokenized in memory.

    Raises:
        DataSourceError: If the source holds no stories (names ``arg``).
    """
    if source.identity is None or cache_dir is None:
        cache = TokenCache.from_stories(source.open(), tokenizer)
    else:
        stem = _cache_stem(source, tokenizer, cache_dir)
        try:
            cache = TokenCache.open(stem, tokenizer, source.identity)
        except _CacheInvalid as why:
            reason = str(why)
            try:
                cache = TokenCache.build(source.open(), tokenizer, stem, source.identity)
            except _NoStories:
                cache = None
            else:
                if reason != "no cache yet":
                    cache.status = f"rebuilt ({reason})"
    if cache is None or cache.n_stories == 0:
        raise DataSourceError(
            f"{arg}: {source.description} holds no stories (expected text with stories "
            f"separated by {EOT_TOKEN})")
    return cache


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------

@dataclass
class _Stream:
    """A token stream: segments of ``base``, each optionally followed by an end-of-text id.

    Position ``p`` of the stream is found by a binary search over the segments' stream
    offsets, so the stream is never materialized: a split of a memory-mapped cache is
    its story offsets, not a copy of its tokens.
    """

    base: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    eot_id: int | None
    digest: str
    vstarts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        seg = self.lengths + (1 if self.eot_id is not None else 0)
        self.vstarts = _offsets(seg.astype(np.int64))

    @classmethod
    def contiguous(cls, tokens: np.ndarray) -> "_Stream":
        tokens = np.ascontiguousarray(tokens)
        digest = hashlib.blake2b(tokens.astype(np.int64).tobytes(), digest_size=16).hexdigest()
        return cls(tokens, np.zeros(1, np.int64), np.array([tokens.size], np.int64), None,
                   digest)

    @classmethod
    def of_stories(cls, cache: TokenCache, idx: np.ndarray) -> "_Stream":
        idx = np.asarray(idx, dtype=np.int64)
        starts = cache.offsets[idx]
        lengths = cache.offsets[idx + 1] - starts
        h = hashlib.blake2b(digest_size=16)
        h.update(cache.digest.encode())
        h.update(idx.tobytes())
        return cls(cache.tokens, starts, lengths, cache.eot_id, h.hexdigest())

    def __len__(self) -> int:
        return int(self.vstarts[-1])

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """The ids at stream positions ``pos`` (any shape), as ``int64``."""
        pos = np.asarray(pos, dtype=np.int64)
        if self.starts.size == 1 and self.eot_id is None:
            return np.asarray(self.base[pos + self.starts[0]], dtype=np.int64)
        seg = np.searchsorted(self.vstarts, pos, side="right") - 1
        off = pos - self.vstarts[seg]
        phys = self.starts[seg] + off
        if self.eot_id is None:
            return np.asarray(self.base[phys], dtype=np.int64)
        is_eot = off >= self.lengths[seg]
        phys[is_eot] = 0
        out = np.asarray(self.base[phys], dtype=np.int64) if self.base.size else \
            np.zeros(pos.shape, dtype=np.int64)
        out[is_eot] = self.eot_id
        return out

    def materialize(self) -> np.ndarray:
        return self.gather(np.arange(len(self), dtype=np.int64))


class TokenDataset:
    """Train and validation token streams with batch sampling.

    Each split is a stream of token ids: its stories, each followed by the end-of-text
    id. The streams are views of :class:`TokenCache` arrays (memory-mapped for file
    and hub sources), gathered window by window, so RAM holds the batch, not the
    corpus. Training windows start at random offsets drawn from a caller-owned
    ``torch.Generator``, so saving and restoring that generator's state resumes the
    exact batch sequence. Validation windows are fixed.

    Build one with :meth:`from_caches` (the pipeline), :meth:`from_texts` (a list of
    stories) or the constructor (two ready token streams).

    Args:
        train_tokens: 1-D tensor or array of training ids.
        val_tokens: 1-D tensor or array of validation ids.
        eot_id: The end-of-text id, if known.
        n_train_stories: Stories behind ``train_tokens``, for reports.
        n_val_stories: Stories behind ``val_tokens``, for reports.
    """

    def __init__(
        self,
        train_tokens,
        val_tokens,
        *,
        eot_id: int | None = None,
        n_train_stories: int | None = None,
        n_val_stories: int | None = None,
    ) -> None:
        streams = {}
        for name, t in (("train", train_tokens), ("val", val_tokens)):
            arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if arr.ndim != 1:
                raise ValueError(f"{name}_tokens must be 1-D, got shape {tuple(arr.shape)}")
            streams[name] = _Stream.contiguous(arr.astype(np.int64, copy=False))
        self._init(streams, eot_id, n_train_stories, n_val_stories)

    def _init(self, streams: dict[str, _Stream], eot_id, n_train, n_val) -> None:
        self._streams = streams
        self.eot_id = eot_id
        self.n_train_stories = n_train
        self.n_val_stories = n_val
        self.caches: tuple[TokenCache, ...] = ()

    @classmethod
    def from_caches(
        cls,
        train: TokenCache,
        val: TokenCache | None = None,
        *,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> "TokenDataset":
        """Views of tokenized stories: a story-level split, or a separate validation set.

        Args:
            train: The training source's cache.
            val: A separate validation source's cache; ``None`` holds out
                ``val_fraction`` of ``train``'s stories (:func:`split_indices`).
            val_fraction: Fraction of stories held out when ``val`` is None.
            seed: Seed of the split.
        """
        self = cls.__new__(cls)
        if val is None:
            train_idx, val_idx = split_indices(train.n_stories, val_fraction, seed)
            streams = {"train": _Stream.of_stories(train, train_idx),
                       "val": _Stream.of_stories(train, val_idx)}
            counts = (train_idx.size, val_idx.size)
        else:
            streams = {"train": _Stream.of_stories(train, np.arange(train.n_stories)),
                       "val": _Stream.of_stories(val, np.arange(val.n_stories))}
            counts = (train.n_stories, val.n_stories)
        self._init(streams, train.eot_id, *counts)
        self.caches = (train,) if val is None else (train, val)
        return self

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Tokenizer,
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> "TokenDataset":
        """Splits stories with :func:`split_stories` and encodes each split.

        Args:
            texts: The stories.
            tokenizer: Any tokenizer of this module.
            val_fraction: Fraction of stories held out for validation.
            seed: Seed of the split.
        """
        split_indices(len(texts), val_fraction, seed)  # validates before encoding
        return cls.from_caches(TokenCache.from_texts(texts, tokenizer),
                               val_fraction=val_fraction, seed=seed)

    @property
    def n_train_tokens(self) -> int:
        """Length of the training stream."""
        return len(self._streams["train"])

    @property
    def n_val_tokens(self) -> int:
        """Length of the validation stream."""
        return len(self._streams["val"])

    def _stream(self, split: str) -> _Stream:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._streams[split]

    def tokens(self, split: str) -> torch.Tensor:
        """The whole token stream of ``split`` as a ``torch.long`` tensor.

        This materializes the stream (8 bytes per token): for tests and small data.
        """
        return torch.from_numpy(self._stream(split).materialize())

    def fingerprint(self) -> dict[str, Any]:
        """A digest of both streams (from the caches' checksums, without reading them)."""
        h = hashlib.sha256()
        for split in _SPLITS:
            s = self._streams[split]
            h.update(f"{split}/{s.digest}/{s.eot_id}/{len(s)}\0".encode())
        return {"sha256": h.hexdigest(), "train_tokens": self.n_train_tokens,
                "val_tokens": self.n_val_tokens}

    def _checked(self, split: str, batch_size: int, seq_len: int) -> _Stream:
        data = self._stream(split)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("seq_len", seq_len)
        if len(data) < seq_len + 1:
            raise ValueError(
                f"the {split} split has {len(data)} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; load more data (more stories, or a larger val_fraction "
                f"for the validation split) or use a smaller seq_len")
        return data

    @staticmethod
    def _windows(data: _Stream, starts: np.ndarray, seq_len: int, device):
        chunk = torch.from_numpy(data.gather(starts[:, None] + np.arange(seq_len + 1)))
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def get_batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws ``batch_size`` random windows of ``split``.

        Windows may cross story boundaries (the end-of-text id marks them), as in
        GPT-style training; each start offset is uniform over all valid offsets.

        Args:
            split: ``"train"`` or ``"val"``.
            batch_size: Windows per batch.
            seq_len: Tokens per window.
            generator: CPU generator for the offsets; it is the only randomness, so
                its ``get_state``/``set_state`` gives exact resume.
            device: Move the batch there; ``None`` leaves it on the CPU.

        Returns:
            ``(x, y)``, both ``[batch_size, seq_len]`` long tensors with
            ``y[:, t] == x[:, t + 1]`` for ``t < seq_len - 1`` (y is x shifted by one).

        Raises:
            ValueError: On a bad split or size, or a split shorter than
                ``seq_len + 1`` tokens.
        """
        data = self._checked(split, batch_size, seq_len)
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (it makes batches "
                            "reproducible and resumable)")
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
        return self._windows(data, starts.numpy(), seq_len, device)

    def n_val_windows(self, seq_len: int) -> int:
        """How many non-overlapping ``seq_len`` windows the validation split holds."""
        _check_positive_int("seq_len", seq_len)
        return max(0, (self.n_val_tokens - 1) // seq_len)

    def val_batches(
        self,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields fixed, non-overlapping validation windows for evaluation.

        The windows are the same on every call, so validation losses of different
        steps, runs and grown models are comparable. When ``max_batches`` caps the
        number of windows, they are spread evenly over the whole split rather than
        taken from its start, so a capped evaluation still covers all of it.

        Args:
            batch_size: Windows per batch; the last batch may be smaller.
            seq_len: Tokens per window.
            max_batches: At most this many batches; ``None`` covers the split.
            device: Move batches there; ``None`` leaves them on the CPU.

        Returns:
            An iterator of ``(x, y)`` pairs shaped ``[b, seq_len]``, ``b <= batch_size``.

        Raises:
            ValueError: On bad sizes or a validation split shorter than
                ``seq_len + 1`` tokens (raised here, not at the first ``next``).
        """
        data = self._checked("val", batch_size, seq_len)
        _check_positive_int("max_batches", max_batches, allow_none=True)
        n_windows = self.n_val_windows(seq_len)
        if max_batches is not None and max_batches * batch_size < n_windows:
            k = max_batches * batch_size
            # Integer spacing: distinct, sorted and identical on every platform.
            windows = (np.arange(k, dtype=np.int64) * n_windows) // k
        else:
            windows = np.arange(n_windows, dtype=np.int64)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(0, windows.size, batch_size):
                yield self._windows(data, windows[b:b + batch_size] * seq_len, seq_len, device)

        return batches()

    def describe(self) -> str:
        """One line for logs: stories and tokens per split."""
        def part(name: str, n_stories: int | None, n_tokens: int) -> str:
            s = f"{n_stories} stories, " if n_stories is not None else ""
            return f"{name}: {s}{n_tokens:,} tokens"
        return (part("train", self.n_train_stories, self.n_train_tokens) + "; "
                + part("val", self.n_val_stories, self.n_val_tokens))

    def __repr__(self) -> str:
        return f"TokenDataset({self.describe()})"


# ---------------------------------------------------------------------------
# The pipeline's data
# ---------------------------------------------------------------------------

def default_cache_dir(cfg) -> Path:
    """Where ``cfg``'s token caches go: ``token_cache_dir``, else ``<out_dir>/.token-cache``."""
    d = getattr(cfg, "token_cache_dir", None)
    return Path(d).expanduser() if d else Path(cfg.out_dir).expanduser() / ".token-cache"


def _bpe_training_texts(source: StorySource, held_out: bool, val_fraction: float,
                        seed: int) -> Callable[[], Iterator[str]]:
    """The training stories of a source, streamed (validation stories skipped)."""
    if not held_out:
        return source.open
    n = sum(1 for _ in source.open())
    if n < 2:
        return source.open  # the split reports the error with its own message
    is_val = np.zeros(n, dtype=bool)
    is_val[split_indices(n, val_fraction, seed)[1]] = True
    return lambda: (s for i, s in enumerate(source.open()) if not is_val[i])


def prepare_data(cfg, tokenizer: Tokenizer | None = None,
                 log: Callable[[str], None] | None = print
                 ) -> tuple[TokenDataset, Tokenizer, str]:
    """The dataset, tokenizer and a description for a pipeline config.

    Reads ``cfg.data`` (``"embedded"``, ``"hf"`` or a path), ``cfg.val_data`` (a
    separate validation source; without it, ``"hf"`` uses the hub's validation split
    and other sources hold out ``cfg.val_fraction`` of their stories by story),
    ``cfg.max_stories`` (the first stories of ``cfg.data`` only), ``cfg.tokenizer``,
    ``cfg.bpe_vocab_size``, ``cfg.seed``, ``cfg.seq_len`` and the cache directory
    (:func:`default_cache_dir`).

    Args:
        cfg: A :class:`~growkit.train.config.TrainConfig`.
        tokenizer: Use this tokenizer (a resumed run's) instead of building one.
        log: Called with one line per token cache used (None: silent).

    Raises:
        ValueError: Naming the field: a bad source, no stories, a split shorter than
            ``seq_len + 1`` tokens.
        RuntimeError: For ``hf`` without ``datasets`` or the hub.
    """
    train_src = resolve_source(cfg.data, arg="TrainConfig.data", split="train",
                               max_stories=cfg.max_stories)
    val_src = None
    val_data = getattr(cfg, "val_data", None)
    if val_data:
        val_src = resolve_source(val_data, arg="TrainConfig.val_data", split="validation")
    elif train_src.kind == "hf":
        val_src = resolve_source("hf", arg="TrainConfig.data", split="validation")
    cache_dir = default_cache_dir(cfg)
    if tokenizer is None:
        if cfg.tokenizer == "bpe":
            texts = _bpe_training_texts(train_src, val_src is None, cfg.val_fraction, cfg.seed)
            tokenizer = build_tokenizer("bpe", texts, cfg.bpe_vocab_size,
                                        cache_dir=Path(cfg.out_dir) / ".tokenizer-cache")
        else:
            tokenizer = build_tokenizer("byte")
    train = token_cache(train_src, tokenizer, cache_dir, arg="TrainConfig.data")
    val = None if val_src is None else token_cache(
        val_src, tokenizer, cache_dir,
        arg="TrainConfig.val_data" if val_data else "TrainConfig.data")
    if log is not None:
        for c in (train, val):
            if c is not None and c.path is not None:
                log(f"token cache {c.status}: {c.path}.tokens ({c.n_stories:,} stories, "
                    f"{c.tokens.dtype})")
    if val is None and train.n_stories < 2:
        raise DataSourceError(
            f"TrainConfig.data={cfg.data!r} holds only 1 story; a story-level validation "
            "split needs at least 2 (or pass --val-data PATH)")
    ds = TokenDataset.from_caches(train, val, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if ds.n_val_tokens < cfg.seq_len + 1:
        field_name = "val_data" if val_data else "val_fraction"
        raise ValueError(
            f"TrainConfig.{field_name}={getattr(cfg, field_name)!r}: the validation split "
            f"has {ds.n_val_tokens} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}; "
            "use more validation stories or lower seq_len")
    if ds.n_train_tokens < cfg.seq_len + 1:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} exceeds the training split "
            f"({ds.n_train_tokens} tokens); load more stories or lower seq_len")
    desc = f"{train_src.description}: {train.n_stories} stories" \
        if train_src.kind != EMBEDDED else train_src.description
    if val is not None:
        desc += f"; validation: {val_src.description}: {val.n_stories} stories"
    else:
        desc += f"; validation: {ds.n_val_stories} held-out stories (seed {cfg.seed})"
    return ds, tokenizer, desc
