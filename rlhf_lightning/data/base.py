"""What every stage's DataModule shares: the tokenizer of the attached LightningModule, and loaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.tokenizer import CharTokenizer


class TokenizedDataModule(L.LightningDataModule):
    """The tokenizer belongs to the LightningModule (it travels inside the checkpoint): `setup` takes it, and
    the context length named by `context_attr`, from there unless one was assigned to `self.tokenizer`."""

    context_attr = "context_length"
    tokenizer: CharTokenizer | None = None

    def module_tokenizer(self) -> tuple[CharTokenizer, int]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = self.tokenizer or getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} needs a tokenizer: attach it to a LightningModule or set `.tokenizer`")
        return tokenizer, getattr(module, self.context_attr, 1 << 30)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """Batches of `dataset` through its own `collate`."""
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=dataset.collate,
            num_workers=self.hparams.get("num_workers", 0) if shuffle else 0,
        )
