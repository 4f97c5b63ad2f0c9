"""`python -m llamaduo_nb.finetune <run> --cycle N`: one cycle of 02 (the entry `accelerate launch` runs)."""

from .stage import main

raise SystemExit(main())
