"""Errors a user can cause. Each message is one line that names the file (or model) and says what to do."""

from __future__ import annotations


class MlxVitError(Exception):
    """Base class: the CLI prints str(error) on one line and exits 1; anything else is a bug."""


class CheckpointError(MlxVitError):
    """A weights file or model folder that cannot be read safely or does not match its config."""


class ConfigError(MlxVitError):
    """A config.json / preprocessor_config.json that is malformed or describes something unsupported."""


class ImageError(MlxVitError):
    """An image file that cannot be opened or decoded."""


class ModelNotFoundError(MlxVitError):
    """A model name that is neither a folder nor a reachable or cached Hub repository."""


class CameraError(MlxVitError):
    """A camera or video file that cannot be opened or stops delivering frames (see mlx_vit.camera)."""
