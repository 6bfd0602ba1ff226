"""The application's figures: shift curves and OOD score histograms, sized by their panels."""

import torch
from PIL import Image

from bayeskern import plots


def _row(value):
    return {"error": value, "ece": value / 2, "nll": value * 3}


def test_shift_curves_draw_one_panel_per_corruption(tmp_path):
    shift = {c: {"0": _row(0.1), "1": _row(0.2), "5": _row(0.4)} for c in ("rotate", "noise", "blur")}
    path = plots.shift_curves({"vanilla": shift, "vi": shift}, tmp_path / "shift.png")
    width, height = Image.open(path).size
    assert width == 3 * plots.PANEL_INCHES[0] * plots.DPI and height == int(1.2 * plots.PANEL_INCHES[1] * plots.DPI)


def test_ood_histograms_draw_one_panel_per_method(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores = {m: (torch.rand(30, generator=g), torch.rand(20, generator=g) + 0.5) for m in ("vanilla", "vi")}
    scores["flat"] = (torch.zeros(5), torch.zeros(5))  # all-zero scores (a point estimate's MI) still draw
    path = plots.ood_histograms(scores, tmp_path / "ood.png")
    assert Image.open(path).size == (3 * plots.PANEL_INCHES[0] * plots.DPI, 3 * plots.DPI)
