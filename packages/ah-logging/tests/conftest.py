"""Every test starts and ends with loguru and the stdlib root logger unconfigured."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from loguru import logger

from ah_logging import InterceptHandler


def _reset() -> None:
    logger.remove()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, InterceptHandler):
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def clean_logging() -> Iterator[None]:
    root_level = logging.getLogger().level
    _reset()
    yield
    _reset()
    logging.getLogger().setLevel(root_level)
