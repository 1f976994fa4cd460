"""Continuous batching: one scheduler thread owns the model and decodes every running request together.

    engine = Engine(model, tokenizer, registry, max_num_seqs=8)
    engine.start()
    req = engine.submit(Request("sql", [prompt_ids], Sampling(max_tokens=32, temperature=0)))
    for kind, index, value in req: ...   # ("delta", i, text) ... ("finish", i, "stop"|"length"), then ("done", None, usage)

How a step runs. The engine keeps a static KV cache of max_num_seqs rows x max_model_len slots.
A request's sequences (one per prompt and choice) wait in a queue; when a row is free and its
adapter has (or can get) a slot, the sequence is prefilled alone into that row, and from the
next step on it is decoded with everyone else: one forward for all rows, whatever their
adapters, each row at its own position (cache_pos is a per-row tensor). A finished or
cancelled sequence frees its row and its adapter slot at once.

Same answer alone or batched, by construction: a prefill is always one request in one row, and
every decode step runs all max_num_seqs rows (idle ones on a dummy token) over the full cache
length with a per-row mask. Every matmul, attention and LoRA kernel therefore has the same
shapes whatever else is running, and each row's arithmetic is its own: greedy output is
bit-identical whether a request is served alone or with 15 others (tests/test_serving.py checks
it). The price: an idle row costs as much as a busy one, so size --max-num-seqs to the load.
"""

import contextlib
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from minilora.errors import MiniloraError
from minilora.generation import _stop_cut, sample_next
from minilora.model import KVCache
from minilora.multi_lora import UnknownAdapter


class RowKVCache(KVCache):
    """One layer's keys/values for the engine's rows; attention always sees all max_len slots.

    model.KVCache slices its keys to the longest row written; this returns the whole cache
    instead, so attention shapes never depend on the other rows (batch-invariant greedy output).
    """

    def update(self, cache_pos, k, v, rows=None):
        rows_given = rows is not None
        rows, _ = self.write_rows(cache_pos, k, v, rows)
        if not rows_given and k.size(0) == self.k.size(0):
            return self.k, self.v  # every row: the cache itself, no copy
        return self.k[rows], self.v[rows]  # (B, nh, max_len, hs)


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    stop: list = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past the end-of-text token (benchmarks)


class Sequence:
    """One completion being generated: a prompt, its choice index, and its place in the batch."""

    def __init__(self, request, index, prompt):
        self.request, self.index, self.prompt = request, index, prompt
        self.generator = None  # set at prefill, on the model's device
        self.tokens, self.text, self.sampled = [], "", 0
        self.row = self.slot = None
        self.pos = 0       # cache slot of the next token fed to the model
        self.last = None   # the token sampled last, fed at the next step


class Request:
    """A completion request: prompts x n sequences; iterate it for its events (see module doc)."""

    def __init__(self, adapter, prompts, sampling, n=1, model=None):
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.adapter, self.model, self.sampling = adapter, model or adapter, sampling
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.sequences = [Sequence(self, i * n + j, p) for i, p in enumerate(prompts) for j in range(n)]
        self.remaining = len(self.sequences)
        self.events = queue.Queue()
        self.cancelled = False
        self.include_usage = False  # streaming: end with a usage chunk (OpenAI's stream_options)

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    def usage(self):
        done = sum(s.sampled for s in self.sequences)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}


class Engine:
    """The scheduler: a thread that admits, prefills and decodes; submit() from any thread."""

    def __init__(self, model, tokenizer, registry, max_num_seqs=8, max_model_len=None):
        block = model.config.block_size
        max_model_len = block if max_model_len is None else max_model_len
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise MiniloraError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= block:
            raise MiniloraError(f"max_model_len must be an int in [2, {block}] (the model's block_size), got {max_model_len!r}")
        if tokenizer.n_vocab > model.config.vocab_size:
            raise MiniloraError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids but the model only "
                                f"{model.config.vocab_size}; serve the model with its own tokenizer")
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.M, self.L = max_num_seqs, max_model_len
        self.device = model.lm_head.weight.device
        cfg = model.config
        for blk in model.transformer.h:
            blk.attn.kv_cache = RowKVCache(self.M, cfg.n_head, self.L, cfg.n_embd // cfg.n_head,
                                           model.lm_head.weight.dtype, self.device)
        self.free_rows = list(range(self.M - 1, -1, -1))  # popped from the end: row 0 first
        self.running = {}  # row -> Sequence
        self.waiting = deque()
        self.lock = threading.Lock()      # the model and registry: held for a step, or to (un)load an adapter
        self.wakeup = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="minilora-scheduler", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, request):
        """Queue a request (already validated, see openai_server.parse_completion); returns it."""
        with self.wakeup:
            self.waiting.extend(request.sequences)
            self.wakeup.notify_all()
        return request

    def cancel(self, request):
        """Drop a request's sequences at the next step (a client went away)."""
        request.cancelled = True
        with self.wakeup:
            self.wakeup.notify_all()

    # ---- the scheduler thread ------------------------------------------------------------------

    def _loop(self):
        while True:
            with self.wakeup:
                while not self.stopping and not self.waiting and not self.running:
                    self.wakeup.wait()
                if self.stopping:
                    return
            try:
                with self.lock, torch.inference_mode():
                    self._admit()
                    if self.running:
                        self._step()
            except Exception as e:  # a bug must not take the server down: fail what is in flight, go on
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _admit(self):
        """Prefill waiting sequences into free rows, oldest first; a sequence whose adapter has no
        free slot waits (later ones may go ahead) until a running row releases one."""
        with self.wakeup:
            waiting = list(self.waiting)
        for seq in waiting:
            req = seq.request
            if req.cancelled:
                self._dequeue(seq)
                continue
            if not self.free_rows:
                break
            try:
                slot = self.registry.acquire(req.adapter)
            except UnknownAdapter as e:  # unloaded after the request was accepted
                self._dequeue(seq)
                self._fail(req, 404, str(e))
                continue
            if slot is None:
                if not self.running:  # nothing will ever release a slot: every one is pinned
                    self._dequeue(seq)
                    self._fail(req, 503, f"no adapter slot is free for {req.adapter!r}: all {self.registry.max_loras} "
                                         f"are pinned; raise --max-loras")
                continue
            self._dequeue(seq)
            seq.row, seq.slot = self.free_rows.pop(), slot
            self.running[seq.row] = seq
            self._prefill(seq)

    def _dequeue(self, seq):
        with self.wakeup:
            self.waiting.remove(seq)

    def _prefill(self, seq):
        p, dev = len(seq.prompt), self.device
        seed = seq.request.sampling.seed
        if seed is not None:  # seed + index: the n choices of a prompt differ, each reproducible on its own
            seq.generator = torch.Generator(dev).manual_seed(seed + seq.index)
        idx = torch.tensor([seq.prompt], device=dev)  # (1, p)
        slot = torch.arange(self.L, device=dev)
        mask = (slot[None, :] <= torch.arange(p, device=dev)[:, None])[None, None]  # (1, 1, p, L): causal, own slots
        with self.registry.rows.use([seq.slot], dev):
            logits, _ = self.model(idx, pos=torch.arange(p, device=dev)[None], attn_mask=mask, cache_pos=0,
                                   cache_rows=torch.tensor([seq.row], device=dev))
        seq.pos = p
        self._accept(seq, logits[0, -1])

    def _step(self):
        """One decode forward over all M rows (idle rows included: fixed shapes), then sampling."""
        for row, seq in list(self.running.items()):
            if seq.request.cancelled:
                self._finish(seq, None)
        if not self.running:
            return
        dev = self.device
        tokens = torch.zeros(self.M, 1, dtype=torch.long)
        pos = torch.zeros(self.M, 1, dtype=torch.long)
        slots = [-1] * self.M
        for row, seq in self.running.items():
            tokens[row, 0], pos[row, 0], slots[row] = seq.last, seq.pos, seq.slot
        tokens, pos = tokens.to(dev), pos.to(dev)
        mask = torch.arange(self.L, device=dev)[None, :] <= pos  # (M, L): each row sees its own slots so far
        with self.registry.rows.use(slots, dev):
            logits, _ = self.model(tokens, pos=pos, attn_mask=mask[:, None, None, :], cache_pos=pos.view(-1))
        self.steps += 1
        for row, seq in list(self.running.items()):
            seq.pos += 1
            self._accept(seq, logits[row, -1])

    def _accept(self, seq, logits):
        """Sample the next token of `seq` from its (V,) logits and release what text it can."""
        s = seq.request.sampling
        tok = int(sample_next(logits.float()[None], s.temperature, None, s.top_p, seq.generator))
        seq.sampled += 1
        seq.last, finish, text = tok, None, None
        if tok == self.tokenizer.eot_token and not s.ignore_eos:
            finish = "stop"
        else:
            seq.tokens.append(tok)
        n = len(seq.tokens)
        if s.stop and finish is None:
            n, text = _stop_cut(self.tokenizer, seq.tokens, s.stop)
            if text is not None:
                finish = "stop"
                del seq.tokens[n:]
        if finish is None and (seq.sampled >= s.max_tokens or seq.pos >= self.L):
            finish = "length"
        if text is None:
            text = self.tokenizer.decode(seq.tokens[:n])
            if finish is None and text.endswith("\ufffd"):
                text = text[:-1]  # maybe half a character: its next bytes may complete it
        if len(text) > len(seq.text):
            seq.request.events.put(("delta", seq.index, text[len(seq.text):]))
            seq.text = text
        if finish:
            self._finish(seq, finish)

    def _finish(self, seq, reason):
        """Free the row and the adapter slot; a cancelled request gets no more events."""
        del self.running[seq.row]
        self.free_rows.append(seq.row)
        self.registry.release(seq.slot)
        req = seq.request
        req.remaining -= 1
        if reason is not None and not req.cancelled:
            req.events.put(("finish", seq.index, reason))
            if req.remaining == 0:
                req.events.put(("done", None, req.usage()))

    def _fail(self, req, status, message):
        """End a request with an error; its other sequences are dropped at the next step."""
        if not req.cancelled:
            req.cancelled = True
            req.events.put(("error", status, message))

    def _fail_all(self, message):
        with contextlib.suppress(Exception):
            for seq in list(self.running.values()):
                del self.running[seq.row]
                self.free_rows.append(seq.row)
                self.registry.release(seq.slot)
                self._fail(seq.request, 500, message)
