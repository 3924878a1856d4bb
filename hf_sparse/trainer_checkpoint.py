"""What `SparseTrainer` writes for `save_model`, checkpoints and `push_to_hub`, and how it reads them back.

A folder written by a Trainer path is a sparse checkpoint: `model.safetensors` with the dropped units' entries
as explicit zeros (so plain `from_pretrained` computes exactly the sparse model), the scores and masks,
`sparse_config.json` (so `load_sparse_model` rebuilds the trainable sparse model), and, when some units are
dropped, `hf_sparse_dropped.safetensors` with the dropped entries' real values (so resuming, or training on
after `load_sparse_model`, continues from the same weights bit for bit).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import CONFIG_NAME
from .dropped import DROPPED_WEIGHTS_NAME, restore_dropped, split_dropped
from .patching import get_sparse_config, is_sparsified


def write_dropped(folder: str, dropped: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = os.path.join(folder, DROPPED_WEIGHTS_NAME)
    if dropped:
        save_file({k: v.detach().cpu().contiguous() for k, v in dropped.items()}, path,
                  metadata={"format": "pt", "hf_sparse": "dropped units' weights, restored by load_sparse_model"})
    elif os.path.exists(path):
        os.remove(path)  # a folder saved over must not keep another mask's dropped values


def read_dropped(folder: str) -> dict[str, torch.Tensor] | None:
    path = os.path.join(folder, DROPPED_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated and cannot be read ({e}); re-save the model") from e


def restore_from_folder(model: nn.Module, folder: str) -> bool:
    """Put back the dropped entries saved in `folder` (after its masks were loaded); False if it has none."""
    dropped = read_dropped(folder)
    if dropped is None:
        return False
    restore_dropped(model, dropped, os.path.join(folder, DROPPED_WEIGHTS_NAME))
    return True


def save_trainer_model(save, model: nn.Module, output_dir: str, state_dict: dict | None, should_save: bool) -> None:
    """Run the Trainer's `_save` (`save(output_dir, state_dict)`) with the dropped entries zeroed, then add the
    sparse config and the dropped values. `model` is the unwrapped sparsified model."""
    if not is_sparsified(model):
        save(output_dir, state_dict)
        return
    if state_dict is None:
        state_dict = model.state_dict()
    zeroed, dropped = split_dropped(model, state_dict)
    save(output_dir, zeroed)
    if should_save:
        os.makedirs(output_dir, exist_ok=True)
        get_sparse_config(model).save_pretrained(output_dir)
        write_dropped(output_dir, dropped)


def sparse_files(folder: str) -> list[str]:
    """The hf_sparse files of a saved folder that must travel with its model files."""
    return [name for name in (CONFIG_NAME, DROPPED_WEIGHTS_NAME) if os.path.isfile(os.path.join(folder, name))]
