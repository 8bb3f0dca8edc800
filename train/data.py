"""Data for the TinyStories pipeline: story sources, tokenizers and the token dataset.

Three pieces, used in this order by the training phases:

* :func:`load_texts` turns a *source* into a list of stories: the embedded generator
  (offline, the default), a TinyStories-format ``.txt`` file (stories separated by the
  line ``<|endoftext|>``), or the Hugging Face dataset when ``datasets`` is installed.
* :func:`build_tokenizer` gives a :class:`ByteTokenizer` (always available) or a
  :class:`BPETokenizer` (needs the optional ``tokenizers`` package). Both save to and
  load from a run directory as JSON (:meth:`Tokenizer.save`, :func:`load_tokenizer`).
* :class:`TokenDataset` splits the stories into train and validation sets, encodes each
  split into one long token stream (stories joined by the end-of-text id) and serves
  random training windows and fixed validation windows.

Example:
    >>> import torch
    >>> from growkit.train.data import load_texts, build_tokenizer, TokenDataset
    >>> texts, desc = load_texts("embedded", n_default_stories=200)
    >>> tok = build_tokenizer("byte")
    >>> ds = TokenDataset.from_texts(texts, tok, val_fraction=0.1, seed=0)
    >>> x, y = ds.get_batch("train", 4, 64, torch.Generator().manual_seed(0))
    >>> tuple(x.shape)
    (4, 64)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from growkit.models.io import atomic_write_text

from .stories import generate_stories

__all__ = [
    "EOT_TOKEN",
    "HF_DATASET",
    "DEFAULT_N_STORIES",
    "TOKENIZER_FILE",
    "load_texts",
    "read_story_file",
    "split_stories",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "TokenDataset",
]

EOT_TOKEN = "<|endoftext|>"
HF_DATASET = "roneneldan/TinyStories"
DEFAULT_N_STORIES = 4000
TOKENIZER_FILE = "tokenizer.json"

_HF_SOURCES = ("hf", HF_DATASET)
_SPLITS = ("train", "val")

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass; True as a count is always a mistake.
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def read_story_file(path: PathLike, max_stories: int | None = None) -> list[str]:
    """Reads stories from a TinyStories-format text file.

    Stories are separated by ``<|endoftext|>`` (on its own line in the released
    files, but a separator inside a line is honoured too). Each story is stripped of
    surrounding whitespace and empty ones are dropped; line breaks inside a story are
    kept. The file is streamed line by line, so ``max_stories`` lets a caller take the
    head of a multi-gigabyte file without reading all of it.

    Args:
        path: The text file, UTF-8 (undecodable bytes become U+FFFD rather than
            aborting a long read).
        max_stories: Stop after this many stories; ``None`` reads them all.

    Returns:
        The stories in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is a directory or ``max_stories`` is not positive.
    """
    _check_positive_int("max_stories", max_stories, allow_none=True)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"story file not found: {str(path)!r}")
    if p.is_dir():
        raise ValueError(
            f"story file {str(path)!r} is a directory; pass the .txt file inside it "
            f"(for example {str(p / 'train.txt')!r})")

    stories: list[str] = []
    current: list[str] = []

    def flush() -> bool:
        text = "".join(current).strip()
        current.clear()
        if text:
            stories.append(text)
        return max_stories is not None and len(stories) >= max_stories

    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if EOT_TOKEN not in line:
                current.append(line)
                continue
            parts = line.split(EOT_TOKEN)
            # Everything before a separator closes the story in progress; the text
            # after the last separator starts the next one.
            for part in parts[:-1]:
                current.append(part)
                if flush():
                    return stories
            current.append(parts[-1])
    flush()
    return stories[:max_stories] if max_stories is not None else stories


def _load_hf(max_stories: int | None) -> list[str]:
    hint = (f"or pass the path of a TinyStories .txt file (stories separated by "
            f"{EOT_TOKEN}), or use source='embedded'")
    try:
        import datasets  # optional: only this source needs it
    except ImportError as e:
        raise RuntimeError(
            f"source='hf' needs the `datasets` package: pip install datasets; {hint}"
        ) from e
    split = "train" if max_stories is None else f"train[:{max_stories}]"
    try:
        ds = datasets.load_dataset(HF_DATASET, split=split)
    except Exception as e:  # network, auth, cache: all mean the same to the caller
        raise RuntimeError(
            f"could not load {HF_DATASET!r} from the Hugging Face hub ({e}); "
            f"check the network, {hint}") from e
    return [t.strip() for t in ds["text"] if t and t.strip()]


def load_texts(
    source: PathLike = "embedded",
    *,
    n_default_stories: int = DEFAULT_N_STORIES,
    seed: int = 0,
    max_stories: int | None = None,
) -> tuple[list[str], str]:
    """Loads the training stories from a source and says which source ran.

    Args:
        source: ``"embedded"`` for the built-in story generator (offline); ``"hf"``
            or ``"roneneldan/TinyStories"`` for the Hugging Face dataset (needs the
            ``datasets`` package and the hub); anything else is a path to a
            TinyStories-format ``.txt`` file. A local file literally named ``hf``
            must be passed as ``"./hf"``.
        n_default_stories: How many stories the embedded generator makes.
        seed: Seed of the embedded generator (file and hub sources ignore it; the
            train/validation split has its own seed in :class:`TokenDataset`).
        max_stories: Keep only the first this many stories of a file or the hub;
            ``None`` keeps all. Ignored by the embedded source, which makes exactly
            ``n_default_stories``.

    Returns:
        ``(stories, description)``, the description naming the source and the story
        count, e.g. ``"embedded generator: 4000 stories (seed 0)"``.

    Raises:
        FileNotFoundError: If ``source`` is a path that does not exist.
        ValueError: If ``source`` is empty or a directory, a count is not positive,
            or the file holds no stories.
        RuntimeError: If the hub source is asked for but unavailable.
    """
    _check_positive_int("n_default_stories", n_default_stories)
    _check_positive_int("max_stories", max_stories, allow_none=True)
    if isinstance(source, str):
        key = source.strip()
        if not key:
            raise ValueError(
                "load_texts(source=''): pass 'embedded', 'hf' or the path of a "
                "TinyStories .txt file")
        if key == "embedded":
            texts = generate_stories(int(n_default_stories), seed=seed)
            return texts, f"embedded generator: {len(texts)} stories (seed {seed})"
        if key in _HF_SOURCES:
            texts = _load_hf(max_stories)
            cap = "" if max_stories is None else f", first {max_stories}"
            return texts, f"hf {HF_DATASET} (train split{cap}): {len(texts)} stories"
    try:
        texts = read_story_file(source, max_stories=max_stories)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"load_texts(source={str(source)!r}): no such file; pass 'embedded', 'hf' "
            f"or the path of a TinyStories .txt file") from e
    except ValueError as e:
        raise ValueError(f"load_texts(source={str(source)!r}): {e}") from e
    if not texts:
        raise ValueError(
            f"load_texts(source={str(source)!r}): the file holds no stories "
            f"(expected text with stories separated by {EOT_TOKEN})")
    cap = "" if max_stories is None else f" (first {max_stories})"
    return texts, f"file {source}{cap}: {len(texts)} stories"


def split_stories(
    texts: Sequence[str], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Splits whole stories (never tokens) into train and validation sets.

    Splitting by story keeps any story entirely on one side, so validation loss
    measures text the model has not seen. ``random.Random`` drives the shuffle
    because its output for a seed is stable across Python versions and platforms.
    Each side keeps the stories in their original order.

    Args:
        texts: The stories, at least two.
        val_fraction: Fraction of stories held out, in (0, 1); rounded to a whole
            number of stories, at least one on each side.
        seed: Seed of the shuffle.

    Returns:
        ``(train_texts, val_texts)``.

    Raises:
        ValueError: If ``val_fraction`` is outside (0, 1) or there are fewer than
            two stories.
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(texts)
    if n < 2:
        raise ValueError(
            f"need at least 2 stories to split into train and validation, got {n}; "
            f"load more data (is the file separated by {EOT_TOKEN} lines?)")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = sorted(order[:n_val])
    train_idx = sorted(order[n_val:])
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

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes documents into one stream, each followed by the end-of-text id.

        Args:
            texts: The documents.

        Returns:
            A 1-D ``int64`` array: ``doc0 EOT doc1 EOT ...``.
        """
        pieces = []
        eot = np.array([self.eot_id], dtype=np.int64)
        for t in texts:
            pieces.append(np.asarray(self.encode(t), dtype=np.int64))
            pieces.append(eot)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

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

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes documents into one stream, each followed by the end-of-text id.

        Vectorised: the bytes of all documents are joined once and the end-of-text
        ids are scattered into place, so megabytes encode in milliseconds.
        """
        encoded = [t.encode("utf-8") for t in texts]
        if not encoded:
            return np.zeros(0, dtype=np.int64)
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return _join_with_eot(flat, lengths, self.eot_id)

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


def _bpe_cache_key(texts: Sequence[str], vocab_size: int, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"growkit-bpe/1/{vocab_size}/{version}/{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        # Length prefixes keep ["ab", "c"] and ["a", "bc"] from hashing alike.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
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
        cls, texts: Sequence[str], vocab_size: int, cache_dir: PathLike | None = None
    ) -> "BPETokenizer":
        """Trains a byte-level BPE tokenizer, or loads it from the cache.

        The cache file is ``<cache_dir>/bpe-<vocab_size>-<hash>.json``, the hash
        covering the training texts, ``vocab_size`` and the ``tokenizers`` version,
        so a cached tokenizer is reused only for exactly the same inputs.

        Args:
            texts: Training stories (pass the training split, not validation).
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
        if not texts:
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
        tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
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

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes documents into one stream, each followed by the end-of-text id.

        Uses ``encode_batch``, which runs in parallel inside ``tokenizers``.
        """
        if not texts:
            return np.zeros(0, dtype=np.int64)
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(lengths.sum()))
        return _join_with_eot(flat, lengths, self.eot_id)

    def save(self, directory: PathLike) -> Path:
        """Saves as ``<directory>/tokenizer.json`` in the ``tokenizers`` format."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str())
        return path


def build_tokenizer(
    kind: str = "byte",
    texts: Sequence[str] | None = None,
    vocab_size: int | None = None,
    cache_dir: PathLike | None = None,
) -> Tokenizer:
    """Builds the tokenizer a run asks for.

    Args:
        kind: ``"byte"`` or ``"bpe"``.
        texts: Training stories for BPE; ignored for bytes.
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
# Dataset
# ---------------------------------------------------------------------------

class TokenDataset:
    """Train and validation token streams with batch sampling.

    Each split is one 1-D ``torch.long`` tensor: its stories encoded and each
    followed by the end-of-text id. Training windows start at random offsets drawn
    from a caller-owned ``torch.Generator``, so saving and restoring that generator's
    state resumes the exact batch sequence. Validation windows are fixed.

    Args:
        train_tokens: 1-D tensor of training ids.
        val_tokens: 1-D tensor of validation ids.
        eot_id: The end-of-text id, if known.
        n_train_stories: Stories behind ``train_tokens``, for reports.
        n_val_stories: Stories behind ``val_tokens``, for reports.
    """

    def __init__(
        self,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor,
        *,
        eot_id: int | None = None,
        n_train_stories: int | None = None,
        n_val_stories: int | None = None,
    ) -> None:
        self._data = {}
        for name, t in (("train", train_tokens), ("val", val_tokens)):
            t = torch.as_tensor(t)
            if t.dim() != 1:
                raise ValueError(f"{name}_tokens must be 1-D, got shape {tuple(t.shape)}")
            self._data[name] = t.to(device="cpu", dtype=torch.long).contiguous()
        self.eot_id = eot_id
        self.n_train_stories = n_train_stories
        self.n_val_stories = n_val_stories

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

        Returns:
            The dataset.
        """
        train_texts, val_texts = split_stories(texts, val_fraction, seed)
        return cls(
            torch.from_numpy(tokenizer.encode_documents(train_texts)),
            torch.from_numpy(tokenizer.encode_documents(val_texts)),
            eot_id=tokenizer.eot_id,
            n_train_stories=len(train_texts),
            n_val_stories=len(val_texts),
        )

    @property
    def n_train_tokens(self) -> int:
        """Length of the training stream."""
        return int(self._data["train"].numel())

    @property
    def n_val_tokens(self) -> int:
        """Length of the validation stream."""
        return int(self._data["val"].numel())

    def tokens(self, split: str) -> torch.Tensor:
        """The whole token stream of ``split`` (``"train"`` or ``"val"``)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._data[split]

    def _checked(self, split: str, batch_size: int, seq_len: int) -> torch.Tensor:
        data = self.tokens(split)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("seq_len", seq_len)
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"the {split} split has {data.numel()} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; load more data (more stories, or a larger val_fraction "
                f"for the validation split) or use a smaller seq_len")
        return data

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
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,),
                               generator=generator)
        chunk = data[starts[:, None] + torch.arange(seq_len + 1)]
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

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
            windows = torch.tensor([(i * n_windows) // k for i in range(k)])
        else:
            windows = torch.arange(n_windows)
        offsets = torch.arange(seq_len + 1)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in range(0, windows.numel(), batch_size):
                starts = windows[b:b + batch_size] * seq_len
                chunk = data[starts[:, None] + offsets]
                x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
                if device is not None:
                    x, y = x.to(device), y.to(device)
                yield x, y

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
