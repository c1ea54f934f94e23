"""The Hugging Face Hub: repo id checks and downloads of weights and JSON only (never code)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mlx_vit.errors import ModelNotFoundError


class HubUnreachableError(ModelNotFoundError):
    """A repo that is not in the Hugging Face cache while the Hub cannot be reached (or HF_HUB_OFFLINE is set)."""


log = logging.getLogger("mlx_vit")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")

SAFETENSORS_FILES = ["config.json", "preprocessor_config.json", "model.safetensors",
                     "model.safetensors.index.json", "model-*-of-*.safetensors"]  # fmt: skip
TORCH_FILES = ["config.json", "preprocessor_config.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]  # fmt: skip


# What a user without the Hub can do instead, in every error that says the Hub cannot give the model.
INSTEAD = ("`mlx-vit convert` makes a model folder from a downloaded checkpoint folder; -m random:vit-tiny-patch16-224 "
           "tries mlx-vit offline")  # fmt: skip

# Branches, tags, commits and `refs/pr/N`; no `..` and no leading `/`, since a revision also names a file under
# the cache's refs/ folder.
REVISION = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


def is_repo_id(name: str) -> bool:
    """The Hub's own rules: org/name or name, no '..' or '--', at most 96 characters, not ending in .git."""
    return (bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name and len(name) <= 96
            and not name.endswith(".git"))  # fmt: skip


def is_revision(revision: str) -> bool:
    return len(revision) <= 256 and bool(REVISION.fullmatch(revision)) and ".." not in revision


def _redact(text: str) -> str:
    """`text` without the Hugging Face token, should a server or proxy have echoed it into an error."""
    from huggingface_hub import get_token

    for token in {get_token(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if token and len(token) >= 4:
            text = text.replace(token, "<token>")
    return text


def download(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot folder of `repo_id` in the standard HF cache with config, preprocessing and weights.

    Safetensors weights are fetched when the repository has them, pytorch_model.bin otherwise. With
    HF_HUB_OFFLINE=1 (or no network) a snapshot already in the cache is used.
    """
    if not is_repo_id(repo_id):
        shown = repr(repo_id[:100])[1:-1]  # one line, whatever it holds
        raise ModelNotFoundError(f"{shown}: not a folder and not a valid Hugging Face repo id (like org/name); "
                                 f"{INSTEAD}")  # fmt: skip
    if revision is not None and not is_revision(revision):
        raise ModelNotFoundError(f"{repo_id}: {revision[:100]!r} is not a valid revision (a branch, tag or commit)")
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
        raise HubUnreachableError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
            f"connect once, or pass a local folder with -m ({INSTEAD})"
        ) from None
    except HfHubHTTPError as error:
        reason = _redact((str(error).splitlines() or [type(error).__name__])[0])[:300]
        raise ModelNotFoundError(f"{repo_id}: download failed ({reason})") from None
    except OSError as error:  # a full disk or an unwritable cache while downloading
        reason = _redact(str(error.strerror or error))[:300]
        raise ModelNotFoundError(f"{repo_id}: download failed ({reason})") from None
    return folder
