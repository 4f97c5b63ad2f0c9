"""Where every artifact of a run lives: one method per path, and nothing else in the package builds paths.

    outputs/<run>/
      params.yaml            resolved params of the run (what every notebook reads)
      state.json             runner state: finished notebooks, decisions, timings
      calls.sqlite           service-LLM call cache + cost ledger (see callcache.py)
      batches/               provider batches each stage submitted (<stage>-cycle_NN.json, see services/batches.py)
      coverage/              01: train.jsonl, test.jsonl, report.json, curation.json, 01_coverage.ipynb
      cycle_00/ cycle_01/ …  02-05 of each cycle: adapter/, train_log.jsonl, responses.jsonl,
                             model-<type>.gguf (03 on llama.cpp; no merged weights are kept), judgments.jsonl,
                             metrics.json, synthetic.jsonl, synth_report.json, notebooks
      baselines/             04, once per run: <model>/responses.jsonl, judgments.jsonl, meta.json for the
                             student before fine-tuning (base_student) and each service baseline
      deploy/                06: merged/, gguf/, Modelfile, parity.json, economics.json, notebook
      fig2_cycles.png        V and C@zeta per judge against cycle and training-set size (04 / summary)
      summary.md             written by the runner at the end
      arms/<generator>/      a study of several generators (synthesize.generators): one run folder per arm,
                             its coverage/, cycle_00/ and baselines/ linked from the study's (shared), then
                             its own cycles 1..n, state.json, lock and calls.sqlite
      fig2_volumes.png/.csv  a sweep or a study (study.py): score against synthetic volume, one line per
                             generator (or per run for `llamaduo compare`), with the rows behind it
      volumes_table.md/.csv  a Table-1 cell per generator x volume; table1_study.md/.csv: Table 1 across
                             the arms' (or compared runs') selected cycles; study.json: what was combined
      review.json            decisions of the review view in 04 (bad references, ambiguous prompts, notes);
                             01 applies them on its next run, 04 leaves ambiguous prompts out of the decision

The record schemas of these files are documented in `schemas.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STAGES = ("01_coverage", "02_finetune", "03_batch_inference", "04_evaluate", "05_synthesize", "06_deploy")


def project_file(path: str | Path) -> Path:
    """A relative path is looked up from the working directory, then from the project root."""
    path = Path(path)
    if path.is_absolute() or path.is_file():
        return path
    in_project = Path(__file__).resolve().parents[1] / path
    return in_project if in_project.is_file() else path


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_path(path: str | Path) -> Path:
    """Where a relative path of a notebook parameter or a params file points: the project root.

    Papermill runs every notebook with the project root as its working directory; a notebook opened in
    JupyterLab from `notebooks/` must see the same files, so the kernel's working directory never counts.
    """
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(PROJECT_ROOT / path))


def cache_home() -> Path:
    """Machine-wide cache for derived model files (dequantised student, GGUF copies); not per run."""
    return Path(os.environ.get("LLAMADUO_CACHE", Path.home() / ".cache" / "llamaduo_nb"))


@contextlib.contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """Hold the file lock of a cache folder (`.<name>.lock` beside it) while it is checked and built: a second
    process waits for the first build instead of repeating it or seeing half a folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def for_run(cls, outputs_dir: str | Path, run_name: str) -> RunLayout:
        return cls(Path(outputs_dir) / run_name)

    # ---- run level
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        """Held (fcntl) by the runner working on this folder; holds its pid, host and start time."""
        return self.root / "runner.lock"

    @property
    def params_changes_file(self) -> Path:
        """One JSON line per `--resume --accept-changed-params`: when, and which keys changed from what to what."""
        return self.root / "params_changes.jsonl"

    @property
    def calls_db(self) -> Path:
        return self.root / "calls.sqlite"

    @property
    def ledger_csv(self) -> Path:
        return self.root / "ledger.csv"

    def batches_file(self, stage: str, cycle: int | None) -> Path:
        """Provider batches a stage submitted (ids, request keys, status): a resumed stage collects them."""
        name = stage if cycle is None else f"{stage}-cycle_{cycle:02d}"
        return self.root / "batches" / f"{name}.json"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def review_file(self) -> Path:
        """Run-level decisions of the 04 review view (schema in review.py)."""
        return self.root / "review.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    # ---- 01 coverage
    @property
    def coverage_dir(self) -> Path:
        return self.root / "coverage"

    @property
    def train_file(self) -> Path:
        return self.coverage_dir / "train.jsonl"

    @property
    def test_file(self) -> Path:
        return self.coverage_dir / "test.jsonl"

    @property
    def coverage_report(self) -> Path:
        return self.coverage_dir / "report.json"

    @property
    def skipped_file(self) -> Path:
        return self.coverage_dir / "skipped.jsonl"

    @property
    def curation_file(self) -> Path:
        return self.coverage_dir / "curation.json"

    @property
    def split_plot(self) -> Path:
        return self.coverage_dir / "split.png"

    @property
    def token_plot(self) -> Path:
        """01's token lengths per split (the statistics are in report.json's `token_statistics`)."""
        return self.coverage_dir / "token_lengths.png"

    # ---- cycles
    def cycle_dir(self, cycle: int) -> Path:
        return self.root / f"cycle_{cycle:02d}"

    def adapter_dir(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "adapter"

    def checkpoints_dir(self, cycle: int) -> Path:
        """02's Trainer checkpoints (checkpoint-<step>/); removed once the adapter is saved."""
        return self.cycle_dir(cycle) / "checkpoints"

    def train_data_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "train_data.jsonl"

    def tracking_dir(self, cycle: int) -> Path:
        """TensorBoard event files of the cycle's fine-tuning (finetune.report_to: tensorboard)."""
        return self.cycle_dir(cycle) / "runs"

    def train_log(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "train_log.jsonl"

    def train_summary(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "finetune.json"

    def loss_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "loss.png"

    def responses_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "responses.jsonl"

    def inference_summary(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "inference.json"

    def cycle_merged_dir(self, cycle: int) -> Path:
        """03 on the llama.cpp engine: scratch for the cycle's adapter merged into the base (a standard HF
        folder), removed once `cycle_gguf` is written."""
        return self.cycle_dir(cycle) / "merged"

    def cycle_gguf(self, cycle: int, qtype: str = "f16") -> Path:
        """03 on the llama.cpp engine: `cycle_merged_dir` as GGUF of type `qtype` (`inference.llamacpp_gguf`)."""
        return self.cycle_dir(cycle) / f"model-{qtype.lower()}.gguf"

    def cycle_gguf_marker(self, cycle: int, qtype: str = "f16") -> Path:
        """Which adapter (content hash) `cycle_gguf` was built from; a GGUF without a match is rebuilt."""
        return self.cycle_dir(cycle) / f"model-{qtype.lower()}.json"

    def output_lengths_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "output_lengths.png"

    def judgments_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "judgments.jsonl"

    def metrics_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "metrics.json"

    def scores_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "precision_vs_similarity.png"

    def pairwise_file(self, cycle: int) -> Path:
        """04's pairwise verdicts (`evaluate.pairwise: true`): one line per (answer, judge, repeat, order)."""
        return self.cycle_dir(cycle) / "pairwise.jsonl"

    def pairwise_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "pairwise.png"

    def synthetic_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "synthetic.jsonl"

    def synthetic_rejected_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "synthetic_rejected.jsonl"

    def synth_report(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "synth_report.json"

    def synth_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "synth_counts.png"

    # ---- teacher study (05, when teacher_study.candidates are declared)
    def teacher_study_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "teacher_study.json"

    def teacher_responses_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "teacher_responses.jsonl"

    def teacher_table_csv(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "teacher_study.csv"

    def teacher_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "teacher_study.png"

    def teacher_validation_dir(self) -> Path:
        """`llamaduo validate-teachers`: one sub-run per candidate, and the rank-correlation table."""
        return self.root / "teacher_validation"

    def table1_csv(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "table1.csv"

    def table1_md(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "table1.md"

    def agreement_file(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "agreement.json"

    def models_scores_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "precision_vs_similarity_models.png"

    def category_hist_plot(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "scores_by_category.png"

    # ---- run-level reference rows of Table 1 (computed once per run by 04)
    @property
    def baselines_dir(self) -> Path:
        return self.root / "baselines"

    def baseline_dir(self, model: str) -> Path:
        """`base_student` (the student before fine-tuning) or a service baseline's provider name."""
        return self.baselines_dir / model

    def baseline_responses_file(self, model: str) -> Path:
        return self.baseline_dir(model) / "responses.jsonl"

    def baseline_judgments_file(self, model: str) -> Path:
        return self.baseline_dir(model) / "judgments.jsonl"

    def baseline_meta_file(self, model: str) -> Path:
        return self.baseline_dir(model) / "meta.json"

    @property
    def cycles_fig2_plot(self) -> Path:
        return self.root / "fig2_cycles.png"

    # ---- a study of several generators (its arms) and the combined figures (study.py, `llamaduo compare`)
    @property
    def arms_dir(self) -> Path:
        return self.root / "arms"

    def arm_dir(self, name: str) -> Path:
        """The run folder of one arm (a generator) of the study in this folder."""
        return self.arms_dir / name

    def arms(self) -> list[str]:
        """Names of the arms that have a run folder, in name order."""
        return sorted(p.name for p in self.arms_dir.iterdir() if p.is_dir()) if self.arms_dir.is_dir() else []

    @property
    def volumes_plot(self) -> Path:
        """Paper Fig. 2: score against synthetic volume (log axis), one line per generator or run."""
        return self.root / "fig2_volumes.png"

    @property
    def volumes_csv(self) -> Path:
        return self.root / "fig2_volumes.csv"

    @property
    def volumes_table_md(self) -> Path:
        return self.root / "volumes_table.md"

    @property
    def volumes_table_csv(self) -> Path:
        return self.root / "volumes_table.csv"

    @property
    def study_table1_md(self) -> Path:
        return self.root / "table1_study.md"

    @property
    def study_table1_csv(self) -> Path:
        return self.root / "table1_study.csv"

    @property
    def study_file(self) -> Path:
        return self.root / "study.json"

    # ---- 06 deploy
    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def merged_dir(self) -> Path:
        return self.deploy_dir / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.deploy_dir / "gguf"

    def gguf_file(self, qtype: str) -> Path:
        return self.gguf_dir / f"model-{qtype.lower()}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.deploy_dir / "Modelfile"

    @property
    def vllm_launch(self) -> Path:
        return self.deploy_dir / "serve_vllm.sh"

    @property
    def llamacpp_launch(self) -> Path:
        return self.deploy_dir / "serve_llamacpp.sh"

    @property
    def parity_report(self) -> Path:
        return self.deploy_dir / "parity.json"

    @property
    def economics_report(self) -> Path:
        return self.deploy_dir / "economics.json"

    @property
    def deploy_report(self) -> Path:
        return self.deploy_dir / "deploy.json"

    @property
    def model_card(self) -> Path:
        return self.merged_dir / "README.md"

    @property
    def cycles_plot(self) -> Path:
        return self.deploy_dir / "cycles.png"

    @property
    def greedy_parity_file(self) -> Path:
        return self.deploy_dir / "greedy_parity.jsonl"

    @property
    def parity_responses_file(self) -> Path:
        return self.deploy_dir / "parity_responses.jsonl"

    @property
    def parity_judgments_file(self) -> Path:
        return self.deploy_dir / "parity_judgments.jsonl"

    @property
    def parity_rejudged_file(self) -> Path:
        return self.deploy_dir / "parity_rejudged.jsonl"

    @property
    def parity_plot(self) -> Path:
        return self.deploy_dir / "parity.png"

    @property
    def ledger_plot(self) -> Path:
        return self.deploy_dir / "ledger_costs.png"

    @property
    def breakeven_plot(self) -> Path:
        return self.deploy_dir / "breakeven.png"

    def server_log(self, qtype: str) -> Path:
        return self.logs_dir / f"llama_server_{qtype.lower()}.log"

    # ---- notebooks
    def notebook_out(self, stage: str, cycle: int | None = None) -> Path:
        """Executed notebooks are saved beside the files they wrote."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        if stage == "01_coverage":
            folder = self.coverage_dir
        elif stage == "06_deploy":
            folder = self.deploy_dir
        else:
            if cycle is None:
                raise ValueError(f"{stage} needs a cycle number")
            folder = self.cycle_dir(cycle)
        return folder / f"{stage}.ipynb"

    def cycles(self) -> list[int]:
        """Cycle numbers that have a folder, in order."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in self.root.glob("cycle_[0-9][0-9]") if p.is_dir())
