"""A conversation held in the model's KV cache between turns (generate.py --chat).

    with ChatSession(model, tok, template, temperature=0) as chat:
        for piece in chat.say("Capital of Peru?"):     # the answer's text as it becomes certain
            print(piece, end="", flush=True)
        chat.messages                                   # [{"role": "user", ...}, {"role": "assistant", ...}]
        chat.turns[-1]                                  # TurnStats: prompt tokens, reused from the cache, prefilled

Why a session and not generate() per turn: each turn's prompt is the whole conversation so far,
rendered with the chat template, so generate() would prefill every earlier turn again. Here the
model's static KV cache (batch 1, the whole context) stays set up between turns, and `cached`
remembers which token ids its slots hold. A new prompt is compared with those ids: the common
prefix's keys and values are already in the cache, so only the rest is prefilled, at cache
position p with a causal mask over slots [0, p + T). Nothing else changes: the decode steps are
generate()'s (one token at cache position L), so greedy answers are the same as a fresh
generate() on the same prompt (tested). Slots past the new end keep stale values, but a static
cache only ever lets attention see the slots up to the last one written.

The prefix is compared in tokens, not text: an answer is re-tokenized on its own when the
conversation is rendered again (chat.chat_tokens), and where that tokenization differs from the
tokens sampled, reuse stops at the first difference and the rest is prefilled, never mixed up.
"""

import time
from dataclasses import dataclass

import torch

from minilora.chat import chat_tokens, check_messages, stop_tokens
from minilora.errors import MiniloraError
from minilora.generation import Completion, sample_next


@dataclass
class TurnStats:
    prompt_tokens: int = 0   # the rendered conversation, generation prompt included
    reused: int = 0          # of those, already in the KV cache from earlier turns
    prefilled: int = 0       # of those, run through the model now (prompt_tokens - reused)
    new_tokens: int = 0      # tokens sampled (end-of-turn included)
    prefill_s: float = 0.0
    decode_s: float = 0.0


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with `model`, its keys and values kept in the model's KV cache (see the module doc).

    The session owns the model's cache until close() (or the end of a with-block); generate() on the
    same model is refused meanwhile, as for any cache owner."""

    def __init__(self, model, tokenizer, template, *, temperature=0.8, top_k=None, top_p=None, seed=None,
                 max_new_tokens=None, reuse=True, stop=()):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens, self.reuse = max_new_tokens, reuse
        self.eos, self.stops = stop_tokens(tokenizer, template)
        self.stops += [s for s in ([stop] if isinstance(stop, str) else stop) if s not in self.stops]
        self.device = model.lm_head.weight.device
        self.generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.messages, self.turns = [], []
        self.cached = []  # token ids whose keys/values fill the cache's first len(cached) slots
        self._modes = {m: m.training for m in model.modules()}
        model.setup_kv_cache(1, model.config.block_size, device=self.device, kind="static")
        model.eval()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the KV cache and give every module back its training flag."""
        if self._modes is not None:
            self.model.clear_kv_cache()
            for m, mode in self._modes.items():
                m.training = mode
            self._modes = None

    def say(self, content):
        """Add a user turn and answer it: yields the answer's text pieces; the answer joins self.messages."""
        self.messages.append({"role": "user", "content": content})
        yield from self.reply(self.messages)

    def reply(self, messages):
        """Answer the conversation `messages` (ending with a user turn): yields text pieces as they become
        certain; afterwards self.messages is `messages` + the answer and self.turns[-1] says what it cost."""
        if self._modes is None:
            raise MiniloraError("this chat session is closed; start a new ChatSession")
        messages = check_messages(messages)
        ids, _ = chat_tokens(self.tokenizer, self.template, messages, add_generation_prompt=True)
        room = self.model.config.block_size - len(ids)
        if room < 1:
            raise MiniloraError(f"the conversation is {len(ids)} tokens, the model's whole context "
                                f"(block_size={self.model.config.block_size}); start a new one (/reset)")
        completion = Completion(max_tokens=min(room, self.max_new_tokens or room), eot_token=self.eos,
                                stop=self.stops, tokenizer=self.tokenizer)
        stats = TurnStats(prompt_tokens=len(ids))
        self.turns.append(stats)
        logits = self._prefill(ids, stats)
        shown = ""
        t0 = time.perf_counter()
        with torch.inference_mode():
            while True:
                token = int(sample_next(logits, generator=self.generator, **self.sampling)[0])
                stats.new_tokens += 1
                completion.add(token, at_limit=len(self.cached) + 1 >= self.model.config.block_size)
                text = completion.text()
                if len(text) > len(shown):
                    yield text[len(shown):]
                    shown = text
                if completion.finish_reason is not None:
                    break
                logits = self._forward([token], len(self.cached))
                self.cached.append(token)
        stats.decode_s = time.perf_counter() - t0
        answer = completion.text()
        self.finish_reason = completion.finish_reason
        self.messages = messages + [{"role": "assistant", "content": self._content(messages, answer)}]

    def _prefill(self, ids, stats):
        t0 = time.perf_counter()
        # at least the last prompt token is run: its logits give the first answer token
        p = min(common_prefix(self.cached, ids), len(ids) - 1) if self.reuse else 0
        with torch.inference_mode():
            logits = self._forward(ids[p:], p)
        self.cached = list(ids)
        stats.reused, stats.prefilled, stats.prefill_s = p, len(ids) - p, time.perf_counter() - t0
        return logits

    def _forward(self, new, p):
        """Run tokens `new` at cache slots p.. -> the last one's logits (1, V) in fp32."""
        T = len(new)
        idx = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, T)
        mask = None
        if p > 0 and T > 1:  # a chunk after cached slots: query p+i sees keys 0..p+i
            q = torch.arange(p, p + T, device=self.device)[:, None]
            k = torch.arange(p + T, device=self.device)[None, :]
            mask = (k <= q)[None, None]  # (1, 1, T, p + T)
        logits, _ = self.model(idx, attn_mask=mask, cache_pos=p)
        return logits[:, -1].float()  # (1, V)

    def _content(self, messages, answer):
        """The assistant content that renders back to the generated text: templates such as "plain"
        ("Assistant:" then " " + content) put a space before the content, which the model generated."""
        prompt = self.template.render(messages, add_generation_prompt=True)
        for cand in (answer, answer.lstrip(), answer.strip()):
            full = self.template.render(messages + [{"role": "assistant", "content": cand}])
            if full.startswith(prompt + answer):
                return cand
        return answer.strip()

    def summary(self):
        """One line: prefill tokens over all turns, with and without the cache's reuse."""
        total = sum(t.prompt_tokens for t in self.turns)
        reused = sum(t.reused for t in self.turns)
        return (f"chat: {len(self.turns)} turn(s), {total} prompt tokens, {reused} reused from the KV cache, "
                f"{total - reused} prefilled ({100 * reused / max(total, 1):.0f}% of prefill saved)")
