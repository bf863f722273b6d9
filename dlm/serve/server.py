"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Endpoints: POST /v1/completions and /v1/chat/completions (the tokenizer's chat template, or
--chat-template), both streaming by committed block (server-sent events) when "stream" is true;
GET /v1/models, /health and /metrics (Prometheus text).

The parallel decoder's settings are per request, as extra fields of the body (the `openai`
client's `extra_body`): threshold (tau), block_length, cache (none / prefix / dual), credit,
suffix_dropout, score, rule, k, factor, window. A bad request gets a 400 whose message is one
sentence; a client that goes away cancels its row at the next block boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import socket
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from dlm.config import CommitRule, ConfigError, DecodeCache, DecodeConfig, Score, check_sampling_overrides
from dlm.serve.engine import Engine

# the body's fields for the decoder: name -> (DecodeConfig field, type)
DECODER_FIELDS = {"threshold": ("tau", float), "block_length": ("block_length", int), "cache": ("cache", DecodeCache),
                  "credit": ("credit", bool), "suffix_dropout": ("suffix_dropout", bool), "score": ("score", Score),
                  "rule": ("rule", CommitRule), "k": ("k", int), "factor": ("factor", float), "window": ("window", int)}
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "seed", "stream", "stop", "user", "n",
          "stream_options"}
# OpenAI's fields this server does not implement, accepted at their neutral values only
NEUTRAL = {"top_p": lambda v: v in (None, 1, 1.0), "logprobs": lambda v: v in (None, False, 0),
           "top_logprobs": lambda v: v in (None, 0), "echo": lambda v: v in (None, False),
           "presence_penalty": lambda v: v in (None, 0, 0.0), "frequency_penalty": lambda v: v in (None, 0, 0.0),
           "best_of": lambda v: v in (None, 1), "logit_bias": lambda v: v in (None, {}), "suffix": lambda v: v in (None, ""),
           "parallel_tool_calls": lambda v: True, "response_format": lambda v: v in (None, {"type": "text"}),
           "tools": lambda v: v in (None, []), "tool_choice": lambda v: v in (None, "none")}
COMPLETION = COMMON | {"prompt"}
CHAT = COMMON | {"messages"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default; chat answers run to the context (at most CHAT_MAX_TOKENS)
CHAT_MAX_TOKENS = 512


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (to start a server on in a test or a notebook)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BadRequest(Exception):
    """A request the server refuses: 400 and this one sentence."""


def _number(body, name, kind, default):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, kind) and not isinstance(v, bool) if kind is not bool else isinstance(v, bool)
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        ok, v = True, float(v)
    if not ok:
        raise BadRequest(f"'{name}' must be {'a number' if kind is float else 'an integer' if kind is int else 'true or false'}, "
                         f"not {json.dumps(v)[:40]}.")
    return v


class Server:
    """The app's state: the engine (running in its own thread), the tokenizer and the defaults."""

    def __init__(self, model, tok, *, name: str, context: int, decode: DecodeConfig, temperature: float = 0.0,
                 chat_template: str | None = None, length_buckets=None, batch_buckets=None, mesh=None,
                 float64: bool = True, diffusion=None):
        self.tok, self.name, self.context = tok, name, context
        self.decode, self.temperature, self.chat_template = decode, temperature, chat_template
        self.eos_id = getattr(tok, "eos_id", -1)
        self.stops = set(getattr(tok, "stop_ids", [])) | ({self.eos_id} if self.eos_id >= 0 else set())
        kw = {}
        if length_buckets:
            kw["length_buckets"] = length_buckets
        if batch_buckets:
            kw["batch_buckets"] = batch_buckets
        buckets = kw.get("length_buckets", (64, 128, 256, 512, 1024, 2048, 4096))
        kw["length_buckets"] = [b for b in buckets if b < context] + [context]
        self.engine = Engine(model, eos_id=self.eos_id, max_length=context, mesh=mesh, float64=float64, diffusion=diffusion, **kw)
        self.metrics = {"requests_total": 0, "requests_completed_total": 0, "requests_rejected_total": 0,
                        "requests_cancelled_total": 0, "completion_tokens_total": 0, "prompt_tokens_total": 0,
                        "request_seconds_sum": 0.0}

    # ---------------------------------------------------------------- request parsing

    def settings(self, body: dict, allowed: set) -> dict:
        """The request's generation settings (max_tokens None: the endpoint's default)."""
        unknown = sorted(set(body) - allowed - set(DECODER_FIELDS) - set(NEUTRAL))
        if unknown:
            raise BadRequest(f"Unknown field '{unknown[0]}'; this server takes {', '.join(sorted(allowed | set(DECODER_FIELDS)))}.")
        odd = sorted(k for k in NEUTRAL if k in body and not NEUTRAL[k](body[k]))
        if odd:
            raise BadRequest(f"'{odd[0]}' is not supported by this server; leave it out (or at its default).")
        if _number(body, "n", int, 1) != 1:
            raise BadRequest("'n' must be 1: send one request per completion.")
        max_tokens = _number(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = _number(body, "max_completion_tokens", int, None)
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be at least 1, not {max_tokens}.")
        temperature = _number(body, "temperature", float, self.temperature)
        if not 0 <= temperature < float("inf"):
            raise BadRequest(f"'temperature' must be >= 0, not {temperature}.")
        seed = _number(body, "seed", int, None)
        if seed is None:  # OpenAI's: no seed, a fresh draw
            seed = secrets.randbits(63)
        elif not -2**63 <= seed < 2**63:
            raise BadRequest(f"'seed' must be a 64-bit integer, not {seed}.")
        changes = {}
        for name, (field, kind) in DECODER_FIELDS.items():
            if body.get(name) is None:  # absent or null: the server's default
                continue
            v = body[name]
            if isinstance(kind, type) and issubclass(kind, (Score, CommitRule, DecodeCache)):
                try:
                    changes[field] = kind(v)
                except ValueError:
                    raise BadRequest(f"'{name}' must be one of {', '.join(m.value for m in kind)}, not {json.dumps(v)[:40]}.") from None
            else:
                changes[field] = _number(body, name, kind, None)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise BadRequest("'stop' must be a string or a list of non-empty strings.")
        stream = _number(body, "stream", bool, False)
        return dict(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop, stream=stream,
                    decode=dataclasses.replace(self.decode, **changes))

    def prompt_ids(self, body: dict) -> np.ndarray:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise BadRequest("'prompt' is empty; send some text.")
            return self.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < 2**31]
            if bad:
                raise BadRequest(f"The prompt holds token {bad[0]}, not a token id of this model (0 to {self.engine.vocab_size - 1}).")
            return np.asarray(p, np.int64)
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request).")

    def chat_ids(self, body: dict) -> np.ndarray:
        messages = body.get("messages")
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise BadRequest("'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"} objects.")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.chat_template is not None:
            from dlm.data.tokenizers import render_template

            text = render_template(self.chat_template, "The --chat-template", messages=messages, add_generation_prompt=True,
                                   **getattr(self.tok, "special_text", {}))
        elif hasattr(self.tok, "render_chat") and getattr(self.tok, "chat_template", None):
            text = self.tok.render_chat(messages)
        else:
            raise BadRequest("This model's tokenizer has no chat template; use /v1/completions, or start the server with "
                             "--chat-template FILE.")
        return self.encode(text, special=False)

    def encode(self, text: str, special: bool = True) -> np.ndarray:
        """Token ids of text (special=False: a rendered chat template, which wrote its own special tokens)."""
        try:
            if not special and hasattr(self.tok, "tok"):
                return np.asarray(self.tok.tok.encode(text, add_special_tokens=False).ids, np.int64)
            return np.asarray(self.tok.encode(text), np.int64)
        except (UnicodeError, ValueError, TypeError) as e:  # a lone surrogate, or what the tokenizer refuses
            raise BadRequest(f"The text cannot be tokenized ({type(e).__name__}); send valid UTF-8 text.") from None

    def submit(self, ids, s: dict, on_block=None, on_done=None):
        try:
            return self.engine.submit(ids, s["max_tokens"], decode=s["decode"], temperature=s["temperature"], seed=s["seed"],
                                      on_block=on_block, on_done=on_done)
        except ConfigError as e:
            raise BadRequest(str(e)) from None

    # ---------------------------------------------------------------- results

    def text(self, tokens, stop: list[str]) -> tuple[str, bool]:
        """The completion's text: tokens up to the first stop token, cut at the first stop string;
        and whether it stopped (a stop token or string)."""
        tokens = [int(t) for t in tokens]
        cut = next((i for i, t in enumerate(tokens) if t in self.stops), None)
        text = self.tok.decode(np.asarray(tokens[:cut] if cut is not None else tokens, np.int32))
        hit = [text.index(s) for s in stop if s in text]
        if hit:
            return text[: min(hit)], True
        return text, cut is not None


def create_app(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="dlm", lifespan=lifespan)

    def error(message: str, status: int = 400):
        if status < 499:
            server.metrics["requests_rejected_total"] += 1
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 499 else "server_error",
                                       "param": None, "code": None}}, status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.name, "requests_in_engine": server.engine.pending()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "dlm"}]}

    @app.get("/metrics")
    def metrics():
        e = server.engine
        lines = []
        values = {**{f"dlm_{k}": v for k, v in server.metrics.items()}, "dlm_requests_in_engine": e.pending(),
                  "dlm_engine_steps_total": e.stats["steps"], "dlm_engine_rows_total": e.stats["rows"],
                  "dlm_compilations_total": e.compilations}
        for k, v in values.items():
            kind = "counter" if k.endswith("_total") or k.endswith("_sum") else "gauge"
            lines += [f"# TYPE {k} {kind}", f"{k} {v}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")
        return body

    async def serve(request: Request, chat: bool):
        start = time.time()
        try:
            body = await body_of(request)
            s = server.settings(body, CHAT if chat else COMPLETION)
            ids = server.chat_ids(body) if chat else server.prompt_ids(body)
            if s["max_tokens"] is None:  # the endpoint's default, within the context
                room = server.context - len(ids)
                s["max_tokens"] = max(1, min(CHAT_MAX_TOKENS if chat else DEFAULT_MAX_TOKENS, room))
        except (BadRequest, ConfigError) as e:  # ConfigError: a chat template that fails to render
            return error(str(e))
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        on_block = (lambda t: loop.call_soon_threadsafe(updates.put_nowait, t)) if s["stream"] else None
        done = asyncio.Event()
        try:
            req = server.submit(ids, s, on_block, lambda r: loop.call_soon_threadsafe(done.set))
        except BadRequest as e:
            return error(str(e))
        server.metrics["requests_total"] += 1
        server.metrics["prompt_tokens_total"] += len(ids)
        req_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(start)

        def usage(n):
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def reason(stopped: bool):
            return "stop" if stopped else "length"

        def count_generated(tokens):
            cut = next((i for i, t in enumerate(tokens) if int(t) in server.stops), None)
            return len(tokens) if cut is None else cut + 1

        if not s["stream"]:
            while not done.is_set():
                if await request.is_disconnected():
                    req.cancel()
                    server.metrics["requests_cancelled_total"] += 1
                    return error("The client went away.", 499)
                try:
                    await asyncio.wait_for(done.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
            if req.tokens is None:  # an engine failure (or a shutdown)
                return error(f"The request was not completed ({req.finish_reason}).", 500)
            text, stopped = server.text(req.tokens, s["stop"])
            n = count_generated(req.tokens)
            server.metrics["completion_tokens_total"] += n
            server.metrics["request_seconds_sum"] += time.time() - start
            server.metrics["requests_completed_total"] += 1
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason(stopped)}
                      if chat else {"index": 0, "text": text, "finish_reason": reason(stopped), "logprobs": None})
            return {"id": req_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": server.name, "choices": [choice], "usage": usage(n)}

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish=None, role=False):
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": req_id, "object": kind, "created": created, "model": server.name,
                                          "choices": [choice]}) + "\n\n"

        def held_back(text: str) -> int:
            """Characters at the end of text that may still grow into a stop string (or be a
            character cut by a block boundary): they are sent once the next block settles them."""
            n = 1 if text.endswith("\ufffd") else 0
            for stop in s["stop"]:
                n = max(n, next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0))
            return n

        async def events():
            sent, stopped, complete, last = "", False, False, None
            pending: set = set()
            try:
                if chat:
                    yield chunk(None, role=True)
                while True:
                    get = asyncio.ensure_future(updates.get())
                    fin = asyncio.ensure_future(done.wait())
                    pending = {get, fin}
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    fin.cancel()
                    if get.done():
                        tokens = get.result()
                    else:
                        get.cancel()
                        tokens = None
                        while not updates.empty():
                            tokens = updates.get_nowait()
                        if tokens is None:
                            break
                    last = tokens
                    text, stopped = server.text(tokens, s["stop"])
                    if not stopped and not done.is_set():
                        text = text[:len(text) - held_back(text)]
                    if len(text) > len(sent) and text.startswith(sent):
                        yield chunk(text[len(sent):])
                        sent = text
                    if stopped:
                        req.cancel()  # a stop string or token: the rest is not needed
                        break
                    if done.is_set() and updates.empty():
                        break
                await done.wait()
                final = req.tokens if req.tokens is not None else last
                if req.tokens is None and not stopped:  # failed in the engine: an error event, then the end
                    yield "data: " + json.dumps({"error": {"message": f"The request was not completed ({req.finish_reason}).",
                                                           "type": "server_error"}}) + "\n\n"
                else:
                    if final is not None:
                        text, stopped = server.text(final, s["stop"])
                        if len(text) > len(sent) and text.startswith(sent):
                            yield chunk(text[len(sent):])
                        server.metrics["completion_tokens_total"] += count_generated(final)
                    yield chunk(None, reason(stopped))
                    server.metrics["request_seconds_sum"] += time.time() - start
                    server.metrics["requests_completed_total"] += 1
                yield "data: [DONE]\n\n"
                complete = True
            finally:
                for task in pending:
                    task.cancel()
                if not complete:  # the client went away (or the stream broke): free the row
                    req.cancel()
                    server.metrics["requests_cancelled_total"] += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


def serve_in_thread(server: Server, host: str = "127.0.0.1", port: int | None = None):
    """Start uvicorn on `server` in a background thread (a notebook, a test, a benchmark):
    returns (base url, stop), where stop() shuts it down and waits for it."""
    import threading

    import uvicorn

    port = port or free_port(host)
    u = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=u.run, name="dlm-server", daemon=True)
    thread.start()
    while not u.started:
        if not thread.is_alive():
            raise ConfigError(f"The server could not start on {host}:{port}.")
        time.sleep(0.05)

    def stop():
        u.should_exit = True
        thread.join()

    return f"http://{host}:{port}", stop


def load(workdir=None, pretrained=None, family=None, dtype="float32", use_ema=True, overrides=()):
    """(model, tokenizer, context, sampling config, name, diffusion config) of a run or a
    published folder; `overrides`: sampling.* keys over the run's (or the default) sampling config."""
    import pathlib

    import dlm

    if (workdir is None) == (pretrained is None):
        raise ConfigError("Pass exactly one of --workdir (a run) and --pretrained (a published checkpoint folder).")
    if pretrained is not None:
        from dlm.data.tokenizers import FolderTokenizer
        from dlm.interop.hf import _load, open_checkpoint

        ckpt = open_checkpoint(pretrained, family, dtype)
        model, _ = _load(ckpt)
        tok = FolderTokenizer(pretrained, ckpt.config, mask_id=model.mask_id)
        from dlm.models.families import sampling_overrides

        cfg = dlm.load_config(None, [*sampling_overrides(ckpt.family, ckpt.config), *overrides])
        return model, tok, ckpt.context, cfg.sampling, pathlib.Path(pretrained).name, cfg.diffusion
    model, cfg = dlm.restore(workdir, use_ema=use_ema)
    if overrides:
        cfg = dlm.load_config(pathlib.Path(workdir) / "config.yaml", overrides)
    return model, dlm.load_tokenizer(workdir), cfg.data.seq_len, cfg.sampling, pathlib.Path(workdir).name, cfg.diffusion


def main(argv=None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dlm.serve", description="An OpenAI-compatible server (completions, "
                                     "chat completions, streaming) over the parallel decoder with continuous batching.")
    parser.add_argument("--workdir", default=None, help="A run written by train.py or dlm.convert.")
    parser.add_argument("--pretrained", default=None, help="A published checkpoint folder (LLaDA, Dream, MDLM-OWT).")
    parser.add_argument("--family", choices=["llada", "dream", "mdlm"], default=None, help="With --pretrained, when config.json does not say.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--chat-template", default=None, help="A jinja2 chat template file, for a tokenizer that has none.")
    parser.add_argument("--length-buckets", default=None, help="Canvas lengths (prompt + completion) the decoder is compiled "
                        "for, e.g. 64,128,256 (default: powers of two up to the context).")
    parser.add_argument("--batch-buckets", default=None, help="Batch sizes a step is padded to, the largest being the rows decoded "
                        "together (default 1,2,4,8,16,32).")
    parser.add_argument("--warmup", action="store_true", help="Compile the default decoder for every bucket before serving.")
    parser.add_argument("--no-ema", action="store_true", help="Use the raw parameters instead of the EMA.")
    parser.add_argument("overrides", nargs="*", help="sampling.* defaults, e.g. sampling.decode.block_length=16 sampling.temperature=0")
    args = parser.parse_args(argv)
    from dlm.train.checkpoint import RestoreError

    try:
        check_sampling_overrides(args.overrides, "The server")
        model, tok, context, sampling, name, diffusion = load(args.workdir, args.pretrained, args.family, args.dtype,
                                                              not args.no_ema, args.overrides)

        def ints(text, what):
            try:
                values = [int(v) for v in text.split(",")]
            except ValueError:
                raise ConfigError(f"--{what} must be comma-separated integers, e.g. 64,128,256; got {text!r}.") from None
            if any(v < 1 for v in values) or values != sorted(set(values)):
                raise ConfigError(f"--{what} must be increasing positive integers, e.g. 64,128,256; got {text!r}.")
            return values

        template = None
        if args.chat_template:
            import pathlib

            template = pathlib.Path(args.chat_template).read_text()
        server = Server(model, tok, name=name, context=context, decode=sampling.decode, temperature=sampling.temperature,
                        chat_template=template, float64=sampling.float64, diffusion=diffusion,
                        length_buckets=ints(args.length_buckets, "length-buckets") if args.length_buckets else None,
                        batch_buckets=ints(args.batch_buckets, "batch-buckets") if args.batch_buckets else None)
        if args.warmup:
            server.engine.warmup(sampling.decode, temperature=sampling.temperature)
    except (ConfigError, OSError, RestoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    print(f"Serving {name} on http://{args.host}:{args.port}/v1 (context {context} tokens)", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
