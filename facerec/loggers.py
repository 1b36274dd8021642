"""Logger factories. W&B never reaches the network unless the user asks for it."""
from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

WANDB_MODES = ("offline", "online", "disabled")


def wandb_key_configured() -> bool:
    """True if a W&B API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(mode: str = "offline", **kwargs):
    """A Lightning WandbLogger in `mode` (offline by default: runs are written under
    save_dir and can be uploaded later with `wandb sync`)."""
    from lightning.pytorch.loggers import WandbLogger

    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not wandb_key_configured():
        raise ValueError(
            "logger.wandb.mode=online needs a W&B API key (run `wandb login` or set WANDB_API_KEY). "
            "Without one, keep mode=offline and upload later with `wandb sync <run dir>/wandb/offline-run-*`."
        )
    return WandbLogger(mode=mode, **kwargs)
