"""Conversations through a real Hugging Face tokenizer and its Jinja chat template: a character-level BPE on the toy
alphabet plus role tokens, built locally with `tokenizers` and saved beside a tiny GPT-2 (no download)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli
from rlhf_lightning.data.conversations import check_messages, encode_conversation
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.data.sft import SFTDataset
from rlhf_lightning.tasks.chat import CHAT_ALPHABET

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + sorted(set(CHAT_ALPHABET)))}
# BOS written by the template (the tokenizer must not add a second), EOS closing each assistant turn and a newline
# after every turn (after EOS: context, never trained)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# a "thinking" template: an earlier assistant turn is rewritten once a later one exists (the prefix property breaks)
BROKEN = TEMPLATE.replace("{{ m['content'] }}", "{% if m['role'] == 'assistant' and not loop.last %}0{% else %}{{ m['content'] }}{% endif %}")


def save_chat_model(folder: Path, template: str = TEMPLATE) -> Path:
    from tokenizers import Tokenizer, decoders, models

    core = Tokenizer(models.BPE(vocab=VOCAB, merges=[]))  # one token per character, the specials whole
    core.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tok.chat_template = template
    tok.save_pretrained(folder)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("hf_chat") / "model")


def load(folder):
    from rlhf_lightning.tokenizer import load_tokenizer

    return load_tokenizer({"type": "hf", "path": str(folder)})


CONVERSATION = [
    {"role": "system", "content": "Solve."},
    {"role": "user", "content": "Q: 1+2=\nA:"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "Q: 10-4=\nA:"},
    {"role": "assistant", "content": "6"},
]


def test_multi_turn_loss_mask_token_by_token(chat_dir):
    tok = load(chat_dir)
    ids, trained = encode_conversation(tok, check_messages(CONVERSATION, "c:1", "messages"), "c:1")
    tokens = [tok.token_text(i) for i in ids]
    expected = (
        [("<s>", 0), ("<|system|>", 0)] + [(c, 0) for c in "Solve.\n"]
        + [("<|user|>", 0)] + [(c, 0) for c in "Q: 1+2=\nA:\n"] + [("<|assistant|>", 0), ("3", 1), ("</s>", 1), ("\n", 0)]
        + [("<|user|>", 0)] + [(c, 0) for c in "Q: 10-4=\nA:\n"] + [("<|assistant|>", 0), ("6", 1), ("</s>", 1), ("\n", 0)]
    )
    assert list(zip(tokens, map(int, trained))) == expected  # one BOS: the template's


def test_prompts_render_with_the_generation_prompt_and_a_single_bos(chat_dir):
    tok = load(chat_dir)
    data = PromptDataset(tok, load_prompts("toy_chat", "val", limit=2))
    assert data.records[0].prompt.startswith("<s><|system|>Solve.\n<|user|>Q: ") and data.records[0].prompt.endswith("\n<|assistant|>")
    ids = data.ids[0]
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id and tok.token_text(ids[-1]) == "<|assistant|>"


def test_a_template_that_breaks_the_prefix_property_is_refused(tmp_path):
    tok = load(save_chat_model(tmp_path / "broken", BROKEN))
    with pytest.raises(DataError) as e:
        SFTDataset(tok, [(check_messages(CONVERSATION, "train.jsonl:4", "messages"), "train.jsonl:4")], 64)
    message = str(e.value)
    assert message.startswith("train.jsonl:4: field 'messages[2]': the chat template breaks the prefix property")
    assert "first difference at token 22: '3' vs '0'" in message and "\n" not in message


def test_sft_on_conversations_through_the_cli_records_the_template(chat_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": CONVERSATION[:3] if i % 2 else CONVERSATION}) + "\n" for i in range(16)))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": CONVERSATION[:2]}) + "\n")
    run_cli(
        [
            "fit", "--config", str(CONFIGS / "hf" / "sft.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_epochs=1",
            f"--model.init_args.model={{type: hf, path: {chat_dir}}}", "--trainer.limit_train_batches=2",
            f"--data.init_args.train_file={train}", f"--data.init_args.val_file={val}", "--data.init_args.batch_size=8",
        ],
        tmp_path,
    )
    ckpt = torch.load(tmp_path / "checkpoints" / "hf" / "sft.ckpt", weights_only=True, map_location="cpu")
    recorded = ckpt["rlhf"]["tokenizer"]
    assert recorded["template"] == TEMPLATE and len(recorded["template_sha256"]) == 64
    # a changed folder template does not change what the checkpoint renders with
    tok = transformers.AutoTokenizer.from_pretrained(chat_dir)
    from rlhf_lightning.tokenizer import load_tokenizer

    assert load_tokenizer(recorded).template == TEMPLATE and tok.chat_template == TEMPLATE


def test_reward_model_records_its_own_template_and_scores_with_it(chat_dir, tmp_path):
    """A reward model on an HF folder (no SFT checkpoint) takes the folder's tokenizer and chat template, records
    them with the template's SHA-256, and reads back with the recorded template after the folder's has changed."""
    import shutil

    from rlhf_lightning.scoring import load_reward_model

    folder = Path(shutil.copytree(chat_dir, tmp_path / "rm"))
    prompt = CONVERSATION[:2]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "3"}], "rejected": [{"role": "assistant", "content": r}]}) + "\n"
        for r in ("4", "5", "6", "7")
    ))
    run_cli(
        [
            "fit", "--config", str(CONFIGS / "hf" / "reward.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_epochs=1",
            "--model.init_args.sft_ckpt=null", f"--model.init_args.model={{type: hf, path: {folder}}}",
            "--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={pairs}", f"--data.init_args.pairs.val_file={pairs}",
            "--data.init_args.batch_size=4",
        ],
        tmp_path,
    )
    ckpt_path = tmp_path / "checkpoints" / "hf" / "reward.ckpt"
    recorded = torch.load(ckpt_path, weights_only=True, map_location="cpu")["rlhf"]["tokenizer"]
    assert recorded["type"] == "hf" and recorded["template"] == TEMPLATE
    assert recorded["template_sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    # the folder's template changes; the checkpoint still renders and scores with the one it was trained with
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = BROKEN
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _, tok, meta = load_reward_model(str(ckpt_path))
    assert tok.template == TEMPLATE and meta["tokenizer"]["template_sha256"] == recorded["template_sha256"]
    assert load(folder).template == BROKEN  # what the folder alone would now give
