"""The HTTP server (sala.engine.server) on a tiny random SALA model with a byte-level tokenizer.

References are transformers' own ``generate`` and the tokenizer; every request goes through fastapi's
TestClient, so routing, validation and the SSE framing are what a real client sees.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fastapi.testclient import TestClient  # noqa: E402  (fastapi + httpx: the 'test' extra)

from sala.demo import byte_tokenizer  # noqa: E402
from sala.engine.server import create_app  # noqa: E402
from sala.engine.service import Engine  # noqa: E402
from sala.testing import make_model, small_config  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CONTEXT = 512
PROMPT = "The quick brown fox jumps over the lazy dog. "


def tiny_sala():
    """Byte vocabulary (259); sparse path from 64 tokens, so a chunked prefill really runs in chunks."""
    cfg = small_config(vocab_size=259, max_position_embeddings=CONTEXT, pad_token_id=2,
                       sparse_config=dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                                          window_size=64, topk=2, dense_len=64))
    return make_model(cfg, seed=3).double()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "tiny-sala"
    tiny_sala().save_pretrained(d)
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine.load(model_dir, device="cpu", dtype="float64", chunk_size=8192)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine))


def complete(client, **body):
    res = client.post("/v1/completions", json=body)
    assert res.status_code == 200, res.text
    return res.json()


def sse_events(res) -> list:
    """The parsed ``data:`` payloads of an SSE body, '[DONE]' kept as the string."""
    assert res.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in res.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in frames]


def reference_tokens(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, cut after the first EOS (which the server does not return as text)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(2) + 1] if 2 in out else out


def test_health_and_models_name_the_folder(client, model_dir):
    assert client.get("/health").json()["model"] == "tiny-sala" == model_dir.name
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-sala"] and data[0]["max_model_len"] == CONTEXT


def test_greedy_completion_equals_generate_and_counts_usage(client, engine):
    tok, model = engine.tokenizer, engine.model
    ids = tok(PROMPT)["input_ids"]
    ref = reference_tokens(model, ids, 12)
    out = complete(client, model="tiny-sala", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out["object"] == "text_completion" and out["model"] == "tiny-sala"
    choice = out["choices"][0]
    assert choice["text"] == tok.decode([t for t in ref if t != 2], skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if ref[-1] == 2 else "length")
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref), "total_tokens": len(ids) + len(ref)}
    assert out["sala"]["ttft_s"] > 0 and out["sala"]["decode_tokens_per_s"] > 0


def test_greedy_on_a_non_sala_model_equals_generate():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2)).double().eval()
    tok = byte_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    ref = reference_tokens(model, ids, 10)
    eng = Engine(model, tok, "llama", chunk_size=16)  # a 45-token prompt in 3 chunks
    try:
        out = TestClient(create_app(eng)).post("/v1/completions", json=dict(prompt=PROMPT, max_tokens=10,
                                                                          temperature=0)).json()
    finally:
        eng.close()
    assert out["choices"][0]["text"] == tok.decode([t for t in ref if t != 2])
    assert out["usage"]["completion_tokens"] == len(ref)


def test_long_prompt_in_prefill_chunks_equals_one_shot(engine, monkeypatch):
    import sala.engine.generation as generation

    prompt = PROMPT * 5  # 225 tokens: 4 chunks of dense_len (64; a chunk of 16 is raised to it)
    one_shot = complete(TestClient(create_app(engine)), prompt=prompt, max_tokens=8, temperature=0)
    chunked_engine = Engine(engine.model, engine.tokenizer, engine.name, chunk_size=16)
    widths = []
    real = generation.forward_chunk

    def spy(model, ids, past, keep):
        widths.append(ids.shape[1])
        return real(model, ids, past, keep)

    monkeypatch.setattr(generation, "forward_chunk", spy)
    try:
        chunked = complete(TestClient(create_app(chunked_engine)), prompt=prompt, max_tokens=8, temperature=0)
    finally:
        chunked_engine.close()
    assert widths == [64, 64, 64, 33], widths  # the prefill (decode steps call forward_chunk directly)
    assert chunked["choices"] == one_shot["choices"] and chunked["usage"] == one_shot["usage"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", dict(prompt=PROMPT)),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "Hi there"}])),
])
def test_stream_concatenates_to_the_full_response(client, path, body):
    body = dict(body, max_tokens=10, temperature=0.8, seed=7)
    full = client.post(path, json=body).json()
    events = sse_events(client.post(path, json=dict(body, stream=True)))
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    chunks, final = events[:-2], events[-2]
    if path.endswith("chat/completions"):
        assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
        want = full["choices"][0]["message"]["content"]
    else:
        text = "".join(e["choices"][0]["text"] for e in chunks)
        want = full["choices"][0]["text"]
    assert len(chunks) >= 2 and all(e["choices"][0]["finish_reason"] is None for e in chunks)
    assert text == want and len(want) > 0
    assert final["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert final["usage"] == full["usage"] and final["sala"]["ttft_s"] > 0


def test_seed_reproduces_sampling_and_other_seeds_differ(client):
    body = dict(prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9)
    a = complete(client, **body, seed=123)["choices"][0]["text"]
    b = complete(client, **body, seed=123)["choices"][0]["text"]
    others = {complete(client, **body, seed=s)["choices"][0]["text"] for s in (124, 125)}
    greedy = complete(client, **dict(body, temperature=0))["choices"][0]["text"]
    assert a == b
    assert others - {a} and {a} | others != {greedy}


def test_stop_string_truncates_and_is_never_sent(client):
    free = complete(client, prompt=PROMPT, max_tokens=12, temperature=0)
    text = free["choices"][0]["text"]
    assert free["choices"][0]["finish_reason"] == "length" and len(text) >= 8, text
    stop = text[4:7]
    cut = text[: text.find(stop)]
    body = dict(prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    out = complete(client, **body)
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 12
    events = sse_events(client.post("/v1/completions", json=dict(body, stream=True)))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_gives_length_with_exactly_that_many_tokens(client, engine):
    out = complete(client, prompt=PROMPT, max_tokens=5, temperature=0)
    ref = reference_tokens(engine.model, engine.tokenizer(PROMPT)["input_ids"], 5)
    assert 2 not in ref  # the greedy continuation has no EOS in its first 5 tokens
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5


def test_chat_uses_the_template(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<system>Be brief.\n<user>Hello\n<assistant>"
    res = client.post("/v1/chat/completions", json=dict(model="tiny-sala", messages=messages, max_tokens=6,
                                                        temperature=0))
    assert res.status_code == 200, res.text
    out = res.json()
    same = complete(client, prompt=rendered, max_tokens=6, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": same["choices"][0]["text"]}
    assert out["usage"]["prompt_tokens"] == len(engine.tokenizer(rendered)["input_ids"])


def test_chat_without_a_template_is_a_clear_400(engine):
    eng = Engine(engine.model, byte_tokenizer(), "plain")
    try:
        res = TestClient(create_app(eng)).post("/v1/chat/completions",
                                               json=dict(messages=[{"role": "user", "content": "hi"}]))
    finally:
        eng.close()
    assert res.status_code == 400
    err = res.json()["error"]
    assert err["param"] == "messages" and "chat template" in err["message"]


@pytest.mark.parametrize("path,body,field,status", [
    ("/v1/completions", dict(prompt=""), "prompt", 400),
    ("/v1/completions", dict(prompt="x" * (CONTEXT + 1)), "prompt", 400),
    ("/v1/completions", dict(prompt="hi", max_tokens=0), "max_tokens", 400),
    ("/v1/completions", dict(prompt="hi", max_tokens=CONTEXT), "max_tokens", 400),
    ("/v1/completions", dict(prompt="hi", temperature=-0.5), "temperature", 400),
    ("/v1/completions", dict(prompt="hi", top_p=0), "top_p", 400),
    ("/v1/completions", dict(prompt="hi", top_p=1.5), "top_p", 400),
    ("/v1/completions", dict(prompt="hi", stop=[""]), "stop", 400),
    ("/v1/completions", dict(prompt="hi", model="gpt-4"), "model", 404),
    ("/v1/completions", dict(max_tokens=3), "prompt", 400),
    ("/v1/chat/completions", dict(messages=[]), "messages", 400),
    ("/v1/chat/completions", dict(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role", 400),
    ("/v1/chat/completions", dict(messages=[{"role": "user"}]), "messages.0.content", 400),
    ("/v1/chat/completions", dict(messages="hello"), "messages", 400),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "y" * CONTEXT}]), "messages", 400),
])
def test_bad_input_is_a_4xx_naming_the_field(client, path, body, field, status):
    res = client.post(path, json=body)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_requests_queue_and_run_one_at_a_time(engine):
    active, peak, lock = [0], [0], threading.Lock()
    model = engine.model
    real_forward = model.forward

    def counted(*a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real_forward(*a, **kw)
        finally:
            with lock:
                active[0] -= 1

    client = TestClient(create_app(engine))
    results = []
    model.forward = counted
    try:
        threads = [threading.Thread(target=lambda s=s: results.append(client.post(
            "/v1/completions", json=dict(prompt=PROMPT, max_tokens=4, seed=s)))) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del model.forward
    assert [r.status_code for r in results] == [200, 200, 200]
    assert peak[0] == 1


def test_sala_serve_warns_on_a_random_checkpoint(model_dir, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    import sala.engine.server as server
    from sala.cli import RANDOM_LABEL, app

    d = tmp_path / "demo"
    shutil.copytree(model_dir, d)
    (d / "SALA_RANDOM_INIT").write_text("random\n")
    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine, host, port: seen.update(name=engine.name, port=port))
    res = CliRunner().invoke(app, ["serve", "--model", str(d), "--port", "8123", "--name", "demo-model",
                                   "--device", "cpu", "--chunk-size", "64"])
    assert res.exit_code == 0, res.output
    assert RANDOM_LABEL in res.output and seen == {"name": "demo-model", "port": 8123}
    assert "decode graphs off" in " ".join(res.output.split())  # auto on a CPU model
    res = CliRunner().invoke(app, ["serve", "--model", str(d), "--device", "cpu", "--decode-graphs", "on"])
    assert res.exit_code != 0 and "on a CUDA device; it is on cpu" in " ".join(res.output.replace("│", " ").split())
    res = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "config.json" in res.output
