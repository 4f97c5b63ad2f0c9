"""llamaduo-nb: notebooks + a thin package that migrate a task from a service LLM to a small local model."""

import os

# On a small shared CPU, OpenMP threads that spin while waiting make torch 10-35x slower on small matmuls
# when another process holds a core (measured on 2 cores). Passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
