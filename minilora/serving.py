"""Continuous batching: one scheduler thread owns the model and decodes every running request together.

    engine = Engine(model, tokenizer, registry, max_num_seqs=8)
    engine.start()
    req = engine.submit(Request("sql", [prompt_ids], Sampling(max_tokens=32, temperature=0)))
    for kind, index, value in req: ...   # ("delta", i, text) ... ("finish", i, "stop"|"length"), then ("done", None, usage)

How a step runs. The engine holds the model's KV cache ("rows" kind) of max_num_seqs rows x max_model_len slots.
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

The decode bookkeeping (stop strings, end of text, finish reasons, what text is certain) is
generation.Completion, the same as generate()'s, and adapters go through adapters.adapter_rows,
the same kernel as generate(adapter_names=...). One request's failure fails only that request:
a bad sample (NaN logits), an adapter whose files vanished, a client that went away.
"""

import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from minilora.adapters import adapter_rows
from minilora.errors import MiniloraError
from minilora.generation import Completion, sample_next
from minilora.registry import UnknownAdapter


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    stop: list = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: keep going past the end-of-text token (benchmarks)
    eos_token_ids: list | None = None  # ids that end the answer (chat: + the end-of-turn token); None: the tokenizer's
    logprobs: int | None = None        # report each token's log-probability and this many top alternatives
    presence_penalty: float = 0.0      # OpenAI's: logit -= presence * (count > 0) + frequency * count,
    frequency_penalty: float = 0.0     # count = times the token was sampled so far in this completion
    echo: bool = False                 # prompt logprobs too (with logprobs): the prefill's logits


class Sequence:
    """One completion being generated: a prompt, its choice index, and its place in the batch."""

    def __init__(self, request, index, prompt):
        self.request, self.index, self.prompt = request, index, prompt
        self.completion = None  # a generation.Completion, made at prefill
        self.generator = None   # set at prefill, on the model's device
        self.text = ""          # text already sent
        self.row = self.slot = None
        self.pos = 0       # cache slot of the next token fed to the model
        self.last = None   # the token sampled last, fed at the next step
        self.logprobs = [] # per sampled token (Sampling.logprobs): (token, logprob, [(top token, logprob), ...])
        self.prompt_logprobs = None  # echo + logprobs: the prompt's, the first token's logprob None
        self.counts = None # (V,) times each token was sampled: the penalties' counts


class Request:
    """A completion request: prompts x n sequences; iterate it for its events (see module doc).

    adapter: the registry name serving it (BASE_ADAPTER for the base); model_name: what the
    client called it, echoed in responses.
    """

    def __init__(self, adapter, prompts, sampling, n=1, model_name=None):
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.adapter, self.model_name, self.sampling = adapter, model_name or adapter, sampling
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.sequences = [Sequence(self, i * n + j, p) for i, p in enumerate(prompts) for j in range(n)]
        self.remaining = len(self.sequences)
        self.events = queue.Queue()
        self.cancelled = False
        self.include_usage = False  # streaming: end with a usage chunk (OpenAI's stream_options)
        self.chat = False           # answered in chat.completion shapes
        self.echo = False           # the prompt's text (and logprobs) before each completion

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    def usage(self):
        done = sum(s.completion.sampled for s in self.sequences if s.completion)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}


def _entry(logprobs, token, k):
    """(token, its logprob, [(token, logprob) of the k most likely]) from a (V,) log-softmax."""
    top = torch.topk(logprobs, k) if k else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
    return token, float(logprobs[token]), alts


class Engine:
    """The scheduler: a thread that admits, prefills and decodes; submit() from any thread."""

    def __init__(self, model, tokenizer, registry, *, max_num_seqs=8, max_model_len=None):
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
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.device = model.lm_head.weight.device
        # The engine owns the model's cache until stop(): generate() on this model is refused meanwhile.
        model.setup_kv_cache(max_num_seqs, max_model_len, dtype=model.lm_head.weight.dtype, device=self.device,
                             kind="rows")
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: row 0 first
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
        """Stop the scheduler and give the model its KV cache back (generate() works on it again)."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        if self.model.kv_cache_kind == "rows":
            self.model.clear_kv_cache()

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
                print(f"minilora scheduler error, failing {len(self.running)} running sequences:", file=sys.stderr)
                traceback.print_exc()
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
            except MiniloraError as e:  # an evicted adapter whose files changed or vanished: this request only
                self._dequeue(seq)
                self._fail(req, 500, f"adapter {req.adapter!r} cannot be loaded again: {e}")
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

    def _rows(self, slots):
        """adapter_rows for one forward with these per-row slots: fixed slots and rank, fixed shapes."""
        return adapter_rows(self.model, self.registry.row_names(slots), slots=self.registry.slot_names,
                            pad_rank=self.registry.max_lora_rank)

    def _prefill(self, seq):
        p, dev, s = len(seq.prompt), self.device, seq.request.sampling
        eos = self.tokenizer.eos_token_ids if s.eos_token_ids is None else s.eos_token_ids
        seq.completion = Completion(max_tokens=s.max_tokens, eot_token=eos, stop=s.stop,
                                    tokenizer=self.tokenizer, ignore_eos=s.ignore_eos)
        if s.seed is not None:  # seed + index: the n choices of a prompt differ, each reproducible on its own
            seq.generator = torch.Generator(dev).manual_seed(s.seed + seq.index)
        idx = torch.tensor([seq.prompt], device=dev)  # (1, p)
        slot = torch.arange(self.max_model_len, device=dev)
        mask = (slot[None, :] <= torch.arange(p, device=dev)[:, None])[None, None]  # (1, 1, p, L): causal, own slots
        echo = s.echo and s.logprobs is not None  # the prompt's logprobs: every position's logits, not just the last
        with self._rows([seq.slot]):
            logits, _ = self.model(idx, pos=torch.arange(p, device=dev)[None], attn_mask=mask, cache_pos=0,
                                   cache_rows=torch.tensor([seq.row], device=dev), all_logits=echo)
        seq.pos = p
        if echo:
            lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (p-1, V): what predicted each next prompt token
            seq.prompt_logprobs = [(seq.prompt[0], None, [])] + [_entry(lp[j], seq.prompt[j + 1], s.logprobs)
                                                                 for j in range(p - 1)]
        self._accept(seq, logits[0, -1])

    def _step(self):
        """One decode forward over all rows (idle rows included: fixed shapes), then sampling."""
        for row, seq in list(self.running.items()):
            if seq.request.cancelled:
                self._finish(seq, None)
        if not self.running:
            return
        dev, M = self.device, self.max_num_seqs
        tokens = torch.zeros(M, 1, dtype=torch.long)
        pos = torch.zeros(M, 1, dtype=torch.long)
        slots = [-1] * M
        for row, seq in self.running.items():
            tokens[row, 0], pos[row, 0], slots[row] = seq.last, seq.pos, seq.slot
        tokens, pos = tokens.to(dev), pos.to(dev)
        mask = torch.arange(self.max_model_len, device=dev)[None, :] <= pos  # (M, L): each row sees its own slots
        with self._rows(slots):
            logits, _ = self.model(tokens, pos=pos, attn_mask=mask[:, None, None, :], cache_pos=pos.view(-1))
        self.steps += 1
        for row, seq in list(self.running.items()):
            seq.pos += 1
            self._accept(seq, logits[row, -1])

    def _accept(self, seq, logits):
        """Sample the next token of `seq` from its (V,) logits and send the text that became certain."""
        s, c = seq.request.sampling, seq.completion
        logits = logits.float()
        raw = logits
        if s.presence_penalty or s.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros_like(logits)
            logits = logits - s.frequency_penalty * seq.counts - s.presence_penalty * (seq.counts > 0).float()
        try:
            tok = int(sample_next(logits[None], s.temperature, None, s.top_p, seq.generator))
        except (MiniloraError, RuntimeError) as e:  # e.g. NaN logits: this row's request fails, no other
            self._finish(seq, None)
            self._fail(seq.request, 500, f"sampling failed: {e}")
            return
        if seq.counts is not None:
            seq.counts[tok] += 1
        if s.logprobs is not None:  # of the model's own distribution, before penalties and temperature (as vLLM)
            seq.logprobs.append(_entry(torch.log_softmax(raw, dim=-1), tok, s.logprobs))
        before = c.released
        c.add(tok, at_limit=seq.pos >= self.max_model_len)
        seq.last = tok
        if s.logprobs is not None and c.released > before:
            seq.request.events.put(("logprobs", seq.index, seq.logprobs[before:c.released]))
        text = c.text()
        if len(text) > len(seq.text):
            seq.request.events.put(("delta", seq.index, text[len(seq.text):]))
            seq.text = text
        if c.finish_reason:
            self._finish(seq, c.finish_reason)

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
        try:
            for seq in list(self.running.values()):
                del self.running[seq.row]
                self.free_rows.append(seq.row)
                self.registry.release(seq.slot)
                self._fail(seq.request, 500, message)
        except Exception:
            traceback.print_exc()
