#!/usr/bin/env python3
"""TRL DPOTrainer throughput on the peer workload's preference pairs (CPU, offline): the TRL side of
benchmarks/peer_dpo.py. Runs in a TRL virtual environment, not in this project's.

Workload (the peer harness's, see its README.txt): the character tokenizer (21 ids) and preference pairs
`toy_task.preference_pairs(512, seed=0)` (chosen " <right>", rejected " <wrong>") of the peer folder (`--peer`);
GPT-2 from config, random init (seed 0): n_layer 2, n_embd 64, n_head 4, n_positions 32, all dropout 0 (103,488
parameters); `DPOTrainer` with loss_type sigmoid, beta 0.1, 32 pairs per optimizer step (64 sequences
"prompt + completion + <eos>", right padded), AdamW lr 1e-3 constant, no warm-up, grad-norm clip 1.0 (TRL's
default), fp32, no gradient checkpointing; the reference model is a frozen copy of the initial policy, run every
step (`precompute_ref_log_probs=False`); 64 steps, TRL logging every step.

    /path/to/trl-venv/bin/python benchmarks/trl_dpo_bench.py [--peer DIR] [--steps 64] [--warmup 3] [--threads 2]

Prints ONE JSON line of figures as the last stdout line (`step_s_median`: median wall seconds per optimizer
step after `--warmup` steps, measured with the peer harness's `benchutil.StepTimer` from TRL's `on_train_begin`
/ `on_step_end` callbacks; `foreign_cpu_cores` >= 0.3 marks a contaminated measurement).

TRL 1.16 on CPU: DPOConfig defaults to bf16=True and gradient_checkpointing=True (set off here, `--bf16 1
--grad-ckpt 1` restores them); without `ref_model`, a policy built from a config makes DPOTrainer reload the
reference from `config._name_or_path` (empty: a Hub repo-id error), so the frozen copy is passed as `ref_model`.
"""

import time

T_SCRIPT0 = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

DEFAULT_PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "peer")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", default=DEFAULT_PEER, help="folder holding the peer harness's toy_task.py and benchutil.py")
    p.add_argument("--num-pairs", type=int, default=512, help="training preference pairs")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=64, help="optimizer steps (max_steps)")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing statistics")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", default="constant")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bf16", type=int, default=0, help="TRL defaults bf16=True; fp32 here (0)")
    p.add_argument("--grad-ckpt", type=int, default=0, help="TRL defaults gradient_checkpointing=True; off here (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="TRL's output_dir parent (default: a temporary folder)")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    return p.parse_args()


def main():
    args = parse_args()
    sys.path.insert(0, os.path.abspath(args.peer))
    import benchutil  # stdlib only

    pre_script_s = benchutil.proc_age_s() - (time.perf_counter() - T_SCRIPT0)

    t_imp0 = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    import toy_task

    import_s = time.perf_counter() - t_imp0

    t_setup0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.set_seed(args.seed)

    tok = toy_task.build_char_tokenizer()
    tok.padding_side = "right"
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,  # no dropout: the model definition, not a trainer default, decides
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen reference: the initial policy
    n_params = sum(p.numel() for p in model.parameters())

    ds = Dataset.from_list(toy_task.preference_pairs(args.num_pairs, seed=args.seed))

    # The collator TRL would build, wrapped to count real (non-pad) and padded tokens per batch.
    base_collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    batch_tokens, batch_padded = [], []

    def collate(examples):
        b = base_collator(examples)
        batch_tokens.append(int(b["attention_mask"].sum()))
        batch_padded.append(int(b["input_ids"].numel()))
        return b

    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="trl_dpo_")
    run_dir = os.path.join(args.workdir, f"dpo_{os.getpid()}")
    targs = DPOConfig(
        output_dir=run_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        loss_type=[args.loss_type],
        beta=args.beta,
        precompute_ref_log_probs=False,
        max_length=32,
        bf16=bool(args.bf16),
        gradient_checkpointing=bool(args.grad_ckpt),
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )

    timer = benchutil.StepTimer()
    trl_logs = []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            timer.begin()

        def on_step_end(self, a, state, control, **kw):
            timer.step_end()

        def on_train_end(self, a, state, control, **kw):
            timer.finish()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                trl_logs.append(dict(logs, step=state.global_step))

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        data_collator=collate,
        callbacks=[Timer()],
    )
    t_ready = time.perf_counter()
    setup_s = t_ready - t_setup0

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    st = timer.summary(args.warmup)
    step_s = timer.step_s
    n = len(step_s)
    med = st["step_s_median"]
    meas = step_s[args.warmup :] if n > args.warmup else step_s
    toks = batch_tokens[:n]
    meas_toks = toks[args.warmup :] if len(toks) > args.warmup else toks
    tok_per_step = statistics.mean(meas_toks)
    losses = [float(r["loss"]) for r in trl_logs if "loss" in r]
    accs = [float(r["rewards/accuracies"]) for r in trl_logs if "rewards/accuracies" in r]
    k = max(1, min(5, len(losses) // 4))
    start_to_ready_s = t_ready - T_SCRIPT0 + pre_script_s

    result = {
        "bench": "trl_dpo",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_params": n_params,
        "loss_type": args.loss_type,
        "beta": args.beta,
        "pairs_per_step": args.batch_size,
        "sequences_per_step": 2 * args.batch_size,
        "train_pairs": len(ds),
        "steps": n,
        "warmup_steps_excluded": args.warmup,
        "lr": args.lr,
        "bf16": bool(args.bf16),
        "grad_ckpt": bool(args.grad_ckpt),
        **{key: v for key, v in st.items() if key != "step_s_all"},
        "samples_per_s": round(args.batch_size / med, 2),
        "sequences_per_s": round(2 * args.batch_size / med, 2),
        "tokens_per_step": round(tok_per_step, 2),
        "padded_tokens_per_step": round(statistics.mean(batch_padded[args.warmup : n] or batch_padded), 2),
        "tokens_per_s": round(tok_per_step / med, 2),
        "tokens_per_s_aggregate": round(sum(meas_toks) / sum(meas), 2),
        "pre_script_s": round(pre_script_s, 3),
        "import_s": round(import_s, 3),
        "setup_s": round(setup_s, 3),
        "start_to_ready_s": round(start_to_ready_s, 3),
        "start_to_first_step_end_s": round(start_to_ready_s + (step_s[0] if step_s else 0.0), 3),
        "train_wall_s": round(train_s, 3),
        "loss_first_steps_mean": round(statistics.mean(losses[:k]), 4) if losses else None,
        "loss_last_steps_mean": round(statistics.mean(losses[-k:]), 4) if losses else None,
        "reward_acc_last_steps_mean": round(statistics.mean(accs[-k:]), 4) if accs else None,
        "peak_rss_mb_self": round(benchutil.peak_rss_mb(), 1),
        "step_s_all": st["step_s_all"],
    }
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "trl_logs.jsonl"), "w") as f:
        for rec in trl_logs:
            f.write(json.dumps(rec) + "\n")
    result["trl_logs"] = os.path.join(run_dir, "trl_logs.jsonl")
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)


if __name__ == "__main__":
    main()
