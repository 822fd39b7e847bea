"""Caption text as every source is reduced to it: BLIP's cleaning, and what counts as empty."""
from __future__ import annotations

import re
import unicodedata


def pre_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning: lower-case, drop . ! " ( ) * # : ; ~, collapse spaces, cut."""
    text = re.sub(r"[.!\"()*#:;~]", " ", str(text).lower())
    words = text.split()
    return " ".join(words[:max_words])


# Characters that show nothing: controls, zero-width/format characters, separators.
_INVISIBLE = ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")


def is_blank(text: str) -> bool:
    return all(unicodedata.category(ch) in _INVISIBLE for ch in text)
