"""Tests for growkit.train.data: the packaged sample, sources, token caches, the dataset.

CPU only, a few seconds. Story files are written to tmp_path from the packaged sample;
the uncompressed sample is never written inside the repository.
"""
import json
import lzma
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import growkit.train.data as data_mod
from growkit.train.config import TrainConfig, parse_command_line
from growkit.train.data import (
    EOT_TOKEN,
    SAMPLE_N_STORIES,
    SAMPLE_NOTICE_PATH,
    SAMPLE_PATH,
    BPETokenizer,
    ByteTokenizer,
    DataSourceError,
    TokenCache,
    TokenDataset,
    build_tokenizer,
    load_texts,
    load_tokenizer,
    prepare_data,
    read_story_file,
    resolve_source,
    split_indices,
    split_stories,
    token_cache,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def all_stories():
    return load_texts("embedded")[0]


@pytest.fixture(scope="module")
def stories(all_stories):
    return all_stories[:400]


@pytest.fixture(scope="module")
def dataset(stories):
    return TokenDataset.from_texts(stories, ByteTokenizer(), val_fraction=0.1, seed=0)


def write_stories(path: Path, texts) -> Path:
    path.write_text("".join(f"{t}\n{EOT_TOKEN}\n" for t in texts), encoding="utf-8")
    return path


def cfg_for(tmp_path, **kw) -> TrainConfig:
    kw.setdefault("out_dir", str(tmp_path / "runs"))
    kw.setdefault("seq_len", 32)
    return TrainConfig(**kw)


# ------------------------------------------------------------------ packaged sample

def test_packaged_sample_is_real_tinystories(all_stories):
    assert SAMPLE_PATH.name.endswith(".txt.xz") and SAMPLE_PATH.stat().st_size < 1_500_000
    # The file is xz and decompresses to EOT-separated stories: 5,979 of them.
    raw = lzma.decompress(SAMPLE_PATH.read_bytes()).decode("utf-8")
    assert raw.count(EOT_TOKEN) == SAMPLE_N_STORIES == 5979
    assert len(all_stories) == 5979
    first = all_stories[0]
    assert first.startswith("Lily was a princess who loved to jump.") and len(first) > 200
    assert all(s.strip() == s and s for s in all_stories)
    assert sum(map(len, all_stories)) > 4_500_000  # about 5 MB of text
    texts, desc = load_texts("embedded")
    assert desc.startswith("embedded TinyStories sample") and "CDLA-Sharing-1.0" in desc
    assert load_texts("embedded", max_stories=3)[0] == all_stories[:3]


def test_sample_license_notice_and_packaging():
    notice = SAMPLE_NOTICE_PATH.read_text(encoding="utf-8")
    for needle in ("CDLA-Sharing-1.0", "roneneldan/TinyStories", "Eldan", "https://cdla.dev"):
        assert needle in notice, needle
    assert SAMPLE_NOTICE_PATH.parent == SAMPLE_PATH.parent
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    assert "assets/*.txt.xz" in setup and "assets/*.txt" in setup  # shipped in the wheel
    # Only the compressed sample and its notice are in the package folder.
    names = sorted(p.name for p in SAMPLE_PATH.parent.iterdir())
    assert names == sorted([SAMPLE_PATH.name, SAMPLE_NOTICE_PATH.name])
    assert not (REPO / "train" / "stories.py").exists()  # the templated generator is gone


# ----------------------------------------------------------------------- sources

def test_load_file_with_separators(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "  First story.\nIt has two lines.  \n<|endoftext|>\n"
        "\n<|endoftext|>\n"                       # empty story: dropped
        "Second story.\n<|endoftext|>\n"
        "Third story.<|endoftext|>Fourth story.\n"  # separator inside a line
        "<|endoftext|>\n   \n",
        encoding="utf-8",
    )
    texts, desc = load_texts(str(path))
    assert texts == ["First story.\nIt has two lines.", "Second story.",
                     "Third story.", "Fourth story."]
    assert desc == f"file {path}: 4 stories"
    assert read_story_file(path, max_stories=2) == texts[:2]
    texts2, desc2 = load_texts(path, max_stories=3)  # PathLike works too
    assert texts2 == texts[:3] and "first 3" in desc2


def test_load_file_without_trailing_separator(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("One.\n<|endoftext|>\nTwo, with ünïcödé.", encoding="utf-8")
    assert load_texts(path)[0] == ["One.", "Two, with ünïcödé."]


def test_block_reader_matches_across_block_boundaries(tmp_path, stories, monkeypatch):
    path = write_stories(tmp_path / "s.txt", stories[:50])
    expected = read_story_file(path)
    assert expected == stories[:50]
    # Tiny blocks: separators and multi-byte characters fall across block edges.
    monkeypatch.setattr(data_mod, "_READ_CHARS", 7)
    assert read_story_file(path) == expected


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="source"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="source"):  # also a ValueError
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="directory"):
        load_texts(str(tmp_path))
    (tmp_path / "zero.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_texts(str(tmp_path / "zero.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no stories"):
        load_texts(str(empty))
    with pytest.raises(ValueError):
        load_texts("")
    with pytest.raises(ValueError, match="max_stories"):
        load_texts(str(empty), max_stories=0)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes the import fail
    for source in ("hf", "roneneldan/TinyStories"):
        with pytest.raises(RuntimeError, match="pip install datasets"):
            load_texts(source)


def _fake_datasets(splits: dict[str, list[str]], calls: list[str]):
    class FakeDataset:
        def __init__(self, rows, name):
            self.rows, self._fingerprint = rows, f"fp-{name}-{len(rows)}"

        def __len__(self):
            return len(self.rows)

        def iter(self, batch_size):
            for i in range(0, len(self.rows), batch_size):
                yield {"text": self.rows[i:i + batch_size]}

    def load_dataset(name, split):
        calls.append(f"{name}:{split}")
        if name != "roneneldan/TinyStories":
            raise ValueError(name)
        base, _, cut = split.partition("[:")
        rows = splits[base]
        if cut:
            rows = rows[:int(cut.rstrip("]"))]
        return FakeDataset(rows, split)

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_source_reads_train_and_validation_splits(tmp_path, stories, monkeypatch):
    calls: list[str] = []
    fake = _fake_datasets({"train": list(stories[:300]) + ["  ", ""],
                           "validation": list(stories[300:340])}, calls)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    cfg = cfg_for(tmp_path, data="hf")
    cfg.check_runtime()
    ds, tok, desc = prepare_data(cfg, log=None)
    assert calls == ["roneneldan/TinyStories:train", "roneneldan/TinyStories:validation"]
    assert (ds.n_train_stories, ds.n_val_stories) == (300, 40)  # empty rows dropped
    assert tok.decode(ds.tokens("val")) == EOT_TOKEN.join(stories[300:340]) + EOT_TOKEN
    assert "hf roneneldan/TinyStories (train split)" in desc and "validation split" in desc
    # Both splits were cached on disk (memory-mapped), and are reused.
    assert all(c.path is not None and c.status == "built" for c in ds.caches)
    ds2, _, _ = prepare_data(cfg, log=None)
    assert [c.status for c in ds2.caches] == ["loaded", "loaded"]
    capped = cfg_for(tmp_path, data="hf", max_stories=10)
    ds3, _, _ = prepare_data(capped, log=None)
    assert ds3.n_train_stories == 10 and "roneneldan/TinyStories:train[:10]" in calls


# ------------------------------------------------------------------- token cache

@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_cache_round_trips_to_direct_encoding(tmp_path, stories, kind, monkeypatch):
    if kind == "bpe":
        pytest.importorskip("tokenizers")
        tok = build_tokenizer("bpe", stories[:200], vocab_size=500)
    else:
        tok = ByteTokenizer()
    texts = list(stories[:120]) + ["Zoë 😀 “quotes” — 中文"]
    path = write_stories(tmp_path / "train.txt", texts)
    # Small blocks and batches: the streamed build crosses many chunk edges.
    monkeypatch.setattr(data_mod, "_READ_CHARS", 1000)
    monkeypatch.setattr(data_mod, "_ENCODE_BATCH_CHARS", 3000)
    cache = token_cache(resolve_source(path), tok, tmp_path / "cache")
    assert cache.status == "built" and isinstance(cache.tokens, np.memmap)
    assert cache.tokens.dtype == (np.uint8 if kind == "byte" else np.uint16)
    direct = tok.encode_documents(read_story_file(path))
    assert np.array_equal(cache.stream(), direct)
    assert cache.n_stories == len(texts) and cache.n_tokens == direct.size
    assert np.array_equal(cache.story(3), tok.encode(texts[3]))
    files = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert files == [".json", ".offsets", ".tokens"]  # no temporary left behind
    again = token_cache(resolve_source(path), tok, tmp_path / "cache")
    assert again.status == "loaded" and np.array_equal(again.stream(), direct)
    # The dataset over the memory-mapped cache serves the same windows as one built
    # from the materialized streams.
    ds = TokenDataset.from_caches(again, val_fraction=0.1, seed=3)
    flat = TokenDataset(ds.tokens("train"), ds.tokens("val"))
    for seed in range(3):
        a = ds.get_batch("train", 8, 40, torch.Generator().manual_seed(seed))
        b = flat.get_batch("train", 8, 40, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for (xa, ya), (xb, yb) in zip(ds.val_batches(4, 16, max_batches=3),
                                  flat.val_batches(4, 16, max_batches=3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _cache_files(cache_dir: Path) -> dict[str, Path]:
    return {p.suffix: p for p in cache_dir.iterdir()}


@pytest.mark.parametrize("damage", ["truncate", "flip", "offsets", "meta", "no_meta"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, stories, damage):
    path = write_stories(tmp_path / "train.txt", stories[:60])
    tok, cdir = ByteTokenizer(), tmp_path / "cache"
    good = token_cache(resolve_source(path), tok, cdir).stream()
    files = _cache_files(cdir)
    if damage == "truncate":
        with open(files[".tokens"], "r+b") as f:
            f.truncate(files[".tokens"].stat().st_size - 100)
    elif damage == "flip":
        raw = bytearray(files[".tokens"].read_bytes())
        raw[len(raw) // 2] ^= 0x01  # same size, one bit wrong
        files[".tokens"].write_bytes(bytes(raw))
    elif damage == "offsets":
        files[".offsets"].unlink()
    elif damage == "meta":
        files[".json"].write_text("{not json")
    else:
        files[".json"].unlink()
    cache = token_cache(resolve_source(path), tok, cdir)
    if damage == "no_meta":
        assert cache.status == "built"  # an interrupted build: simply built again
    else:
        assert cache.status.startswith("rebuilt"), cache.status
    assert np.array_equal(cache.stream(), good)
    assert token_cache(resolve_source(path), tok, cdir).status == "loaded"


def test_cache_key_follows_file_and_tokenizer(tmp_path, stories):
    pytest.importorskip("tokenizers")
    path = write_stories(tmp_path / "train.txt", stories[:30])
    cdir = tmp_path / "cache"
    token_cache(resolve_source(path), ByteTokenizer(), cdir)
    write_stories(path, stories[:31])  # edited file: new size and mtime
    c = token_cache(resolve_source(path), ByteTokenizer(), cdir)
    assert c.status == "built" and c.n_stories == 31
    bpe = build_tokenizer("bpe", stories[:100], vocab_size=400)
    assert token_cache(resolve_source(path), bpe, cdir).status == "built"
    assert len(list(cdir.glob("*.tokens"))) == 3


def test_cache_of_no_stories_is_an_error(tmp_path):
    path = tmp_path / "seps.txt"
    path.write_text(f"{EOT_TOKEN}\n \n{EOT_TOKEN}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no stories"):
        token_cache(resolve_source(path, arg="--data"), ByteTokenizer(), tmp_path / "c",
                    arg="--data")
    assert not list((tmp_path / "c").glob("*.json"))


# --------------------------------------------------------------- pipeline inputs

def test_default_is_the_embedded_sample(tmp_path):
    cfg = cfg_for(tmp_path)
    assert cfg.data == "embedded" and cfg.val_data is None
    ds, tok, desc = prepare_data(cfg, log=None)
    assert ds.n_train_stories + ds.n_val_stories == 5979
    assert ds.n_val_stories == round(5979 * cfg.val_fraction)
    assert desc.startswith("embedded TinyStories sample") and "held-out" in desc
    assert ds.caches[0].path is None  # the sample is tokenized in memory
    assert not (tmp_path / "runs").exists()  # nothing written for it


def test_val_data_is_a_separate_validation_set(tmp_path, stories):
    train = write_stories(tmp_path / "train.txt", stories[:200])
    val = write_stories(tmp_path / "val.txt", stories[200:230])
    cfg = parse_command_line(["--data", str(train), "--val-data", str(val),
                              "--out-dir", str(tmp_path / "runs")]).cfg
    assert cfg.val_data == str(val)
    cfg.check_runtime()
    ds, tok, desc = prepare_data(cfg, log=None)
    assert (ds.n_train_stories, ds.n_val_stories) == (200, 30)
    assert tok.decode(ds.tokens("train")) == EOT_TOKEN.join(stories[:200]) + EOT_TOKEN
    assert tok.decode(ds.tokens("val")) == EOT_TOKEN.join(stories[200:230]) + EOT_TOKEN
    assert f"validation: file {val}: 30 stories" in desc
    assert len(list((tmp_path / "runs" / ".token-cache").glob("*.tokens"))) == 2
    # The embedded sample with a separate validation file: all 5,979 stories train.
    ds2, _, _ = prepare_data(cfg_for(tmp_path, val_data=str(val)), log=None)
    assert (ds2.n_train_stories, ds2.n_val_stories) == (5979, 30)


@pytest.mark.parametrize("field", ["data", "val_data"])
def test_bad_data_arguments_name_the_argument(tmp_path, field):
    zero = tmp_path / "zero.txt"
    zero.write_bytes(b"")
    seps = tmp_path / "seps.txt"
    seps.write_text(f"{EOT_TOKEN}\n\n{EOT_TOKEN}\n", encoding="utf-8")
    for bad, why in ((tmp_path / "missing.txt", "no such file"), (tmp_path, "directory"),
                     (zero, "empty file")):
        cfg = cfg_for(tmp_path, **{field: str(bad)})
        with pytest.raises(ValueError, match=f"TrainConfig.{field}.*{why}"):
            cfg.check_runtime()
        with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
            prepare_data(cfg, log=None)
    with pytest.raises(ValueError, match=f"TrainConfig.{field}.*no stories"):
        prepare_data(cfg_for(tmp_path, **{field: str(seps)}), log=None)
    if field == "data":
        with pytest.raises(ValueError, match=field):
            TrainConfig(data="  ")
    else:  # an optional field: blank, "none" or "null" mean None (no validation file)
        assert TrainConfig(val_data="  ").val_data is None


def test_too_little_validation_text_names_the_field(tmp_path, stories):
    val = write_stories(tmp_path / "val.txt", ["Tiny."])
    with pytest.raises(ValueError, match="val_data"):
        prepare_data(cfg_for(tmp_path, val_data=str(val)), log=None)


# -------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_unicode():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    text = "Héllo, wörld! 😀 “quotes” — 中文\nnew line\ttab"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids + [tok.eot_id] + tok.encode("b")) == text + EOT_TOKEN + "b"
    # A truncated multi-byte character decodes to U+FFFD instead of raising.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([257])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_byte_encode_documents_matches_per_story_encoding():
    tok = ByteTokenizer()
    texts = ["a", "", "héllo", "x y"]
    expected = []
    for t in texts:
        expected += tok.encode(t) + [tok.eot_id]
    out = tok.encode_documents(texts)
    assert out.dtype == np.int64 and out.tolist() == expected
    assert tok.encode_documents([]).size == 0


def test_byte_encoding_is_fast(all_stories):
    texts = all_stories  # 5,979 stories, ~5 MB
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    ds = TokenDataset.from_texts(texts, tok)
    assert time.perf_counter() - t0 < 1.0
    assert ds.n_train_tokens + ds.n_val_tokens == sum(
        len(t.encode()) + 1 for t in texts)


def test_tokenizer_save_load(tmp_path):
    tok = ByteTokenizer()
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    json.loads(path.read_text())  # plain JSON
    for where in (tmp_path, path):
        loaded = load_tokenizer(where)
        assert isinstance(loaded, ByteTokenizer) and loaded.eot_id == 256
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "bad")


def test_build_tokenizer_kinds(monkeypatch):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError):
        build_tokenizer("bpe", texts=None, vocab_size=None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer("bpe", texts=["a b c"], vocab_size=300)


def test_bpe_tokenizer(tmp_path, stories):
    pytest.importorskip("tokenizers")
    cache = tmp_path / "cache"
    tok = build_tokenizer("bpe", stories[:300], vocab_size=600, cache_dir=cache)
    assert isinstance(tok, BPETokenizer)
    assert 257 < tok.vocab_size <= 600 and 0 <= tok.eot_id < tok.vocab_size
    text = "Once upon a time, a bunny named Zoë found a 😀 in the garden.\nThe end."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges actually compress
    out = tok.encode_documents(stories[:3])
    assert (out == tok.eot_id).sum() == 3 and out[-1] == tok.eot_id

    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    mtime = files[0].stat().st_mtime_ns
    again = BPETokenizer.train(stories[:300], 600, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == mtime  # served from the cache
    assert again.encode(text) == ids
    BPETokenizer.train(stories[:299], 600, cache_dir=cache)  # other texts, other key
    assert len(list(cache.iterdir())) == 2

    run = tmp_path / "run"
    tok.save(run)
    loaded = load_tokenizer(run)
    assert isinstance(loaded, BPETokenizer) and loaded.encode(text) == ids

    ds = TokenDataset.from_texts(stories, tok, val_fraction=0.1)
    x, y = ds.get_batch("train", 2, 16, torch.Generator().manual_seed(0))
    assert x.max() < tok.vocab_size
    with pytest.raises(ValueError, match="257"):
        BPETokenizer.train(stories, 257)


# ----------------------------------------------------------------------- dataset

def test_split_indices_are_pinned_and_scale():
    # Guards "same seed, same split on every machine" (integer hashing, no RNG).
    assert split_indices(20, 0.25, 0)[1].tolist() == [1, 4, 5, 13, 18]
    assert split_indices(20, 0.25, 1)[1].tolist() == [6, 8, 9, 12, 14]
    t0 = time.perf_counter()
    train, val = split_indices(1_000_000, 0.01, 7)  # millions of stories, no Python list
    assert time.perf_counter() - t0 < 10.0  # ~0.3 s; generous for a loaded CI machine
    assert val.size == 10_000 and train.size + val.size == 1_000_000
    assert not np.intersect1d(train, val).size


def test_split_is_deterministic_and_disjoint(stories):
    train, val = split_stories(stories, 0.1, seed=0)
    assert (train, val) == split_stories(stories, 0.1, seed=0)
    assert split_stories(stories, 0.1, seed=1)[1] != val
    assert len(val) == 40 and len(train) == 360
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(stories)
    # Each side keeps file order.
    pos = {s: i for i, s in enumerate(stories)}
    assert [pos[s] for s in val] == sorted(pos[s] for s in val)


def test_split_errors(stories):
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split_stories(stories, bad)
    with pytest.raises(ValueError, match="at least 2"):
        split_stories(stories[:1], 0.5)
    train, val = split_stories(stories[:2], 0.01)  # at least one story on each side
    assert len(train) == len(val) == 1


def test_dataset_streams(dataset, stories):
    tok = ByteTokenizer()
    train, val = split_stories(stories, 0.1, seed=0)
    assert dataset.n_train_tokens == sum(len(s.encode()) + 1 for s in train)
    assert dataset.n_val_tokens == sum(len(s.encode()) + 1 for s in val)
    stream = dataset.tokens("val")
    assert stream.dtype == torch.long and stream.dim() == 1
    assert tok.decode(stream) == EOT_TOKEN.join(val) + EOT_TOKEN
    assert dataset.n_train_stories == 360 and dataset.n_val_stories == 40
    assert "360 stories" in dataset.describe()


def test_get_batch_shapes_and_shift(dataset):
    g = torch.Generator().manual_seed(0)
    x, y = dataset.get_batch("train", 8, 32, g)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    # Every row is a real window of the stream.
    windows = dataset.tokens("train").unfold(0, 33, 1)
    for row_x, row_y in zip(x, y):
        full = torch.cat([row_x, row_y[-1:]])
        assert (windows == full).all(dim=1).any()
    xv, yv = dataset.get_batch("val", 3, 16, g)
    assert xv.shape == (3, 16) and torch.equal(yv[:, :-1], xv[:, 1:])


def test_get_batch_resumes_from_generator_state(dataset):
    g = torch.Generator().manual_seed(123)
    dataset.get_batch("train", 4, 16, g)
    state = g.get_state()
    first = [dataset.get_batch("train", 4, 16, g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    second = [dataset.get_batch("train", 4, 16, g2) for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = dataset.get_batch("train", 4, 16, torch.Generator().manual_seed(124))
    assert not torch.equal(other[0], first[0][0])


def test_val_batches_fixed_and_non_overlapping(dataset):
    T, B = 32, 5
    a = list(dataset.val_batches(B, T))
    b = list(dataset.val_batches(B, T))
    assert len(a) == len(b) > 1
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])
    n_windows = dataset.n_val_windows(T)
    assert sum(x.shape[0] for x, _ in a) == n_windows
    # Consecutive, non-overlapping windows: concatenated they rebuild the stream.
    xs = torch.cat([x for x, _ in a]).reshape(-1)
    assert torch.equal(xs, dataset.tokens("val")[: n_windows * T])

    capped = list(dataset.val_batches(B, T, max_batches=2))
    assert len(capped) == 2 and all(x.shape == (B, T) for x, _ in capped)
    for (x1, _), (x2, _) in zip(capped, dataset.val_batches(B, T, max_batches=2)):
        assert torch.equal(x1, x2)
    # Capped windows spread over the split: the last one is far from the start.
    rows = torch.cat([x for x, _ in capped])
    last_start = next(i for i in range(n_windows)
                      if torch.equal(dataset.tokens("val")[i * T:(i + 1) * T], rows[-1]))
    assert last_start > n_windows // 2


def test_dataset_errors(dataset):
    g = torch.Generator().manual_seed(0)
    too_long = dataset.n_val_tokens
    with pytest.raises(ValueError, match="smaller seq_len"):
        dataset.get_batch("val", 2, too_long, g)
    with pytest.raises(ValueError, match="smaller seq_len"):
        dataset.val_batches(2, too_long)  # eager, not at first next()
    with pytest.raises(ValueError, match="split"):
        dataset.get_batch("test", 2, 8, g)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.get_batch("train", 0, 8, g)
    with pytest.raises(ValueError, match="seq_len"):
        dataset.get_batch("train", 2, 0, g)
    with pytest.raises(TypeError, match="Generator"):
        dataset.get_batch("train", 2, 8, None)
    with pytest.raises(ValueError):
        TokenDataset(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_exactly_seq_len_plus_one_tokens_is_enough():
    ds = TokenDataset(torch.arange(9), torch.arange(5))
    x, y = ds.get_batch("val", 3, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(4).expand(3, 4))
    assert torch.equal(y, torch.arange(1, 5).expand(3, 4))
    assert [tuple(x.shape) for x, _ in ds.val_batches(2, 4)] == [(1, 4)]
