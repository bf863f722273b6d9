"""Tokenizers: bytes (256 + EOS), BPE trained here with HF `tokenizers`, pretrained HF ones.

Every tokenizer has `vocab_size` real tokens including EOS; the mask token is id
`vocab_size`, appended after them, except for a published model's tokenizer folder
(FolderTokenizer: LLaDA's and Dream's masks are tokens of their own vocabulary).
`bytes_per_token(ids)` converts nats/token to bits/byte.
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


CHAT_SECONDS = 2.0  # a chat template renders a few messages: milliseconds
CHAT_CHARS = 1 << 20


class _Limit(Exception):
    pass


def render_template(source: str, what: str, **values) -> str:
    """`source` rendered in jinja2's ImmutableSandboxedEnvironment with limits: at most
    CHAT_SECONDS of rendering (a trace function counts the template's own lines, so loops with no
    output are caught too), at most CHAT_CHARS of output, no string or list repeated past that
    size and no call with an integer argument past it ('a' * 10**10, 'a'.ljust(10**10)); ranges
    are the sandbox's (at most 100,000 items). Any failure is one ConfigError that starts with
    `what`."""
    import sys
    import time

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    import re

    wide = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%"])

        def wrap_str_format(self, value):  # str.format / format_map, at attribute access
            owner = getattr(value, "__self__", None)
            if (isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map")
                    and any(wide.search(field) for field in re.findall(r"\{[^{}]*\}", owner))):
                raise _Limit("a format field wider than a million characters")
            return super().wrap_str_format(value)

        def call_binop(self, context, operator, left, right):
            if operator == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*\d{7,}|%[-+ #0]*\d*\.\d{7,}", left):
                raise _Limit("a %-format wider than a million characters")
            sized = lambda x: isinstance(x, (str, list, tuple, bytes))
            if operator == "*" and ((sized(left) and isinstance(right, int) and len(left) * right > CHAT_CHARS)
                                    or (sized(right) and isinstance(left, int) and len(right) * left > CHAT_CHARS)):
                raise _Limit(f"a repetition of more than {CHAT_CHARS} items")
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise _Limit("a power with an exponent above 4096")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            if any(isinstance(a, int) and abs(a) > CHAT_CHARS for a in (*args, *kwargs.values())):
                raise _Limit(f"a call with an integer argument above {CHAT_CHARS}")

            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message):
        raise TemplateError(message)

    deadline = time.monotonic() + CHAT_SECONDS

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Limit(f"more than {CHAT_SECONDS:g} s of rendering")
        return tracer

    env = Limited(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    previous = sys.gettrace()
    out, size = [], 0
    try:
        template = env.from_string(source)
        sys.settrace(tracer)
        for chunk in template.generate(**values):
            size += len(chunk)
            if size > CHAT_CHARS:
                raise _Limit(f"more than {CHAT_CHARS} characters of output")
            out.append(chunk)
    except _Limit as e:
        raise ConfigError(f"{what} stopped at {e.args[0]}; the folder holds a template dlm will not render.") from None
    except (TemplateError, ArithmeticError, MemoryError, RecursionError, TypeError, ValueError, AttributeError,
            KeyError, IndexError) as e:  # SecurityError is a TemplateError
        raise ConfigError(f"{what} failed ({type(e).__name__}: {str(e)[:160]}); the folder holds a template dlm cannot "
                          "render safely.") from None
    finally:
        sys.settrace(previous)
    return "".join(out)


class FolderTokenizer(HFTokenizer):
    """A published model's tokenizer folder: tokenizer.json, tokenizer_config.json (special
    tokens, chat template) and config.json (special ids). The special ids come from those
    files: BOS, EOS (config.json's eos_token_id, the model's end of text), end-of-turn tokens
    (<|eot_id|>, <|im_end|>, and tokenizer_config's eos_token), pad and mask (config.json's
    mask_token_id, tokenizer_config's mask_token, or `mask_id`). vocab_size is the tokenizer's
    own count (a model's logit columns may be more)."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

    def __init__(self, directory, config: dict | None = None, mask_id: int | None = None):
        from tokenizers import Tokenizer

        directory = pathlib.Path(directory)
        if not (directory / "tokenizer.json").exists():
            raise ConfigError(f"{str(directory)!r} holds no tokenizer.json (MDLM-OWT uses GPT-2's: copy gpt2's tokenizer.json "
                              "into the folder).")
        try:
            self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library's parse errors
            raise ConfigError(f"{str(directory / 'tokenizer.json')!r} is not a Hugging Face tokenizer file ({str(e)[:120]}).") from None
        self.kind = "hf-folder"
        self.directory = directory
        self.files = {n: (directory / n).read_bytes() for n in self.FILES if (directory / n).exists()}
        tc = json.loads(self.files.get("tokenizer_config.json", b"{}"))
        if config is None:
            config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
        self.vocab_size = self.tok.get_vocab_size()
        tid = lambda t: self.tok.token_to_id(t.get("content") if isinstance(t, dict) else t) if t else None
        first = lambda *xs: next((x for x in xs if x is not None), None)
        self.bos_id = first(config.get("bos_token_id"), tid(tc.get("bos_token")))
        self.eos_id = first(config.get("eos_token_id"), tid(tc.get("eos_token")), -1)
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        self.pad_id = first(config.get("pad_token_id"), tid(tc.get("pad_token")), self.eos_id)
        self.stop_ids = sorted({i for i in (self.eos_id, tid(tc.get("eos_token")), tid("<|eot_id|>"), tid("<|im_end|>"),
                                            tid("<|endoftext|>")) if i is not None and i >= 0})
        self._mask = first(mask_id, config.get("mask_token_id"), tid(tc.get("mask_token")), tid("<|mdm_mask|>"), self.vocab_size)
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if template is None and "chat_template.jinja" in self.files:
            template = self.files["chat_template.jinja"].decode()
        self.chat_template = template
        self.special_text = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items()
                             if k.endswith("_token") and isinstance(v, (str, dict))}

    @property
    def mask_id(self) -> int:
        return self._mask

    def decode(self, ids) -> str:
        """Text of ids; masks and ids past the tokenizer's vocabulary show as '_'."""
        parts, run = [], []
        for i in [int(i) for i in np.asarray(ids).tolist()] + [None]:
            if i is None or i >= self.vocab_size or i == self._mask:
                if run:
                    parts.append(self.tok.decode(run, skip_special_tokens=False))
                    run = []
                if i is not None:
                    parts.append("_")
            else:
                run.append(i)
        return "".join(parts)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered in jinja2's sandbox (a template from a downloaded folder is
        untrusted code: it cannot reach Python internals or change its inputs), within
        CHAT_SECONDS and CHAT_CHARS; whatever goes wrong is one ConfigError naming the folder."""
        if not self.chat_template:
            raise ConfigError("This tokenizer has no chat_template (a base model?); prompt it with --prompt instead of --chat.")
        return render_template(self.chat_template, f"The chat template of {str(getattr(self, 'directory', '?'))!r}",
                               messages=messages, add_generation_prompt=add_generation_prompt, **self.special_text)

    def encode_chat(self, question: str) -> np.ndarray:
        return np.asarray(self.tok.encode(self.render_chat([{"role": "user", "content": question}]),
                                          add_special_tokens=False).ids, np.int32)

    def save(self, workdir: pathlib.Path) -> None:
        d = pathlib.Path(workdir) / "hf_tokenizer"
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (d / name).write_bytes(data)
        ids = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id, "mask_token_id": self._mask}
        (d / "config.json").write_text(json.dumps(ids))
        (pathlib.Path(workdir) / "tokenizer.json").write_text(json.dumps({"kind": "hf-folder"}))


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
    if pathlib.Path(name).is_dir():  # a local folder: a published model's, or a converted workdir
        return load_tokenizer(name)
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
    data = json.loads(meta.read_text())
    if "kind" not in data:  # a Hugging Face tokenizer file: a published model's folder
        return FolderTokenizer(workdir)
    kind = data["kind"]
    if kind == "hf-folder":
        return FolderTokenizer(workdir / "hf_tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "symbols":
        return SymbolTokenizer(json.loads(meta.read_text())["alphabet"])
    if kind == "markov":  # workdirs written before SymbolTokenizer
        return SymbolTokenizer(letters(json.loads(meta.read_text())["num_states"]))
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_file(str(workdir / "tokenizer.hf.json")), kind)
