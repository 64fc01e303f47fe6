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

# The public names and the modules they live in. Each module is imported when one of its names is
# first used (PEP 562), so ``import nbpeft`` costs little and a cell that only trains never imports
# the export, comparison or combination code. ``import nbpeft`` took 4.6 s, 0.9 s of it beyond torch
# (python -X importtime, 2 busy cores); now it imports no torch until a name needs it.
_LAZY = {
    "methods": ".methods",  # the package, callable: nbpeft.methods() lists the methods
    "combine": ".adapters.combine",
    "Comparison": ".adapters.compare", "compare": ".adapters.compare",
    "Summary": ".adapters.summary", "summary": ".adapters.summary",
    **dict.fromkeys(["Adapter", "adapter_rows", "attach", "detach", "disable_adapters", "merge", "set_adapter",
                     "unmerge"], ".core"),
    "NewTokens": ".data.new_tokens", "add_tokens": ".data.new_tokens",
    "Example": ".data.preview", "show_example": ".data.preview",
    "ConfigError": ".errors",
    **dict.fromkeys(["ExportCheck", "ExportResult", "check_export", "export", "to_lora"], ".formats.export"),
    "load_adapter": ".formats.peft_folder", "save_adapter": ".formats.peft_folder",
    "Answers": ".inference.answers", "compare_answers": ".inference.answers",
    "generate": ".inference.generate",
    "PreferenceLab": ".inference.preferences",
    "load_model": ".models",
    "bakeoff": ".training.bakeoff",
    "export_job": ".training.jobs",
    "TrainResult": ".training.loop", "train": ".training.loop",
    "Released": ".training.memory", "release": ".training.memory",
    "RunTable": ".training.run_table", "plot_runs": ".training.run_table", "runs": ".training.run_table",
    **dict.fromkeys(["choice_accuracy", "choice_batches", "predict_choices", "tfew_loss"], ".training.tfew"),
}


def __getattr__(name):  # noqa: ANN001, ANN202 (PEP 562: a public name, imported on first use)
    where = _LAZY.get(name)
    if where is None:
        try:  # a submodule not imported yet: nbpeft.core, nbpeft.training, ...
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(where, __name__)
    value = module if name == "methods" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():  # noqa: ANN202
    return sorted(set(globals()) | set(_LAZY))


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
