"""Every exception the app defines belongs to its one family (``shared.errors.LedgerError``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import shared
from shared.errors import BadInput, LedgerError, Retryable, StorageError, TermEnded


def _app_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(shared.__path__, prefix="shared."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) \
                    and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exception_of_the_app_derives_from_its_root() -> None:
    exceptions = _app_exceptions()
    assert len(exceptions) >= 15, sorted(exceptions)
    strays = sorted(name for name, cls in exceptions.items() if not issubclass(cls, LedgerError))
    assert strays == []


def test_the_subfamilies_say_what_the_caller_does() -> None:
    exceptions = _app_exceptions()
    by_name = {name.rsplit(".", 1)[1]: cls for name, cls in exceptions.items()}
    assert issubclass(by_name["MalformedMessage"], BadInput)
    assert issubclass(by_name["InsufficientFunds"], BadInput)
    assert issubclass(by_name["FencedOut"], TermEnded)
    assert issubclass(by_name["LeadershipLost"], TermEnded)
    assert issubclass(by_name["AccountChanged"], Retryable)
    assert issubclass(by_name["RecordingRaced"], Retryable)
    assert issubclass(by_name["StorageUnavailable"], StorageError)
    assert issubclass(by_name["StorageUnavailable"], Retryable)
