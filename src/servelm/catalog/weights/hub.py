"""``servelm models pull``: fetch a catalog entry's GGUF files from the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from servelm.catalog.specs import ModelSpec


class PullError(RuntimeError):
    pass


def pull(spec: ModelSpec, models_dir: Path) -> list[Path]:
    """Download every file of ``spec`` into ``models_dir`` (with the hub's progress bars).

    Files already there are not downloaded again (the hub library checks them).
    """
    if spec.engine != "llama.cpp":
        raise PullError(f"'{spec.slug}' runs on a remote engine; there is nothing to pull.")
    if not spec.hf_repo or not spec.hf_files:
        raise PullError(
            f"'{spec.slug}' names no hf_repo and hf_files in the models file; "
            "add them, or set path to weights you already have."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    models_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for filename in spec.hf_files:
        try:
            local = hf_hub_download(spec.hf_repo, filename, local_dir=models_dir)
        except LocalEntryNotFoundError as exc:
            # The hub library wraps its HTTP answer in this when there is no local copy;
            # a wrapped HTTP error means the hub answered, anything else that it did not.
            if isinstance(exc.__cause__, HfHubHTTPError):
                raise _refused(spec, filename, exc.__cause__) from exc
            raise PullError(
                f"could not reach the Hugging Face Hub to fetch {spec.hf_repo}/{filename}: "
                "check the network (or HF_ENDPOINT), or copy the file into "
                f"{models_dir} and run again."
            ) from exc
        except HfHubHTTPError as exc:
            raise _refused(spec, filename, exc) from exc
        except OSError as exc:
            raise PullError(f"could not fetch {spec.hf_repo}/{filename}: {exc}") from exc
        out.append(Path(local))
    return out


def _refused(spec: ModelSpec, filename: str, exc: Exception) -> PullError:
    response = getattr(exc, "response", None)
    status = response.status_code if response is not None else "?"
    return PullError(
        f"the Hugging Face Hub refused {spec.hf_repo}/{filename} (HTTP {status}); "
        "check hf_repo and hf_files in the models file, and HF_TOKEN for gated models."
    )
