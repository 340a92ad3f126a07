"""Pushing a checkpoint directory to the Hugging Face Hub as it is on disk: model files, manifest,
recipe, results and the model card.

What can be checked without the network (the repository id, offline mode, a token) is checked by
:func:`check_push`, which a compression that will push calls before its slow work; a push that
fails leaves the checkpoint in place, to push again with ``compress-eval push``.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from compress_eval.errors import UserError
from compress_eval.models import gate
from compress_eval.results import store

# Why a Hub answer refused the push, by status: what to do about it.
REFUSALS = {
    401: "the Hub does not accept the token (401 Unauthorized): log in again with `hf auth login` or set "
         "HF_TOKEN to a valid token",
    403: "the token may not write there (403 Forbidden): use a token with write access to that namespace",
}


def first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def check_push(repo_id: str) -> None:
    """Refuse, in one line, a push that cannot work: a malformed id, offline mode, no token."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"invalid Hub repository id {repo_id!r}: give NAMESPACE/NAME (or NAME, under your "
                        f"account) of letters, digits, '-', '_' and '.', not starting or ending with '-' or '.', "
                        f"without '--' or '..', at most 96 characters") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError("cannot push to the Hugging Face Hub while HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE")
    if get_token() is None:
        raise UserError("no Hugging Face token to push with: run `hf auth login`, or set HF_TOKEN to a token "
                        "with write access")


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` if it does not exist and upload the checkpoint in ``run_dir`` to it, its
    model card rendered again first (naming the repository); returns the repository's URL."""
    check_push(repo_id)
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or store.read_manifest(run_dir) is None:
        raise UserError(f"{run_dir} is not a compress-eval checkpoint (no {store.MANIFEST}): give a directory "
                        f"written by `compress-eval compress` or `run`")
    gate.check(run_dir)  # a directory that does not load is not worth publishing
    store.write_card(run_dir, repo_id)
    api = HfApi()
    again = f"the checkpoint stays in {run_dir}: push it again with `compress-eval push {run_dir} {repo_id}`"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        # Hidden files are the temporary files of a writer busy in the directory.
        api.upload_folder(repo_id=url.repo_id, folder_path=run_dir, ignore_patterns=[".*"],
                          commit_message=f"compress-eval checkpoint {run_dir.name}")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        why = REFUSALS.get(status, f"the Hub refused it ({first_line(exc)})")
        raise UserError(f"cannot push {run_dir} to {repo_id}: {why}; {again}") from None
    except HTTPError as exc:  # the transport's errors: no connection, DNS, timeout
        raise UserError(f"cannot reach the Hugging Face Hub at {api.endpoint} ({first_line(exc)}): check "
                        f"the network (or HF_ENDPOINT); {again}") from None
    return str(url)
