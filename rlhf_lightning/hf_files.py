"""The optional Hugging Face dependency and local model folders (nothing is ever downloaded)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXTRA_HINT", "import_transformers", "local_folder"]

EXTRA_HINT = "pip install 'rlhf-lightning[hf]'"


def import_transformers():
    """The `transformers` module, or an ImportError that names the extra to install."""
    try:
        import transformers

        return transformers
    except ImportError as err:
        raise ImportError(
            f"Hugging Face models need the optional dependencies transformers and tokenizers: {EXTRA_HINT} "
            f"({err})"
        ) from None


def local_folder(path: str, what: str = "model") -> str:
    """Absolute path of an existing local folder; a clear error otherwise (nothing is downloaded)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"hf {what}: 'path' must name a local folder, got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"hf {what}: {path!r} is not a local folder (save one with `save_pretrained`; nothing is downloaded)"
        )
    return str(folder.resolve())
