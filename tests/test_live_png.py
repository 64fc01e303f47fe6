"""The live loss figure must render as an image in any kernel, not only after pyplot is imported."""

from IPython.core.formatters import DisplayFormatter
from matplotlib.figure import Figure

from nbpeft.training.display import _FigurePNG


def test_loss_figure_renders_as_png_without_pyplot():
    figure = Figure(figsize=(2, 1))
    figure.add_subplot().plot([1, 2], [3, 1])
    formatter = DisplayFormatter()  # a fresh formatter: no inline backend registered
    assert "image/png" not in formatter.format(figure)[0]  # why the wrapper exists
    data, _ = formatter.format(_FigurePNG(figure))
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert data["text/plain"] == "<loss curve>"
