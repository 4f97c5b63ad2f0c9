"""``python -m llamaduo_nb.dataquality --pool A.jsonl ...`` = ``llamaduo dedup --pool A.jsonl ...``."""

import sys

from .cli import main

sys.exit(main())
