"""What a site tells the server when one of its tasks fails: a fixed error class and a message
that carries no path, file name or other site data. The full text stays in the site's own log.

Exceptions a site raises to refuse a round (``PublicError``: a knob its operator did not allow, a
limit, a full disk) are written for the server and pass, with anything shaped like a path
removed all the same; every other exception is reported by its class alone, as one of a few
fixed kinds. Standard library only: the worker imports this before torch.
"""

from __future__ import annotations

import re
import time

PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\",;:()\[\]]+|[^\s'\",;:()\[\]/]+\.(?:jpe?g|png|bmp|pt|state|json|pkl)\b",
                       re.IGNORECASE)


class PublicError(Exception):
    """A refusal whose message is meant for the server (it names the limit and the flag, not the data)."""


def _kind(error: BaseException) -> tuple[str, str]:
    """(fixed class, fixed description) of an exception whose own text may carry site data."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "DatasetLayoutError" in names:
        return "SiteDataError", "the site's data folder could not be used for this round"
    if isinstance(error, MemoryError) or "OutOfMemoryError" in names or "out of memory" in str(error).lower():
        return "SiteMemoryError", "the site ran out of memory in this round"
    if isinstance(error, OSError):
        return "SiteIOError", "the site could not read or write one of its files"
    if isinstance(error, (ValueError, KeyError, TypeError)):
        return "SiteInputError", "the site could not use this message's content or settings"
    return "SiteInternalError", "the site failed while handling this message"


def scrub(text: str) -> str:
    """``text`` with every path-shaped or image-file-shaped word replaced by ``<path>``."""
    return PATH_LIKE.sub("<path>", text)


def public_reason(error: BaseException) -> str:
    """The error reply's reason, in Flower's ``<class ...>:<'...'>`` form that the server unwraps."""
    if isinstance(error, PublicError):
        kind, text = type(error).__name__, scrub(str(error))
    else:
        kind, description = _kind(error)
        text = f"{description} ({type(error).__name__}; the details are in the site's log at {time.strftime('%H:%M:%S')})"
    return f"<class 'fedreid.{kind}'>:<'{text}'>"
