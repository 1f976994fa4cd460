"""Generation: a static KV cache, sampling, and batched or streamed decoding.

    from minilora.generation import generate, stream_generate
    out = generate(model, [[72, 105], [87, 104, 121]], max_new_tokens=20, temperature=0)
    out.tokens          # [[...], [...]]: the new tokens of each prompt (no prompt, no eot, no stop string)
    out.finish_reasons  # ["length", "stop"]: "stop" at eot_token or a stop string, else "length"
    out.texts           # decoded completions, cut exactly before a stop string (when tokenizer= is given)
    out.stats           # prompt/new token counts and prefill/decode seconds, for tokens/s

    for ev in stream_generate(model, prompts, 20, tokenizer=tok, stop=["\\n"]):
        ev.row, ev.token, ev.finish_reason   # a token as soon as it is certain, then one final event per row

How it runs. Prompts of different lengths are left-padded to the longest (T tokens), so every
row's next token lands in the same cache slot. An attention mask hides the pad slots and each
row's position ids start at 0 at its first real token, so a padded row computes what it would
alone. The model's static cache, (B, nh, T + max_new_tokens, hs) per layer, is filled by one
prefill forward over the prompts; each decode step then feeds one token per row and writes one
slot in place. When rows finish, the survivors are copied to the front of the cache (once per
finish, not per step) and the batch shrinks, so finished rows cost nothing further.

use_cache=False re-runs the whole sequence every step: the slow reference the tests and the
benchmark compare against. LoRA adapters (merged, unmerged or disabled) are ordinary modules
inside the model, so nothing here depends on them; adapter_names=["sql", "__base__", ...] gives
each prompt its own adapter in one batch (minilora.adapters.adapter_rows, at every forward).
For bf16 either cast the weights (model.to(torch.bfloat16); the cache follows the weights' dtype)
or keep fp32 weights and pass autocast_dtype=torch.bfloat16 (the cache is then kept in bf16 too).
Logits are sampled in fp32.

generate() puts the model in eval mode and restores each module's training flag afterwards; it
sets up and finally releases the model's KV cache, so one model runs one generation at a time
(a model whose cache a serving engine holds refuses generate() with a clear error).
"""

import contextlib
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minilora.adapters import adapter_rows, check_row_adapters
from minilora.errors import MiniloraError


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V) -> (B,) LongTensor.

    temperature 0 (or one below float32's smallest normal number) is argmax (ties go to the lowest
    id) and ignores top_k/top_p. top_k keeps exactly k tokens even when several tie with the k-th.
    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (always at
    least the top one).
    """
    if not bool(torch.isfinite(logits).all()):
        raise MiniloraError("the model produced NaN or inf logits; check the weights and adapter (e.g. a huge lora_alpha)")
    if temperature < torch.finfo(torch.float32).tiny:
        # 0, or so small it is 0 for float32 (1e-300 rounds to 0, and 0/0 = NaN): greedy, the limit as t -> 0
        return logits.argmax(dim=-1)
    # The max is subtracted first, so the top logit is exactly 0 and a tiny temperature (1e-37) gives
    # -inf to the rest, never inf - inf = NaN: it samples the argmax, as temperature -> 0 should.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        # Scatter the k winners into -inf: a threshold (logits < k-th value) would also keep every tie.
        _, keep = torch.topk(logits, top_k, dim=-1)  # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, keep, logits.gather(-1, keep))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely ones already hold top_p: the first token is never dropped.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


class Event(NamedTuple):
    """One streamed item: a new token of prompt `row`, or (token None) that row's finish."""
    row: int
    token: int | None
    finish_reason: str | None  # None, or "stop" / "length" on the row's last event


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # real prompt tokens, padding excluded
    new_tokens: int = 0     # tokens sampled, eot and stop-string tokens included
    prefill_s: float = 0.0  # the first forward, over the whole prompts
    decode_s: float = 0.0   # sampling, stop checks and every later forward

    @property
    def prefill_tokens_per_s(self):
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self):
        return self.new_tokens / max(self.decode_s, 1e-9)


@dataclass
class Generation:
    tokens: list            # list[list[int]]: new tokens per prompt, without eot or the stop string
    finish_reasons: list    # list[str]: "stop" or "length"
    texts: list | None      # decoded completions cut exactly before a stop string (needs tokenizer)
    stats: GenerationStats = field(default_factory=GenerationStats)
    logits: list | None = None  # return_logits: per prompt (steps, V) fp32 logits each sample came from


def stop_cut(tokenizer, tokens, stops):
    """-> (n, text). A stop string in the decoded tokens: tokens[:n] lie wholly before it and text
    is the completion cut exactly there. None yet (text None): tokens[:n] are safe to stream,
    since no stop string can begin inside them whatever is sampled next."""
    text = tokenizer.decode(tokens)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        limit = min(hits)
    else:
        # Hold back a tail that may still grow into a stop string, and a half-sampled character
        # (decoded as U+FFFD) whose completion might be one.
        hold = max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        limit = len(text) - max(hold, int(text.endswith("\ufffd")))
    n = len(tokens)
    while n:
        head = tokenizer.decode(tokens[:n])
        if len(head) <= limit and text.startswith(head):
            break
        n -= 1
    return n, (text[:limit] if hits else None)


class Completion:
    """One sequence's decoding, shared by generate() and the serving engine: the tokens it keeps,
    how many are certain (released), and why it finished ("stop" at eot or a stop string, else
    "length"). Feed it each sampled token with add()."""

    def __init__(self, *, max_tokens, eot_token=None, stop=(), tokenizer=None, ignore_eos=False):
        self.max_tokens, self.stop, self.tokenizer = max_tokens, list(stop), tokenizer
        # one id or several (Llama 3 ends a turn with <|eot_id|> and a text with <|end_of_text|>)
        self.eot = frozenset([eot_token] if eot_token is None or isinstance(eot_token, int) else map(int, eot_token))
        self.ignore_eos = ignore_eos  # vLLM's extension: keep going past end of text (benchmarks)
        self.tokens = []        # kept tokens: no eot, nothing from a stop string on
        self.released = 0       # tokens[:released] can no longer change: safe to stream
        self.sampled = 0        # tokens sampled, eot and stop-string tokens included
        self.finish_reason = None
        self.stop_text = None   # the text cut exactly before a stop string, once one appeared

    def add(self, token, *, at_limit=False):
        """Take one sampled token -> the tokens it releases. at_limit: the context is full."""
        self.sampled += 1
        if token in self.eot and not self.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
        n = len(self.tokens)
        if self.stop and self.finish_reason is None:
            n, text = stop_cut(self.tokenizer, self.tokens, self.stop)
            if text is not None:
                self.finish_reason, self.stop_text = "stop", text
                del self.tokens[n:]
        if self.finish_reason is None and (self.sampled >= self.max_tokens or at_limit):
            self.finish_reason, n = "length", len(self.tokens)
        elif self.finish_reason == "stop" and self.stop_text is None:
            n = len(self.tokens)  # eot: tokens held back for a stop string that never came are released
        new, self.released = self.tokens[self.released:n], n
        return new

    def text(self):
        """The released text; until the end, a trailing half character (U+FFFD) waits for its bytes."""
        if self.stop_text is not None:
            return self.stop_text
        text = self.tokenizer.decode(self.tokens[:self.released])
        return text[:-1] if self.finish_reason is None and text.endswith("\ufffd") else text


def _prompt_lists(idx, attention_mask, vocab_size):
    """idx as a (B, T) tensor (+ optional left-padding mask) or a list of id lists -> list of lists."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2:
            raise MiniloraError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
        rows = idx.tolist()
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).bool().cpu()
            if mask.shape != idx.shape:
                raise MiniloraError(f"attention_mask shape {tuple(mask.shape)} differs from idx shape {tuple(idx.shape)}")
            lengths = mask.sum(dim=1).tolist()
            for i, n in enumerate(lengths):
                if not mask[i, idx.size(1) - n:].all():
                    raise MiniloraError(f"attention_mask row {i} is not left-padded (zeros then ones); pad on the left")
            rows = [r[len(r) - n:] for r, n in zip(rows, lengths)]
    else:
        if attention_mask is not None:
            raise MiniloraError("attention_mask is only for a (B, T) tensor idx; a list of prompts needs no padding")
        if not isinstance(idx, (list, tuple)) or any(isinstance(r, int) for r in idx):
            raise MiniloraError("idx must be a (B, T) tensor or a list of token-id lists; wrap one prompt as [ids]")
        rows = [[int(t) for t in r] for r in idx]
    if not rows:
        raise MiniloraError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise MiniloraError(f"prompt {i} is empty; every prompt needs at least one token (e.g. the eot token)")
        bad = [t for t in r if not 0 <= t < vocab_size]
        if bad:
            raise MiniloraError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary (0..{vocab_size - 1})")
    return rows


def _attn_mask(key_valid, q0, L):
    """(B, 1, L - q0, L) bool: queries at slots q0..L-1 see non-pad keys up to themselves."""
    q = torch.arange(q0, L, device=key_valid.device)[:, None]
    k = torch.arange(L, device=key_valid.device)[None, :]
    mask = (k <= q)[None] & key_valid[:, None, :L]  # (B, Tq, L)
    # A pad query would see no key at all, and SDPA turns an all-False row into NaN: let it see itself.
    return (mask | (k == q)[None])[:, None]  # (B, 1, Tq, L)


class GenerationStream:
    """The events of one generation (see Event), produced lazily; result() once exhausted.

    Build it with stream_generate(). Arguments are checked here, so bad input raises at the
    call, not at the first next(). The model is switched to eval mode on the first next() and
    restored (and the KV cache this stream set up released) when the stream ends or is closed.
    """

    def __init__(self, model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 stop=None, seed=None, eot_token=None, tokenizer=None, attention_mask=None,
                 autocast_dtype=None, return_logits=False, adapter_names=None):
        cfg = model.config
        if model.kv_cache_kind is not None:  # a serving engine (or another stream) is running this model
            raise MiniloraError(f"this model's KV cache is in use ({model.kv_cache_kind!r} kind: a serving engine or "
                                "another generation owns it); generate through that owner, or on a copy of the model")
        self.prompts = _prompt_lists(idx, attention_mask, cfg.vocab_size)
        if adapter_names is not None:  # checked now: an unknown name fails before any compute
            adapter_names = check_row_adapters(model, adapter_names, len(self.prompts))
        self.adapter_names = adapter_names
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MiniloraError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        T = max(len(p) for p in self.prompts)
        if T + max_new_tokens > cfg.block_size:
            raise MiniloraError(
                f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"(block_size={cfg.block_size}); lower max_new_tokens or shorten the prompt")
        if not temperature >= 0:
            raise MiniloraError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise MiniloraError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise MiniloraError(f"top_p must be in (0, 1] or None, got {top_p}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise MiniloraError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stop and tokenizer is None:
            raise MiniloraError("stop strings need tokenizer= to decode the tokens")
        self.model, self.T, self.N = model, T, max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.use_cache, self.tokenizer = use_cache, tokenizer
        self.autocast_dtype, self.return_logits = autocast_dtype, return_logits
        self.device = model.lm_head.weight.device
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.completions = [Completion(max_tokens=max_new_tokens, eot_token=eot_token, stop=stop, tokenizer=tokenizer)
                            for _ in self.prompts]
        self.logits = [[] for _ in self.prompts]
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in self.prompts))
        self._events = self._run()

    def __iter__(self):
        return self._events

    def __next__(self):
        return next(self._events)

    def close(self):
        self._events.close()

    def result(self):
        """The Generation, once every event has been consumed."""
        if any(c.finish_reason is None for c in self.completions):
            raise MiniloraError("the stream is not finished; iterate it to the end before result()")
        texts = [c.text() for c in self.completions] if self.tokenizer is not None else None
        logits = [torch.stack(l) for l in self.logits] if self.return_logits else None
        return Generation([c.tokens for c in self.completions], [c.finish_reason for c in self.completions], texts,
                          self.stats, logits)

    # ---- the loop -------------------------------------------------------------------------------

    def _run(self):
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        owns_cache = False
        try:
            if self.use_cache:
                self.model.setup_kv_cache(len(self.prompts), self.T + self.N, dtype=self.autocast_dtype,
                                          device=self.device, kind="static")
                owns_cache = True
            self._prefill()
            for _ in range(self.N):
                t0 = time.perf_counter()
                events, keep = self._sample()
                self.stats.decode_s += time.perf_counter() - t0
                yield from events
                if not keep:
                    return
                t0 = time.perf_counter()
                self._decode(keep)
                self.stats.decode_s += time.perf_counter() - t0
        finally:
            if owns_cache:
                self.model.clear_kv_cache()
            for m, mode in modes.items():
                m.training = mode

    def _forward(self, idx, pos, attn_mask, cache_pos):
        """Every forward passes here; self.rows names each batch row's prompt, so each row gets its
        own adapter. Returns the last position's logits (B, V) in fp32."""
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        rows = (adapter_rows(self.model, [self.adapter_names[r] for r in self.rows]) if self.adapter_names
                else contextlib.nullcontext())
        with ctx, rows:
            logits, _ = self.model(idx, pos=pos, attn_mask=attn_mask, cache_pos=cache_pos)
        return logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def _prefill(self):
        t0 = time.perf_counter()
        B, T, dev = len(self.prompts), self.T, self.device
        total = T + self.N
        pad = torch.tensor([T - len(p) for p in self.prompts], device=dev)  # (B,)
        self.seq = torch.zeros(B, total, dtype=torch.long, device=dev)  # pad id 0: masked out anyway
        for i, p in enumerate(self.prompts):
            self.seq[i, T - len(p):T] = torch.tensor(p, device=dev)
        slot = torch.arange(total, device=dev)[None, :]  # (1, total)
        self.key_valid = slot >= pad[:, None]  # (B, total): False on pad slots
        self.pos = (slot - pad[:, None]).clamp(min=0)  # (B, total): 0 at each row's first real token
        self.padded = bool(pad.any())
        self.rows = list(range(B))  # prompt index of each batch row; shrinks as rows finish
        self.L = T  # tokens in each row's sequence so far (pads included)
        mask = _attn_mask(self.key_valid, 0, T) if self.padded else None
        self.next_logits = self._forward(self.seq[:, :T], self.pos[:, :T], mask, 0 if self.use_cache else None)
        self.stats.prefill_s = time.perf_counter() - t0

    @torch.inference_mode()
    def _sample(self):
        """Sample one token per active row; -> (events, batch indices of the rows still going)."""
        logits = self.next_logits
        tokens = sample_next(logits, generator=self.generator, **self.sampling)  # (B,)
        self.seq[:, self.L] = tokens
        self.stats.new_tokens += len(self.rows)
        events, keep = [], []
        for i, (r, tok) in enumerate(zip(self.rows, tokens.tolist())):
            if self.return_logits:
                self.logits[r].append(logits[i].cpu())
            c = self.completions[r]
            events += [Event(r, t, None) for t in c.add(tok)]
            if c.finish_reason is None:
                keep.append(i)
            else:
                events.append(Event(r, None, c.finish_reason))
        return events, keep

    @torch.inference_mode()
    def _decode(self, keep):
        """Drop finished rows, then one forward for the token each remaining row just sampled."""
        if len(keep) < len(self.rows):
            self._compact(keep)
        L = self.L
        self.L += 1
        if self.use_cache:
            mask = _attn_mask(self.key_valid, L, L + 1) if self.padded else None
            self.next_logits = self._forward(self.seq[:, L:L + 1], self.pos[:, L:L + 1], mask, L)
        else:
            mask = _attn_mask(self.key_valid, 0, L + 1) if self.padded else None
            self.next_logits = self._forward(self.seq[:, :L + 1], self.pos[:, :L + 1], mask, None)

    def _compact(self, keep):
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.seq, self.pos, self.key_valid = self.seq[idx], self.pos[idx], self.key_valid[idx]
        self.padded = not bool(self.key_valid[:, :self.T].all())
        if self.use_cache:
            # Move the survivors' cache rows to the front, once: the model then uses the first n rows
            # as plain views. (cache_rows would gather the whole cache again at every step.)
            self.model.keep_kv_rows(idx, self.L)


def stream_generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                    stop=None, seed=None, eot_token=None, tokenizer=None, attention_mask=None, autocast_dtype=None,
                    return_logits=False, adapter_names=None):
    """Like generate() (same arguments), but an iterator of Events as tokens become certain; .result() at the end.

    A token is released as soon as no stop string can begin inside it; each row ends with one
    Event(row, None, "stop" | "length"). Concatenating a row's tokens gives generate()'s tokens.
    """
    return GenerationStream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            use_cache=use_cache, stop=stop, seed=seed, eot_token=eot_token, tokenizer=tokenizer,
                            attention_mask=attention_mask, autocast_dtype=autocast_dtype,
                            return_logits=return_logits, adapter_names=adapter_names)


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True, stop=None,
             seed=None, eot_token=None, tokenizer=None, attention_mask=None, autocast_dtype=None,
             return_logits=False, adapter_names=None):
    """Sample up to max_new_tokens new tokens for each prompt -> Generation.

    idx: a (B, T) LongTensor (with attention_mask (B, T), 1 = token, 0 = left padding, for prompts
    of different lengths) or a list of token-id lists of any lengths. temperature 0 is greedy;
    top_k / top_p filter before sampling; seed makes sampling reproducible (None: torch's global
    RNG). A row stops at eot_token (an id, or a list of ids such as tokenizer.eos_token_ids) or at any of the stop strings (a str or list, decoded with
    tokenizer), which are excluded from its output. Prompt + max_new_tokens must fit in the
    model's block_size. use_cache=False is the slow re-forward reference. autocast_dtype runs the
    forwards under torch.autocast. return_logits keeps each step's logits (for tests).
    adapter_names: one adapter name per prompt ("__base__" for none), PEFT's mixed-adapter batch:
    the base matmuls run once for the batch and each row adds its own adapter's update.
    """
    stream = stream_generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             use_cache=use_cache, stop=stop, seed=seed, eot_token=eot_token, tokenizer=tokenizer,
                             attention_mask=attention_mask, autocast_dtype=autocast_dtype,
                             return_logits=return_logits, adapter_names=adapter_names)
    for _ in stream:
        pass
    return stream.result()
