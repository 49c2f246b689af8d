"""Files of the Hugging Face hub through huggingface_hub's cache, failing fast offline: the one
place ``pretrained`` and the converter's ``--weights hf:...`` fetch from."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vgg_flax import arch


def hf_repo(name: str) -> str | None:
    """timm's Hugging Face repo holding torchvision's weights for ``name`` (None: none)."""
    return f"timm/{name}.tv_in1k" if arch.VARIANTS[name].torchvision else None


class HubUnreachable(OSError):
    """A request to the Hugging Face hub got no answer (no network, DNS, proxy, timeout)."""


def _check_reachable(repo_id: str, filename: str, timeout: float = 5.0) -> None:
    """One request for the file's metadata, without retries; HubUnreachable if it gets no answer.
    huggingface_hub retries a failed connection five times with backoff (23 s offline, two
    warnings a retry) before its own error; this fails in the time of one request."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)
    except HfHubHTTPError:
        pass  # the hub answered (missing or gated repo...): hf_hub_download reports it
    except httpx2.TransportError as err:
        raise HubUnreachable(f"{type(err).__name__}: {err}") from None


def hub_file(repo_id: str, filename: str = "model.safetensors", *, progress: bool = True) -> Path:
    """A file of a Hugging Face repo, from huggingface_hub's cache or downloaded into it.

    huggingface_hub's own errors propagate (``LocalEntryNotFoundError`` with HF_HUB_OFFLINE, an
    ``HfHubHTTPError`` for a missing repo or file); ``HubUnreachable`` when the hub does not
    answer and the file is not cached."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    kwargs: dict[str, Any] = {}
    if not progress:
        from tqdm.auto import tqdm

        class _Quiet(tqdm):
            def __init__(self, *args, **kw):
                kw["disable"] = True
                super().__init__(*args, **kw)
        kwargs["tqdm_class"] = _Quiet
    try:  # the cache first, without a request
        return Path(hf_hub_download(repo_id, filename, library_name="vgg_flax",
                                    local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise
    _check_reachable(repo_id, filename)
    return Path(hf_hub_download(repo_id, filename, library_name="vgg_flax", **kwargs))
