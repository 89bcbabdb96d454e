"""Hugging Face models: a tiny GPT-2 built from a config and saved locally (no download), through every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli
from tolerance import FORWARD_ATOL, RATIO_ATOL
from rlhf_lightning.padding import left_pad
from rlhf_lightning.generation import generate
from rlhf_lightning.losses import logprobs_from_logits
from rlhf_lightning.tasks.arithmetic import ALPHABET, format_prompt

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

EOS = "<|endoftext|>"
PROMPTS = [format_prompt(3, "+", 4), format_prompt(12, "-", 5), format_prompt(99, "+", 99)]


VOCAB = {EOS: 0, **{c: i + 1 for i, c in enumerate(sorted(set(ALPHABET)))}}


def save_char_tokenizer(folder: Path) -> None:
    """A character-level fast tokenizer whose BOS = EOS = PAD (as GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models

    core = Tokenizer(models.BPE(vocab=VOCAB, merges=[]))  # no merges: one token per character
    core.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=EOS).save_pretrained(folder)


def save_tiny_gpt2(folder: Path) -> Path:
    """A 2-layer, 32-dim GPT-2 and the character-level tokenizer."""
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="module")
def hf_sft(gpt2_dir, tmp_path_factory) -> Path:
    """Working directory holding checkpoints/hf/sft.ckpt from a few SFT steps through the CLI."""
    cwd = tmp_path_factory.mktemp("hf_run")
    run_cli(
        [
            "fit", "--config", str(CONFIGS / "hf" / "sft.yaml"), *QUIET, "--trainer.logger=false",
            f"--model.init_args.model={{type: hf, path: {gpt2_dir}}}", "--model.init_args.optim.lr=0.003",
            "--trainer.limit_train_batches=4", "--data.init_args.batch_size=16", "--data.init_args.max_val_prompts=16",
        ],
        cwd,
    )
    return cwd


def test_tokenizer_keeps_the_project_contract(gpt2_dir):
    from rlhf_lightning.tokenizer import load_tokenizer

    tok = load_tokenizer({"type": "hf", "path": str(gpt2_dir)})
    assert tok.pad_id == tok.bos_id == tok.eos_id == 0  # GPT-2: one special token for all three
    ids = tok.encode_prompt(PROMPTS[0])
    assert ids[0] == tok.bos_id and len(ids) == 1 + len(PROMPTS[0])
    assert tok.encode_completion("7") == tok.encode("7") + [tok.eos_id]
    assert tok.decode(ids) == PROMPTS[0]  # the leading BOS is skipped even though it is the EOS id
    assert tok.decode(tok.encode("12") + [tok.eos_id] + tok.encode("34")) == "12"  # stops at EOS
    assert load_tokenizer(tok.to_dict()) == tok and tok.to_dict()["path"] == str(gpt2_dir.resolve())


def test_generation_matches_a_full_recompute_for_left_padded_rows(gpt2_dir):
    from rlhf_lightning.tokenizer.hf import HFTokenizer
    from rlhf_lightning.models import build_model

    model, tok = build_model({"type": "hf", "path": str(gpt2_dir)}).eval(), HFTokenizer(str(gpt2_dir))
    assert model.config.block_size == 64
    ids, mask = left_pad([tok.encode_prompt(p) for p in PROMPTS], tok.pad_id)  # (3, P), different lengths
    gen = generate(model, ids, mask, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.7,
                   generator=torch.Generator().manual_seed(0))
    # teacher-forced recompute of the sampled tokens: one forward over prompt ++ completion
    logits = model(torch.cat([ids, gen.completion_ids], 1), torch.cat([mask, gen.completion_mask], 1))
    recomputed = logprobs_from_logits(logits[:, ids.size(1) - 1 : -1], gen.completion_ids, 0.7)
    torch.testing.assert_close(recomputed[gen.completion_mask], gen.logprobs[gen.completion_mask], atol=FORWARD_ATOL, rtol=0)
    # the update's path: logits of the completion positions only (transformers' logits_to_keep), same log-probs
    from rlhf_lightning.scoring import token_logprobs

    kept = token_logprobs(model, torch.cat([ids, gen.completion_ids], 1), torch.cat([mask, gen.completion_mask], 1), 0.7, completion_len=8)
    assert model(ids, mask, logits_to_keep=3).shape == (3, 3, logits.size(-1))
    torch.testing.assert_close(kept[gen.completion_mask], recomputed[gen.completion_mask], atol=FORWARD_ATOL, rtol=0)
    # K samples per prompt from one prompt forward (the cache's rows repeated): as generating the repeated prompts
    shared = generate(model, ids, mask, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.7,
                      generator=torch.Generator().manual_seed(0), samples_per_prompt=2)
    repeated = generate(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), max_new_tokens=8, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared.completion_ids, repeated.completion_ids)
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, atol=FORWARD_ATOL, rtol=0)
    # a row's greedy result does not depend on the other rows' padding
    batched = generate(model, ids, mask, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
    for i, prompt in enumerate(PROMPTS):
        alone = torch.tensor([tok.encode_prompt(prompt)])
        single = generate(model, alone, torch.ones_like(alone, dtype=torch.bool), max_new_tokens=8,
                          eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
        assert single.completion_ids[0].tolist() == batched.completion_ids[i].tolist()
        torch.testing.assert_close(single.logprobs[0], batched.logprobs[i], atol=FORWARD_ATOL, rtol=0)


def test_sft_checkpoint_reloads_with_identical_logits(gpt2_dir, hf_sft):
    from rlhf_lightning.models import build_model
    from rlhf_lightning.policy import load_policy

    model, tok, meta = load_policy(str(hf_sft / "checkpoints" / "hf" / "sft.ckpt"))
    assert meta["model"]["type"] == "hf" and meta["tokenizer"]["type"] == "hf"
    pretrained = build_model({"type": "hf", "path": str(gpt2_dir)}).eval()
    ids = torch.tensor([tok.encode_prompt(PROMPTS[1]) + tok.encode_completion("7")])
    trained = model.eval()(ids)
    assert not torch.allclose(trained, pretrained(ids))  # SFT changed the weights...
    again, _, _ = load_policy(str(hf_sft / "checkpoints" / "hf" / "sft.ckpt"))
    torch.testing.assert_close(again.eval()(ids), trained, atol=0, rtol=0)  # ...and the checkpoint holds them


def test_export_of_a_policy_with_tied_embeddings_reads_back_identical(hf_sft, tmp_path):
    from rlhf_lightning.export import export_policy
    from rlhf_lightning.policy import load_policy

    ckpt = str(hf_sft / "checkpoints" / "hf" / "sft.ckpt")
    model, tok, _ = load_policy(ckpt)
    lm = model.lm
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()  # GPT-2 ties its head to the embedding
    exported, _, _ = load_policy(str(export_policy(ckpt, str(tmp_path / "export"))))
    ids = torch.tensor([tok.encode_prompt(PROMPTS[1]) + tok.encode_completion("7")])
    torch.testing.assert_close(exported.eval()(ids), model.eval()(ids), atol=0, rtol=0)
    assert exported.lm.lm_head.weight.data_ptr() == exported.lm.transformer.wte.weight.data_ptr()  # still one tensor


def write_pairs(path: Path, items: list[tuple[int, int]]) -> str:
    lines = [{"prompt": format_prompt(a, "+", b), "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in items]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_reward_fit_on_an_hf_backbone(gpt2_dir, hf_sft):
    from rlhf_lightning.scoring import load_reward_model

    train = write_pairs(hf_sft / "prefs_train.jsonl", [(a, b) for a in range(8) for b in range(4)])
    val = write_pairs(hf_sft / "prefs_val.jsonl", [(a, 9) for a in range(8)])
    run_cli(
        [
            "fit", "--config", str(CONFIGS / "hf" / "reward.yaml"), *QUIET, "--trainer.logger=false",
            f"--model.init_args.model={{type: hf, path: {gpt2_dir}}}", "--data.init_args.pairs=JsonlPairs",
            f"--data.init_args.pairs.train_file={train}", f"--data.init_args.pairs.val_file={val}", "--data.init_args.batch_size=8", "--trainer.max_epochs=1",
        ],
        hf_sft,
    )
    model, tok, meta = load_reward_model(str(hf_sft / "checkpoints" / "hf" / "reward.ckpt"))
    assert meta["model"]["type"] == "hf" and tok.to_dict()["type"] == "hf"
    pretrained = transformers.AutoModel.from_pretrained(str(gpt2_dir), local_files_only=True)
    moved = model.backbone.encoder.state_dict()["h.0.attn.c_attn.weight"] - pretrained.state_dict()["h.0.attn.c_attn.weight"]
    assert moved.abs().max() > 0  # the backbone trained (4 steps of Bradley-Terry)
    # a score is read at the last real token: right padding after it changes nothing
    ids = tok.encode_prompt(PROMPTS[0]) + tok.encode_completion("7")
    padded = torch.tensor([ids + [tok.pad_id] * 3])
    mask = torch.tensor([[True] * len(ids) + [False] * 3])
    torch.testing.assert_close(model(padded, mask), model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool)))


def test_ppo_two_rollouts_with_the_judge(hf_sft):
    from rlhf_lightning.policy import load_policy

    cli = run_cli(
        [
            "fit", "--config", str(CONFIGS / "hf" / "ppo.yaml"), *QUIET, "--trainer.logger=false",
            "--model.init_args.reward.source=judge", "--model.init_args.reward.ckpt=null", "--model.init_args.rollout.temperature=0.7",
            "--trainer.limit_train_batches=2", "--data.init_args.batch_size=4", "--data.init_args.max_val_prompts=8",
        ],
        hf_sft,
    )
    module = cli.model
    assert abs(module.last_update["first_ratio_error"]) < RATIO_ATOL  # generation's log-probs = the update's, at T=0.7
    assert not any(p.requires_grad for p in module.reference.parameters())  # frozen, no optimizer state
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in module.reference.parameters())
    sft, _, _ = load_policy(str(hf_sft / "checkpoints" / "hf" / "sft.ckpt"))
    ppo, tok, meta = load_policy(str(hf_sft / "checkpoints" / "hf" / "ppo.ckpt"))
    assert meta["stage"] == "ppo" and meta["tokenizer"]["type"] == "hf"
    ids = torch.tensor([tok.encode_prompt(PROMPTS[0])])
    assert not torch.equal(ppo.eval()(ids), sft.eval()(ids))  # 2 rollouts x 2 epochs x 2 minibatches of updates


def test_lora_configs_train_adapters_on_the_hf_folder_and_on_the_sft_policy(gpt2_dir, hf_sft):
    from rlhf_lightning.policy import load_policy

    pytest.importorskip("peft")
    hf = f"--model.init_args.model={{type: hf, path: {gpt2_dir}}}"
    sft = run_cli(
        ["fit", "--config", str(CONFIGS / "hf" / "sft_lora.yaml"), *QUIET, "--trainer.logger=false", hf,
         "--trainer.limit_train_batches=2", "--data.init_args.batch_size=8", "--data.init_args.max_val_prompts=8"],
        hf_sft,
    )
    path = hf_sft / "checkpoints" / "hf" / "sft_lora.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["rlhf"]["base"]["kind"] == "hf" and saved["rlhf"]["base"]["path"] == str(gpt2_dir.resolve())
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # adapters only
    model, tok, _ = load_policy(str(path))
    ids = torch.tensor([tok.encode_prompt(PROMPTS[0])])
    torch.testing.assert_close(model.eval()(ids), sft.model.model.eval()(ids))
    ppo = run_cli(
        ["fit", "--config", str(CONFIGS / "hf" / "ppo_lora.yaml"), *QUIET, "--trainer.logger=false",
         "--model.init_args.reward.source=judge", "--model.init_args.reward.ckpt=null", "--trainer.limit_train_batches=1",
         "--data.init_args.batch_size=4", "--data.init_args.max_val_prompts=8", "--model.init_args.rollout.micro_batch_size=4",
         "--model.init_args.rollout.generation_batch_size=8"],
        hf_sft,
    )  # the config as shipped: new adapters on checkpoints/hf/sft.ckpt (16 rows: minibatches of 8 in 2 micro-batches)
    trained = {n for n, p in ppo.model.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert not list(ppo.model.reference.parameters())  # the reference is the policy with adapters off: no copy


def test_missing_transformers_names_the_extra(monkeypatch, gpt2_dir):
    import sys

    from rlhf_lightning.models import build_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rlhf-lightning\[hf\]'"):
        build_model({"type": "hf", "path": str(gpt2_dir)})


def test_static_cache_gives_the_dynamic_caches_tokens_and_its_step_traces_whole(gpt2_dir, traced_step):
    from rlhf_lightning.models import build_model
    from rlhf_lightning.tokenizer.hf import HFTokenizer

    static = build_model({"type": "hf", "path": str(gpt2_dir)}).eval()  # static_cache: true, the default
    dynamic = build_model({"type": "hf", "path": str(gpt2_dir), "static_cache": False}).eval()
    assert type(static.new_cache(2, 8).inner).__name__ == "StaticCache" and type(dynamic.new_cache(2, 8).inner).__name__ == "DynamicCache"
    tok = HFTokenizer(str(gpt2_dir))
    ids, mask = left_pad([tok.encode_prompt(p) for p in PROMPTS], tok.pad_id)

    def run(model, **compile_option):
        return generate(model, ids, mask, max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.7,
                        generator=torch.Generator().manual_seed(0), samples_per_prompt=2, **compile_option)

    reference = run(dynamic)
    for out in (run(static), run(static, compile=True), run(static, compile=True)):  # eager; the captured step's path, twice
        assert torch.equal(out.completion_ids, reference.completion_ids)
        torch.testing.assert_close(out.logprobs, reference.logprobs, atol=FORWARD_ATOL, rtol=0)
    assert traced_step["stats"]["unique_graphs"] == 1  # transformers' forward on the static cache, one graph for every step
    with pytest.raises(ValueError, match="compile: true.*static_cache: true"):
        run(dynamic, compile=True)
    # transformers' static layers take the dtype of their first keys: under bf16 autocast, then without, two caches
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = run(static, compile=True)
    assert torch.equal(run(static, compile=True).completion_ids, reference.completion_ids) and in_bf16.completion_ids.shape == (6, 8)


def test_a_sliding_window_cache_is_decoded_eagerly_with_a_warning(tmp_path, monkeypatch):
    import rlhf_lightning.generation as generation
    from rlhf_lightning.models import build_model

    folder = tmp_path / "mistral"  # sliding-window static layers count positions in a Python int: no single graph
    config = transformers.MistralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, sliding_window=8, max_position_embeddings=64, vocab_size=len(VOCAB))
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    model = build_model({"type": "hf", "path": str(folder)}).eval()
    assert "mistral" in model.capture_refusal and "StaticSlidingWindowLayer" in model.capture_refusal
    monkeypatch.setattr(generation, "_WARNED", set())
    ids = torch.tensor([[0, 3, 4], [0, 5, 6]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with pytest.warns(UserWarning, match="cannot capture mistral's decode step .* decodes eagerly"):
        asked = generate(model, ids, mask, max_new_tokens=4, eos_id=-1, pad_id=0, greedy=True, compile=True)
    assert torch.equal(asked.completion_ids, generate(model, ids, mask, max_new_tokens=4, eos_id=-1, pad_id=0, greedy=True).completion_ids)
    assert generation._STATIC_CACHES.get(model) is None


def test_an_architecture_without_a_static_cache_names_the_option(tmp_path, monkeypatch, capsys):
    from rlhf_lightning.cli import main
    from rlhf_lightning.models import build_model

    neo = tmp_path / "neo"  # GPT-Neo: transformers does not mark it as working on a preallocated cache
    config = transformers.GPTNeoConfig(num_layers=1, attention_types=[[["global"], 1]], hidden_size=16, num_heads=2,
                                       max_position_embeddings=64, vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0)
    transformers.GPTNeoForCausalLM(config).save_pretrained(neo)
    save_char_tokenizer(neo)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "hf" / "sft.yaml"), *QUIET, f"--model.init_args.model={{type: hf, path: {neo}}}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf: error:")]
    assert code == 2 and len(lines) == 1, lines
    assert "'gpt_neo'" in lines[0] and "static_cache: false" in lines[0] and str(neo) in lines[0], lines[0]
    assert not (tmp_path / "checkpoints").exists()
    model = build_model({"type": "hf", "path": str(neo), "static_cache": False}).eval()  # the way out it names
    ids = torch.tensor([[0, 3, 4]])
    out = generate(model, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=4, eos_id=-1, pad_id=0, greedy=True)
    assert out.completion_ids.shape == (1, 4)


def test_dpo_on_the_hf_folder_with_lora_has_the_adapters_off_reference_and_round_trips_its_adapters(gpt2_dir, tmp_path):
    from rlhf_lightning.export import export_policy
    from rlhf_lightning.lora import BaseOfAdapters
    from rlhf_lightning.models import build_model
    from rlhf_lightning.policy import load_policy

    pytest.importorskip("peft")
    train = write_pairs(tmp_path / "train.jsonl", [(2, 3), (4, 1), (5, 2), (1, 1), (3, 3), (6, 2), (2, 2), (4, 4)])
    val = write_pairs(tmp_path / "val.jsonl", [(1, 2), (3, 1)])
    jsonl = ["--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={train}", f"--data.init_args.pairs.val_file={val}",
             "--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.logger=false",
             "--model.init_args.eval.max_val_prompts=8", "--model.init_args.optim.lr=0.01", "--model.init_args.optim.warmup_steps=0"]
    cli = run_cli(["fit", "--config", str(CONFIGS / "hf" / "dpo_lora.yaml"), *QUIET, *jsonl, "--model.init_args.policy_ckpt=null",
                   f"--model.init_args.model={{type: hf, path: {gpt2_dir}}}"], tmp_path)
    module = cli.model
    assert isinstance(module.reference, BaseOfAdapters) and module.frozen_models() == [module.reference]  # no second copy
    tok = module.tokenizer
    base = build_model({"type": "hf", "path": str(gpt2_dir)}).eval()
    ids = torch.tensor([tok.encode_prompt(PROMPTS[0]) + tok.encode_completion("5")])
    torch.testing.assert_close(module.reference(ids, None), base(ids), atol=FORWARD_ATOL, rtol=0)  # adapters off: the folder
    assert not torch.allclose(module.model.eval()(ids), base(ids))  # the adapters trained

    saved = torch.load(tmp_path / "checkpoints" / "hf" / "dpo_lora.ckpt", weights_only=True)
    assert saved["rlhf"]["stage"] == "dpo" and saved["rlhf"]["base"]["kind"] == "hf"
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # adapters only
    read, _, _ = load_policy(str(tmp_path / "checkpoints" / "hf" / "dpo_lora.ckpt"))
    torch.testing.assert_close(read.eval()(ids), module.model.eval()(ids), atol=0, rtol=0)
    merged, _, _ = load_policy(str(export_policy(str(tmp_path / "checkpoints" / "hf" / "dpo_lora.ckpt"), str(tmp_path / "dpo_export"))))
    torch.testing.assert_close(merged.eval()(ids), module.model.eval()(ids), atol=FORWARD_ATOL, rtol=0)  # merged adapters
