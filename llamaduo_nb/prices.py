"""The price table: USD per 1M input/output tokens by model, from `params/prices.yaml` (`load_prices`).

Foundation: config validates that every paid provider's model has a price, the service client books each
paid reply's cost with it (`callcache` ledger rows), the forecast prices planned calls.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .runlayout import project_file


class PriceError(ValueError):
    """`params/prices.yaml` is malformed; the message names the file and the entry."""


_PRICES_EXAMPLE = (
    "models:\n  gpt-4o: {input: 2.50, cached_input: 1.25, output: 10.00}   # USD per 1M tokens\n"
    "aliases:\n  gpt-4o-2024-08-06: gpt-4o\nbatch_discount: {openai: 0.5}"
)
_PRICE_KEYS = {"input", "output", "cached_input"}


@dataclass(frozen=True)
class Price:
    input: float  # USD per 1M input tokens
    output: float  # USD per 1M output tokens
    cached_input: float | None = None  # USD per 1M input tokens served from the provider's prompt cache


class PriceTable:
    """USD per 1M input/output tokens by model name.

    Lookup is explicit: the model id itself under `models`, else its entry under `aliases` (a dated snapshot
    such as `claude-3-sonnet-20240229` names its family `claude-3-sonnet`). There is no prefix guessing:
    `gemini-2.5-flash-lite` is not `gemini-2.5-flash`. A paid provider whose model has no price is a config
    error (RunConfig validation); free providers (`embedded`, `free: true`) always cost 0.
    """

    def __init__(
        self,
        prices: Mapping[str, Price],
        aliases: Mapping[str, str] | None = None,
        batch_discount: Mapping[str, float] | None = None,
        source: str = "<prices>",
    ):
        self.prices = dict(prices)
        self.aliases = dict(aliases or {})
        self.batch_discount = dict(batch_discount or {})
        self.source = source
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise PriceError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise PriceError(f"{path}: expected a mapping at the top level; example:\n{_PRICES_EXAMPLE}")
        unknown = set(data) - {"currency", "unit", "as_of", "models", "aliases", "batch_discount"}
        if unknown:
            raise PriceError(f"{path}: unknown key(s) {sorted(unknown)}; example:\n{_PRICES_EXAMPLE}")
        models = data.get("models") or {}
        if not isinstance(models, dict):
            raise PriceError(
                f"{path}, key 'models': expected a mapping of model -> price; example:\n{_PRICES_EXAMPLE}"
            )
        prices = {str(name): _price(entry, path, f"models.{name}") for name, entry in models.items()}
        aliases = data.get("aliases") or {}
        if not isinstance(aliases, dict):
            raise PriceError(
                f"{path}, key 'aliases': expected a mapping of snapshot id -> model under models"
            )
        for alias, family in aliases.items():
            if family not in prices:
                raise PriceError(
                    f"{path}, key 'aliases.{alias}': {family!r} is not listed under models; "
                    f"add `  {family}: {{input: ..., output: ...}}` there"
                )
        discounts = data.get("batch_discount") or {}
        if not isinstance(discounts, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in discounts.values()
        ):
            raise PriceError(
                f"{path}, key 'batch_discount': expected provider kind -> share of the list price paid "
                f"in batch mode in [0, 1], e.g. {{openai: 0.5}}; got {discounts!r}"
            )
        return cls(
            prices,
            {str(k): str(v) for k, v in aliases.items()},
            {str(k): float(v) for k, v in discounts.items()},
            str(path),
        )

    def lookup(self, model: str) -> Price | None:
        if model in self.prices:
            return self.prices[model]
        family = self.aliases.get(model)
        return self.prices.get(family) if family is not None else None

    def missing_advice(self, provider: Any) -> str:
        """What to add to the price table for `provider`'s model (the exact YAML line)."""
        model = provider.model
        families = sorted((name for name in self.prices if model.startswith(name)), key=len, reverse=True)
        alias_hint = (
            f", or, if it is a dated snapshot of a listed model, under `aliases:` the line "
            f"`  {model}: {families[0]}`"
            if families
            else ""
        )
        return (
            f"provider '{provider.name}' ({provider.kind}) uses model '{model}', which has no price in "
            f"{self.source}. Add under `models:` the line "
            f"`  {model}: {{input: <USD per 1M input tokens>, output: <USD per 1M output tokens>}}` "
            f"with the provider's list price{alias_hint}. A server you host yourself can instead declare "
            f"`free: true` on the provider"
        )

    def cost(
        self,
        kind: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        free: bool = False,
        cached_input_tokens: int = 0,
        batch: bool = False,
    ) -> float:
        """USD for one call. `cached_input_tokens` (part of `input_tokens`) are billed at `cached_input`
        where the model has that price; `batch` applies the provider kind's batch discount."""
        if free or kind == "embedded":
            return 0.0
        price = self.lookup(model)
        if price is None:
            with self._warn_lock:
                first = model not in self._warned
                self._warned.add(model)
            if first:
                warnings.warn(
                    f"no price for model '{model}' in {self.source}; its calls are ledgered at $0. "
                    f"Add e.g. `  {model}: {{input: 1.0, output: 2.0}}` under `models:` (USD per 1M tokens).",
                    stacklevel=2,
                )
            return 0.0
        cached = min(max(int(cached_input_tokens), 0), int(input_tokens))
        cached_rate = price.input if price.cached_input is None else price.cached_input
        usd = (
            (input_tokens - cached) * price.input + cached * cached_rate + output_tokens * price.output
        ) / 1e6
        if batch:
            usd *= self.batch_discount.get(kind, 1.0)
        return usd


def _price(entry: Any, path: Path, key: str) -> Price:
    if not isinstance(entry, dict) or not {"input", "output"} <= set(entry) or set(entry) - _PRICE_KEYS:
        raise PriceError(
            f"{path}, key '{key}': expected {{input: <USD/1M>, output: <USD/1M>}} "
            f"(optionally cached_input), got {entry!r}"
        )
    for side in entry:
        value = entry[side]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PriceError(f"{path}, key '{key}.{side}': expected a number >= 0, got {value!r}")
    cached = entry.get("cached_input")
    return Price(float(entry["input"]), float(entry["output"]), None if cached is None else float(cached))


def load_prices(prices_file: str | Path, *, required: bool = False) -> PriceTable:
    """Load the price table. A missing file is a PriceError when `required` (a paid provider needs it),
    else an empty table with one warning."""
    path = project_file(prices_file)
    if not path.is_file():
        if required:
            raise PriceError(
                f"price table {prices_file} not found ({path}); paid providers need their prices"
            )
        warnings.warn(f"price table {prices_file} not found; every call is ledgered at $0", stacklevel=2)
        return PriceTable({}, source=str(prices_file))
    return PriceTable.load(path)
