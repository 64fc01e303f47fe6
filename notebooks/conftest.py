"""Notebook runs under nbval (``make notebooks``)."""


def pytest_configure(config):
    # No cell timeout: a slow or busy machine makes a notebook slower, never failed.
    config.option.nbval_cell_timeout = None
