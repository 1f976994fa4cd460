"""Generation: the KV cache changes nothing but speed, sampling does what it says, rows stop alone."""

import copy

import pytest
import torch

from minilora import GPT, GPTConfig, MiniloraError
from minilora.generation import generate, sample_next, stream_generate
from minilora import LoraConfig, apply_lora, disable_adapter, merge
from minilora.tokenizer import get_tokenizer

TOK = get_tokenizer("byte")
PROMPTS = [TOK.encode("Hello"), TOK.encode("Hi there, you"), [7]]  # lengths 5, 13, 1
STEPS = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_name("tiny"))
    # Larger weights than GPT-2's init give peaked, varied logits, so greedy runs don't collapse
    # into one repeated token and a wrong position or mask shows up as a different token.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


def reference_greedy(model, prompt, steps):
    """Greedy decoding by hand: the full sequence through the plain forward at every step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out, _ = model(torch.tensor([seq]))
            logits.append(out[0, -1])
            seq.append(int(out[0, -1].argmax()))
    return seq[len(prompt):], torch.stack(logits)


def test_cached_equals_uncached_and_reference_batch_1(model):
    prompt = PROMPTS[1]
    ref_tokens, ref_logits = reference_greedy(model, prompt, STEPS)
    for use_cache in (True, False):
        out = generate(model, [prompt], STEPS, temperature=0, use_cache=use_cache, return_logits=True)
        assert out.tokens == [ref_tokens] and out.finish_reasons == ["length"]
        assert out.logits[0].shape == (STEPS, model.config.vocab_size)
        torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-5, rtol=0)
    assert len(set(ref_tokens)) > 3  # a varied sequence, so the comparison means something


def test_padded_batch_cached_equals_uncached_and_each_row_alone(model):
    cached = generate(model, PROMPTS, STEPS, temperature=0, return_logits=True)
    uncached = generate(model, PROMPTS, STEPS, temperature=0, use_cache=False, return_logits=True)
    assert cached.tokens == uncached.tokens
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(cached.logits[row], uncached.logits[row], atol=1e-5, rtol=0)
        ref_tokens, ref_logits = reference_greedy(model, prompt, STEPS)
        assert cached.tokens[row] == ref_tokens
        torch.testing.assert_close(cached.logits[row], ref_logits, atol=1e-5, rtol=0)


def test_tensor_with_attention_mask_equals_list_form(model):
    T = max(len(p) for p in PROMPTS)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    assert generate(model, idx, 8, temperature=0, attention_mask=mask).tokens == \
        generate(model, PROMPTS, 8, temperature=0).tokens
    with pytest.raises(MiniloraError, match="left-padded"):
        generate(model, idx, 8, attention_mask=mask.flip(1))


def test_temperature_zero_is_argmax_whatever_the_seed(model):
    greedy = [reference_greedy(model, p, 10)[0] for p in PROMPTS]
    for seed in (None, 0, 123):
        assert generate(model, PROMPTS, 10, temperature=0, seed=seed, top_k=5, top_p=0.5).tokens == greedy


def test_seed_reproduces_and_different_seeds_differ(model):
    """Seeded sampling draws exactly what a sampler written by hand draws: the full sequence through the
    plain forward at every step, softmax, then torch.multinomial over the batch with a generator seeded
    alike (one (B, V) draw per step, as generate() makes)."""
    def reference_sample(prompts, steps, seed):
        g = torch.Generator().manual_seed(seed)
        seqs = [list(p) for p in prompts]
        with torch.no_grad():
            for _ in range(steps):
                logits = torch.stack([model(torch.tensor([s]))[0][0, -1] for s in seqs])  # (B, V)
                for s, t in zip(seqs, torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)[:, 0]):
                    s.append(int(t))
        return [s[len(p):] for s, p in zip(seqs, prompts)]

    a = generate(model, PROMPTS, 16, seed=1)
    assert a.tokens == reference_sample(PROMPTS, 16, seed=1)
    assert generate(model, PROMPTS, 16, seed=2).tokens == reference_sample(PROMPTS, 16, seed=2) != a.tokens
    # the cached and uncached paths draw the same random numbers, so they sample the same tokens
    assert generate(model, PROMPTS, 16, seed=1, use_cache=False).tokens == a.tokens


def test_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPTS, 12, temperature=0).tokens
    assert generate(model, PROMPTS, 12, temperature=1.5, top_k=1, seed=5).tokens == greedy


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # nucleus for p=0.7: {1, 3} (0.5 + 0.3 >= 0.7)
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, top_p=0.7, generator=g)
    assert set(drawn.tolist()) == {1, 3}
    assert 0.55 < (drawn == 1).float().mean() < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    assert set(sample_next(logits, top_p=0.4, generator=g).tolist()) == {1}  # always the top token
    assert set(sample_next(logits, top_p=1.0, generator=g).tolist()) == {0, 1, 2, 3}


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 3.0, 0.0]).expand(3000, 6)
    drawn = sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    kept = set(drawn.tolist())
    assert len(kept) == 2 and kept <= {1, 2, 3, 4}


def test_eot_ends_its_row_and_others_continue(model):
    full = generate(model, PROMPTS, STEPS, temperature=0).tokens
    eot = full[1][4]  # a token row 1 produces early
    expected = [t[:t.index(eot)] if eot in t else t for t in full]
    assert any(len(e) < STEPS for e in expected) and any(len(e) == STEPS for e in expected)
    for use_cache in (True, False):
        out = generate(model, PROMPTS, STEPS, temperature=0, eot_token=eot, use_cache=use_cache)
        assert out.tokens == expected  # rows left after the batch shrank still decode correctly
        assert out.finish_reasons == ["stop" if len(e) < STEPS else "length" for e in expected]


def test_stop_string_ends_the_row_and_is_excluded(model):
    full = generate(model, PROMPTS, STEPS, seed=3, tokenizer=TOK)
    text = full.texts[0]
    k = next(i for i in range(4, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[k:k + 2]
    out = generate(model, PROMPTS, STEPS, seed=3, tokenizer=TOK, stop=["@@@never", stop])
    cut = text.find(stop)
    assert out.finish_reasons[0] == "stop"
    assert out.texts[0] == text[:cut] and stop not in TOK.decode(out.tokens[0])
    assert out.tokens[0] == full.tokens[0][:len(out.tokens[0])]
    assert TOK.decode(out.tokens[0]) == text[:cut]  # byte tokens: the cut falls on a token boundary
    with pytest.raises(MiniloraError, match="tokenizer"):
        generate(model, PROMPTS, 4, stop="x")


@pytest.mark.parametrize("use_cache", [True, False])
def test_stream_yields_the_same_tokens(model, use_cache):
    full = generate(model, PROMPTS, STEPS, temperature=0, tokenizer=TOK).texts
    kwargs = dict(temperature=0, tokenizer=TOK, stop=[full[0][6:8], full[2][3:6]], eot_token=full[1][3].encode()[0],
                  use_cache=use_cache)
    expected = generate(model, PROMPTS, STEPS, **kwargs)
    stream = stream_generate(model, PROMPTS, STEPS, **kwargs)
    got, finished = [[] for _ in PROMPTS], [None] * len(PROMPTS)
    for ev in stream:
        assert finished[ev.row] is None  # nothing after a row's final event
        if ev.token is None:
            finished[ev.row] = ev.finish_reason
        else:
            got[ev.row].append(ev.token)
    assert got == expected.tokens and finished == expected.finish_reasons
    assert stream.result().tokens == expected.tokens
    assert "stop" in finished


def test_lora_unmerged_merged_and_disabled(model):
    base = generate(model, PROMPTS, 12, temperature=0).tokens
    lora = copy.deepcopy(model)
    apply_lora(lora, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    cached = generate(lora, PROMPTS, 12, temperature=0, return_logits=True)
    uncached = generate(lora, PROMPTS, 12, temperature=0, use_cache=False, return_logits=True)
    assert cached.tokens == uncached.tokens and cached.tokens != base  # a non-zero adapter changes the output
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(cached.logits[row], uncached.logits[row], atol=1e-5, rtol=0)
    with disable_adapter(lora):
        assert generate(lora, PROMPTS, 12, temperature=0).tokens == base
    merge(lora)
    assert generate(lora, PROMPTS, 12, temperature=0).tokens == cached.tokens


def test_context_overflow_raises_the_documented_error(model):
    with pytest.raises(MiniloraError, match=r"exceeds the model's context \(block_size=64\); lower max_new_tokens"):
        generate(model, [[1] * 40, [2]], 25)
    assert len(generate(model, [[1] * 40, [2]], 24, temperature=0).tokens[0]) == 24  # exactly full is fine


def test_bad_arguments_raise(model):
    for kwargs, match in [(dict(idx=[[]]), "empty"), (dict(idx=[1, 2]), "list of token-id lists"),
                          (dict(idx=[[300]]), "vocabulary"), (dict(top_p=0.0), "top_p"),
                          (dict(top_k=0), "top_k"), (dict(temperature=-1), "temperature"),
                          (dict(max_new_tokens=0), "max_new_tokens")]:
        args = dict(idx=[[1, 2]], max_new_tokens=4) | kwargs
        with pytest.raises(MiniloraError, match=match):
            generate(model, args.pop("idx"), args.pop("max_new_tokens"), **args)


def test_bf16_weights_and_autocast_give_finite_close_logits(model):
    """Over every step, not just the first: each step's bf16 logits are compared with fp32 logits of
    the plain forward over the same tokens (the bf16 run's own, so the comparison holds even after
    a near-tie sends bf16 greedy down another path), and each greedy pick is the fp32 argmax up to
    bf16 rounding. Seeded sampling draws from those logits exactly as torch.multinomial does."""
    def fp32_logits(prompt, tokens):  # (len(tokens), V): the fp32 logits each of `tokens` was sampled from
        with torch.no_grad():
            return model(torch.tensor([prompt + tokens]), all_logits=True)[0][0, len(prompt) - 1:-1]

    fp32 = generate(model, PROMPTS, STEPS, temperature=0).tokens
    bf16_model = GPT(model.config).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())
    for m, kw in [(bf16_model, {}), (model, dict(autocast_dtype=torch.bfloat16))]:
        out = generate(m, PROMPTS, STEPS, temperature=0, return_logits=True, **kw)
        agree = 0
        for row, prompt in enumerate(PROMPTS):
            assert len(out.tokens[row]) == STEPS and torch.isfinite(out.logits[row]).all()
            ref = fp32_logits(prompt, out.tokens[row])  # logits of size ~6: bf16 rounding is ~0.1 of them
            torch.testing.assert_close(out.logits[row], ref, atol=0.15, rtol=0.05)
            picked = ref.gather(1, torch.tensor(out.tokens[row])[:, None])[:, 0]
            assert (ref.max(dim=-1).values - picked).max() < 0.3  # a near-tie at worst, never a wrong token
            agree += next((i for i, (x, y) in enumerate(zip(out.tokens[row], fp32[row])) if x != y), STEPS)
        assert agree >= STEPS * len(PROMPTS) // 2  # bf16 follows fp32 greedy for most of the steps

        sampled = generate(m, PROMPTS, 8, seed=0, return_logits=True, **kw)
        g = torch.Generator().manual_seed(0)
        for step in range(8):  # every row runs all 8 steps (no eot): one (B, V) draw per step
            probs = torch.softmax(torch.stack([l[step] for l in sampled.logits]), dim=-1)
            assert [t[step] for t in sampled.tokens] == torch.multinomial(probs, 1, generator=g)[:, 0].tolist()
        for row, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(sampled.logits[row], fp32_logits(prompt, sampled.tokens[row]), atol=0.15, rtol=0.05)


def test_modes_cache_and_grad_mode_are_restored(model):
    model.train()
    model.transformer.h[0].eval()
    stream = stream_generate(model, PROMPTS, 8)
    next(iter(stream))
    assert not model.training and torch.is_grad_enabled()  # inference mode does not leak between events
    stream.close()
    assert model.training and not model.transformer.h[0].training
    assert model.transformer.h[0].attn.kv_cache is None
    generate(model, PROMPTS, 4)
    assert model.training and model.transformer.h[0].attn.kv_cache is None
    model.eval()
