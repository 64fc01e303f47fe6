"""The runs tab: the recorded training runs (``nbpeft.runs``), filtered, and their curves overlaid."""

from __future__ import annotations

import ipywidgets as widgets

import nbpeft

from ..errors import ConfigError
from ..frontend import one_line
from .attach import say

STATUSES = ("any", "finished", "stopped", "interrupted", "failed", "running")


class RunsTab(widgets.VBox):
    """Filters (model, method, since, status), the table of runs, and a plot of the runs picked."""

    def __init__(self) -> None:
        label = {"style": {"description_width": "initial"}}
        self.model_filter = widgets.Text(value="", placeholder="part of the model's name", description="model", **label)
        self.method_filter = widgets.Dropdown(options=["any", *(m.name for m in nbpeft.methods()), "full"],
                                              value="any", description="method", **label)
        self.since = widgets.Text(value="", placeholder="e.g. 2025-06-01", description="since", **label)
        self.status = widgets.Dropdown(options=STATUSES, value="any", description="ended", **label)
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.table = widgets.HTML()
        self.picked = widgets.SelectMultiple(options=[], description="runs to plot", rows=5, **label)
        self.plot_button = widgets.Button(description="Plot", icon="line-chart")
        self.plot = widgets.Image(format="png", layout={"display": "none"})
        self.message = widgets.HTML()
        for widget, name in ((self.refresh_button, "refresh"), (self.table, "table"), (self.picked, "picked"),
                             (self.plot_button, "plot-button"), (self.plot, "plot"), (self.message, "message")):
            widget.add_class(f"nbpeft-runs-{name}")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.plot_button.on_click(lambda _: self.draw())
        filters = widgets.HBox([self.model_filter, self.method_filter, self.since, self.status, self.refresh_button])
        super().__init__([filters, self.table, widgets.HBox([self.picked, self.plot_button]), self.message, self.plot])

    def filters(self) -> dict[str, str]:
        """The fields as ``nbpeft.runs()``'s keywords."""
        given = {"model": self.model_filter.value.strip(), "method": self.method_filter.value,
                 "since": self.since.value.strip(), "status": self.status.value}
        return {key: value for key, value in given.items() if value and value != "any"}

    def refresh(self) -> None:
        """Read the store again with the filters."""
        try:
            table = nbpeft.runs(**self.filters())
        except ConfigError as err:
            say(self.message, one_line(err, {"since=": "since "}), error=True)
            return
        say(self.message, "")
        self.table.value = table._repr_html_()
        self.picked.options = list(reversed(table.ids))  # newest first
        self.picked.value = tuple(self.picked.options[:2])

    def draw(self) -> None:
        if not self.picked.value:
            say(self.message, "pick one or more runs to plot", error=True)
            return
        self.plot.value = nbpeft.plot_runs(list(self.picked.value)).png
        self.plot.layout.display = None
        say(self.message, "")
