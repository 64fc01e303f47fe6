"""nbpeft: parameter-efficient fine-tuning, built for Jupyter notebooks.

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8)
    nbpeft.train(model, data, tokenizer=tokenizer, steps=30)
    nbpeft.save_adapter(model, "my-adapter")
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .answers import Answers, compare_answers
from .combine import combine
from .compare import Comparison, compare
from .core import Adapter, adapter_rows, attach, detach, disable_adapters, merge, set_adapter, unmerge
from .export import ExportCheck, ExportResult, check_export, export, to_lora
from .generate import generate
from .io import load_adapter, save_adapter
from .jobs import export_job
from .memory import Released, release
from .methods.base import ConfigError, methods
from .models import load_model
from .show import Example, show_example
from .summary import Summary, summary
from .tfew import choice_accuracy, choice_batches, predict_choices, tfew_loss
from .tokens import NewTokens, add_tokens
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "adapter_rows",
    "TrainResult",
    "generate",
    "export_job",
    "compare_answers",
    "Answers",
    "train",
    "ConfigError",
    "attach",
    "detach",
    "disable_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "methods",
    "panel",
    "save_adapter",
    "set_adapter",
    "summary",
    "Summary",
    "unmerge",
    "combine",
    "compare",
    "export",
    "check_export",
    "to_lora",
    "ExportResult",
    "ExportCheck",
    "Comparison",
    "Example",
    "show_example",
    "choice_accuracy",
    "choice_batches",
    "predict_choices",
    "tfew_loss",
    "add_tokens",
    "NewTokens",
    "release",
    "Released",
]


def load_ipython_extension(ipython):  # pragma: no cover - exercised through IPython
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):  # pragma: no cover
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)


def panel(model, tokenizer=None, **kwargs):
    """Attach, train and manage adapters from a tabbed ipywidgets panel (see :mod:`nbpeft.widgets`)."""
    from .widgets import panel as _panel

    return _panel(model, tokenizer, **kwargs)
