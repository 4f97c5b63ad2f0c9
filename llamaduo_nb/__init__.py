"""llamaduo-nb: notebooks + a thin package that migrate a task from a service LLM to a small local model."""

__version__ = "0.1.0"
