"""`rlhf export --ckpt PATH --out DIR [--adapters]`: a trained policy as safetensors weights plus JSON.

The folder holds `model.safetensors` (tensors only: the format cannot carry code), `config.json`
(the model's plain config and the stage it came from) and `tokenizer.json`. A policy with LoRA adapters is
exported merged (W + alpha/r B A: a plain model). With `--adapters` it is written in PEFT's own format instead
(`adapter_config.json`, `adapter_model.safetensors`, loadable with `peft.PeftModel.from_pretrained` on the base)
plus `rlhf_adapters.json` (the base's path and SHA-256, the model config, the tokenizer). `rlhf eval --ckpt DIR`
and `policy.load_policy(DIR)` read both folders back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_lightning.checkpoints import ADAPTERS, CONFIG, TOKENIZER, WEIGHTS
from rlhf_lightning.files import atomic_write
from rlhf_lightning.options import ConfigError
from rlhf_lightning.policy import load_policy



def export_policy(ckpt: str, out: str, adapters: bool = False) -> Path:
    """Write the folder next to its final place, then rename it there (`files.atomic_write`: no half-written export)."""
    from safetensors.torch import save_file

    model, tokenizer, meta = load_policy(ckpt, role="--ckpt")
    if adapters and not meta.get("lora"):
        raise ConfigError(f"--adapters: {ckpt!r} holds no LoRA adapters (a full model: export it without --adapters)")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out: {str(out_dir)!r} exists and is not a folder")

    def write(tmp: Path) -> None:
        tmp.mkdir()
        if adapters:
            from rlhf_lightning.lora import save_peft_folder

            save_peft_folder(model, meta["lora"], tmp, base=meta["base"]["path"])
            record = {"stage": meta["stage"], "model": meta["model"], "tokenizer": tokenizer.to_dict(), "lora": meta["lora"], "base": meta["base"]}
            (tmp / ADAPTERS).write_text(json.dumps(record, indent=2) + "\n")
            return
        plain = model
        if meta.get("lora"):
            from rlhf_lightning.lora import merged

            plain = merged(model)
        state, seen = {}, set()
        for k, v in plain.state_dict().items():  # a tied weight (an HF model's embedding and head) is one tensor twice:
            shared = v.untyped_storage().data_ptr() in seen  # safetensors refuses shared memory, so each gets its own copy
            seen.add(v.untyped_storage().data_ptr())
            state[k] = v.detach().clone() if shared or not v.is_contiguous() else v
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({"stage": meta["stage"], "model": meta["model"]}, indent=2) + "\n")
        (tmp / TOKENIZER).write_text(json.dumps(tokenizer.to_dict(), indent=2) + "\n")

    return atomic_write(out_dir, write)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="an SFT, PPO or DPO checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--adapters", action="store_true", help="LoRA adapters in PEFT's folder format instead of merged weights")
    args = parser.parse_args(argv)
    out = export_policy(args.ckpt, args.out, args.adapters)
    files = "adapter_config.json, adapter_model.safetensors, " + ADAPTERS if args.adapters else f"{WEIGHTS}, {CONFIG}, {TOKENIZER}"
    print(f"exported {args.ckpt} -> {out}/ ({files})")
    return 0
