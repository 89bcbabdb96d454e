"""`ShardedStrategy`: Lightning's `ModelParallelStrategy` as FSDP2 data parallelism, with safe sharded checkpoints.

    trainer:
      strategy:
        class_path: rlhf_lightning.strategy.ShardedStrategy
        init_args: {param_dtype: bfloat16}    # optional; see `sharding.ShardingPolicy`

- Every process is one data-parallel rank (`data_parallel_size: auto` is the world size, not Lightning's number
  of nodes) and `tensor_parallel_size` is 1: each rank holds a shard of every block. A stage shards its models in
  `configure_model` (`modules.stage.StageModule`) with the strategy's `sharding` policy.
- `last.ckpt` (and every checkpoint a `ModelCheckpoint` writes) is a distributed checkpoint folder with
  `save_distributed_checkpoint: true` (the default): each rank writes its shards, nothing is gathered. The stage's
  final checkpoint is written whole (`full_checkpoint()`, used by `callbacks.FinalCheckpoint`): the usual single
  file that `rlhf eval`, `rlhf export` and the next stage read with no process group.
- Resuming from a folder reads it through `checkpoints`' safe DCP reader and planner (DCP's own unpickles its
  metadata with plain `pickle`), and is refused with one line when it was written by another number of ranks.
  A single-file checkpoint resumes as with Lightning's strategy (the full state, broadcast from rank 0).

Lightning's `FSDPStrategy` (FSDP1) wraps the module, so `manual_backward` (PPO) would run inside the wrapped
forward; this strategy leaves the module alone, and a backward is a plain backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy

from rlhf_lightning.callbacks.lightning_internals import set_data_parallel_size
from rlhf_lightning.checkpoints import LIGHTNING_META, CheckpointError, dcp_load, is_distributed_checkpoint, read_dcp_metadata, read_distributed_meta
from rlhf_lightning.options import ConfigError
from rlhf_lightning.sharding import STRATEGY, ShardingPolicy

__all__ = ["ShardedStrategy"]


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process; the sharding options are `sharding.ShardingPolicy`'s fields."""

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        reshard_after_forward: bool = True,
        gather_for_generation: bool = False,
        replicate_frozen_below: int = 0,
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            data_parallel_size: ranks that each hold a shard; "auto": every process (devices x nodes).
            tensor_parallel_size: 1 (tensor parallelism is not implemented).
            save_distributed_checkpoint: `last.ckpt` as a folder of shards (resumed by as many ranks); False: every
                checkpoint gathered whole on rank 0.
            param_dtype, reduce_dtype, reshard_after_forward, gather_for_generation, replicate_frozen_below,
            cpu_offload: the sharding policy (`sharding.ShardingPolicy`).
            process_group_backend, timeout: as Lightning's `ModelParallelStrategy` (gloo on CPU, nccl on GPUs).
        """
        if tensor_parallel_size != 1:
            raise ConfigError(
                f"{STRATEGY}tensor_parallel_size: only 1 is implemented (FSDP2 shards every block over the "
                f"data-parallel ranks), got {tensor_parallel_size!r}"
            )
        if data_parallel_size != "auto" and (isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1):
            raise ConfigError(f"{STRATEGY}data_parallel_size: 'auto' or an integer >= 1, got {data_parallel_size!r}")
        self.sharding = ShardingPolicy(param_dtype, reduce_dtype, reshard_after_forward, gather_for_generation, replicate_frozen_below, cpu_offload)
        self.requested_data_parallel_size = data_parallel_size
        self.distributed_checkpoints = save_distributed_checkpoint
        self._writing_full = False
        # Lightning's own checkpoint code is the whole-checkpoint path here; the sharded one is this class's
        super().__init__(data_parallel_size, 1, save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        size = world if self.requested_data_parallel_size == "auto" else self.requested_data_parallel_size
        if size != world:
            raise ConfigError(
                f"{STRATEGY}data_parallel_size: {size} ranks requested, the run has {world} processes "
                f"(trainer.devices x trainer.num_nodes); leave it 'auto'"
            )
        set_data_parallel_size(self, size)
        super().setup_environment()

    # ------------------------------------------------------------------ checkpoints

    @property
    def writes_shards(self) -> bool:
        """Whether the checkpoint being written now is a folder of shards."""
        return self.distributed_checkpoints and not self._writing_full

    @contextlib.contextmanager
    def full_checkpoint(self) -> Iterator[None]:
        """Checkpoints written inside are gathered whole on rank 0 into one file (the stage's final checkpoint)."""
        self._writing_full = True
        try:
            yield
        finally:
            self._writing_full = False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self.writes_shards:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(cpu_offload=True))

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if not self.writes_shards:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer  # the documented wrapper's wrapped optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(cpu_offload=True))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self.writes_shards:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from torch.distributed.checkpoint import save

        path = Path(self.broadcast(str(filepath)))
        if self.global_rank == 0:
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("sharded_checkpoint_folder")
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        save(shards, checkpoint_id=path)
        if self.global_rank == 0:
            checkpoint["sharded"] = {"world_size": self.world_size}
            torch.save(checkpoint, path / LIGHTNING_META)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_distributed_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = read_distributed_meta(path, "ckpt_path")  # checked: safe metadata, weights_only items
        saved = checkpoint.get("sharded", {}).get("world_size")
        if saved != self.world_size:
            raise CheckpointError(
                f"ckpt_path: {str(path)!r} holds the shards of {saved} ranks and this run has {self.world_size}; "
                f"resume it with {saved} processes, or start from its weights (rlhf export consolidates them)"
            )
        module = self.model
        wanted = get_model_state_dict(module)
        if not self.lightning_module.strict_loading:  # a checkpoint of what trains (LoRA adapters): read what it holds
            saved = read_dcp_metadata(path, "ckpt_path").state_dict_metadata
            wanted = {k: v for k, v in wanted.items() if f"state_dict.{k}" in saved}
        state = {"state_dict": wanted}
        dcp_load(state, path, no_dist=False)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp_load(optim_state, path, no_dist=False)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True))
        checkpoint.pop("sharded", None)
        return checkpoint

