"""Tokenizers: bytes (256 + EOS), BPE trained here with HF `tokenizers`, pretrained HF ones.

Every tokenizer has `vocab_size` real tokens including EOS; the mask token is id
`vocab_size`, appended after them. `bytes_per_token(ids)` converts nats/token to bits/byte.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from dlm.config import ConfigError, DataConfig, TokenizerKind

EOS_TEXT = "<|eos|>"


class SymbolTokenizer:
    """A small alphabet of symbols, one token each (Markov states as letters, Sudoku digits); there
    is no EOS (vocab = the alphabet's size), mask = vocab_size."""

    kind = "symbols"
    eos_id = -1

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.vocab_size = len(alphabet)
        self._index = {c: i for i, c in enumerate(alphabet)}

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> np.ndarray:
        bad = [c for c in text if c not in self._index]
        if bad:
            raise ConfigError(f"{bad[0]!r} is not a symbol of this tokenizer; use characters from {self.alphabet!r}.")
        return np.asarray([self._index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] if 0 <= i < self.vocab_size else "_" for i in np.asarray(ids).tolist())

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int64)

    def save(self, workdir: pathlib.Path) -> None:
        (pathlib.Path(workdir) / "tokenizer.json").write_text(json.dumps({"kind": "symbols", "alphabet": self.alphabet}))


def letters(n: int) -> str:
    """n distinct one-character names: a-z, then A-Z, then Latin Extended-A (Markov states)."""
    return "".join(chr(97 + i) if i < 26 else chr(65 + i - 26) if i < 52 else chr(0x100 + i) for i in range(n))


class ByteTokenizer:
    """UTF-8 bytes 0..255 and EOS = 256; mask = 257."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogateescape"), np.uint8).astype(np.int32)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in np.asarray(ids).tolist():
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(EOS_TEXT if i == self.eos_id else "_")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length of every token id (EOS counts as one byte: it stands for a separator)."""
        return np.ones(self.vocab_size, np.int64)

    def save(self, workdir: pathlib.Path) -> None:
        (workdir / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class HFTokenizer:
    """A `tokenizers.Tokenizer` with an EOS token; mask = vocab_size."""

    def __init__(self, tok, kind: str):
        self.tok = tok
        self.kind = kind
        eos = next((t for t in (EOS_TEXT, "<|endoftext|>", "</s>", "[SEP]", "<eos>") if tok.token_to_id(t) is not None), None)
        if eos is None:
            tok.add_special_tokens([EOS_TEXT])
            eos = EOS_TEXT
        self.eos_id = tok.token_to_id(eos)
        self.vocab_size = tok.get_vocab_size()

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts):
        return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).tolist()]
        parts, run = [], []
        for i in ids + [None]:
            if i is None or i >= self.vocab_size or i == self.eos_id:
                if run:
                    parts.append(self.tok.decode(run, skip_special_tokens=False))
                    run = []
                if i is not None:
                    parts.append(EOS_TEXT if i == self.eos_id else "_")
            else:
                run.append(i)
        return "".join(parts)

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i != self.eos_id:
                out[i] = max(len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8")), 1)
        return out

    def save(self, workdir: pathlib.Path) -> None:
        self.tok.save(str(workdir / "tokenizer.hf.json"))
        (workdir / "tokenizer.json").write_text(json.dumps({"kind": self.kind}))


def train_bpe(texts, vocab_size: int) -> HFTokenizer:
    """Byte-level BPE trained on `texts` (an iterable of documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, "bpe")


def pretrained(name: str) -> HFTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_pretrained(name)
    except Exception as e:  # network or name errors from the hub
        raise ConfigError(f"Could not load the pretrained tokenizer {name!r} ({type(e).__name__}); check the name and the network.") from None
    return HFTokenizer(tok, "pretrained")


def build_tokenizer(cfg: DataConfig, train_texts=None):
    if cfg.tokenizer == TokenizerKind.BYTE:
        return ByteTokenizer()
    if cfg.tokenizer == TokenizerKind.BPE:
        return train_bpe(train_texts, cfg.bpe_vocab_size)
    return pretrained(cfg.pretrained_tokenizer)


def load_tokenizer(workdir: str | pathlib.Path):
    """The tokenizer a run saved in its workdir, or None if it saved none."""
    workdir = pathlib.Path(workdir)
    meta = workdir / "tokenizer.json"
    if not meta.exists():
        return None
    kind = json.loads(meta.read_text())["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "symbols":
        return SymbolTokenizer(json.loads(meta.read_text())["alphabet"])
    if kind == "markov":  # workdirs written before SymbolTokenizer
        return SymbolTokenizer(letters(json.loads(meta.read_text())["num_states"]))
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_file(str(workdir / "tokenizer.hf.json")), kind)
