"""The worked examples in the modules' docstrings are true."""

import doctest

import pytest

from yoda_raw import config, data, evaluate, fetch, generate, meter, model, packing, precision, sources, tiny
from yoda_raw.fast import compile, dequant, dropout, graphs, lora

# Only modules that hold examples: a module with none would pass whatever its code did.
MODULES = [config, sources, data, packing, tiny, precision, model, generate, evaluate, meter, fetch]
MODULES += [graphs, compile, dequant, dropout, lora]  # the fast path


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no docstring example left to check"
    assert result.failed == 0
