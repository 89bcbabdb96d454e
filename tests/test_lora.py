"""LoRA adapters on a trained base: only adapters train, the reference is the base with adapters off, checkpoints
hold the adapters and their base's hash, exports (merged and PEFT's format) give the same logits, bad input."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUIET, run_cli
from tolerance import FORWARD_ATOL
from rlhf_lightning.checkpoints import CheckpointError
from rlhf_lightning.cli import main
from rlhf_lightning.lora import BaseOfAdapters, add_adapters, adapters_disabled, lora_settings, merged
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.optim import adamw
from rlhf_lightning.policy import load_policy

peft = pytest.importorskip("peft", reason="needs the [peft] extra")

TINY = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}


def ids(vocab: int, rows: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (the adapters start as a no-op): give every adapter weight a value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny full SFT checkpoint to put adapters on (a few steps: any trained weights will do)."""
    cwd = tmp_path_factory.mktemp("lora_base")
    run_cli(["fit", "--config", "toy/sft", *QUIET, "--trainer.logger=false", "--trainer.max_steps=3",
             "--data.init_args.max_val_prompts=8", "--model.init_args.model=" + str(TINY).replace("'", "")], cwd)
    return cwd / "checkpoints" / "toy" / "sft.ckpt"


@pytest.fixture(scope="module")
def lora_sft(base, tmp_path_factory) -> Path:
    """LoRA SFT on `base` from the command line: the checkpoint of adapters."""
    cwd = tmp_path_factory.mktemp("lora_sft")
    run_cli(["fit", "--config", "toy/sft", *QUIET, "--trainer.logger=false", "--trainer.max_steps=4",
             "--data.init_args.max_val_prompts=8", "--model.init_args.lora={r: 4}", f"--model.init_args.base_ckpt={base}"], cwd)
    return cwd / "checkpoints" / "toy" / "sft.ckpt"


def test_adapters_off_is_the_base_and_only_adapters_train(base):
    model, _, _ = load_policy(str(base))
    x = ids(model.config.vocab_size)
    expected = model(x, None)
    add_adapters(model, lora_settings({"r": 4}))
    randomize_adapters(model)
    assert not torch.allclose(model(x, None), expected, atol=1e-4)  # the adapters change the output
    with adapters_disabled(model):
        assert torch.equal(model(x, None), expected)
    assert torch.equal(BaseOfAdapters(model)(x, None), expected)  # PPO's reference: no copy
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # still trainable after switching back on

    module = SFTModule(lora={"r": 4}, base_ckpt=str(base))
    optimizer = adamw(module.model, 1e-3, 0.1)  # what every stage's optimizer is built with
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert in_optimizer and all("lora_" in names[i] for i in in_optimizer)
    module.model(x, None).sum().backward()
    optimizer.step()
    with_grad = [n for n, p in module.model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {id(p) for p in optimizer.state} <= in_optimizer


def test_memory_line_counts_adapters_their_gradients_and_adam_state(base):
    from rlhf_lightning.callbacks import memory_estimate

    module = SFTModule(lora={"r": 4}, base_ckpt=str(base))
    # one layer, 16 wide, r = 4: qkv 4*16 + 48*4, proj 4*16 + 16*4, mlp.0 4*16 + 64*4, mlp.2 4*64 + 16*4
    trainable = (64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)
    line = memory_estimate(module)
    assert f"({trainable:,} trainable of" in line
    assert f"gradients {trainable * 4 / 1024:.1f} KB, optimizer state {trainable * 8 / 1024:.1f} KB, frozen models 0.0 B" in line


def test_adapter_checkpoint_round_trips_and_refuses_another_base(lora_sft, base, tmp_path):
    state = torch.load(lora_sft, weights_only=True)
    assert state["rlhf"]["lora"]["r"] == 4 and state["rlhf"]["base"]["path"] == str(base.resolve())
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])  # adapters only, no base copy
    model, _, meta = load_policy(str(lora_sft))
    adapters = {k[len("model."):]: v for k, v in state["state_dict"].items()}
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == adapters.keys() and all(torch.equal(loaded[k], adapters[k]) for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained: B moved off zero

    moved = tmp_path / "sft.ckpt"  # the same adapters, against a base that has changed since
    shutil.copy(lora_sft, moved)
    original = base.read_bytes()
    try:
        full = torch.load(base, weights_only=True)
        full["state_dict"]["model.wte.weight"] += 1.0
        torch.save(full, base)
        with pytest.raises(CheckpointError) as err:
            load_policy(str(moved))
    finally:
        base.write_bytes(original)
    message = str(err.value)
    assert str(base.resolve()) in message and state["rlhf"]["base"]["sha256"] in message and "nothing was loaded" in message


def test_merged_and_peft_exports_give_the_adapter_models_logits(lora_sft, base, tmp_path):
    model, _, _ = load_policy(str(lora_sft))
    x = ids(model.config.vocab_size)
    expected = model(x, None)
    assert main(["export", "--ckpt", str(lora_sft), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--ckpt", str(lora_sft), "--out", str(tmp_path / "peft"), "--adapters"]) == 0
    plain, _, _ = load_policy(str(tmp_path / "merged"))
    assert not any("lora_" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x, None), expected, atol=FORWARD_ATOL, rtol=0)
    again, _, _ = load_policy(str(tmp_path / "peft"))
    assert torch.equal(again(x, None), expected)
    # PEFT itself reads the folder onto the base
    from peft import PeftModel

    base_model, _, _ = load_policy(str(base))
    with_peft = PeftModel.from_pretrained(base_model, str(tmp_path / "peft"))
    torch.testing.assert_close(with_peft(x, None), expected, atol=FORWARD_ATOL, rtol=0)
    torch.testing.assert_close(merged(model)(x, None), expected, atol=FORWARD_ATOL, rtol=0)


def test_ppo_with_adapters_trains_them_on_the_base_and_ppo_continues_sft_adapters(base, lora_sft, tmp_path):
    # the judge, plus a penalty for a missing EOS: rewards that differ within a batch (a gradient) for any base
    args = ["fit", "--config", "toy/ppo", *QUIET, "--trainer.logger=false", "--trainer.max_steps=4",
            "--model.init_args.reward.source=judge", "--model.init_args.reward.missing_eos_penalty=1.0", "--model.init_args.eval.every=0",
            "--data.init_args.max_val_prompts=8", "--model.init_args.reference_dtype=bfloat16", "--model.init_args.eval.keep_best=false"]
    run_cli([*args, f"--model.init_args.policy_ckpt={base}", "--model.init_args.lora={r: 4}"], tmp_path)
    ppo = torch.load(tmp_path / "checkpoints" / "toy" / "ppo.ckpt", weights_only=True)
    assert ppo["rlhf"]["base"]["path"] == str(base.resolve()) and all("lora_" in k for k in ppo["state_dict"])
    trained, _, _ = load_policy(str(tmp_path / "checkpoints" / "toy" / "ppo.ckpt"))
    assert any(v.abs().sum() > 0 for k, v in trained.state_dict().items() if "lora_B" in k)

    (tmp_path / "continued").mkdir()
    run_cli([*args, f"--model.init_args.policy_ckpt={lora_sft}"], tmp_path / "continued")
    continued = torch.load(tmp_path / "continued" / "checkpoints" / "toy" / "ppo.ckpt", weights_only=True)
    sft = torch.load(lora_sft, weights_only=True)
    assert continued["rlhf"]["base"] == sft["rlhf"]["base"]  # the same base, the SFT adapters trained further
    assert continued["state_dict"].keys() == sft["state_dict"].keys()
    assert any(not torch.equal(continued["state_dict"][k], sft["state_dict"][k]) for k in sft["state_dict"])


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--model.init_args.lora={r: 4}"], ["adapters need a trained base", "base_ckpt"]),
    (["--model.init_args.lora={r: 4, target_modules: [attn.nope]}", "BASE"], ["'attn.nope' matches no module", "attn.qkv", "mlp.0"]),
    (["--model.init_args.lora={r: 0}", "BASE"], ["lora.r", ">= 1"]),
    (["--model.init_args.base_ckpt=BASE"], ["base_ckpt", "needs model.init_args.lora"]),
])
def test_bad_lora_options_give_one_line_and_exit_2(base, extra, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = [f"--model.init_args.base_ckpt={base}" if e == "BASE" else e.replace("BASE", str(base)) for e in extra]
    assert main(["fit", "--config", "toy/sft", "--trainer.max_steps=1", *extra]) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "checkpoints").exists()


def test_lora_without_peft_names_the_extra(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    assert main(["fit", "--config", "toy/sft", "--trainer.max_steps=1", "--model.init_args.lora={r: 4}", f"--model.init_args.base_ckpt={base}"]) == 2
    assert "pip install 'rlhf-lightning[peft]'" in one_error_line(capsys)


def test_adapter_checkpoint_with_a_changed_base_is_refused_by_eval(lora_sft, base, tmp_path, monkeypatch, capsys):
    original = base.read_bytes()
    try:
        base.write_bytes(original + b"\0")
        assert main(["eval", "--ckpt", str(lora_sft)]) == 2
    finally:
        base.write_bytes(original)
    line = one_error_line(capsys)
    assert str(base.resolve()) in line and "nothing was loaded" in line


def test_reward_model_lora_trains_adapters_and_the_head_and_reloads_on_its_checked_base(base, tmp_path):
    from rlhf_lightning.scoring import load_reward_model

    cli = run_cli(
        ["fit", "--config", "toy/reward", *QUIET, "--trainer.logger=false", "--trainer.max_steps=3",
         f"--model.init_args.sft_ckpt={base}", "--model.init_args.lora={r: 4}", f"--data.init_args.pairs.init_args.policy_ckpt={base}",
         "--data.init_args.pairs.init_args.samples_per_prompt=4", "--data.init_args.pairs.init_args.judge=random",
         "--data.init_args.pairs.init_args.max_train_prompts=64", "--data.init_args.pairs.init_args.max_val_prompts=16",
         "--data.init_args.batch_size=8"],
        tmp_path,
    )
    trained = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert {n for n in trained if "lora_" not in n} == {"head.weight", "head.bias", "lm_scale"}  # the LM head is the base's
    assert any("lora_" in n for n in trained)
    path = tmp_path / "checkpoints" / "toy" / "reward.ckpt"
    saved = torch.load(path, weights_only=True)
    assert {k[len("model."):] for k in saved["state_dict"]} == trained  # nothing of the frozen base
    assert saved["rlhf"]["base"] == {"kind": "checkpoint", "path": str(base.resolve()), "sha256": cli.model.sft_sha256}
    model, tokenizer, _ = load_reward_model(str(path))
    x = torch.tensor([tokenizer.encode_prompt("Q: 2+3=\nA:") + tokenizer.encode_completion("5")])
    mask, completion = torch.ones_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool)
    completion[:, -2:] = True
    torch.testing.assert_close(model(x, mask, completion), cli.model.model.eval()(x, mask, completion))
    original = base.read_bytes()
    try:
        full = torch.load(base, weights_only=True)
        full["state_dict"]["model.wte.weight"] += 1.0
        torch.save(full, base)
        with pytest.raises(CheckpointError, match="nothing was loaded"):
            load_reward_model(str(path))
    finally:
        base.write_bytes(original)


def test_reward_lora_without_a_trained_base_exits_2(tmp_path, capsys):
    code = main(["fit", "--config", "toy/reward", *QUIET, "--trainer.logger=false", "--model.init_args.sft_ckpt=null",
                 "--model.init_args.lora={r: 4}", "--data.init_args.pairs=JsonlPairs", "--data.init_args.pairs.train_file=x.jsonl"])
    assert code == 2
    assert "adapters need a trained base" in capsys.readouterr().err


def test_ppo_gradient_checkpointing_gives_the_same_update_gradients(base):
    from rlhf_lightning.data.prompts import PromptDataset, load_prompts
    from rlhf_lightning.modules.ppo import PPOModule

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = PPOModule(policy_ckpt=str(base), gradient_checkpointing=checkpointing, reward=dict(source="judge"), rollout=dict(samples_per_prompt=2, max_new_tokens=4))
        assert module.model.config.gradient_checkpointing == checkpointing and not module.reference.config.gradient_checkpointing
        data = PromptDataset(module.tokenizer, load_prompts("toy", "train", limit=4), module.data_max_length)
        rollout, _ = module.make_rollout(data.collate([data[i] for i in range(len(data))]))
        module.model.train()
        out, _, _ = module.minibatch_loss(rollout)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_a_lora_run_resumes_from_last(base, tmp_path):
    args = ["fit", "--config", "toy/sft", *QUIET, "--trainer.logger=false", "--data.init_args.max_val_prompts=8",
            "--model.init_args.lora={r: 4}", f"--model.init_args.base_ckpt={base}"]
    run_cli([*args, "--trainer.max_steps=3"], tmp_path)
    assert (tmp_path / "checkpoints" / "toy" / "sft" / "last.ckpt").is_file()
    cli = run_cli([*args, "--trainer.max_steps=5", "--ckpt_path=last"], tmp_path)
    assert cli.trainer.global_step == 5  # continued from step 3, not started over
    saved = torch.load(tmp_path / "checkpoints" / "toy" / "sft.ckpt", weights_only=True)
    assert saved["global_step"] == 5 and all("lora_" in k for k in saved["state_dict"])
