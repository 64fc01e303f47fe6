"""nbpeft: parameter-efficient fine-tuning, built for Jupyter notebooks.

    model, tokenizer = nbpeft.load_model("smollm2-135m")
    nbpeft.attach(model, "lora", r=8)
    nbpeft.train(model, data, tokenizer=tokenizer, steps=30)
    nbpeft.save_adapter(model, "my-adapter")
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from . import methods  # the package, callable: nbpeft.methods() lists the methods
from .adapters.combine import combine
from .adapters.compare import Comparison, compare
from .adapters.summary import Summary, summary
from .core import Adapter, adapter_rows, attach, detach, disable_adapters, merge, set_adapter, unmerge
from .data.new_tokens import NewTokens, add_tokens
from .data.preview import Example, show_example
from .errors import ConfigError
from .formats.export import ExportCheck, ExportResult, check_export, export, to_lora
from .formats.peft_folder import load_adapter, save_adapter
from .inference.answers import Answers, compare_answers
from .inference.generate import generate
from .inference.preferences import PreferenceLab
from .models import load_model
from .training.bakeoff import bakeoff
from .training.jobs import export_job
from .training.loop import TrainResult, train
from .training.memory import Released, release
from .training.run_table import RunTable, plot_runs, runs
from .training.tfew import choice_accuracy, choice_batches, predict_choices, tfew_loss

__version__ = "0.1.0"

# Modules that moved into the subpackages: their old import paths still work, with a DeprecationWarning.
# (train, generate, export, summary, compare and combine are the functions of those names.)
MOVED = {
    "nbpeft.answers": "nbpeft.inference.answers",
    "nbpeft.chat": "nbpeft.data.chat",
    "nbpeft.checkpoint": "nbpeft.training.checkpoints",
    "nbpeft.distributed": "nbpeft.training.distributed",
    "nbpeft.events": "nbpeft.training.events",
    "nbpeft.fast": "nbpeft.training.lm_loss",
    "nbpeft.gguf_export": "nbpeft.formats.gguf",
    "nbpeft.io": "nbpeft.formats.peft_folder",
    "nbpeft.jobs": "nbpeft.training.jobs",
    "nbpeft.live": "nbpeft.training.display",
    "nbpeft.memory": "nbpeft.training.memory",
    "nbpeft.precision": "nbpeft.training.precision",
    "nbpeft.show": "nbpeft.data.preview",
    "nbpeft.sources": "nbpeft.data.sources",
    "nbpeft.tfew": "nbpeft.training.tfew",
    "nbpeft.tokens": "nbpeft.data.new_tokens",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import nbpeft.events`` gives a module that reads every name from ``nbpeft.training.events``, with a warning."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return None  # a fresh module, filled in below

    def exec_module(self, module):  # noqa: ANN001, ANN201
        warnings.warn(f"{module.__name__} moved to {MOVED[module.__name__]}; import it from there",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(MOVED[module.__name__])
        module.__getattr__ = lambda name: getattr(target, name)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = [
    "Adapter",
    "adapter_rows",
    "TrainResult",
    "generate",
    "export_job",
    "compare_answers",
    "Answers",
    "PreferenceLab",
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
    "runs",
    "plot_runs",
    "RunTable",
    "bakeoff",
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
