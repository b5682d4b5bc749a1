"""Client text that Python holds but UTF-8 cannot carry.

JSON escapes such as "\\ud800" decode to a `str` holding a lone UTF-16 surrogate. Such a
string passes `isinstance(x, str)` yet fails every encoder downstream (a tokenizer, a cache
key, a JSON response), so untrusted text is checked once, where it enters, and any text echoed
back in an error message is made printable first.
"""

from __future__ import annotations

__all__ = ["is_unicode", "printable"]


def is_unicode(text: str) -> bool:
    """Whether `text` encodes to UTF-8 (holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with anything UTF-8 cannot carry written as a backslash escape."""
    return text if is_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")
