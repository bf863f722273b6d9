"""Text sources: documents (strings) for a train and a validation split.

- builtin: the running interpreter's standard-library `.py` files (no test folders, no
  site-packages); a file goes to validation when md5(relative path) % validation_mod == 0.
- files: local text files (one document each) and JSONL files (one document a line, through the
  HF `datasets` JSON loader).
- hf: an HF `datasets` name (needs the hub or a local cache).
- tfds: a TFDS data source (`tfds.data_source`, no TensorFlow), prepared beforehand.
"""

from __future__ import annotations

import hashlib
import itertools
import pathlib
import sysconfig

from dlm.config import ConfigError, DataConfig, Source, TokenizerKind

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _held_out(name: str, mod: int) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % mod == 0


def builtin_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if _held_out(str(rel), cfg.validation_mod) else train).append(text)
    return train, val


def _check_file(path: pathlib.Path) -> None:
    if not path.exists():
        raise ConfigError(f"Data file {str(path)!r} does not exist; fix data.paths.")
    if not path.is_file():
        raise ConfigError(f"Data path {str(path)!r} is not a regular file; list files, not folders, in data.paths.")
    try:
        with path.open("rb") as f:
            head = f.read(1)
    except OSError as e:
        raise ConfigError(f"Data file {str(path)!r} cannot be read ({e.strerror}); check its permissions.") from None
    if not head:
        raise ConfigError(f"Data file {str(path)!r} is empty; remove it from data.paths or give it text.")


def _load_local(paths: list[str], field: str, byte_level: bool) -> list[str]:
    """Documents of local files: a text file is one document, a JSONL line is one document.

    Text that is not UTF-8 is kept byte for byte (surrogate escapes) for the byte tokenizer and
    rejected for the others, which only take text."""
    import datasets

    datasets.disable_progress_bars()
    docs = []
    errors = "surrogateescape" if byte_level else "strict"
    for p in paths:
        path = pathlib.Path(p)
        _check_file(path)
        if path.suffix in (".jsonl", ".json"):
            try:
                ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
            except Exception as e:
                raise ConfigError(f"Data file {p!r} is not valid JSON lines ({type(e).__name__}); fix or remove it.") from None
            if field not in ds.column_names:
                raise ConfigError(f"{p!r} has no field {field!r} (fields: {', '.join(ds.column_names)}); set data.text_field.")
            values = ds[field]
            missing = [i for i, t in enumerate(values) if not isinstance(t, str)]
            if missing:
                raise ConfigError(f"Line {missing[0] + 1} of {p!r} has no text in field {field!r}; fix that record or set data.text_field.")
            docs += [t for t in values if t]
        else:
            docs.append(_read_text(path, p, errors))
    return docs


def _read_text(path: pathlib.Path, name: str, errors: str) -> str:
    """A text file as one document (surrogate escapes keep non-UTF-8 bytes for the byte tokenizer)."""
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ConfigError(f"Data file {name!r} is not valid UTF-8 (byte {e.start}); convert it, or use data.tokenizer=byte, "
                          "which reads any bytes.") from None


def json_lines(path: pathlib.Path, name: str):
    """(line number, record) of a JSON-lines file, read one line at a time; blank lines are
    skipped and a line that does not parse is one error naming it."""
    import json

    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"Line {n} of {name!r} is not valid JSON; fix or remove it.") from None


def _split_held_out(docs: list[str], mod: int) -> tuple[list[str], list[str]]:
    train, val = [], []
    for i, d in enumerate(docs):
        (val if _held_out(f"{i}:{d[:64]}", mod) else train).append(d)
    return train, val


def _hf_split(cfg: DataConfig, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split)
    except Exception as e:
        raise ConfigError(f"Could not load HF dataset {cfg.hf_name!r} split {split!r} ({type(e).__name__}: {e}).") from None
    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"HF dataset {cfg.hf_name!r} has no field {cfg.text_field!r}; set data.text_field.")
    n = len(ds) if not cfg.max_documents else min(cfg.max_documents, len(ds))
    return [t for t in ds.select(range(n))[cfg.text_field] if t]


def _tfds_split(cfg: DataConfig, split: str) -> list[str]:
    return list(itertools.islice(_stream_tfds(cfg, split), cfg.max_documents or None))


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train documents, validation documents)."""
    if cfg.source == Source.BUILTIN:
        train, val = builtin_documents(cfg)
    elif cfg.source == Source.FILES:
        byte_level = cfg.tokenizer == TokenizerKind.BYTE
        docs = _load_local(cfg.paths, cfg.text_field, byte_level)
        if cfg.validation_paths:
            train, val = docs, _load_local(cfg.validation_paths, cfg.text_field, byte_level)
        else:
            train, val = _split_held_out(docs, cfg.validation_mod)
    elif cfg.source == Source.HF:
        train = _hf_split(cfg, cfg.train_split)
        val = _hf_split(cfg, cfg.validation_split) if cfg.validation_split else None
        if val is None:
            train, val = _split_held_out(train, cfg.validation_mod)
    elif cfg.source == Source.TFDS:
        train = _tfds_split(cfg, cfg.train_split)
        val = _tfds_split(cfg, cfg.validation_split) if cfg.validation_split else None
        if val is None:
            train, val = _split_held_out(train, cfg.validation_mod)
    else:
        raise ValueError(f"{cfg.source} is not a text source")
    if cfg.max_documents:
        train, val = train[: cfg.max_documents], val[: cfg.max_documents]
    if not train or not val:
        raise ConfigError(f"Data source {cfg.source.value!r} gave {len(train)} training and {len(val)} validation documents; both must be non-empty.")
    return train, val


def _pairs_of(records, prompt_field: str, response_field: str, where: str) -> list[tuple[str, str]]:
    """(prompt, response) of each record; a missing or non-text field is one error naming the record."""
    out = []
    for i, rec in enumerate(records):
        for field in (prompt_field, response_field):
            if not isinstance(rec.get(field), str):
                raise ConfigError(f"Record {i + 1} of {where} has no text in field {field!r}; fix that record or set "
                                  f"data.{'prompt' if field == prompt_field else 'response'}_field.")
        out.append((rec[prompt_field], rec[response_field]))
    return out


def _local_pairs(paths: list[str], cfg: DataConfig) -> list[tuple[str, str]]:
    import datasets

    datasets.disable_progress_bars()
    out = []
    for p in paths:
        path = pathlib.Path(p)
        _check_file(path)
        if path.suffix not in (".jsonl", ".json"):
            raise ConfigError(f"data.format=pairs reads prompt/response records from JSON lines, and {p!r} is not a .jsonl file.")
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
        except Exception as e:
            raise ConfigError(f"Data file {p!r} is not valid JSON lines ({type(e).__name__}); fix or remove it.") from None
        out += _pairs_of(ds, cfg.prompt_field, cfg.response_field, repr(p))
    return out


def load_pairs(cfg: DataConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pairs, validation pairs) of (prompt, response) for data.format=pairs (files or hf)."""
    if cfg.source == Source.FILES:
        train = _local_pairs(cfg.paths, cfg)
        val = _local_pairs(cfg.validation_paths, cfg) if cfg.validation_paths else None
    elif cfg.source == Source.HF:
        import datasets

        def split(name):
            try:
                ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=name)
            except Exception as e:
                raise ConfigError(f"Could not load HF dataset {cfg.hf_name!r} split {name!r} ({type(e).__name__}: {e}).") from None
            if cfg.max_documents:
                ds = ds.select(range(min(cfg.max_documents, len(ds))))
            return _pairs_of(ds, cfg.prompt_field, cfg.response_field, f"HF dataset {cfg.hf_name!r} split {name!r}")

        train = split(cfg.train_split)
        val = split(cfg.validation_split) if cfg.validation_split else None
    else:
        raise ValueError(f"{cfg.source} has no prompt/response records")
    if val is None:
        keep = [not _held_out(f"{i}:{p[:64]}", cfg.validation_mod) for i, (p, _) in enumerate(train)]
        train, val = [x for x, k in zip(train, keep) if k], [x for x, k in zip(train, keep) if not k]
    if cfg.max_documents:
        train, val = train[: cfg.max_documents], val[: cfg.max_documents]
    if not train or not val:
        raise ConfigError(f"Data source {cfg.source.value!r} gave {len(train)} training and {len(val)} validation pairs; both must be non-empty.")
    return train, val


def _stream_local(paths: list[str], field: str, byte_level: bool):
    """The documents of `_load_local`, in the same order, read one at a time (a JSONL file line by
    line) so that a corpus larger than memory can be tokenised."""
    errors = "surrogateescape" if byte_level else "strict"
    for p in paths:
        path = pathlib.Path(p)
        _check_file(path)
        if path.suffix in (".jsonl", ".json"):
            for n, rec in json_lines(path, p):
                if not isinstance(rec, dict) or field not in rec:
                    raise ConfigError(f"Line {n} of {p!r} has no field {field!r}; set data.text_field.")
                if not isinstance(rec[field], str):
                    raise ConfigError(f"Line {n} of {p!r} has no text in field {field!r}; fix that record or set data.text_field.")
                if rec[field]:
                    yield rec[field]
        else:
            yield _read_text(path, p, errors)


def _stream_hf(cfg: DataConfig, split: str):
    """An HF split record by record: streamed from the hub when it is reachable, else read from the local cache."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split, streaming=True)
        features = list(ds.features or [])
    except Exception:
        try:
            ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split)
        except Exception as e:
            raise ConfigError(f"Could not load HF dataset {cfg.hf_name!r} split {split!r} ({type(e).__name__}: {e}).") from None
        features = ds.column_names
    if features and cfg.text_field not in features:
        raise ConfigError(f"HF dataset {cfg.hf_name!r} has no field {cfg.text_field!r}; set data.text_field.")
    for rec in ds:
        if rec.get(cfg.text_field):
            yield rec[cfg.text_field]


def _stream_tfds(cfg: DataConfig, split: str):
    import tensorflow_datasets as tfds

    try:
        src = tfds.data_source(cfg.tfds_name, split=split, download=False)
    except Exception as e:
        raise ConfigError(f"Could not open TFDS data source {cfg.tfds_name!r} split {split!r} ({type(e).__name__}); prepare it first.") from None
    for i in range(len(src)):
        v = src[i][cfg.text_field]
        yield v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def stream_documents(cfg: DataConfig):
    """(is_validation, document) pairs of a text source, one document at a time: the documents of
    `load_documents` with the same split, in the same order within each split (data.max_documents
    caps each split)."""
    if cfg.source == Source.BUILTIN:
        train, val = builtin_documents(cfg)
        streams = [(False, iter(train)), (True, iter(val))]
    elif cfg.source == Source.FILES:
        byte_level = cfg.tokenizer == TokenizerKind.BYTE
        docs = _stream_local(cfg.paths, cfg.text_field, byte_level)
        if cfg.validation_paths:
            streams = [(False, docs), (True, _stream_local(cfg.validation_paths, cfg.text_field, byte_level))]
        else:
            streams = [(None, docs)]
    elif cfg.source in (Source.HF, Source.TFDS):
        one = _stream_hf if cfg.source == Source.HF else _stream_tfds
        streams = [(False, one(cfg, cfg.train_split)), (True, one(cfg, cfg.validation_split))] if cfg.validation_split \
            else [(None, one(cfg, cfg.train_split))]
    else:
        raise ConfigError(f"data.source={cfg.source.value} is not a text corpus; dlm.data.prepare tokenises builtin, files, hf or tfds sources.")
    counts = {False: 0, True: 0}
    cap = cfg.max_documents or None
    for split, docs in streams:
        for i, d in enumerate(docs):
            is_val = split if split is not None else _held_out(f"{i}:{d[:64]}", cfg.validation_mod)
            if cap is not None and counts[is_val] >= cap:
                if split is not None or counts[not is_val] >= cap:
                    break
                continue
            counts[is_val] += 1
            yield is_val, d
