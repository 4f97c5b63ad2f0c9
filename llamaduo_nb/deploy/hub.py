"""06 step 6: optional upload of the merged model (and GGUF files, and the run's datasets) to the Hub.

The token is the user's: `HF_TOKEN` or the login cached by `hf auth login` (huggingface_hub's
`get_token`), never a parameter or a file under outputs/. Every call says what it did or why it did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..runlayout import RunLayout
from ..student import GGUFExport


@dataclass(frozen=True)
class PushResult:
    pushed: bool
    url: str | None
    reason: str  # what was uploaded, or why nothing was


def hub_token() -> tuple[str | None, str]:
    """(token, where it came from): HF_TOKEN, else huggingface_hub's cached login, else (None, why)."""
    import os

    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip(), "HF_TOKEN"
    token = get_token()
    if token:
        return token, "cached login (hf auth login)"
    return None, "no HF_TOKEN in the environment and no cached login (`hf auth login`)"


def push_to_hub(
    merged_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    extra_files: Sequence[str | Path] = (),
) -> PushResult:
    """Upload the merged folder (model card included) and e.g. GGUF files under gguf/ to a model repo."""
    token, source = hub_token()
    if token is None:
        return PushResult(False, None, f"not pushed to {repo_id}: {source}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    api.upload_folder(repo_id=repo_id, folder_path=str(merged_dir), commit_message="LlamaDuo: merged student")
    for path in extra_files:
        path = Path(path)
        api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=f"gguf/{path.name}",
            repo_id=repo_id,
            commit_message=f"LlamaDuo: {path.name}",
        )
    return PushResult(True, url, f"pushed merged weights + {len(extra_files)} GGUF files with the {source}")


def dataset_files(layout: RunLayout, cycle: int) -> dict[str, Path]:
    """path in the dataset repo -> file: the curated splits and the synthetic data up to `cycle`."""
    files = {"train.jsonl": layout.train_file, "test.jsonl": layout.test_file}
    for c in range(cycle + 1):
        if layout.synthetic_file(c).is_file():
            files[f"synthetic/cycle_{c:02d}.jsonl"] = layout.synthetic_file(c)
    return {k: v for k, v in files.items() if v.is_file()}


def push_datasets(layout: RunLayout, repo_id: str, cycle: int, *, private: bool = True) -> PushResult:
    """Upload the curated train/test splits and the synthetic data as a dataset repo (JSONL files)."""
    token, source = hub_token()
    if token is None:
        return PushResult(False, None, f"datasets not pushed to {repo_id}: {source}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset"))
    files = dataset_files(layout, cycle)
    for name, path in files.items():
        api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=name,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"LlamaDuo: {name}",
        )
    return PushResult(True, url, f"pushed {len(files)} dataset files with the {source}")


def push_if_configured(
    cfg: RunConfig, layout: RunLayout, exports: Sequence[GGUFExport], cycle: int | None = None
) -> list[PushResult]:
    """Push what `deploy.hf_repo` / `deploy.hf_dataset_repo` ask for; one result (with its reason) each."""
    dep = cfg.deploy
    results = []
    if not dep.hf_repo:
        results.append(PushResult(False, None, "deploy.hf_repo is not set: nothing pushed"))
    else:
        results.append(
            push_to_hub(
                layout.merged_dir, dep.hf_repo, private=dep.hf_private, extra_files=[e.path for e in exports]
            )
        )
    if dep.hf_dataset_repo:
        chosen = cycle if cycle is not None else max(layout.cycles(), default=0)
        results.append(push_datasets(layout, dep.hf_dataset_repo, chosen, private=dep.hf_private))
    return results
