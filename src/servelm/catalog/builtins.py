"""The built-in catalog entries: the default model and the three models the Segmind
pages sell, with their prices. An operator overrides any field of these in the models
file (``servelm.toml``); to change a built-in price for everyone, edit it here."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from servelm.catalog.specs import DEFAULT_MODEL_SLUG, ModelSpec


def default_spec(models_dir: Path) -> ModelSpec:
    return ModelSpec(
        slug=DEFAULT_MODEL_SLUG,
        aliases=("smollm2", "SmolLM2-135M-Instruct"),
        path=models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf",
        context_window=8192,
        default_max_tokens=256,
        max_output_tokens=2048,
        input_price=Decimal("0.05"),
        output_price=Decimal("0.1"),
        owned_by="HuggingFaceTB",
        display_name="SmolLM2 135M Instruct",
        description=(
            "A **135-million-parameter** instruction-tuned model from Hugging Face's SmolLM2 "
            "family, small enough to answer on a laptop CPU in milliseconds. servelm ships it "
            "as the default model (4-bit `Q4_1` weights, 92 MB), so a fresh install can "
            "serve requests before any large model is pulled."
        ),
        features=(
            "Runs on CPU: no GPU needed",
            "8,192-token context window",
            "English chat, short answers and simple instructions",
            "Open weights (Apache 2.0)",
        ),
        # Loaded at start-up: the first request a new server gets is not a cold start.
        preload=True,
    )


def builtin_specs(models_dir: Path) -> list[ModelSpec]:
    """The default model and the three models the Segmind pages sell.

    The seed models' weights are tens of GB and are not fetched by default; until an
    operator pulls them (or points ``path`` at a copy), they are listed as unavailable.
    Prices are credits per million tokens, and an operator's to change.
    """
    return [
        default_spec(models_dir),
        ModelSpec(
            slug="llama-v3p1-8b-instruct",
            aliases=("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
            hf_repo="bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
            hf_files=("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",),
            context_window=131072,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("0.2"),
            output_price=Decimal("0.2"),
            tools=True,
            owned_by="meta-llama",
            display_name="Llama 3.1 8B Instruct",
            description=(
                "Meta's **Llama 3.1** in its 8-billion-parameter instruction-tuned version: a "
                "dense transformer tuned for dialogue, with a 128K-token context and native "
                "tool calling. A strong general model that fits one consumer GPU "
                "(4-bit `Q4_K_M` weights, 4.9 GB)."
            ),
            features=(
                "131,072-token context window",
                "Tool calls (function calling)",
                "Multilingual: English, German, French, Italian, Portuguese, Hindi, Spanish "
                "and Thai",
                "Open weights (Llama 3.1 Community License)",
            ),
        ),
        ModelSpec(
            slug="mixtral-8x7b-instruct",
            aliases=("mistralai/Mixtral-8x7B-Instruct-v0.1",),
            hf_repo="TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF",
            hf_files=("mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf",),
            context_window=32768,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("0.6"),
            output_price=Decimal("0.6"),
            system_role="first_user",
            merge_consecutive=True,
            owned_by="mistralai",
            display_name="Mixtral 8x7B Instruct",
            description=(
                "Mistral AI's **sparse mixture of experts**: each layer has 8 expert "
                "networks and a router sends every token through 2 of them, so of its 46.7B "
                "parameters only about 12.9B work on each token. It answers like a much "
                "larger dense model at the speed and cost of a small one."
            ),
            features=(
                "Sparse mixture of experts (8 experts, 2 active per token)",
                "32,768-token context window",
                "English, French, Italian, German and Spanish; strong at code",
                "Open weights (Apache 2.0)",
            ),
        ),
        ModelSpec(
            slug="mixtral-8x22b-instruct",
            aliases=("mistralai/Mixtral-8x22B-Instruct-v0.1",),
            hf_repo="MaziyarPanahi/Mixtral-8x22B-Instruct-v0.1-GGUF",
            hf_files=tuple(
                f"Mixtral-8x22B-Instruct-v0.1.Q4_K_M-0000{i}-of-00005.gguf" for i in range(1, 6)
            ),
            context_window=65536,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("1.2"),
            output_price=Decimal("1.2"),
            system_role="last_user",
            merge_consecutive=True,
            owned_by="mistralai",
            display_name="Mixtral 8x22B Instruct",
            description=(
                "The larger **sparse mixture of experts** from Mistral AI: 141B parameters, "
                "of which about 39B are active for each token (2 of 8 experts per layer). "
                "Fluent in five languages and strong at mathematics and code, with a "
                "64K-token context."
            ),
            features=(
                "Sparse mixture of experts (8 experts, 2 active per token)",
                "65,536-token context window",
                "English, French, Italian, German and Spanish",
                "Strong at mathematics and coding",
                "Open weights (Apache 2.0)",
            ),
        ),
    ]
