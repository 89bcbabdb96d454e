"""Models: one interface, padding-independent results, KV cache equal to a full forward, reload identity."""

import pytest
import torch

from rlhf_lightning.models import GPT, GPTConfig, build_model, positions_from_mask
from tolerance import EPS32, FORWARD_ATOL, grad_atol


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_positions_from_mask_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_does_not_change_a_rows_logits():
    model = tiny_gpt().eval()
    ids = torch.tensor([[3, 4, 5]])
    alone = model(ids, torch.ones(1, 3, dtype=torch.bool))  # (1, 3, V)
    padded = torch.tensor([[0, 0, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    with_pad = model(padded, mask)[:, 2:]
    torch.testing.assert_close(with_pad, alone, atol=FORWARD_ATOL, rtol=0)


def test_kv_cache_forward_equals_full_forward():
    model = tiny_gpt().eval()
    ids = torch.tensor([[0, 3, 4, 5, 6], [7, 8, 9, 1, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    full = model(ids, mask)  # (2, 5, V)
    cache = model.new_cache(2, 5)
    first = model(ids[:, :3], mask[:, :3], position_ids=positions_from_mask(mask[:, :3]), cache=cache)
    pos = positions_from_mask(mask)
    steps = [model(ids[:, t : t + 1], mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache) for t in (3, 4)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1)[:, 1:], full[:, 1:], atol=FORWARD_ATOL, rtol=0)
    torch.testing.assert_close(first[1], full[1, :3], atol=FORWARD_ATOL, rtol=0)


def test_too_long_sequence_is_a_clear_error():
    model = tiny_gpt()
    ids = torch.zeros(1, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size=16"):
        model(ids, torch.ones_like(ids, dtype=torch.bool))


def test_build_model_from_plain_dict_and_unknown_type():
    bigram = build_model({"type": "bigram", "vocab_size": 7, "n_embd": 4})
    assert bigram(torch.tensor([[1, 2, 3]])).shape == (1, 3, 7)
    with pytest.raises(ValueError, match="lstm") as err:
        build_model({"type": "lstm"})
    assert "gpt" in str(err.value)


def test_one_step_mask_equals_the_general_mask():
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # a padded last key still sees itself
    fast = GPT._attention_mask(mask, 2, 1, 4, mask.device)  # (B, 1, 1, S)
    q_pos, k_pos = torch.tensor([[4]]), torch.arange(5)[None, :]
    general = ((k_pos <= q_pos) & mask[:, None, None, :]) | (k_pos == q_pos)
    assert fast.tolist() == general.tolist()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_blocks():
    from rlhf_lightning.models import enable_gradient_checkpointing

    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16))
    checkpointed = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16))
    checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    ids = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row
    calls = []
    checkpointed.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    losses = [m.train()(ids, mask).logsumexp(-1)[mask].mean() for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert len(calls) == 2  # the forward, then its recomputation in backward
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(ids, mask)
    assert len(calls) == 1  # no checkpointing outside training



def test_a_policy_read_from_a_checkpoint_holds_the_stored_tensors(sft_ckpt):
    from rlhf_lightning.checkpoints import read_checkpoint, submodule_state
    from rlhf_lightning.policy import load_policy

    model, _, _ = load_policy(str(sft_ckpt))
    stored = {k: v.clone() for k, v in submodule_state(read_checkpoint(str(sft_ckpt), ("sft",), "ckpt"), "model").items()}
    params = dict(model.named_parameters())
    assert params.keys() == stored.keys()
    for name, tensor in stored.items():  # built on the meta device, then given the checkpoint's tensors: none left on meta
        assert params[name].device.type == "cpu" and params[name].requires_grad and torch.equal(params[name], tensor), name
    # training a weight in place (the tensor may map the checkpoint file) leaves the file as it was
    with torch.no_grad():
        params["lm_head.weight"].add_(1.0)
    again = submodule_state(read_checkpoint(str(sft_ckpt), ("sft",), "ckpt"), "model")
    assert torch.equal(again["lm_head.weight"], stored["lm_head.weight"])
    assert not torch.equal(params["lm_head.weight"], stored["lm_head.weight"])


def _adamw_beside_the_loop(steps: int, **options) -> tuple[torch.optim.AdamW, list[GPT]]:
    """`optim.adamw(**options)` on one GPT and torch's per-parameter AdamW (the same groups and settings) on an
    identical copy, both trained `steps` steps on the same batch: (ours, [our model, the loop's model])."""
    from rlhf_lightning.optim import adamw

    torch.manual_seed(0)
    models = [GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = adamw(models[0], 1e-2, 0.1, **options)
    loop = torch.optim.AdamW(
        [{"params": [p for p in models[1].parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in models[1].parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), foreach=False,
    )
    ids = torch.randint(0, 11, (4, 8))
    for _ in range(steps):
        for model, opt in zip(models, (ours, loop)):
            opt.zero_grad()
            model(ids).logsumexp(-1).mean().backward()
            opt.step()
    return ours, models


def test_adamw_is_fused_and_steps_like_the_reference_implementation():
    # one step (the tolerance policy's rule 3): both start from bitwise the same gradients, and the fused kernel
    # evaluates the same update in another order; weights of magnitude <= ~1 then differ by a few roundings
    ours, models = _adamw_beside_the_loop(1)
    assert all(group["fused"] for group in ours.param_groups)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=16 * EPS32, rtol=0)  # the step itself moves a weight by about lr = 1e-2


def test_adamw_unfused_is_bitwise_the_per_parameter_loop():
    ours, models = _adamw_beside_the_loop(5, fused=False)
    assert all(group["foreach"] and not group["fused"] for group in ours.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


@pytest.mark.parametrize("kind", ["gpt", "bigram"])
def test_completion_logprobs_reach_the_lm_head_for_the_completion_positions_only(kind):
    from rlhf_lightning.scoring import token_logprobs

    torch.manual_seed(0)
    config = {"type": kind, "vocab_size": 11, **({"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16} if kind == "gpt" else {})}
    model = build_model(config)
    ids = torch.randint(0, 11, (3, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # a left-padded prompt
    head = model.lm_head if kind == "gpt" else model.head
    widths = []
    head.register_forward_hook(lambda mod, args, out: widths.append(out.size(1)))
    full = token_logprobs(model, ids, mask, temperature=0.7)  # (B, T): every position
    part, logits = token_logprobs(model, ids, mask, temperature=0.7, completion_len=4, return_logits=True)
    assert widths == [9, 5]  # the completion's 4 positions and the last
    assert logits.shape == (3, 4, 11)
    torch.testing.assert_close(part, full[:, -4:], atol=FORWARD_ATOL, rtol=0)
    # the same gradients as through the full logits
    grads = []
    for keep in (False, True):
        model.zero_grad()
        lp = token_logprobs(model, ids, mask, 0.7, completion_len=4) if keep else token_logprobs(model, ids, mask, 0.7)[:, -4:]
        lp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=grad_atol(grads[0], terms=3 * 9), rtol=0)


def test_a_checkpoint_stored_in_bf16_loads_in_the_models_precision(sft_ckpt, tmp_path):
    from rlhf_lightning.policy import load_policy

    data = torch.load(sft_ckpt, weights_only=True)
    data["state_dict"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in data["state_dict"].items()}
    path = tmp_path / "bf16.ckpt"
    torch.save(data, path)
    model, _, _ = load_policy(str(path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference, _, _ = load_policy(str(sft_ckpt))
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b.to(torch.bfloat16).float())
