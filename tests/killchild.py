"""Child process of the kill trials: run 04's judging or 05's synthesis the way the notebooks do.

    python tests/killchild.py 04_evaluate <run_dir> <cycle>
    python tests/killchild.py 05_synthesize <run_dir> <cycle>

The harness (tests/test_kill_trials.py) SIGKILLs it at random points and starts it again.
"""

from __future__ import annotations

import sys
import warnings


def main(stage_name: str, run_dir: str, cycle: int) -> None:
    from llamaduo_nb import evaluate, synthesize
    from llamaduo_nb.notebook import open_stage

    warnings.filterwarnings("ignore", message="no price for model")  # the test server's model is unpriced
    stage = open_stage(stage_name, run_dir, "", cycle)
    if stage_name == "04_evaluate":
        responses = evaluate.load_responses(stage.layout.responses_file(cycle))
        judgments = evaluate.run_judges(stage, responses)
        evaluate.write_metrics(stage, judgments)
    elif stage_name == "05_synthesize":
        synthesize.run_synthesis(stage)
    else:
        raise SystemExit(f"unknown stage {stage_name!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
