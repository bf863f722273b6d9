"""The OpenAI-compatible server (python -m dlm.serve) answers the `openai` client on localhost:
completions, chat completions and streams carry the tokens generate() gives the same prompt,
malformed requests get a 400 with one sentence, and a client that leaves mid-stream frees its row."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from dlm.config import DecodeCache, DecodeConfig, Sampler, SamplingConfig
from dlm.sampling import generate as gen
from dlm.serve.server import Server, free_port, load, serve_in_thread
from hostile import cli_error, run_cli

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained", "llada")


@pytest.fixture(scope="module")
def served():
    model, tok, context, _, name, diffusion = load(pretrained=FOLDER)
    server = Server(model, tok, name=name, context=context, decode=DecodeConfig(block_length=8), temperature=0.0,
                    batch_buckets=[1, 4], diffusion=diffusion)
    url, stop = serve_in_thread(server)
    yield server, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    stop()


def _solo_text(server, ids, max_tokens, **decode):
    """What generate() gives the prompt alone, as the server's text."""
    sc = SamplingConfig(sampler=Sampler.PARALLEL, temperature=0.0,
                        decode=DecodeConfig(**{"block_length": 8, **decode}))
    out = gen.generate(server.engine.model, cfg=sc, prompts=[ids], length=len(ids) + max_tokens, eos_id=server.eos_id)
    return server.text(out["tokens"][0, len(ids):], [])[0]


def test_completion_is_the_prompts_generate_tokens(served):
    server, url, client = served
    r = client.completions.create(model="llada", prompt="they do", max_tokens=12, temperature=0)
    ids = server.tok.encode("they do")
    assert r.choices[0].text == _solo_text(server, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_template_and_per_request_decoder_settings(served):
    server, url, client = served
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="llada", messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"threshold": 0.5, "cache": "dual", "block_length": 4})
    ids = server.tok.tok.encode(server.tok.render_chat(messages), add_special_tokens=False).ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _solo_text(server, ids, 16, tau=0.5, cache=DecodeCache.DUAL, block_length=4)


def test_stream_sends_committed_blocks_that_add_up_to_the_completion(served):
    server, url, client = served
    chunks = list(client.completions.create(model="llada", prompt="they do", max_tokens=24, temperature=0, stream=True,
                                            extra_body={"block_length": 4}))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == _solo_text(server, server.tok.encode("they do"), 24, block_length=4)
    assert len([c for c in chunks if c.choices[0].text]) >= 2  # more than one block arrived on its own
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = list(client.chat.completions.create(model="llada", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                               temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason in ("stop", "length")


def _post(url, body: bytes):
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"max_tokens": 4}', "'prompt'"),
    (b'{"prompt": "", "max_tokens": 4}', "empty"),
    (b'{"prompt": "hi", "max_tokens": "four"}', "'max_tokens' must be an integer"),
    (b'{"prompt": "hi", "max_tokens": 0}', "at least 1"),
    (b'{"prompt": "hi", "temperature": -1}', "'temperature'"),
    (b'{"prompt": "hi", "threshold": 1.5}', "tau"),
    (b'{"prompt": "hi", "cache": "bogus"}', "one of none, prefix, dual"),
    (b'{"prompt": "hi", "block_length": 0}', "block_length"),
    (b'{"prompt": "hi", "n": 3}', "'n' must be 1"),
    (b'{"prompt": "hi", "logprobs": 2}', "'logprobs' is not supported"),
    (b'{"prompt": "hi", "mirostat": 2}', "Unknown field 'mirostat'"),
    (b'{"prompt": "hi", "max_tokens": 100}', "context of 64"),
    (b'{"prompt": [1, 99999], "max_tokens": 4}', "token 99999"),
    (b'{"prompt": "hi", "stop": [3]}', "'stop'"),
    (b'{"prompt": "hi", "stop": 0}', "'stop'"),
    (b'{"prompt": [1, 18446744073709551616], "max_tokens": 4}', "token 18446744073709551616"),
    (b'{"prompt": "hi", "seed": 99999999999999999999}', "'seed'"),
    (b'{"prompt": "hi", "top_p": 0.5}', "'top_p' is not supported"),
    (b'{"prompt": "hi", "rule": "topk", "k": 1099511627776}', "at most"),
    (b'{"prompt": "hi", "suffix_dropout": true, "window": 10000000000}', "at most"),
    (b'{"prompt": "hi", "temperature": NaN}', "'temperature'"),
    (b'{"prompt": "\\ud800 hi"}', "cannot be tokenized"),
])
def test_malformed_requests_get_400_and_one_sentence(served, body, words):
    server, url, client = served
    status, answer = _post(url, body)
    message = answer["error"]["message"]
    assert status == 400 and words in message and "\n" not in message and message.endswith("."), (status, answer)


def test_null_decoder_fields_and_neutral_openai_fields_take_the_defaults(served):
    server, url, client = served
    body = {"prompt": "they do", "max_tokens": 8, "temperature": 0, "threshold": None, "block_length": None, "top_p": 1,
            "logprobs": None, "presence_penalty": 0}
    status, answer = _post(url, json.dumps(body).encode())
    assert status == 200, answer
    assert answer["choices"][0]["text"] == _solo_text(server, server.tok.encode("they do"), 8)


def test_stop_string_across_a_block_boundary_is_not_streamed(served):
    """The stream holds back text that may still become a stop string, so it sends exactly
    the non-streamed completion."""
    server, url, client = served
    ids = server.tok.encode("they do")
    out = gen.generate(server.engine.model, cfg=SamplingConfig(sampler=Sampler.PARALLEL, temperature=0.0,
                                                               decode=DecodeConfig(block_length=4)),
                       prompts=[ids], length=len(ids) + 24, eos_id=server.eos_id)["tokens"][0, len(ids):]
    full, _ = server.text(out, [])
    edge = len(server.text(out[:4], [])[0])  # where the first block's text ends
    assert 1 <= edge < len(full) - 1
    stop = full[edge - 1:edge + 1]
    kw = dict(model="llada", prompt="they do", max_tokens=24, temperature=0, stop=[stop], extra_body={"block_length": 4})
    whole = client.completions.create(**kw).choices[0]
    streamed = list(client.completions.create(stream=True, **kw))
    assert whole.text == full[:full.index(stop)] and whole.finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == whole.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_openai_client_sees_bad_request(served):
    server, url, client = served
    with pytest.raises(openai.BadRequestError, match="threshold|tau"):
        client.completions.create(model="llada", prompt="hi", max_tokens=4, extra_body={"threshold": 0})


def test_client_leaving_mid_stream_frees_its_row_and_the_server_goes_on(served):
    server, url, client = served
    before = server.metrics["requests_cancelled_total"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "they", "max_tokens": 60, "stream": True, "block_length": 1, "threshold": 1.0}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:  # the headers, then the stream's first chunk
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 60
    while server.metrics["requests_cancelled_total"] == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metrics["requests_cancelled_total"] == before + 1
    while server.engine.pending() and time.time() < deadline:
        time.sleep(0.1)
    assert server.engine.pending() == 0
    assert server.engine.stats["finished_cancelled"] >= 1
    r = client.completions.create(model="llada", prompt="they do", max_tokens=8, temperature=0)
    assert r.choices[0].text == _solo_text(server, server.tok.encode("they do"), 8)


def test_health_and_metrics(served):
    server, url, client = served
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    client.completions.create(model="llada", prompt="they", max_tokens=8, temperature=0)
    with urllib.request.urlopen(url + "/metrics") as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["dlm_requests_total"] >= 1 and values["dlm_completion_tokens_total"] >= 1
    assert values["dlm_compilations_total"] == server.engine.compilations


def test_command_serves_a_published_folder(tmp_path):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-m", "dlm.serve", "--pretrained", FOLDER, "--port", str(port),
                          "sampling.temperature=0", "sampling.decode.block_length=4"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                r = client.completions.create(model="llada", prompt="they do", max_tokens=8)
                break
            except openai.APIConnectionError:
                assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
                time.sleep(0.5)
        assert r.choices[0].text and r.usage.completion_tokens >= 1
    finally:
        p.terminate()
        p.wait(30)


def test_server_refuses_a_run_the_parallel_decoder_cannot_decode(root):
    import dlm
    from dlm.config import ConfigError, load_config

    cfg = load_config(root / "configs/test.yaml", ["diffusion.hyperschedule=block", "diffusion.block_width=8"])
    model = dlm.build_model(cfg, seed=0)
    from dlm.data.tokenizers import ByteTokenizer

    with pytest.raises(ConfigError, match="flat absorbing models"):
        Server(model, ByteTokenizer(), name="x", context=32, decode=DecodeConfig(), diffusion=cfg.diffusion)


@pytest.mark.parametrize("args, words", [
    (["--port", "1"], "exactly one of --workdir"),
    (["--pretrained", FOLDER, "--length-buckets", "64,32"], "increasing"),
    (["--pretrained", FOLDER, "model.d_model=8"], "sampling.* overrides only"),
])
def test_command_refuses_bad_arguments_in_one_line(args, words):
    assert words in cli_error(run_cli(["-m", "dlm.serve", *args]))
