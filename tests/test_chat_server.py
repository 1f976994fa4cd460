"""/v1/chat/completions, logprobs, echo, penalties, /v1/models/{id} and --api-key, over real HTTP on 127.0.0.1."""

import copy
import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minilora import GPT, GPTConfig, merge_and_unload
from minilora.chat import chat_tokens, load_chat_template, stop_tokens, write_template
from minilora.generation import generate
from minilora.openai_server import App, Server
from minilora.registry import AdapterRegistry
from minilora.serving import Engine
from minilora.tokenizer import get_tokenizer

from scripts import random_adapter

TOK = get_tokenizer("byte")
PLAIN, CHATML = load_chat_template("plain", tokenizer=TOK), load_chat_template("chatml", tokenizer=TOK)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey."}, {"role": "user", "content": "Why?"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_name("tiny", block_size=256)).eval()  # room for ChatML in bytes
    root = tmp_path_factory.mktemp("chat")
    merged = merge_and_unload(random_adapter(base, root / "bot", 4, 1, ("q_proj", "v_proj"))).eval()
    write_template(CHATML, root / "bot")  # the adapter trained with ChatML: its requests render with it
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, max_loras=2, max_cpu_loras=2, max_lora_rank=8)
    reg.add("bot", root / "bot")
    engine = Engine(model, TOK, reg, max_num_seqs=4).start()
    server = Server(App(engine, "base", chat_template=PLAIN), port=0).start()
    keyed = Server(App(engine, "base", chat_template=PLAIN, api_key="s3cret"), port=0).start()
    yield dict(base=base, merged=merged, server=server, keyed=keyed)
    keyed.shutdown()
    keyed.server_close()
    server.close()


def call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json",
                                                                             **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    if resp.getheader("Content-Type") == "text/event-stream":
        events = [e[len("data: "):] for e in text.split("\n\n") if e]
        if path.startswith("/v1/"):  # OpenAI's streams end with [DONE]; TGI's with the event holding the whole text
            assert events.pop() == "[DONE]"
        return resp.status, [json.loads(e) for e in events]
    return resp.status, json.loads(text)


def chat(server, **body):
    return call(server, "POST", "/v1/chat/completions", {"max_tokens": 10, "temperature": 0, **body})


def reference(model, template, messages, n, return_logits=False):
    """generate() on the rendered prompt: what a chat request must answer."""
    ids, _ = chat_tokens(TOK, template, messages, add_generation_prompt=True)
    eos, stops = stop_tokens(TOK, template)
    return generate(model, [ids], n, temperature=0, eot_token=eos, stop=stops, tokenizer=TOK, return_logits=return_logits)


def test_chat_matches_generate_alone_and_in_a_mixed_batch(setup):
    s = setup["server"]
    want_base = reference(setup["base"], PLAIN, MESSAGES, 10)
    want_bot = reference(setup["merged"], CHATML, MESSAGES, 10)
    status, out = chat(s, model="base", messages=MESSAGES)
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want_base.texts[0]}
    assert choice["finish_reason"] == want_base.finish_reasons[0] and choice["logprobs"] is None
    prompt = len(chat_tokens(TOK, PLAIN, MESSAGES, add_generation_prompt=True)[0])
    assert out["usage"] == {"prompt_tokens": prompt, "completion_tokens": want_base.stats.new_tokens,
                            "total_tokens": prompt + want_base.stats.new_tokens}
    assert chat(s, model="bot", messages=MESSAGES)[1]["choices"][0]["message"]["content"] == want_bot.texts[0]
    with ThreadPoolExecutor(6) as pool:  # chat for both models, and plain completions, decoded together
        jobs = [pool.submit(chat, s, model=m, messages=MESSAGES) for m in ("bot", "base", "bot")]
        jobs += [pool.submit(call, s, "POST", "/v1/completions", {"model": "bot", "prompt": "abc", "max_tokens": 10})]
        outs = [j.result()[1] for j in jobs]
    assert [o["choices"][0]["message"]["content"] for o in outs[:3]] == [want_bot.texts[0], want_base.texts[0], want_bot.texts[0]]
    assert want_base.texts[0] != want_bot.texts[0]


def test_streaming_chunks_concatenate_to_the_answer(setup):
    s = setup["server"]
    whole = chat(s, model="bot", messages=MESSAGES, n=2, max_completion_tokens=12)[1]
    status, chunks = chat(s, model="bot", messages=MESSAGES, n=2, max_completion_tokens=12, stream=True,
                          stream_options={"include_usage": True})
    assert status == 200 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and all("role" not in m["delta"] for m in mine[1:])
        assert "".join(m["delta"].get("content", "") for m in mine) == whole["choices"][i]["message"]["content"]
        assert mine[-1]["finish_reason"] == whole["choices"][i]["finish_reason"]


def test_logprobs_are_the_models_log_softmax(setup):
    want = reference(setup["merged"], CHATML, MESSAGES, 6, return_logits=True)
    out = chat(setup["server"], model="bot", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)[1]
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == len(want.tokens[0])
    for step, entry in enumerate(content):
        lp = torch.log_softmax(want.logits[0][step], dim=-1)
        tok = want.tokens[0][step]
        assert entry["token"] == TOK.decode([tok]) and entry["bytes"] == list(TOK.decode([tok]).encode())
        assert entry["logprob"] == pytest.approx(lp[tok].item(), abs=1e-5)
        top = torch.topk(lp, 3)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    # completions' shape, with echo: the prompt's tokens first (the first has no logprob)
    out = call(setup["server"], "POST", "/v1/completions", {"model": "base", "prompt": "abc", "max_tokens": 4,
                                                            "temperature": 0, "logprobs": 2, "echo": True})[1]
    choice = out["choices"][0]
    want = generate(setup["base"], [TOK.encode("abc")], 4, temperature=0, eot_token=TOK.eot_token, tokenizer=TOK)
    assert choice["text"] == "abc" + want.texts[0]
    lp = choice["logprobs"]
    assert lp["tokens"][:3] == ["a", "b", "c"] and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == 3 + len(want.tokens[0]) and lp["text_offset"][:4] == [0, 1, 2, 3]
    with torch.no_grad():
        logits, _ = setup["base"](torch.tensor([TOK.encode("abc")]), all_logits=True)
    assert lp["token_logprobs"][2] == pytest.approx(torch.log_softmax(logits[0, 1], -1)[ord("c")].item(), abs=1e-5)


def test_penalties_follow_openais_definition(setup):
    """Greedy with penalties == argmax of logits - frequency * count - presence * (count > 0), step by step."""
    model, prompt, n, fp, pp = setup["base"], TOK.encode("aaaa"), 12, 0.7, 0.5
    ids, counts = list(prompt), torch.zeros(TOK.n_vocab)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1, :TOK.n_vocab].float()
            tok = int((logits - fp * counts - pp * (counts > 0).float()).argmax())
            if tok == TOK.eot_token:
                break
            counts[tok] += 1
            ids.append(tok)
    body = {"model": "base", "prompt": "aaaa", "max_tokens": n, "temperature": 0}
    got = call(setup["server"], "POST", "/v1/completions", {**body, "frequency_penalty": fp, "presence_penalty": pp})[1]
    plain = call(setup["server"], "POST", "/v1/completions", body)[1]
    assert got["choices"][0]["text"] == TOK.decode(ids[len(prompt):])
    assert got["choices"][0]["text"] != plain["choices"][0]["text"]  # the penalties changed the answer


def test_api_key_models_by_id_and_bad_chat_bodies(setup):
    k = setup["keyed"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, out = chat(k, model="base", messages=MESSAGES, headers=None) if not headers else \
            call(k, "POST", "/v1/chat/completions", {"model": "base", "messages": MESSAGES}, headers)
        assert status == 401 and out["error"]["code"] == "invalid_api_key" and out["error"]["type"] == "invalid_request_error"
    assert call(k, "GET", "/v1/models")[0] == 401 and call(k, "GET", "/health")[0] == 200
    ok = {"Authorization": "Bearer s3cret"}
    assert call(k, "POST", "/v1/chat/completions", {"model": "base", "messages": MESSAGES, "max_tokens": 2}, ok)[0] == 200
    s = setup["server"]
    status, card = call(s, "GET", "/v1/models/bot")
    assert status == 200 and card["id"] == "bot" and card["parent"] == "base"
    assert call(s, "GET", "/v1/models/nope")[0] == 404
    for body, words in (({"model": "base"}, "'messages' is required"),
                        ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
                        ({"model": "base", "messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
                        ({"model": "base", "messages": MESSAGES, "top_logprobs": 2}, "needs 'logprobs'"),
                        ({"model": "nope", "messages": MESSAGES}, "does not exist")):
        status, out = call(s, "POST", "/v1/chat/completions", body)
        assert 400 <= status < 500 and words in out["error"]["message"], out


def test_tgi_generate_and_stream_match_the_openai_route(setup):
    s = setup["server"]
    openai = call(s, "POST", "/v1/completions", {"model": "bot", "prompt": "abc", "max_tokens": 9, "temperature": 0})[1]
    body = {"inputs": "abc", "parameters": {"adapter_id": "bot", "max_new_tokens": 9, "details": True}}
    status, out = call(s, "POST", "/generate", body)
    assert status == 200 and out[0]["generated_text"] == openai["choices"][0]["text"]
    reason = {"length": "length", "stop": "eos_token"}[openai["choices"][0]["finish_reason"]]
    assert out[0]["details"]["finish_reason"] == reason
    assert out[0]["details"]["generated_tokens"] == openai["usage"]["completion_tokens"]
    status, events = call(s, "POST", "/generate_stream", body)
    assert status == 200 and [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert "".join(e["token"]["text"] for e in events) == out[0]["generated_text"] == events[-1]["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1]) and events[-1]["details"]["finish_reason"] == reason
    base = call(s, "POST", "/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 9}})[1]  # no adapter_id: the base
    assert base[0]["generated_text"] == call(s, "POST", "/v1/completions", {"model": "base", "prompt": "abc", "max_tokens": 9,
                                                                             "temperature": 0})[1]["choices"][0]["text"]
    status, err = call(s, "POST", "/generate", {"inputs": "abc", "parameters": {"adapter_id": "nope"}})
    assert status == 404 and "does not exist" in err["error"] and err["error_type"] == "validation"
    status, err = call(s, "POST", "/generate", {"inputs": "", "parameters": {}})
    assert status == 422 and "inputs" in err["error"]
