"""Money arithmetic: micro-credits, prices, rounding, parsing and formatting.

Every amount is an integer number of micro-credits (1 credit = 1,000,000), never a
float. Prices are credits per million tokens, kept as ``Decimal`` in the catalog and
turned into integer micro-credits per million tokens here, so a request's cost is one
integer division, rounded up once per request rather than per token.

Holds, settlement and the ledger (``servelm.billing``), the admin API and the CLI all
do their arithmetic through this module and nowhere else.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, DecimalException, InvalidOperation

from servelm.errors import InvalidRequest, NotEnoughCredits

MICRO = 1_000_000  # micro-credits per credit

# Bounds on money, far inside BIGINT (2^63 - 1 ≈ 9.2e18): a grant of at most a billion
# credits, an account of at most a trillion, so no sum of grants can leave the column.
MAX_GRANT_MICRO = 10**9 * MICRO
MAX_ACCOUNT_MICRO = 10**12 * MICRO


def price_per_million_micro(price: Decimal) -> int:
    """A price in credits per million tokens as micro-credits per million tokens; a
    sub-micro price is rounded up (never undercharge)."""
    return int((price * MICRO).to_integral_value(rounding=ROUND_CEILING))


def cost_micro(
    prompt_tokens: int, completion_tokens: int, input_price_micro: int, output_price_micro: int
) -> int:
    """Cost in micro-credits of a request, rounded up to the next micro-credit.

    Prices are micro-credits per million tokens, so the exact cost is
    ``tokens * price / 1e6``; the fraction is rounded up once per request.
    """
    numer = prompt_tokens * input_price_micro + completion_tokens * output_price_micro
    return -(-numer // MICRO)


def affordable_max_tokens(
    balance: int,
    prompt_tokens: int,
    input_price_micro: int,
    output_price_micro: int,
    wanted: int,
) -> int:
    """The most output tokens (≤ wanted) whose worst-case cost the balance covers.

    A request's cost is rounded up once (``cost_micro``), so n tokens are affordable
    exactly when ``prompt * p_in + n * p_out <= balance * 1e6``.
    """
    room = balance * MICRO - prompt_tokens * input_price_micro
    if room < 0:
        return 0
    if output_price_micro == 0:
        return wanted
    return min(wanted, room // output_price_micro)


def format_credits(micro: int) -> str:
    """Micro-credits as a decimal credit string, e.g. 1234567 → '1.234567'."""
    sign = "-" if micro < 0 else ""
    q, r = divmod(abs(micro), MICRO)
    return f"{sign}{q}.{r:06d}"


def not_enough(balance: int, needed: int, *, at_least: bool = False) -> NotEnoughCredits:
    """The refusal of a hold the balance cannot cover, in the user's terms."""
    bound = "at least" if at_least else "up to"
    return NotEnoughCredits(
        f"Not enough credits: this request needs {bound} {format_credits(needed)} "
        f"credits and the balance is {format_credits(balance)}.",
        balance=balance,
        needed=needed,
    )


def credits_number(micro: int) -> float:
    """Micro-credits as a JSON number of credits, for ``usage.cost`` and
    ``usage.remaining_credits`` (OpenRouter's convention, which LiteLLM and others
    read as a float). The nearest double to the exact amount: its shortest form
    has at most six decimals (1234567 → 1.234567) up to 2^53 micro-credits, about
    9 billion credits; past that the last digits round. Exact amounts are in the
    headers, ``/v1/credits`` and the ledger."""
    return micro / MICRO


def parse_credits(value: str | int | float, *, param: str = "credits") -> int:
    """'12.5' credits → 12500000 micro-credits; exact, refusing sub-micro amounts and
    anything that is not a finite amount within a grant's bound. A JSON number is
    taken by its decimal text (0.1 stays exactly 0.1)."""
    text = str(value).strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    try:
        if len(text) > 64:  # Decimal would parse a million digits; nobody means that
            raise InvalidOperation
        amount = Decimal(text) * MICRO
    except DecimalException:  # InvalidOperation, and Overflow for 1e999999
        raise InvalidRequest(f"'{shown}' is not a number of credits.", param=param) from None
    if not amount.is_finite():
        raise InvalidRequest(f"'{shown}' is not a number of credits.", param=param)
    if abs(amount) > MAX_GRANT_MICRO:
        raise InvalidRequest(
            f"A grant may be at most {MAX_GRANT_MICRO // MICRO} credits.", param=param
        )
    if amount != amount.to_integral_value():
        raise InvalidRequest("Credits have at most 6 decimal places.", param=param)
    return int(amount)
