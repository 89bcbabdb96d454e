"""What every training stage shares: `StageModule`, the base of SFT, reward, PPO and DPO (and the stages to come).

- step metrics: a stage's `training_step` hands its scalars to `callbacks.log_step_metrics`; the base writes them to
  the loggers after the step (`on_train_batch_end`);
- LoRA: `train_adapters(record)` records the adapters' settings and base; a checkpoint then holds the adapters
  only (the frozen base is rebuilt from the record) and loads without the base's tensors;
- checkpoint metadata: `checkpoint["rlhf"]` is ``{"stage", **checkpoint_meta(), **LoRA record}``, which `rlhf eval`,
  `rlhf export` and the next stage read;
- options: `save_options(groups)` stores the `__init__` arguments as `hparams`, its option groups
  (`option_groups`) as plain dicts, so a checkpoint loads with `weights_only` and `hparams.yaml` reads as the config;
- the trainable state: `trainable_state()` copies what trains (the adapters only under LoRA); `keep_if_best` and
  `restore_best` keep the copy with the best `val` accuracy and put it back at the end (`keep_best`); a sharded
  model's copy is gathered whole and loaded back into the shards;
- sharding: under Lightning's `ModelParallelStrategy` (`strategy.ShardedStrategy`), `configure_model` applies FSDP2
  to each model a stage lists in `shardable_roots` (trained) and `frozen_roots` (a reference, a reward model), with
  the strategy's `sharding` policy (`sharding.shard_model`); under any other strategy it does nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from rlhf_lightning.callbacks import attached_trainer, write_step_metrics
from rlhf_lightning.lora import keep_trainable
from rlhf_lightning.option_groups import plain

__all__ = ["StageModule"]


class StageModule(L.LightningModule):
    """The base of the training stages; a stage names itself in `stage` and describes its checkpoint in
    `checkpoint_meta`. It holds its trained model as `self.model`."""

    stage: str = ""
    lora: dict[str, Any] | None = None  # {"lora": settings, "base": record} while adapters train
    _best: dict[str, Any] | None = None  # {<when>: int, "accuracy", "state"}: the best policy on `val` so far

    @property
    def attached(self) -> L.Trainer | None:
        """The Trainer this stage runs in, or None (a module used on its own: a test, a script, a benchmark)."""
        return attached_trainer(self)

    def save_options(self, groups: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """`save_hyperparameters` of the calling `__init__`, with `groups` (name -> the resolved group) stored as
        plain dicts in place of what was passed."""
        self.save_hyperparameters(ignore=list(ignore), frame=inspect.currentframe().f_back)
        self.hparams.update({name: plain(group) for name, group in groups.items()})

    def train_adapters(self, record: dict[str, Any] | None) -> None:
        """Record the adapters that train (None: the whole model trains)."""
        self.lora = record
        self.strict_loading = record is None  # a checkpoint of adapters leaves the frozen base out

    def checkpoint_meta(self) -> dict[str, Any]:
        """The stage's part of `checkpoint["rlhf"]` (besides "stage" and the LoRA record)."""
        return {}

    def shardable_roots(self) -> dict[str, nn.Module]:
        """The trained models a sharded strategy shards, by attribute name (the optimizer is built after, over their
        shards): `self.model`."""
        return {"model": self.model}

    def frozen_roots(self) -> dict[str, nn.Module]:
        """Frozen models to shard as roots of their own (kept whole below the policy's `replicate_frozen_below`)."""
        return {}

    def configure_model(self) -> None:
        """FSDP2 on `shardable_roots` and `frozen_roots` over the strategy's data-parallel mesh (Lightning's
        `ModelParallelStrategy` sets `device_mesh`; None elsewhere: nothing to do). Applied once. A Hugging Face
        model read on rank 0 only (`load_on_rank0`) gets rank 0's weights once sharded (`models.hf`)."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from rlhf_lightning.models.hf import full_state_for_broadcast, receive_rank0_weights
        from rlhf_lightning.sharding import data_parallel_mesh, is_sharded, shard_model

        policy = getattr(self.trainer.strategy, "sharding", None)  # `strategy.ShardedStrategy`'s; defaults otherwise
        mesh = data_parallel_mesh(mesh)
        roots = [(name, root, False) for name, root in self.shardable_roots().items()]
        roots += [(name, root, True) for name, root in self.frozen_roots().items()]
        for name, root, frozen in roots:
            full = None if is_sharded(root) else full_state_for_broadcast(root)  # rank 0's whole weights, before sharding
            shard_model(root, mesh, policy, frozen=frozen, role=name)
            if full is not None:
                receive_rank0_weights(root, full, self.trainer.strategy.root_device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        write_step_metrics(self)  # the loggers' part of this step's `log_step_metrics`

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf"] = {"stage": self.stage, **self.checkpoint_meta(), **(self.lora or {})}
        if self.lora is not None:
            keep_trainable(checkpoint["state_dict"], self.model, "model.")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what trains: every weight of the model, or its adapters under LoRA. A sharded model's
        weights are gathered whole (a collective: every rank calls it), so the copy is the same on every rank and a
        checkpoint's metadata can hold it."""
        return {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", copy=True)
            for k, v in self.model.state_dict().items() if self.lora is None or "lora_" in k
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back a `trainable_state` copy (a sharded model takes each rank's shard of the whole tensors)."""
        from rlhf_lightning.sharding import is_sharded

        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # a copy of the mapping: torch replaces its values by the distributed tensors it builds
            set_model_state_dict(self.model, dict(state), options=StateDictOptions(full_state_dict=True, strict=self.lora is None))
        else:
            self.model.load_state_dict(state, strict=self.lora is None)

    def keep_if_best(self, when: dict[str, int], accuracy: float, min_gain: float = 0.0) -> None:
        """Keep a `trainable_state` copy when `accuracy` on `val` is at least the best so far plus `min_gain` (0: the
        latest of equals wins); `when` names the point (`{"rollout": 4}`). NaN (no gold answer to choose by) keeps nothing."""
        if accuracy == accuracy and (self._best is None or accuracy >= self._best["accuracy"] + min_gain):
            self._best = {**when, "accuracy": accuracy, "state": self.trainable_state()}

    def restore_best(self, key: str, current: int) -> dict[str, Any] | None:
        """Put the kept copy back unless it is the current policy (`best[key] == current`); returns the kept record."""
        best = self._best
        if best is not None and best[key] != current:
            self.load_trainable_state(best["state"])
        return best
