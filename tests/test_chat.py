"""Conversational records with the character tokenizer's chat vocabulary: templates, assistant-only loss masks,
the prefix check, prompts and preference pairs in TRL's forms, the toy_chat task, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from rlhf_lightning.data.conversations import check_messages, encode_conversation
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences import PreferenceDataModule
from rlhf_lightning.data.preferences.records import read_preferences, render_pair
from rlhf_lightning.data.preferences.sources import JsonlPairs
from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.data.sft import SFTDataModule, SFTDataset
from rlhf_lightning.tasks.arithmetic import ALPHABET
from rlhf_lightning.tasks.chat import CHAT_ALPHABET, SYSTEM_PROMPT, demonstrations
from rlhf_lightning.tasks.arithmetic import problems
from rlhf_lightning.tokenizer import CharTokenizer, load_tokenizer

TOK = CharTokenizer(CHAT_ALPHABET, chat=True)
SYSTEM = {"role": "system", "content": SYSTEM_PROMPT}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_flat_tokenizer_unchanged_and_chat_vocabulary_extends_it():
    flat, chat = CharTokenizer(ALPHABET), CharTokenizer(ALPHABET, chat=True)
    assert flat.to_dict() == {"type": "char", "alphabet": ALPHABET}  # flat checkpoints describe it as before
    assert chat.encode("Q: 1+2=") == flat.encode("Q: 1+2=")  # every flat id is unchanged
    assert chat.vocab_size == flat.vocab_size + 3
    assert chat.encode("<|user|>1<eos>") == [flat.vocab_size + 1, flat.encode("1")[0], chat.eos_id]
    d = chat.to_dict()
    assert d["chat"] is True and len(d["template_sha256"]) == 64
    assert load_tokenizer(d) == chat and load_tokenizer(d) != flat
    with pytest.raises(ValueError, match="template_sha256"):
        load_tokenizer({**d, "template": d["template"] + " "})


def test_multi_turn_loss_mask_is_assistant_tokens_through_eos_only():
    messages = check_messages([SYSTEM, user("Q: 1+2=\nA:"), assistant("3"), user("Q: 9-4=\nA:"), assistant("5")], "f:1", "messages")
    ids, trained = encode_conversation(TOK, messages, "f:1")
    text = [TOK.token_text(i) for i in ids]
    assert text[0] == "<bos>" and text.count("<bos>") == 1
    assert [t for t, m in zip(text, trained) if m] == ["3", "<eos>", "5", "<eos>"]
    # the role tokens, the system and user turns are context only
    assert not any(m for t, m in zip(text, trained) if t in ("<|system|>", "<|user|>", "<|assistant|>", "Q", "S"))
    data = SFTDataset(TOK, [(messages, "f:1"), ("Q: 1+2=\nA:", "3", "f:2")], 64)
    batch = data.collate([data[0], data[1]])
    assert batch["loss_mask"][0].sum() == 4 and batch["loss_mask"][1].sum() == 2  # flat: answer + EOS
    assert not (batch["loss_mask"] & batch["prompt_loss_mask"]).any()
    assert (batch["loss_mask"] | batch["prompt_loss_mask"]).sum(1).tolist() == [len(ids) - 1, 10 + 2]  # every token after BOS


def test_prefix_check_refuses_a_template_that_rewrites_earlier_turns():
    # a "thinking" template: earlier assistant turns lose their text once a later turn exists
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and not loop.last %}0{% else %}{{ m['content'] }}{% endif %}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = CharTokenizer(CHAT_ALPHABET, chat=True, template=template)
    messages = check_messages([user("Q: 1+2=\nA:"), assistant("3"), user("Q: 2+2=\nA:"), assistant("4")], "d.jsonl:7", "messages")
    with pytest.raises(DataError) as e:
        encode_conversation(tok, messages, "d.jsonl:7")
    assert str(e.value).startswith("d.jsonl:7: field 'messages[1]': the chat template breaks the prefix property")
    assert "first difference at token 13: '3' vs '0'" in str(e.value) and "\n" not in str(e.value)


def test_a_template_without_eos_after_the_reply_is_refused():
    tok = CharTokenizer(CHAT_ALPHABET, chat=True, template="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(DataError, match=r"f:1: field 'messages\[1\]': the chat template does not end the assistant turn with EOS"):
        encode_conversation(tok, check_messages([user("Q: 1+2=\nA:"), assistant("3")], "f:1", "messages"), "f:1")


def test_sft_file_of_conversations_and_prompts_in_both_chat_forms(tmp_path):
    train = write(tmp_path / "train.jsonl", [
        {"messages": [SYSTEM, user("Q: 1+2=\nA:"), assistant("3")], "group": "easy"},
        {"messages": [user("Q: 12+30=\nA:"), assistant("42"), user("Q: 9-4=\nA:"), assistant("5")]},
    ])
    val = write(tmp_path / "val.jsonl", [
        {"prompt": [SYSTEM, user("Q: 2+2=\nA:")]},  # gold from the toy task's question
        {"messages": [user("Q: 3+3=\nA:"), assistant("6")]},  # gold: the final reply
        {"prompt": [user("Solve 3+4.")], "gold": "7", "group": "other"},
    ])
    dm = SFTDataModule(train_file=train, val_file=val, batch_size=2, tokenizer=TOK, max_length=64)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["loss_mask"].sum(1).tolist()) == [2, 5]  # "3"+EOS; "42"+EOS and "5"+EOS
    v = dm.val_set.collate([dm.val_set[i] for i in range(3)])
    assert v["golds"] == ["4", "6", "7"] and v["prompts"][0] == "<|system|>Solve.<|user|>Q: 2+2=\nA:<|assistant|>"
    assert v["strata"][2] == ("other",) and "op/+" in v["strata"][0]
    assert v["prompt_ids"][0, -1].item() == TOK.encode("<|assistant|>")[0]  # the generation prompt ends the prompt


def test_preference_pairs_explicit_and_implicit_prompt(tmp_path):
    q = [SYSTEM, user("Q: 1+2=\nA:")]
    explicit = write(tmp_path / "a.jsonl", [{"prompt": q, "chosen": [assistant("3")], "rejected": [assistant("4")]}])
    implicit = write(tmp_path / "b.jsonl", [{"chosen": q + [assistant("3")], "rejected": q + [assistant("4")], "margin": 1}])
    a, b = read_preferences(explicit)[0], read_preferences(implicit)[0]
    assert (a.prompt, a.chosen, a.rejected, a.messages) == ("Q: 1+2=\nA:", "3", "4", tuple(q)) and b.margin == 1.0
    ra, rb = render_pair(TOK, a), render_pair(TOK, b)
    assert ra.prompt == rb.prompt == "<|system|>Solve.<|user|>Q: 1+2=\nA:<|assistant|>" and ra.messages is None
    dm = PreferenceDataModule(JsonlPairs(explicit, val_file=implicit), tokenizer=TOK, max_length=64)
    dm.setup("fit")
    batch = dm.train_set.collate([dm.train_set[0]])
    ids = batch["input_ids"][0][batch["attention_mask"][0]].tolist()
    assert [TOK.token_text(i) for i in ids[-3:]] == ["<|assistant|>", "3", "<eos>"] and ids[0] == TOK.bos_id


def test_toy_chat_task_prompts_and_demonstrations():
    records = load_prompts("toy_chat", "val")
    flat = load_prompts("toy", "val")
    assert [r.gold for r in records] == [r.gold for r in flat] and [r.strata for r in records] == [r.strata for r in flat]
    rendered = PromptDataset(TOK, records[:2]).records
    assert rendered[0].prompt == f"<|system|>{SYSTEM_PROMPT}<|user|>{flat[0].prompt}<|assistant|>"
    demos = demonstrations(problems("train")[:40])
    assert any(len(d) == 5 for d in demos) and all(d[0] == SYSTEM and d[-1]["role"] == "assistant" for d in demos)
    dm = SFTDataModule(task="toy_chat", tokenizer=TOK, max_length=48, max_val_prompts=4)
    dm.setup("fit")
    assert len(dm.train_set) == len(load_prompts("toy", "train")) and max(len(ids) for ids, _ in dm.train_set.examples) <= 48


BAD = [
    ({"messages": [{"content": "Q: 1+2=\nA:"}, assistant("3")]}, "sft", "f:1: field 'messages[0].role': missing required field"),
    ({"messages": [{"role": "user"}, assistant("3")]}, "sft", "f:1: field 'messages[0].content': missing required field"),
    ({"messages": [{"role": "bot", "content": "x"}, assistant("3")]}, "sft", "f:1: field 'messages[0].role': unknown role \"bot\"; allowed: system, user, assistant"),
    ({"messages": [user("  "), assistant("3")]}, "sft", "f:1: field 'messages[0].content': expected a non-empty string, got \"  \""),
    ({"messages": [SYSTEM, user("Q: 1+2=\nA:")]}, "sft", "f:1: field 'messages': no assistant turn: nothing to train on"),
    ({"messages": [user("a"), SYSTEM, assistant("3")]}, "sft", "f:1: field 'messages[1].role': a system message must come first"),
    ({"prompt": [user("Q: 1+2=\nA:"), assistant("3")]}, "prompts", "f:1: field 'prompt[1].role': the last message must be a user turn, got 'assistant'"),
    ({"chosen": [user("a"), assistant("3")], "rejected": [user("b"), assistant("4")]}, "prefs", "f:1: field 'rejected[0]': 'chosen' and 'rejected' must share their prompt"),
    ({"prompt": [user("a")], "chosen": [assistant("3"), assistant("4")], "rejected": [assistant("5")]}, "prefs", "f:1: field 'chosen': expected one assistant message, got 2"),
    ({"prompt": [user("a")], "chosen": [user("3")], "rejected": [assistant("5")]}, "prefs", "f:1: field 'chosen[0].role': unknown role \"user\"; allowed: assistant"),
]


@pytest.mark.parametrize("record, kind, message", BAD, ids=[m.split(": ", 2)[-1][:40] for _, _, m in BAD])
def test_bad_conversational_records_name_file_line_and_field(tmp_path, record, kind, message):
    path = write(tmp_path / "f", [record])
    with pytest.raises(DataError) as e:
        if kind == "sft":
            SFTDataModule(train_file=path, tokenizer=TOK, max_length=64, max_val_prompts=1).setup("fit")
        elif kind == "prompts":
            load_prompts(path=path)
        else:
            read_preferences(path)
    assert str(e.value).replace(str(path), "f").startswith(message), str(e.value)


def test_a_flat_record_in_a_conversational_file_is_refused(tmp_path):
    path = write(tmp_path / "f", [{"messages": [user("a"), assistant("3")]}, {"prompt": "Q: 1+2=\nA:", "completion": "3"}])
    with pytest.raises(DataError, match=r":2: field 'messages': missing required field"):
        SFTDataModule(train_file=path, tokenizer=TOK, max_length=64, max_val_prompts=1).setup("fit")


@pytest.mark.parametrize("chat", [False, True])
def test_ascii_fast_path_encodes_and_refuses_as_the_general_path(chat, monkeypatch):
    import random

    tok = CharTokenizer(CHAT_ALPHABET, chat=chat)
    pieces = [*CHAT_ALPHABET, "<|user|>", "<|system|>", "<|assistant|>", "<eos>", "<|bot|>", "*", "é"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(400)]

    def outcome(text):
        try:
            return tok.encode(text, where="f:1")
        except ValueError as e:
            return str(e)

    fast = [outcome(t) for t in texts]
    monkeypatch.setattr(tok, "_encode_ascii", lambda text: None)  # the general path alone
    assert fast == [outcome(t) for t in texts]
    assert sum(isinstance(r, str) for r in fast) > 50 and sum(isinstance(r, list) for r in fast) > 50  # both kinds met
