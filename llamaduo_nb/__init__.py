"""llamaduo-nb: notebooks + a thin package that migrate a task from a service LLM to a small local model."""

import os

# On a small shared CPU, OpenMP threads that spin while waiting make torch 10-35x slower on small matmuls
# when another process holds a core (measured on 2 cores). Passive waiting costs nothing when idle.
# The marker says the policy is ours, not the user's: it travels with it into papermill's kernels, and
# llama-server (a process of its own, whose threads meet at a barrier after every op) is started with a short
# bounded spin instead (`embedded.server_env`): passive waits there cost half its tokens/s.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["LLAMADUO_DEFAULT_OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
