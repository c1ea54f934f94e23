"""The Hugging Face Hub: repo id checks and downloads of weights and JSON only (never code)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mlx_vit.errors import ModelNotFoundError

log = logging.getLogger("mlx_vit")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")

SAFETENSORS_FILES = ["config.json", "preprocessor_config.json", "model.safetensors",
                     "model.safetensors.index.json", "model-*-of-*.safetensors"]  # fmt: skip
TORCH_FILES = ["config.json", "preprocessor_config.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]  # fmt: skip


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith(".git")


def download(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot folder of `repo_id` in the standard HF cache with config, preprocessing and weights.

    Safetensors weights are fetched when the repository has them, pytorch_model.bin otherwise. With
    HF_HUB_OFFLINE=1 (or no network) a snapshot already in the cache is used.
    """
    if not is_repo_id(repo_id):
        raise ModelNotFoundError(f"{repo_id}: not a folder and not a valid Hugging Face repo id (like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SAFETENSORS_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=TORCH_FILES))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id}: gated repository; accept its terms and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
            "connect once, or pass a local folder with -m"
        ) from None
    except HfHubHTTPError as error:
        raise ModelNotFoundError(f"{repo_id}: download failed ({str(error).splitlines()[0]})") from None
    return folder
