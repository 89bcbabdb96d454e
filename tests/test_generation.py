"""Batched KV-cache generation against full recomputation, one token per row per step, EOS, padding;
and against a frozen copy of the first (unoptimized) sampler: same tokens and log-probs for the same seed."""

import pytest
import torch
import torch.nn.functional as F

from rlhf_lightning.generation import Generation, generate
from rlhf_lightning.padding import left_pad
from rlhf_lightning.losses import logprobs_from_logits
from rlhf_lightning.models import GPT, BigramConfig, BigramLM, GPTConfig, positions_from_mask
from tolerance import FORWARD_ATOL

EOS, PAD = 2, 0


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=24, n_layer=2, n_head=2, n_embd=16)).eval()


PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 3]]


def test_cached_tokens_and_logprobs_equal_a_full_recompute():
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS, PAD)
    g = torch.Generator().manual_seed(0)
    out = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.7, generator=g)
    for i in range(len(PROMPTS)):
        n = int(out.lengths[i])
        seq = torch.tensor([PROMPTS[i] + out.completion_ids[i, :n].tolist()])
        logits = model(seq, torch.ones_like(seq, dtype=torch.bool))  # no cache, no padding
        P = len(PROMPTS[i])
        recomputed = logprobs_from_logits(logits[:, P - 1 : P + n - 1], seq[:, P:], temperature=0.7)[0]
        torch.testing.assert_close(out.logprobs[i, :n], recomputed, atol=FORWARD_ATOL, rtol=0)
        # greedy continuation under the full recompute picks the same tokens as greedy with cache
    greedy = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True)
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(int(greedy.lengths[i])):
            x = torch.tensor([seq])
            seq.append(int(model(x, torch.ones_like(x, dtype=torch.bool))[0, -1].argmax()))
        assert seq[len(prompt) :] == greedy.completion_ids[i, : int(greedy.lengths[i])].tolist()


def test_each_decode_step_feeds_one_new_token_per_row():
    model = tiny_gpt()
    widths = []
    original = model.forward

    def recording_forward(input_ids, *args, **kwargs):
        widths.append(tuple(input_ids.shape))
        return original(input_ids, *args, **kwargs)

    model.forward = recording_forward
    ids, mask = left_pad(PROMPTS, PAD)
    out = generate(model, ids, mask, max_new_tokens=5, eos_id=99, pad_id=PAD, temperature=1.0,
                   generator=torch.Generator().manual_seed(1))
    assert widths[0] == (3, 4)  # the prompt once
    assert widths[1:] == [(3, 1)] * 4  # then exactly one new token per row per step
    assert out.completion_ids.shape == (3, 5)


def test_rows_stop_at_eos_and_then_only_pad():
    model = tiny_gpt()
    with torch.no_grad():  # make EOS the likeliest token everywhere except at the very first step
        model.lm_head.weight[EOS].fill_(0.0)
    ids, mask = left_pad(PROMPTS, PAD)
    out = generate(model, ids, mask, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=2.0,
                   generator=torch.Generator().manual_seed(3))
    for i in range(len(PROMPTS)):
        n = int(out.lengths[i])
        row = out.completion_ids[i].tolist()
        if out.finished[i]:
            assert row[n - 1] == EOS and EOS not in row[: n - 1]
            assert row[n:] == [PAD] * (8 - n)
            assert out.logprobs[i, n:].abs().sum() == 0
        assert out.completion_mask[i].tolist() == [True] * n + [False] * (8 - n)


def test_a_rows_result_does_not_depend_on_other_rows_padding():
    model = tiny_gpt()
    alone_ids, alone_mask = left_pad([PROMPTS[1]], PAD)
    alone = generate(model, alone_ids, alone_mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True)
    batch_ids, batch_mask = left_pad(PROMPTS, PAD)  # row 1 now carries two pads in front
    batch = generate(model, batch_ids, batch_mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True)
    assert batch.completion_ids[1].tolist() == alone.completion_ids[0].tolist()
    torch.testing.assert_close(batch.logprobs[1], alone.logprobs[0], atol=FORWARD_ATOL, rtol=0)


def test_top_k_samples_only_the_k_likeliest_but_reports_full_softmax_logprobs():
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS, PAD)
    out = generate(model, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, top_k=1,
                   generator=torch.Generator().manual_seed(0))
    greedy = generate(model, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, greedy=True)
    assert out.completion_ids.tolist() == greedy.completion_ids.tolist()
    assert (out.logprobs < 0).all()  # not log(1): the full softmax, not the truncated one


# ---- a frozen copy of the first sampler: a `torch.cat`-grown mask, a host sync per token ----


def _reference_sample(scaled, top_k, generator):
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def mask_from_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Right-aligned-free mask: lengths [2, 0] with max_len 3 -> [[1,1,0],[0,0,0]] (bool)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, N)


@torch.no_grad()
def reference_generate(model, prompt_ids, prompt_mask, *, max_new_tokens, eos_id, pad_id, temperature=1.0,
                       top_k=None, greedy=False, generator=None) -> Generation:
    B, P = prompt_ids.shape
    mask = prompt_mask.bool()
    prompt_lengths = mask.sum(-1)
    model.eval()
    cache = model.new_cache(B, P + max_new_tokens)
    logits = model(prompt_ids, mask, position_ids=positions_from_mask(mask), cache=cache)[:, -1]
    next_pos = prompt_lengths.clone()
    out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    out_lp = torch.zeros(B, max_new_tokens, dtype=torch.float32)
    lengths = torch.zeros(B, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    ones = torch.ones(B, 1, dtype=torch.bool)
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature
        token = scaled.argmax(-1) if greedy else _reference_sample(scaled, top_k, generator)
        logprob = F.log_softmax(scaled, dim=-1).gather(-1, token[:, None]).squeeze(-1)
        alive = ~finished
        out_ids[:, t] = torch.where(alive, token, pad_id)
        out_lp[:, t] = torch.where(alive, logprob, 0.0)
        lengths += alive.long()
        finished |= alive & (token == eos_id)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        logits = model(out_ids[:, t : t + 1], mask, position_ids=next_pos[:, None], cache=cache)[:, -1]
        next_pos += 1
    return Generation(out_ids, mask_from_lengths(lengths, max_new_tokens), out_lp, lengths, finished)


def eos_prone_gpt(seed: int) -> GPT:
    """EOS gets a logit ~2 above the others: rows end at different, mostly early, steps."""
    model = tiny_gpt(seed)
    with torch.no_grad():
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight[EOS].fill_(0.15)
    return model


LONG_PROMPTS = [[1, 5, 6, 7, 3, 4, 8, 9, 5, 6, 7, 3, 4, 9], [1, 8], [1, 9, 3], [1], [1, 4, 4, 4, 4, 4, 4]]
CASES = [
    # (model seed, prompts, sampling options): temperatures != 1, top-k, greedy, EOS-prone weights
    (0, PROMPTS, dict(temperature=0.7)),
    *[(seed, LONG_PROMPTS, dict(temperature=1.3)) for seed in range(2)],
    (0, LONG_PROMPTS, dict(temperature=1.0)),
    (1, LONG_PROMPTS, dict(temperature=0.8, top_k=3)),
    (2, PROMPTS, dict(top_k=1)),
    (0, LONG_PROMPTS, dict(greedy=True, temperature=0.5)),
    *[("eos", LONG_PROMPTS, dict(temperature=t)) for t in (0.6, 1.7)],
    ("eos", PROMPTS, dict(temperature=0.9, top_k=4)),
    ("eos", LONG_PROMPTS, dict(greedy=True)),
]


@pytest.mark.parametrize("model_seed,prompts,options", CASES)
@pytest.mark.parametrize("sample_seed", [0, 7])
def test_same_tokens_and_logprobs_as_the_reference_sampler(model_seed, prompts, options, sample_seed):
    model = eos_prone_gpt(sample_seed) if model_seed == "eos" else tiny_gpt(model_seed)
    ids, mask = left_pad(prompts, PAD)
    N = 24 - max(len(p) for p in prompts)  # up to the context: the decode crosses 16-key blocks
    kw = dict(max_new_tokens=N, eos_id=EOS, pad_id=PAD, **options)
    ref = reference_generate(model, ids, mask, generator=torch.Generator().manual_seed(sample_seed), **kw)
    out = generate(model, ids, mask, generator=torch.Generator().manual_seed(sample_seed), **kw)
    assert out.completion_ids.tolist() == ref.completion_ids.tolist()
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=FORWARD_ATOL, rtol=0)
    assert out.lengths.tolist() == ref.lengths.tolist() and out.finished.tolist() == ref.finished.tolist()
    assert out.completion_mask.tolist() == ref.completion_mask.tolist()
    assert out.completion_ids.dtype == torch.long and out.logprobs.dtype == torch.float32


def test_early_stop_when_every_row_ended_and_reference_agreement_there():
    model = eos_prone_gpt(0)
    ids, mask = left_pad(LONG_PROMPTS, PAD)
    kw = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.5)
    ref = reference_generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    out = generate(model, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert bool(ref.finished.all()) and int(ref.lengths.max()) < 10  # every row ended early...
    assert len(calls) < 10  # ...so the loop stopped before the last step
    assert out.completion_ids.tolist() == ref.completion_ids.tolist()
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=FORWARD_ATOL, rtol=0)


def test_a_model_without_keys_matches_the_reference_too():
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=11, n_embd=8)).eval()
    ids, mask = left_pad(LONG_PROMPTS, PAD)
    kw = dict(max_new_tokens=9, eos_id=EOS, pad_id=PAD, temperature=0.8)
    ref = reference_generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    out = generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    assert out.completion_ids.tolist() == ref.completion_ids.tolist()
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=FORWARD_ATOL, rtol=0)


def test_generation_in_passes_equals_one_call_per_pass():
    model = tiny_gpt()
    prompts = PROMPTS + [[1, 4, 4, 4, 5], [1, 3]]
    ids, mask = left_pad(prompts, PAD)
    g = torch.Generator().manual_seed(3)
    out = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.9, generator=g, batch_size=2)
    # the same passes by hand, one generator carried through them: same tokens, log-probs, lengths, EOS flags
    g = torch.Generator().manual_seed(3)
    parts = [generate(model, ids[s : s + 2], mask[s : s + 2], max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.9, generator=g)
             for s in (0, 2, 4)]
    for field in Generation.__dataclass_fields__:
        assert torch.equal(getattr(out, field), torch.cat([getattr(p, field) for p in parts])), field
    assert out.completion_ids.shape == (5, 6)
    # greedy decoding does not depend on how rows are split
    whole = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True)
    split = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True, batch_size=3)
    assert torch.equal(whole.completion_ids, split.completion_ids)
    torch.testing.assert_close(whole.logprobs, split.logprobs, atol=FORWARD_ATOL, rtol=0)


@pytest.mark.parametrize("options", [{"temperature": 0.8}, {"greedy": True}, {"temperature": 1.3, "top_k": 3}])
def test_k_samples_per_prompt_equal_generating_the_repeated_prompts(options):
    model = eos_prone_gpt(2)
    prompts = PROMPTS + [[1, 4, 4, 4, 5]]
    ids, mask = left_pad(prompts, PAD)
    K = 3
    forwards = []
    model.register_forward_hook(lambda mod, args, out: forwards.append(args[0].shape))
    shared = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5),
                      samples_per_prompt=K, **options)
    assert forwards[0] == (4, 5) and all(s == (12, 1) for s in forwards[1:])  # the prompts once, then K rows each
    repeated = generate(model, ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), max_new_tokens=6, eos_id=EOS,
                        pad_id=PAD, generator=torch.Generator().manual_seed(5), **options)
    assert torch.equal(shared.completion_ids, repeated.completion_ids) and torch.equal(shared.finished, repeated.finished)
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, atol=FORWARD_ATOL, rtol=0)
    # in passes of whole groups: 5 rows a pass hold one prompt's 3 samples
    passes = generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5),
                      samples_per_prompt=K, batch_size=5, **options)
    assert passes.completion_ids.shape == (12, 6)
    if options.get("greedy"):
        assert torch.equal(passes.completion_ids, shared.completion_ids)


def test_k_samples_per_prompt_from_the_bigram_too():
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=11, n_embd=8)).eval()
    ids, mask = left_pad(PROMPTS, PAD)
    shared = generate(model, ids, mask, max_new_tokens=4, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(1), samples_per_prompt=2)
    repeated = generate(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), max_new_tokens=4, eos_id=EOS, pad_id=PAD,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(shared.completion_ids, repeated.completion_ids)


@pytest.mark.parametrize("options", [{"temperature": 0.8}, {"greedy": True}, {"temperature": 1.3, "top_k": 3}])
def test_the_captured_decode_step_gives_the_eager_tokens_and_logprobs(options, traced_step):
    model = tiny_gpt(2) if options.get("greedy") else eos_prone_gpt(2)  # greedy on the EOS-prone model ends at once
    ids, mask = left_pad(PROMPTS + [[1, 4, 4, 4, 5]], PAD)  # left padding of 0 to 3 tokens

    def run(**compile_option):
        return generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5),
                        samples_per_prompt=3, **options, **compile_option)

    eager, captured, again = run(), run(compile=True), run(compile=True)
    assert len(set(eager.lengths.tolist())) > 1  # rows end at different steps (or run the whole length)
    for field in ("completion_ids", "completion_mask", "lengths", "finished"):
        assert torch.equal(getattr(captured, field), getattr(eager, field)), field
    torch.testing.assert_close(captured.logprobs, eager.logprobs, atol=FORWARD_ATOL, rtol=0)
    assert torch.equal(again.completion_ids, captured.completion_ids)  # the reused cache carries nothing over
    assert traced_step["stats"]["unique_graphs"] == 1  # one graph for every step of both calls: no shape or value changes


def test_the_static_cache_is_reused_per_model_and_shape(traced_step, monkeypatch):
    import rlhf_lightning.generation as generation

    monkeypatch.setattr(generation, "_MAX_STATIC_CACHES", 2)
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS, PAD)  # P = 4
    for n in (6, 7, 20, 7, 2):  # P + N = 10 and 11 share a buffer of 16; 24 takes one of 32; 6 one of 16 for 2 rows
        generate(model, ids[: 2 if n == 2 else 3], mask[: 2 if n == 2 else 3], max_new_tokens=n, eos_id=-1, pad_id=PAD, greedy=True, compile=True)
    # the two most recently used shapes are kept, in order of use: (3, 32) was evicted when (2, 16) came
    assert [key[:2] for key in generation._STATIC_CACHES[model]] == [(3, 16), (2, 16)]
    assert traced_step["stats"]["unique_graphs"] == 3  # one graph a shape, never one dynamic in the shape


def test_the_captured_step_under_bf16_autocast(traced_step):
    import rlhf_lightning.generation as generation

    model = eos_prone_gpt(2)
    ids, mask = left_pad(PROMPTS, PAD)

    def run(**compile_option):
        return generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.9,
                        generator=torch.Generator().manual_seed(1), samples_per_prompt=2, **compile_option)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # PPO's rollouts under bf16-mixed: bf16 keys, float32 buffers
        eager, captured = run(), run(compile=True)
    assert torch.equal(captured.completion_ids, eager.completion_ids)
    torch.testing.assert_close(captured.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    outside = run(compile=True)  # the final evaluation runs outside autocast: a cache of its own
    assert torch.equal(outside.completion_ids, run().completion_ids)
    assert sorted(key[-1] is None for key in generation._STATIC_CACHES[model]) == [False, True]


def test_compile_on_cpu_warns_once_and_decodes_eagerly(monkeypatch):
    import rlhf_lightning.generation as generation

    monkeypatch.setattr(generation, "_WARNED", set())
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS, PAD)
    kwargs = dict(max_new_tokens=5, eos_id=EOS, pad_id=PAD, temperature=0.9)
    eager = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    with pytest.warns(UserWarning, match="on cpu it decodes eagerly"):
        asked = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), compile=True, **kwargs)
    assert torch.equal(asked.completion_ids, eager.completion_ids) and torch.equal(asked.logprobs, eager.logprobs)
    assert generation._STATIC_CACHES.get(model) is None  # the eager path, not the static one
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type
        generate(model, ids, mask, compile=True, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [{"temperature": 0.8}, {"greedy": True}])
def test_the_decode_step_captured_with_cuda_graphs(options):
    model = eos_prone_gpt(2).cuda()
    ids, mask = (t.cuda() for t in left_pad(PROMPTS + [[1, 4, 4, 4, 5]], PAD))

    def run(**compile_option):
        return generate(model, ids, mask, max_new_tokens=6, eos_id=EOS, pad_id=PAD, samples_per_prompt=3,
                        generator=torch.Generator(device="cuda").manual_seed(5), **options, **compile_option)

    from torch._dynamo.utils import counters

    counters.clear()
    eager, captured, again = run(), run(compile=True), run(compile=True)
    assert torch.equal(captured.completion_ids, eager.completion_ids) and torch.equal(again.completion_ids, eager.completion_ids)
    torch.testing.assert_close(captured.logprobs, eager.logprobs, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["inductor"]["cudagraph_skips"]  # compiled and captured


@pytest.mark.parametrize("options", [{"temperature": 0.8}, {"greedy": True}])
def test_non_finite_logits_stop_generation(options):
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")  # every row's logit of id 3 is NaN
    ids, mask = left_pad(PROMPTS, PAD)
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        generate(model, ids, mask, max_new_tokens=3, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0), **options)
