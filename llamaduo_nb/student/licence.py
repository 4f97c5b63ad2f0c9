"""The licence of the student's base checkpoint, as far as we know it: written into every GGUF file (03's
per-cycle export, 06's shipped files) and into 06's model card."""

from __future__ import annotations

# What the card says about licences we know; anything else tells the reader to check.
BASE_LICENCES: dict[str, tuple[str, str, str]] = {
    # model id prefix: (licence id, upstream model, note)
    "embedded:smollm2": (
        "apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 is released by Hugging Face under the Apache License 2.0.",
    ),
    "HuggingFaceTB/SmolLM2": ("apache-2.0", "", "SmolLM2 is released under the Apache License 2.0."),
    "google/gemma": (
        "gemma",
        "",
        "Gemma weights are under Google's Gemma Terms of Use, which carry over to "
        "derivatives (including this merged model).",
    ),
    "meta-llama/": (
        "llama3",
        "",
        "Llama weights are under Meta's Llama Community License, which carries over "
        "to derivatives; check its naming and acceptable-use terms.",
    ),
    "mistralai/": (
        "apache-2.0",
        "",
        "Check the Mistral model's own card; most open Mistral weights are Apache-2.0.",
    ),
}


def base_licence(model_id: str) -> tuple[str, str, str]:
    """(licence id, upstream model id, note) for the card; unknown bases say so instead of guessing."""
    for prefix, (licence, upstream, note) in BASE_LICENCES.items():
        if model_id.startswith(prefix):
            return licence, upstream or model_id, note
    return (
        "other",
        model_id,
        f"The licence of the base model {model_id} was not recognised: check its model card.",
    )
