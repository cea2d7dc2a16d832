"""Money as ``Decimal``: parsing, formatting and the limits of the v1 contract. Never a float."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from shared.errors import BadInput

CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("1000000000000")  # 1e12, the contract's ceiling for one step


class MoneyError(BadInput):
    """A string is not an amount of money this ledger accepts."""


def parse_amount(text: str) -> Decimal:
    """Parse a positive decimal string with at most 2 decimals and at most 1e12."""
    stripped = text.strip()
    if stripped != text or not stripped:
        raise MoneyError(f"amount {text!r} must be a decimal string such as '12.50'")
    if any(ch not in "0123456789." for ch in stripped):
        raise MoneyError(f"amount {text!r} must contain only digits and one '.', e.g. '12.50'")
    try:
        value = Decimal(stripped)
    except InvalidOperation:
        raise MoneyError(f"amount {text!r} is not a decimal number") from None
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -2:
        raise MoneyError(f"amount {text!r} has more than 2 decimals")
    if value <= 0:
        raise MoneyError(f"amount {text!r} must be greater than 0")
    if value > MAX_AMOUNT:
        raise MoneyError(f"amount {text!r} exceeds the limit of 1e12")
    return value.quantize(CENT)


def parse_balance(text: str) -> Decimal:
    """Parse a stored balance (any sign, 2 decimals) exactly."""
    try:
        return Decimal(text).quantize(CENT)
    except InvalidOperation:
        raise MoneyError(
            f"stored balance {text!r} is not a decimal; repair the ledger row") from None


def format_money(value: Decimal) -> str:
    """The canonical string of an amount: always 2 decimals, e.g. '123.40'."""
    return str(value.quantize(CENT))
