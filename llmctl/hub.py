"""Hugging Face hub ids as MODEL, resolved offline from the local Hugging Face cache; `llmctl download`.

A MODEL that is not an existing path and reads as a hub id -- `org/name` or `name`, optionally `@revision` (a
branch, a tag or a full commit hash) -- means that repository's snapshot in the local Hugging Face cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), found by huggingface_hub with
`local_files_only=True`: nothing goes to the network at run time. An existing path always wins, and a string
starting with `/`, `./`, `../` or `~` is always a path. `download` is the one place that goes online: it fetches
the safetensors weights, the JSON configs and the tokenizer files (never pickled weights) into that cache.
huggingface_hub (installed with transformers) is imported only when a hub id is looked up.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from llmctl.errors import UserError

# what llmctl reads from a model repository: weights (safetensors only), configs, tokenizer files, chat templates
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"  # huggingface_hub's rule: '-', '.' inside only
_ID = re.compile(rf"^(?:{_PART}/)?{_PART}(?:@[^\s@/][^\s@]*)?$")


def parse(spec) -> tuple[str, str | None] | None:
    """`org/name[@revision]` or `name[@revision]` -> (repo id, revision or None); None when `spec` is a path by
    its form (`/`, `./`, `../`, `~` prefix, more than one `/`, characters a repo id can't have)."""
    s = str(spec)
    if not _ID.match(s):
        return None
    repo, _, rev = s.partition("@")
    if "--" in repo or ".." in repo or len(repo.rpartition("/")[2]) > 96:
        return None
    return repo, rev or None


def hub_id(spec) -> tuple[str, str | None] | None:
    """(repo id, revision) when MODEL `spec` names a hub repository: it reads as an id and is no existing path."""
    if spec is None or Path(spec).expanduser().exists():
        return None
    return parse(spec)


def hub_cache() -> str:
    """The Hugging Face hub cache huggingface_hub uses (HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve(spec, allow_patterns=ALLOW_PATTERNS) -> Path | None:
    """MODEL -> the cached snapshot directory of the hub id it names; None when `spec` is an existing path or not
    an id. An id missing from the cache (or a cached snapshot that lacks files) is a UserError naming the
    download command."""
    parsed = hub_id(spec)
    if parsed is None:
        return None
    repo, rev = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=rev, local_files_only=True, allow_patterns=allow_patterns))
    except IncompleteSnapshotError:
        raise UserError(f"model {spec} is only partly in the local Hugging Face cache ({hub_cache()}); fetch the "
                        f"rest with: llmctl download {spec}") from None
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        pass
    raise UserError(f"model {spec} is neither a local directory nor in the local Hugging Face cache "
                    f"({hub_cache()}); fetch it with: llmctl download {spec}")


def download(spec: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """Fetch a model repository's safetensors, JSON and tokenizer files into the Hugging Face cache (or
    `cache_dir`); return its snapshot directory. Offline, not found, gated or unreachable: one UserError."""
    parsed = parse(spec)
    if parsed is None:
        raise UserError(f"{spec!r} is not a Hugging Face model id (expected org/name, optionally @revision)")
    repo, rev = parsed
    if revision and rev and revision != rev:
        raise UserError(f"two revisions for {repo}: @{rev} and --revision {revision}; give one")
    rev = revision or rev
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as e
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        disable_progress_bars()  # progress bars only on a terminal
    where = f"{repo}" + (f" (revision {rev})" if rev else "")
    try:
        path = Path(snapshot_download(repo, revision=rev, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
    except e.GatedRepoError:
        raise UserError(f"{where} is gated: accept its terms on https://huggingface.co/{repo} and log in "
                        "(`hf auth login` or HF_TOKEN)") from None
    except e.RepositoryNotFoundError:
        raise UserError(f"no model {repo} on the Hugging Face Hub (a private one needs `hf auth login` or "
                        "HF_TOKEN)") from None
    except e.RevisionNotFoundError:
        raise UserError(f"model {repo} has no revision {rev!r} on the Hugging Face Hub") from None
    except e.IncompleteSnapshotError:
        raise UserError(f"cannot fetch {where}: the Hub cannot be reached and the cached snapshot lacks files "
                        f"(HF_HUB_OFFLINE={'1' if constants.HF_HUB_OFFLINE else '0'}, {constants.ENDPOINT})") from None
    except e.LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE=1 keeps it offline" if constants.HF_HUB_OFFLINE else
               f"the Hub ({constants.ENDPOINT}) cannot be reached: {_first_line(err.__cause__ or err)}")
        raise UserError(f"cannot fetch {where}: {why}, and it is not in the cache") from None
    except (e.HfHubHTTPError, e.HFValidationError) as err:
        raise UserError(f"cannot fetch {where}: {_first_line(err)}") from None
    except Exception as err:
        if not type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise
        raise UserError(f"cannot fetch {where}: the Hub ({constants.ENDPOINT}) cannot be reached: "
                        f"{_first_line(err)}") from None
    if not path.is_dir() or not any(path.rglob("*.safetensors")):
        raise UserError(f"{where} has no safetensors weights on the Hub (llmctl reads no pickled weights)")
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
