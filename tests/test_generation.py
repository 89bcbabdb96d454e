"""Batched KV-cache generation against full recomputation, one token per row per step, EOS, padding."""

import torch

from rlhf_lightning.padding import left_pad
from rlhf_lightning.generation import generate
from rlhf_lightning.losses import logprobs_from_logits
from rlhf_lightning.models import GPT, GPTConfig

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
        torch.testing.assert_close(out.logprobs[i, :n], recomputed, atol=1e-5, rtol=1e-5)
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
    torch.testing.assert_close(batch.logprobs[1], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def test_top_k_samples_only_the_k_likeliest_but_reports_full_softmax_logprobs():
    model = tiny_gpt()
    ids, mask = left_pad(PROMPTS, PAD)
    out = generate(model, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, top_k=1,
                   generator=torch.Generator().manual_seed(0))
    greedy = generate(model, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, greedy=True)
    assert out.completion_ids.tolist() == greedy.completion_ids.tolist()
    assert (out.logprobs < 0).all()  # not log(1): the full softmax, not the truncated one
