"""``python -m llamaduo_nb.testing [--port 8000 --rpm 600 --latency 0.5 ...]``: the test LLM server by hand."""

from .server import main

main()
