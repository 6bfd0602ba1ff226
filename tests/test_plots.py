import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch

from bayeskern import metrics, plots


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(1000, 5, generator=generator)
    targets = torch.randint(0, 5, (1000,), generator=generator)
    return logits.softmax(1), targets


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_reliability_diagram_writes_png_of_documented_size(problem, tmp_path, binning):
    probs, targets = problem
    path = plots.reliability_diagram(probs, targets, tmp_path / "r.png", title="model", binning=binning)
    image = matplotlib.image.imread(path)
    assert image.shape == (500, 400, 4)  # PANEL_INCHES (4, 5) at 100 dpi
    assert image[..., :3].std() > 0.1  # something was drawn


def test_compare_reliability_puts_panels_side_by_side(problem, tmp_path):
    probs, targets = problem
    flat, sharp = (probs.log() / 3).softmax(1), (2 * probs.log()).softmax(1)
    named = {"model": probs, "flat": flat, "sharp": sharp}
    path = plots.compare_reliability(named, targets.numpy(), tmp_path / "c.png")
    assert matplotlib.image.imread(path).shape == (500, 3 * 400, 4)


def test_legend_reports_the_metrics_ece_and_mce(problem):
    probs, targets = problem
    flat = (probs.log() / 3).softmax(1)
    figure = plots.reliability_figure({"model": probs, "flat": flat}, targets, n_bins=10)
    for axes, p in zip(figure.axes[:2], (probs, flat)):
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert f"ECE = {metrics.ece(p, targets, n_bins=10):.4f}" in labels
        assert f"MCE = {metrics.mce(p, targets, n_bins=10):.4f}" in labels
    assert [figure.axes[i].get_title() for i in (0, 1)] == ["model", "flat"]


def test_plots_leave_pyplot_state_alone(problem, tmp_path):
    probs, targets = problem
    open_before = plt.get_fignums()
    plots.reliability_diagram(probs, targets, tmp_path / "r.png")
    plots.compare_reliability({"a": probs, "b": probs}, targets, tmp_path / "c.png")
    assert plt.get_fignums() == open_before


def test_bad_input_raises_before_anything_is_written(problem, tmp_path):
    probs, targets = problem
    path = tmp_path / "r.png"
    with pytest.raises(ValueError, match="targets has length 999"):
        plots.reliability_diagram(probs, targets[:-1], path)
    with pytest.raises(ValueError, match="probs rows must sum to 1"):
        plots.compare_reliability({"ok": probs, "bad": 2 * probs}, targets, path)
    with pytest.raises(ValueError, match="probs_by_name is empty"):
        plots.compare_reliability({}, targets, path)
    assert not path.exists()
