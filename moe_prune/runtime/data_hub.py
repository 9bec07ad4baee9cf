"""Hub datasets as documents: `org/name[:config]` streamed, never downloaded whole.

Not covered by tests beyond the offline and unreachable cases: the test suite runs offline.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from moe_prune.artifacts.common import describe
from moe_prune.errors import MoePruneError
from moe_prune.io.hub import HUB_TIMEOUT_S, offline, quiet_hub_logs
from moe_prune.runtime.chat import CHAT_FIELD
from moe_prune.runtime.data_files import Document, document


def read_hub(source: str, text_field: str, split: str) -> Iterable[Document]:
    """Stream `org/name[:config]` from the hub, lazily: the caller stops once it has its characters.

    The hub is asked once, quietly, whether the dataset exists before `datasets` streams it: offline,
    `datasets` would retry for half a minute and log every retry.
    """
    name, _, config = source.partition(":")
    with quiet_hub_logs():
        _probe_hub(source, name)
        try:
            from datasets import load_dataset

            stream = iter(load_dataset(name, config or None, split=split, streaming=True))
            first = next(stream, None)
        except Exception as exc:  # hub and dataset-script errors have many types; all mean the same to the user
            raise MoePruneError(f"{source}: could not be loaded as a hub dataset ({describe(exc)})") from exc
    if first is None:
        return ()
    if text_field not in first and CHAT_FIELD not in first:
        raise MoePruneError(f"{source}: no field {text_field!r} (fields: {', '.join(first)}; use --text-field)")
    records = itertools.chain([first], stream)
    return (document(r, text_field, source, n) for n, r in enumerate(records, 1))


def _probe_hub(source: str, name: str) -> None:
    """One quick request: a clear line when offline, unreachable or unknown, instead of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if offline():
        raise MoePruneError(
            f"{source}: not a local file, and hub datasets cannot be reached in offline mode "
            "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
        )
    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as exc:
        raise MoePruneError(f"{source}: not a local file, and no such dataset on the hub (or it is private)") from exc
    except Exception as exc:  # connection, TLS, proxy and HTTP errors of several libraries
        raise MoePruneError(
            f"{source}: not a local file, and the hub dataset could not be reached ({describe(exc)})"
        ) from exc
