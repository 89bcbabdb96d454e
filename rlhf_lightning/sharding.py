"""Sharding a model with FSDP2 (`torch.distributed.fsdp.fully_shard`): per transformer block, then the root.

Lightning's `ModelParallelStrategy` does not wrap the module: a stage applies the sharding in `configure_model`
(`modules.stage.StageModule.configure_model`, through `shard_model` here) on the strategy's device mesh. Each
block becomes one all-gather / reduce-scatter group; the root holds what is left (embeddings, final norm, head).
Parameters become `DTensor` shards (a (32, 32) weight is (16, 32) on each of 2 ranks), an optimizer built after
`configure_model` holds the shards, and `torch.nn.utils.clip_grad_norm_` reduces the norm over the ranks.

- `ShardingPolicy`: the options (bf16 compute through a `MixedPrecisionPolicy`, resharding after forward, CPU
  offload, small frozen models kept whole, weights kept gathered through a decode); the strategy carries them.
- `shard_model(root, mesh, policy)`: the sharding; `blocks_of(model)` finds the transformer blocks.
- `in_lockstep(model)`: a sharded model in a multi-process run: every forward is a collective, so every rank
  must make the same number of calls (`generation.generate` keeps a finished rank stepping).
- `gathered_for_decode(model)`: with `gather_for_generation`, the blocks stay gathered through a decode
  (`set_reshard_after_forward(False)`), then are resharded: one all-gather per block a decode, not one a token.
- `compute_dtype(model)`: the dtype the sharded model computes in (a KV cache is allocated in it).

Sharded checkpoints (DCP folders) are read safely and consolidated in `checkpoints`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from rlhf_lightning.distributed import min_over_ranks, world_size
from rlhf_lightning.options import ConfigError

__all__ = [
    "ShardingPolicy", "all_ranks", "blocks_of", "compute_dtype", "data_parallel_mesh", "gathered_for_decode", "in_lockstep", "is_sharded",
    "shard_model",
]

STRATEGY = "trainer.strategy.init_args."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardingPolicy:
    """How `shard_model` shards; each field is an option of the sharded strategy (`trainer.strategy.init_args`)."""

    param_dtype: str | None = None
    """"bfloat16": the gathered weights, the forward and the backward in bf16 (FSDP2's `MixedPrecisionPolicy`);
    the shards and the optimizer stay in float32. None: compute in the weights' own dtype."""
    reduce_dtype: str | None = None
    """The dtype gradients are reduced in (None: float32 with a `param_dtype`, else the gradients' own)."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (gathered again in backward): least memory."""
    gather_for_generation: bool = False
    """Keep the gathered weights through a whole decode, then reshard: one all-gather per block instead of one a
    token. The full model must fit in memory."""
    replicate_frozen_below: int = 0
    """Frozen models (a reference, a reward model) with fewer parameters than this stay whole on every rank: no
    all-gather per forward. 0: every frozen model is sharded too."""
    cpu_offload: bool = False
    """Keep the shards, their gradients and the optimizer state in CPU memory (FSDP2's `CPUOffloadPolicy`): a model
    larger than the device, at the cost of copies every step."""

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{STRATEGY}{name}: unknown dtype {value!r}; allowed: {', '.join(DTYPES)}, null")
        if isinstance(self.replicate_frozen_below, bool) or not isinstance(self.replicate_frozen_below, int) or self.replicate_frozen_below < 0:
            raise ConfigError(f"{STRATEGY}replicate_frozen_below: must be an integer >= 0 (parameters), got {self.replicate_frozen_below!r}")

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param = DTYPES[self.param_dtype] if self.param_dtype else None
        reduce = DTYPES[self.reduce_dtype] if self.reduce_dtype else (torch.float32 if param is not None else None)
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)

    def to_dict(self) -> dict:
        return asdict(self)


# the policy each sharded root was sharded with (read by generation: the decode's dtype, gather_for_generation)
_POLICIES: weakref.WeakKeyDictionary[nn.Module, ShardingPolicy] = weakref.WeakKeyDictionary()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model`: the children of its largest `nn.ModuleList` whose children share one class
    (GPT's `blocks`, an HF model's `layers` or `h`); [] when it has none (a bigram model)."""
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def data_parallel_mesh(mesh):
    """The 1-D data-parallel part of a Lightning `ModelParallelStrategy` mesh (dims "data_parallel",
    "tensor_parallel"); refuses a tensor-parallel size other than 1 (not implemented), naming the option."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ConfigError(
            f"{STRATEGY}tensor_parallel_size: only 1 is implemented (FSDP2 shards every block over the data-parallel "
            f"ranks), the mesh has {mesh['tensor_parallel'].size()}; set data_parallel_size to the number of processes"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages some part of `model`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(root: nn.Module, mesh, policy: ShardingPolicy | None = None, *, frozen: bool = False, role: str = "model") -> bool:
    """`fully_shard` each transformer block of `root`, then `root` itself, on the 1-D data-parallel `mesh`.

    A frozen root smaller than `policy.replicate_frozen_below` parameters is left whole (replicated). Sharding is
    applied once (a second call does nothing: Lightning calls `configure_model` again for a later `validate`).
    Refuses, naming `role`, a model with no block to shard. A 0-dim parameter (FSDP2 shards along dim 0) stays
    whole on every rank; in a trained root its gradient is averaged over the ranks. Returns whether `root` is sharded.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = policy or ShardingPolicy()
    if is_sharded(root):
        return True
    if frozen and sum(p.numel() for p in root.parameters()) < policy.replicate_frozen_below:
        return False
    if policy.cpu_offload and mesh.device_type == "cpu":
        raise ConfigError(
            f"{STRATEGY}cpu_offload: true keeps a GPU's shards, gradients and optimizer state in CPU memory; this run "
            "is on the CPU already (--trainer.accelerator=gpu, or cpu_offload: false)"
        )
    blocks = blocks_of(root)
    if not blocks:
        raise ConfigError(
            f"trainer.strategy: {role} ({type(root).__name__}) has no transformer block to shard; "
            "sharded training needs a model with blocks (gpt or hf), or use a data-parallel strategy (ddp)"
        )
    # FSDP2 cannot shard a 0-dim parameter (a reward model's `lm_scale`): it stays whole on every rank, its gradient
    # averaged over the ranks as FSDP2 averages the shards' (a frozen root's needs nothing)
    scalars = {p for p in root.parameters() if p.dim() == 0}
    if not frozen:
        for p in scalars:
            if p.requires_grad:
                p.register_hook(functools.partial(_mean_over_mesh, group=mesh.get_group()))
    options = dict(
        mesh=mesh,
        mp_policy=policy.mp_policy(),
        offload_policy=CPUOffloadPolicy() if policy.cpu_offload else OffloadPolicy(),
        ignored_params=scalars or None,
    )
    for block in blocks:
        fully_shard(block, reshard_after_forward=policy.reshard_after_forward, **options)
    fully_shard(root, reshard_after_forward=policy.reshard_after_forward, **options)
    _POLICIES[root] = policy
    return True


def _mean_over_mesh(grad: torch.Tensor, group) -> torch.Tensor:
    """A replicated parameter's gradient averaged over the data-parallel ranks (one all-reduce per backward)."""
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)
    return grad / torch.distributed.get_world_size(group)


def _policy_of(model: nn.Module) -> ShardingPolicy | None:
    for module in model.modules():
        if module in _POLICIES:
            return _POLICIES[module]
    return None


def in_lockstep(model: nn.Module) -> bool:
    """Whether each forward of `model` is a collective every rank must join (a sharded model, several ranks)."""
    return world_size() > 1 and is_sharded(model)


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank (a collective: every rank must call it)."""
    return bool(min_over_ranks(torch.tensor(int(flag))).item())


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a sharded model computes in under its policy's `param_dtype` (None: its weights' own)."""
    policy = _policy_of(model)
    return DTYPES[policy.param_dtype] if policy is not None and policy.param_dtype else None


@contextlib.contextmanager
def gathered_for_decode(model: nn.Module) -> Iterator[None]:
    """Under a policy with `gather_for_generation`, the blocks gathered by the first forward stay gathered until
    the end of the block (`set_reshard_after_forward(False)`), then are resharded; otherwise nothing changes."""
    from torch.distributed.fsdp import FSDPModule

    policy = _policy_of(model)
    if policy is None or not policy.gather_for_generation:
        yield
        return
    managed = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in managed:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in managed:
            m.reshard()
            m.set_reshard_after_forward(policy.reshard_after_forward, recurse=False)
