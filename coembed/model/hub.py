"""Model folders on the Hugging Face Hub: find, download and upload them.

Built on ``huggingface_hub``'s helpers rather than its ``ModelHubMixin``: the
mixin passes ``config.json`` to ``__init__`` as keyword arguments and loads a
fixed ``model.safetensors``, while a coembed model validates a versioned,
nested config first and checks every head weight and encoder fingerprint
itself; overriding the mixin's hooks for that would leave nothing of it.

* :func:`download` is the only function that fetches a model. It calls
  :func:`huggingface_hub.snapshot_download` for the data files a model folder
  holds (:data:`DOWNLOAD_PATTERNS`; never ``.bin``, ``.pt`` or ``.py`` files),
  which also honours ``HF_HUB_OFFLINE`` and the cache. The folder it returns is
  then loaded exactly like a local folder.
* :func:`upload_folder` creates the repo and uploads a folder written by
  :meth:`~coembed.CoEmbedder.save_pretrained` in one commit.

This module knows model folders by their files (:mod:`coembed.layout`), never
the model class, which builds on it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub import snapshot_download as hub_snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from coembed import layout
from coembed.errors import HubError, ModelLoadError
from coembed.layout import is_repo_id, model_folders
from coembed.version import __version__

log = logging.getLogger(__name__)

#: The files of a model folder that are downloaded; nothing else in a repo is fetched.
DOWNLOAD_PATTERNS = [layout.MODEL_CONFIG, layout.MODEL_WEIGHTS, layout.MODEL_CARD, *layout.RECORD_FILES,
                     layout.FIGURE_GLOB]


# ---------------------------------------------------------------------------------------
# finding and downloading
# ---------------------------------------------------------------------------------------


def locate_model(model_id: str | os.PathLike[str], *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                 local_files_only: bool = False) -> tuple[Path, Path]:
    """``(model folder, record folder)`` for a local model or run folder, or a Hub repo id (downloaded)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return model_folders(path)
    repo_id = os.fspath(model_id)
    if path.exists() or isinstance(model_id, os.PathLike) or not is_repo_id(repo_id):
        raise ModelLoadError(f"{repo_id!r} is not a model folder, and not a Hugging Face Hub repo id ('user/name')")
    return model_folders(download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only))


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             token: str | bool | None = None, local_files_only: bool = False) -> Path:
    """Fetch the data files of the model repo ``repo_id`` into the Hugging Face cache; return the snapshot folder."""
    try:
        folder = snapshot_download(repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only, allow_patterns=DOWNLOAD_PATTERNS,
                                   library_name="coembed", library_version=__version__)
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache, and the Hub "
                             f"was not asked (HF_HUB_OFFLINE / local_files_only) or could not be reached: {exc}") from None
    except GatedRepoError:
        raise ModelLoadError(f"Hub repo {repo_id!r} is gated: accept its conditions on the Hub and pass a token") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id!r} is not a local folder, and the Hub has no model repo of that name "
                             "(or it is private: pass token=... or log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except network_errors() as exc:
        raise ModelLoadError(f"could not download {repo_id!r} from the Hub: {type(exc).__name__}: {exc}") from None
    return Path(folder)


def network_errors() -> tuple[type[BaseException], ...]:
    """Errors of the Hub client's HTTP stack (requests, httpx or httpx2, by huggingface_hub version)."""
    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, ConnectionError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def snapshot_download(repo_id: str, **kwargs: Any) -> str:
    """:func:`huggingface_hub.snapshot_download`: the one network call of loading (tests replace it)."""
    return hub_snapshot_download(repo_id, **kwargs)


# ---------------------------------------------------------------------------------------
# uploading
# ---------------------------------------------------------------------------------------


def upload_folder(folder: Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                  commit_message: str | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` in one commit; returns the repo URL."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    log.info("uploading %s to Hub repo %s", ", ".join(files), repo_id)
    api = HfApi(token=token, library_name="coembed", library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message=commit_message or f"Upload coembed model ({__version__})")
    except network_errors() as exc:
        raise HubError(f"could not upload to Hub repo {repo_id!r}: {type(exc).__name__}: {exc}") from None
    return str(url)
