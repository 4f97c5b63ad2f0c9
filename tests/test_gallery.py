"""`make docs`: the committed gallery of a run — summary with working image links, plots downscaled, size capped."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from llamaduo_nb import gallery  # noqa: E402
from llamaduo_nb.runlayout import RunLayout  # noqa: E402


def _png(path, width_in: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(width_in, 3))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path, dpi=150)
    plt.close(fig)


def test_gallery_copies_the_summary_and_downscaled_plots(tmp_path):
    layout = RunLayout(tmp_path / "run")
    _png(layout.loss_plot(0), 12)  # 1800 px wide
    _png(layout.cycles_fig2_plot, 4)
    layout.summary_file.write_text(
        f"# Run demo\n\n![V and C@zeta over cycles]({layout.cycles_fig2_plot.name})\n"
    )
    files = {p.name for p in gallery.build_gallery(layout.root, tmp_path / "docs")}
    assert files == {"README.md", "c00_02_loss.png", "fig2_cycles.png"}
    readme = (tmp_path / "docs" / "README.md").read_text()
    assert "](fig2_cycles.png)" in readme and "![c00_02_loss.png](c00_02_loss.png)" in readme
    with Image.open(tmp_path / "docs" / "c00_02_loss.png") as image:
        assert image.width == gallery.MAX_WIDTH_PX


def test_a_sweeps_score_against_volume_figure_is_in_the_gallery(tmp_path):
    layout = RunLayout(tmp_path / "run")
    _png(layout.cycles_fig2_plot, 4)
    _png(layout.volumes_plot, 6)
    layout.summary_file.write_text("# Run sweep\n")
    files = {p.name for p in gallery.build_gallery(layout.root, tmp_path / "docs")}
    assert files == {"README.md", "fig2_cycles.png", "fig2_volumes.png"}
    assert "![fig2_volumes.png](fig2_volumes.png)" in (tmp_path / "docs" / "README.md").read_text()


def test_gallery_refuses_a_run_without_summary_and_a_heavy_folder(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="make demo"):
        gallery.build_gallery(layout.root, tmp_path / "docs")
    _png(layout.loss_plot(0), 6)
    layout.summary_file.write_text("# Run demo\n")
    monkeypatch.setattr(gallery, "MAX_BYTES", 1000)
    with pytest.raises(RuntimeError, match="MiB"):
        gallery.build_gallery(layout.root, tmp_path / "docs")
    assert not (tmp_path / "docs").exists()  # nothing half-written
