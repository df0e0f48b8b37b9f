"""The worked examples in the docstrings of the data path are true."""

import doctest

import pytest

from yoda_raw import chat, data, packing, tiny


@pytest.mark.parametrize("module", [data, chat, packing, tiny], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
