"""An OpenAI-compatible HTTP front end for the Engine, on the standard library's http.server.

    GET  /health                      200 while the server runs
    GET  /v1/models                   the base and every adapter (parent = the base), OpenAI's list shape
    POST /v1/completions              OpenAI's completions API; `model` picks the adapter (or the base)
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}   (vLLM's runtime updating, opt-in)
    POST /v1/unload_lora_adapter      {"lora_name"}

Every bad request gets a 4xx in OpenAI's error shape, {"error": {"message", "type", "param",
"code"}}, and never reaches the model: bodies are capped (413) and need a Content-Length (411),
JSON and every field are checked (400), unknown models are 404 naming the available ones.
Streaming (`"stream": true`) sends server-sent events, one chunk per released piece of text,
then `data: [DONE]`; a client that disconnects mid-stream has its sequences dropped.
"""

import contextlib
import hmac
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minilora.chat import ChatError, chat_tokens, load_chat_template, stop_tokens, template_in
from minilora.errors import MiniloraError
from minilora.lora import BASE_ADAPTER
from minilora.serving import Request, Sampling

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 64  # prompts x n in one request
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit)


class ApiError(Exception):
    def __init__(self, status, message, code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self, tgi=False):
        if tgi:  # TGI's shape: {"error": message, "error_type": ...}; its validation errors are 422
            return {"error": self.message, "error_type": "validation" if self.status < 500 else "generation"}
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body, key, default, lo, hi, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", "invalid_value", key)
    return v


def _prompts(value, tokenizer):
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    def ids(p):
        if isinstance(p, str):
            return tokenizer.encode_document(p) or [tokenizer.eot_token]  # "" conditions on <|endoftext|>, as in OpenAI's API
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < tokenizer.n_vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.n_vocab - 1})",
                               "invalid_value", "prompt")
            return p
        raise ApiError(400, "'prompt' must be a string, a list of strings, or (lists of) token ids", "invalid_value", "prompt")

    if value is None:
        raise ApiError(400, "'prompt' is required", "missing_field", "prompt")
    if isinstance(value, list) and value and (isinstance(value[0], str) or isinstance(value[0], list)):
        return [ids(p) for p in value]
    return [ids(value)]


def _model(body, engine, base_name):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: the base model's name or an adapter's", "missing_field", "model")
    names = engine.registry.names()
    if model != base_name and model not in names:
        raise ApiError(404, f"The model '{model}' does not exist. Available models: {', '.join([base_name] + names)}",
                       "model_not_found", "model")
    return model


def _flag(body, key):
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {v!r}", "invalid_value", key)
    return v


def _sampling(body, engine, max_tokens, stop_extra=(), eos=None, logprobs=None, echo=False):
    """The Sampling of a request: the fields completions and chat share."""
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(400, "'logit_bias' is not supported by this server; leave it out", "unsupported", "logit_bias")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "invalid_value", "stop")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, 0, 2**63 - 1 - MAX_CHOICES, integer=True)
    return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                    top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)), stop=list(stop_extra) + stop, seed=seed,
                    ignore_eos=_flag(body, "ignore_eos"), eos_token_ids=eos, logprobs=logprobs, echo=echo,
                    presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
                    frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)))


def _request(body, engine, model, base_name, prompts, sampling, n, param="max_tokens"):
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} completions; split the request",
                       "invalid_value", "n")
    longest = max(len(p) for p in prompts)
    if longest + sampling.max_tokens > engine.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {engine.max_model_len} tokens, but the prompt has {longest} "
                            f"and {param} is {sampling.max_tokens}; shorten the prompt or lower {param}",
                       "context_length_exceeded", param)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_value", "stream_options")
    request = Request(BASE_ADAPTER if model == base_name else model, prompts, sampling, n=n, model_name=model)
    request.include_usage = bool(options.get("include_usage"))  # OpenAI: a final usage chunk only on request
    return request


def parse_completion(body, engine, base_name):
    """A /v1/completions JSON body -> (Request (not yet submitted), stream), or ApiError."""
    model = _model(body, engine, base_name)
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported by this server; leave it out", "unsupported", "suffix")
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise ApiError(400, "'best_of' is not supported by this server; leave it out", "unsupported", "best_of")
    stream, echo = _flag(body, "stream"), _flag(body, "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    max_tokens = _number(body, "max_tokens", 16, 1, engine.max_model_len, integer=True)
    prompts = _prompts(body.get("prompt"), engine.tokenizer)
    request = _request(body, engine, model, base_name, prompts,
                       _sampling(body, engine, max_tokens, logprobs=logprobs, echo=echo), n)
    request.echo = echo
    return request, stream


def parse_chat(body, engine, base_name, template):
    """A /v1/chat/completions body -> (Request, stream): the messages rendered with `template` (the model's)."""
    model = _model(body, engine, base_name)
    if not isinstance(body.get("messages"), list):
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", "missing_field", "messages")
    try:
        ids, _ = chat_tokens(engine.tokenizer, template, body["messages"], add_generation_prompt=True)
    except ChatError as e:
        raise ApiError(400, str(e), "invalid_value", "messages") from None
    if not ids:
        raise ApiError(400, "the messages render to no tokens", "invalid_value", "messages")
    stream = _flag(body, "stream")
    logprobs = None
    if _flag(body, "logprobs"):
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = engine.max_model_len - len(ids)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {engine.max_model_len} tokens, but the messages "
                            f"have {len(ids)}; shorten them", "context_length_exceeded", "messages")
    max_tokens = _number(body, param, room, 1, engine.max_model_len, integer=True)  # default: the rest of the context
    eos, stops = stop_tokens(engine.tokenizer, template)
    request = _request(body, engine, model, base_name, [ids],
                       _sampling(body, engine, max_tokens, stops, eos, logprobs), n, param)
    request.id = "chatcmpl-" + request.id.removeprefix("cmpl-")
    request.echo = False
    return request, stream


# ---- TGI's surface (text-generation-inference): the same engine and batches, TGI's bodies and shapes ----------

TGI_FINISH = {"length": "length", "stop": "eos_token"}  # a stop string's "stop" is TGI's "stop_sequence"


def parse_tgi(body, engine, base_name):
    """A TGI /generate body {"inputs", "parameters": {adapter_id, max_new_tokens, ...}} -> (Request, details?)."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str) or not body["inputs"]:
        raise ApiError(422, "'inputs' must be a non-empty string", "validation", "inputs")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(422, "'parameters' must be an object", "validation", "parameters")
    for key in ("repetition_penalty", "top_k", "typical_p", "truncate", "watermark", "grammar", "best_of"):
        if params.get(key) not in (None, False):
            raise ApiError(422, f"'{key}' is not supported by this server; leave it out", "validation", key)
    adapter = params.get("adapter_id")
    sampled = _flag(params, "do_sample")
    openai = {"model": base_name if adapter is None else adapter, "stop": params.get("stop") or None,
              "seed": params.get("seed"), "top_p": params.get("top_p"),
              "temperature": (params.get("temperature") or 1.0) if sampled else 0,  # do_sample false: greedy, as TGI
              "frequency_penalty": params.get("frequency_penalty")}
    model = _model(openai, engine, base_name)
    max_new = _number(params, "max_new_tokens", 100, 1, engine.max_model_len, integer=True)
    prompt = engine.tokenizer.encode_document(body["inputs"])
    request = _request(openai, engine, model, base_name, [prompt], _sampling(openai, engine, max_new, logprobs=0), 1,
                       "max_new_tokens")
    request.full_text = body["inputs"] if _flag(params, "return_full_text") else ""
    return request, _flag(params, "details")


class App:
    """What the handler needs: the engine, names, and the runtime-updating policy."""

    def __init__(self, engine, base_name, runtime_updates=False, allowed_dirs=(), max_body=MAX_BODY_BYTES,
                 chat_template=None, api_key=None):
        if runtime_updates and not allowed_dirs:
            raise MiniloraError("--enable-runtime-lora-updating needs --allowed-lora-dir: the directories "
                                "clients may load adapters from")
        self.engine, self.base_name, self.runtime_updates, self.max_body = engine, base_name, runtime_updates, max_body
        # the base's chat template (serve.py: --chat_template, else the checkpoint's); an adapter's own wins for it
        self.chat_template = chat_template or load_chat_template(None, tokenizer=engine.tokenizer)
        self.templates = {}  # (adapter name, path) -> its template (None: the base's)
        self.api_key = api_key.encode() if api_key else None
        self.allowed = [os.path.realpath(d) for d in allowed_dirs]
        self.started = int(time.time())
        self.created = {}

    def models(self):
        paths = self.engine.registry.paths  # a snapshot: the registry replaces it, never mutates it
        card = lambda name, root, parent: {"id": name, "object": "model", "created": self.created.get(name, self.started),
                                           "owned_by": "minilora", "root": root, "parent": parent,
                                           "max_model_len": self.engine.max_model_len}
        return {"object": "list", "data": [card(self.base_name, self.base_name, None)] +
                [card(n, p, self.base_name) for n, p in paths.items()]}

    def card(self, model_id):
        for card in self.models()["data"]:
            if card["id"] == model_id:
                return card
        raise ApiError(404, f"The model '{model_id}' does not exist.", "model_not_found", "model")

    def template(self, model):
        """The chat template of `model`: an adapter directory's chat_template.jinja (what it trained with), else the base's."""
        path = self.engine.registry.paths.get(model)
        if path is None:
            return self.chat_template
        if (model, path) not in self.templates:
            try:
                self.templates[(model, path)] = template_in(path, self.engine.tokenizer)
            except MiniloraError as e:
                raise ApiError(500, f"adapter {model!r}: {e}", "server_error") from None
        return self.templates[(model, path)] or self.chat_template

    def authorized(self, header):
        """Constant-time check of 'Authorization: Bearer KEY' (--api-key); always true without a key."""
        if self.api_key is None:
            return True
        given = header.encode("utf-8", "replace") if header else b""
        return hmac.compare_digest(given, b"Bearer " + self.api_key)

    def load(self, body):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object with 'lora_name' and 'lora_path'", "invalid_json")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path or "\x00" in path:
            raise ApiError(400, "'lora_name' and 'lora_path' must be non-empty strings (no NUL characters)",
                           "invalid_value")
        if name in (self.base_name, BASE_ADAPTER):
            raise ApiError(400, f"'{name}' is the base model's name; choose another lora_name", "invalid_value", "lora_name")
        if name in self.engine.registry.paths:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded; unload it first", "invalid_value",
                           "lora_name")
        real = self._allowed(path)
        try:
            weights = self.engine.registry.read(name, real)  # from disk, outside the lock: decoding goes on
            with self.engine.lock:
                self.engine.registry.add(name, real, weights, check=self._allowed)
        except MiniloraError as e:
            raise ApiError(400, str(e), "invalid_value", "lora_path") from None
        self.created[name] = int(time.time())
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body):
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or name not in self.engine.registry.paths:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "model_not_found", "lora_name")
        with self.engine.lock:
            self.engine.registry.remove(name)
        self.created.pop(name, None)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _allowed(self, path):
        """The real path of an adapter directory inside an allowed one: '..' and symlinks resolved first.

        Nothing outside the allowed directories is even listed, so a refusal says nothing about
        whether that path exists. Also run before every re-read of an evicted adapter."""
        def inside(p):
            return any(os.path.commonpath([p, d]) == d for d in self.allowed)

        refuse = ApiError(403, f"'{path}' is outside the directories this server may load adapters from",
                          "forbidden", "lora_path")
        try:
            real = os.path.realpath(path)
        except OSError:  # a link it may not read (/proc/1/root): refused alike, whether or not it exists
            raise refuse from None
        if not inside(real):
            raise refuse
        try:
            files = [os.path.realpath(os.path.join(real, f)) for f in os.listdir(real)] if os.path.isdir(real) else []
        except OSError as e:
            raise ApiError(400, f"cannot read adapter directory '{path}': {e.strerror}", "invalid_value", "lora_path") from None
        if not all(inside(f) for f in files):  # a symlink inside pointing out
            raise refuse
        return real


class Handler(BaseHTTPRequestHandler):
    server_version = "minilora"
    timeout = 60  # a client that stalls mid-request frees its thread

    def send_error(self, code, message=None, explain=None):
        # http.server answers an unknown method with 501 and an unknown HTTP version with 505; both are
        # the client's mistake, and a 5xx would read as a server failure to every monitor
        super().send_error({501: 405, 505: 400}.get(code, code), message, explain)

    def log_message(self, fmt, *args):  # quiet by default; the server prints one line per start
        if self.server.verbose:
            super().log_message(fmt, *args)

    def do_GET(self):
        routes = {"/health": lambda: {"status": "ok"}, "/v1/models": self.server.app.models}
        path = self.path.split("?", 1)[0]
        if path.startswith("/v1/models/"):  # GET /v1/models/{id}; an adapter id may hold no '/', a hub name may
            routes[path] = lambda: self.server.app.card(urllib.parse.unquote(path[len("/v1/models/"):]))
        self._route(routes)

    def do_POST(self):
        app = self.server.app
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat,
                  "/generate": lambda: self._tgi(False), "/generate_stream": lambda: self._tgi(True)}
        if app.runtime_updates:
            routes.update({"/v1/load_lora_adapter": lambda: app.load(self._json()),
                           "/v1/unload_lora_adapter": lambda: app.unload(self._json())})
        self._route(routes)

    def _route(self, routes):
        path = self.path.split("?", 1)[0]
        try:
            if path != "/health" and not self.server.app.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'",
                               "invalid_api_key")
            if path not in routes:
                other = "POST" if self.command == "GET" else "GET"
                if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                    raise ApiError(404, f"{path} is off; start the server with --enable-runtime-lora-updating", "not_found")
                raise ApiError(405 if path in _ROUTES[other] else 404, f"no {self.command} route {path}", "not_found")
            out = routes[path]()
            if out is not None:
                self._send(200, out)
        except ApiError as e:
            tgi = path in ("/generate", "/generate_stream")
            self._send(422 if tgi and e.status == 400 else e.status, e.body(tgi))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away (the finally in _completions has freed its rows)
        except Exception as e:  # a bug in one request must not take the server down
            with contextlib.suppress(OSError):
                self._send(500, ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body())

    def _json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked bodies are not accepted; send a Content-Length", "length_required")
        size = self.headers.get("Content-Length")
        if size is None:
            raise ApiError(411, "a Content-Length header is required", "length_required")
        if not (size.isascii() and size.isdigit()):  # "²".isdigit() is True, int("²") fails
            raise ApiError(400, f"bad Content-Length {size!r}", "invalid_value")
        if int(size) > self.server.app.max_body:
            raise ApiError(413, f"request body of {size} bytes is over the {self.server.app.max_body}-byte limit",
                           "payload_too_large")
        raw = self.rfile.read(int(size))
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting past the parser's limit
            raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None

    def _send(self, status, out):
        text = isinstance(out, str)
        data = (out if text else json.dumps(out)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _completions(self):
        app = self.server.app
        request, stream = parse_completion(self._json(), app.engine, app.base_name)
        return self._run(request, stream)

    def _chat(self):
        app = self.server.app
        body = self._json()
        model = _model(body, app.engine, app.base_name)
        request, stream = parse_chat(body, app.engine, app.base_name, app.template(model))
        request.chat = True
        return self._run(request, stream)

    def _tgi(self, stream):
        app = self.server.app
        request, details = parse_tgi(self._json(), app.engine, app.base_name)
        app.engine.submit(request)
        try:
            return self._tgi_stream(request) if stream else self._tgi_collect(request, details)
        finally:
            app.engine.cancel(request)

    def _tgi_events(self, request):
        """-> (token events [(id, text, logprob)], then a final (None, full text, details)): each released token
        carries the text that came with it, so the tokens' texts concatenate to generated_text exactly."""
        text, pending = "", []
        for kind, i, value in self._events(request):
            if kind == "error":
                raise ApiError(i, value, "server_error")
            if kind == "logprobs":
                pending += value
            elif kind == "delta":
                for k, (tok, lp, _) in enumerate(pending or [(None, None, [])]):
                    yield tok, value if k == 0 else "", lp
                text += value
                pending = []
            elif kind == "finish":
                for tok, lp, _ in pending:
                    yield tok, "", lp
                seq = request.sequences[0]
                reason = "stop_sequence" if seq.completion.stop_text is not None else TGI_FINISH[value]
                details = {"finish_reason": reason, "generated_tokens": seq.completion.sampled,
                           "seed": request.sampling.seed, "prefill": [], "tokens": []}
            elif kind == "done":
                yield None, request.full_text + text, details

    def _tgi_collect(self, request, details):
        for tok, text, extra in self._tgi_events(request):
            if tok is None and extra is not None and isinstance(extra, dict):
                return [{"generated_text": text, **({"details": extra} if details else {})}]

    def _tgi_stream(self, request):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        event = lambda k, tok, text, lp, special=False: {"index": k, "token": {"id": tok, "text": text, "logprob": lp,
                                                                                "special": special},
                                                          "generated_text": None, "details": None}
        held, k = None, 0  # each token's event goes out once the next one exists: the last one carries the end
        for tok, text, extra in self._tgi_events(request):
            if isinstance(extra, dict):
                if extra["finish_reason"] == "eos_token" or held is None:  # TGI ends on the EOS token's own event
                    if held is not None:
                        self._send_chunk(held)
                    k += 1
                    held = event(k, request.sequences[0].last, "", 0.0, special=True)
                held.update(generated_text=text, details={key: extra[key] for key in ("finish_reason", "generated_tokens",
                                                                                      "seed")})
                self._send_chunk(held)
                return
            if held is not None:
                self._send_chunk(held)
            k += 1
            held = event(k, tok, text, extra)

    def _run(self, request, stream):
        app = self.server.app
        app.engine.submit(request)
        try:
            if stream:
                return self._stream(request)
            return self._collect(request)
        finally:
            app.engine.cancel(request)  # no-op if it finished; frees its rows if the client went away

    def _events(self, request):
        """The request's events, ending early (ConnectionResetError) if the client hangs up meanwhile."""
        while True:
            try:
                event = request.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            # a closed connection reads as EOF: notice it even when there is nothing to write
            if select.select([self.connection], [], [], 0)[0] and not self.connection.recv(1, socket.MSG_PEEK):
                raise ConnectionResetError("client disconnected")
            if event is not None:
                yield event
                if event[0] in ("done", "error"):
                    return

    def _collect(self, request):
        k = len(request.sequences)
        texts, finish, logprobs = [""] * k, [None] * k, [[] for _ in range(k)]
        for kind, i, value in self._events(request):
            if kind == "error":
                raise ApiError(i, value, "model_not_found" if i == 404 else "server_error")
            if kind == "delta":
                texts[i] += value
            elif kind == "logprobs":
                logprobs[i] += value
            elif kind == "finish":
                finish[i] = value
            elif kind == "done":
                if request.chat:
                    choices = [{"index": i, "message": {"role": "assistant", "content": t},
                                "logprobs": self._logprobs(request, logprobs[i]), "finish_reason": f}
                               for i, (t, f) in enumerate(zip(texts, finish))]
                else:
                    choices = []
                    for i, (t, f) in enumerate(zip(texts, finish)):
                        seq = request.sequences[i]
                        head = self._prompt_text(request, seq)
                        entries = (seq.prompt_logprobs or []) + logprobs[i]
                        choices.append({"text": head + t, "index": i, "finish_reason": f,
                                        "logprobs": self._logprobs(request, entries)})
                return {"id": request.id, "object": "chat.completion" if request.chat else "text_completion",
                        "created": request.created, "model": request.model_name, "choices": choices, "usage": value}

    def _prompt_text(self, request, seq):
        return self.server.app.engine.tokenizer.decode(seq.prompt) if request.echo else ""

    def _logprobs(self, request, entries, offset=0):
        """OpenAI's logprobs object for (token, logprob, [(top token, logprob)]) entries, or None when not asked."""
        if request.sampling.logprobs is None:
            return None
        text = self.server.app.engine.tokenizer.decode
        if request.chat:
            item = lambda t, lp: {"token": text([t]), "logprob": lp, "bytes": list(text([t]).encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]} for t, lp, top in entries]}
        tokens = [text([t]) for t, _, _ in entries]
        offsets = [offset + sum(map(len, tokens[:j])) for j in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if lp is None else {text([a]): alp for a, alp in top} for _, lp, top in entries],
                "text_offset": offsets}

    def _stream(self, request):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # HTTP/1.0: the stream ends when the connection does
        self.end_headers()
        chat = request.chat
        head = {"id": request.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": request.created, "model": request.model_name}
        started, pending = set(), {}  # chat: choices that sent their role; logprobs waiting for their text
        offsets = {}

        def choice(i, text, reason, entries=None):
            if chat:
                delta = {} if reason is not None else {"content": text}
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", "content": "" if reason is not None else text}
                return {"index": i, "delta": delta, "logprobs": self._logprobs(request, entries or []) if entries else None,
                        "finish_reason": reason}
            lp = self._logprobs(request, entries or [], offsets.get(i, 0)) if entries else None
            offsets[i] = offsets.get(i, 0) + len(text)
            return {"text": text, "index": i, "logprobs": lp, "finish_reason": reason}

        for i, seq in enumerate(request.sequences):
            if request.echo:  # the prompt comes first, as the non-streamed text starts with it
                self._send_chunk({**head, "choices": [choice(i, self._prompt_text(request, seq), None, seq.prompt_logprobs)]})
        for kind, i, value in self._events(request):
            if kind == "error":
                chunk = ApiError(i, value, "server_error").body()
            elif kind == "logprobs":
                pending.setdefault(i, []).extend(value)
                continue
            elif kind == "done":
                if not request.include_usage:
                    continue
                chunk = {**head, "choices": [], "usage": value}
            else:
                text, reason = (value, None) if kind == "delta" else ("", value)
                chunk = {**head, "choices": [choice(i, text, reason, pending.pop(i, None))]}
            self._send_chunk(chunk)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send_chunk(self, chunk):
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


_ROUTES = {"GET": {"/health", "/v1/models"},
           "POST": {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                    "/generate", "/generate_stream"}}


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    # The listen backlog (http.server's default is 5): connections past it were reset at ~30 clients.
    request_queue_size = 1024
    max_connections = 256  # handler threads at once; further clients wait in the backlog, never reset

    def __init__(self, app, host="127.0.0.1", port=8000, verbose=False):
        self.app, self.verbose = app, verbose
        self.slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__((host, port), Handler)

    def process_request(self, request, client_address):
        self.slots.acquire()  # blocks the accept loop, not the clients being served
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        # a client that hung up before reading its answer is no server error: no traceback per client on stderr
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        """Serve from a background thread (tests, notebooks); returns self."""
        threading.Thread(target=self.serve_forever, name="minilora-http", daemon=True).start()
        return self

    def close(self):
        self.shutdown()
        self.server_close()
        self.app.engine.stop()
