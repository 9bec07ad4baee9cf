"""What every hub request shares: offline detection and silence while the hub libraries retry.

Offline, `huggingface_hub` and `datasets` retry for half a minute and log every attempt; moe-prune
asks once, quietly, and says in one line what could not be reached (the cause stays chained).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

HUB_TIMEOUT_S = 10
HUB_LOGGERS = ("datasets", "huggingface_hub", "urllib3", "httpx", "httpx2", "fsspec", "filelock")


def offline() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set: no request may be made."""
    from huggingface_hub.constants import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Silence the retry and progress chatter of the hub libraries while something is fetched."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
