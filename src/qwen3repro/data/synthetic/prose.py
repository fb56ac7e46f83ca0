"""Text in the world's languages: the paragraphs every kind of document is written with.

Prose documents, the filler of long-context documents and held-out evaluation text all draw
from here, so they share one style per language.
"""
from __future__ import annotations

import random

from ..world import PERSON_ATTRIBUTES, World
from .records import content_uid


def pick_language(world: World, rng: random.Random) -> str:
    """A language name, drawn by the world's language weights (one language is rare)."""
    return world.languages[rng.choices(range(len(world.languages)), weights=world.language_weights)[0]].name


def prose_text(world: World, rng: random.Random, lang: str, n_sentences: int) -> str:
    """A paragraph in one language: random clauses, with an occasional entity fact."""
    out = []
    for _ in range(n_sentences):
        if rng.random() < 0.1:
            out.append(world.render_fact(lang, rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES)))
        else:
            out.append(world.render(lang, world.random_frame(rng)))
    return " ".join(out)


def frame_uid(frame) -> str:
    """A sentence's meaning, independent of language: translation items are held out by it."""
    return content_uid("frame", repr(frame))
