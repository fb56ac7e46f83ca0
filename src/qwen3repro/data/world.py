"""The tiny synthetic world: languages, a shared concept inventory, and entities with facts.

Qwen3 was pre-trained on 119 languages (report §3.2) and its post-training up-weights
translation and filters "inappropriate language mixing" (§4.1, §4.3). To make language identity,
mixing and translation measurable at tiny scale, this module builds, from one integer seed:

* a **concept inventory** shared by every language (nouns, verbs, adjectives, relation words);
* a handful of **synthetic languages**, each with its own phonology (letters, syllable shapes),
  lexicon (one distinct word per concept), and morphology/syntax (word order, adjective position,
  plural and past-tense suffixes, negation particle, article). The same semantic frame rendered in
  two languages is a translation pair;
* **entities** (people and cities) with attributes (home city, job, pet, favourite colour, age):
  consistent facts that any language can state, so knowledge is measurable across languages.

Each language has a name and a sampling weight; the last one is rare (the report up-weights rare
languages in translation data; here the rarity is what later stages up-weight).

The character inventory stays small (lower-case ASCII, capitals for names and sentence starts,
digits, ``.,?:``, and three accented vowels used by one language) so that a 1-2k byte-level BPE
vocabulary covers it well. Everything is a pure function of the seed: no global random state.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

# ----------------------------------------------------------------------------- concepts
# One shared inventory; every language has exactly one word per concept, so a frame can be
# rendered in any language and the renderings are translations of each other.
NOUNS_PERSON = ("man", "woman", "child", "farmer", "teacher", "friend", "king", "baker", "sailor", "doctor")
NOUNS_ANIMAL = ("dog", "cat", "bird", "fish", "horse", "goat", "fox", "bear")
NOUNS_THING = (
    "house", "river", "tree", "stone", "book", "bread", "water", "boat", "road", "fire", "star",
    "moon", "field", "door", "cup", "letter", "song", "key", "box", "garden", "apple", "mountain",
    "bridge", "window", "lamp", "coin", "basket", "flower",
)
NOUNS = NOUNS_PERSON + NOUNS_ANIMAL + NOUNS_THING
VERBS_TRANS = (
    "see", "take", "make", "find", "eat", "carry", "build", "love", "hold", "open", "read", "watch",
    "follow", "want", "bring", "sell", "paint", "hear",
)
VERBS_INTRANS = ("sleep", "run", "walk", "sing", "swim", "fall", "wait", "laugh", "dance", "rest")
VERBS = VERBS_TRANS + VERBS_INTRANS
COLORS = ("red", "blue", "green", "white", "black", "yellow")
ADJECTIVES = COLORS + (
    "big", "small", "old", "new", "good", "bad", "fast", "slow", "warm", "cold", "happy", "quiet",
    "bright", "dark", "tall",
)
# Relation words used by entity facts ("X lives in Y", "X works as a farmer", "X is 31 years old").
RELATIONS = ("live", "work", "have", "like", "in", "as", "year", "color", "not", "and", "the", "city")
JOBS = ("farmer", "teacher", "baker", "sailor", "doctor", "king")
CONCEPTS: tuple[str, ...] = tuple(dict.fromkeys(NOUNS + VERBS + ADJECTIVES + RELATIONS))

WORD_ORDERS = ("SVO", "SOV", "VSO", "VOS")


# ----------------------------------------------------------------------------- languages
@dataclass(frozen=True)
class LanguageSpec:
    """The hand-chosen, seed-independent part of a language: its name, weight and sound inventory."""

    name: str
    # Share of S1 prose/knowledge documents in this language (weights sum to 1; the last is rare).
    weight: float
    consonants: str
    vowels: tuple[str, ...]
    # Syllable shapes over C (consonant) and V (vowel).
    syllables: tuple[str, ...]
    # Syntax is fixed per language (not drawn), so the five always differ typologically.
    word_order: str
    adjective_after_noun: bool


# Five invented languages. Velari carries the only accented vowels (é, ö; repeated plain vowels keep
# them rare); Tsoki is the rare language (5%), the one later stages up-weight. Weights fall
# geometrically like the long tail of a real multilingual corpus.
LANGUAGE_SPECS: tuple[LanguageSpec, ...] = (
    LanguageSpec("Velari", 0.35, "lmnrvstkd", ("a", "e", "i", "o", "a", "e", "i", "o", "é", "ö"), ("CV", "CVC", "V"), "SVO", False),
    LanguageSpec("Dorsk", 0.30, "dkrgzbtsh", ("o", "u", "a"), ("CVC", "CCV", "CVCC"), "SOV", True),
    LanguageSpec("Mirune", 0.20, "mnpwylh", ("i", "u", "e", "a"), ("CV", "V", "CVV"), "VSO", True),
    LanguageSpec("Kahalo", 0.10, "khlpwn", ("a", "o", "i"), ("CV", "CVV"), "SVO", True),
    LanguageSpec("Tsoki", 0.05, "tskqxjf", ("o", "i", "y"), ("CVC", "CV", "CCVC"), "VOS", False),
)
RARE_LANGUAGE = "Tsoki"


@dataclass(frozen=True)
class Language:
    """A generated language: lexicon plus the rules that turn a frame into a sentence."""

    name: str
    weight: float
    lexicon: dict  # concept -> word
    word_order: str  # one of WORD_ORDERS
    adjective_after_noun: bool
    plural_suffix: str
    past_suffix: str
    negation_after_verb: bool
    has_article: bool

    def word(self, concept: str) -> str:
        return self.lexicon[concept]


def _make_word(rng: random.Random, spec: LanguageSpec, n_syllables: int) -> str:
    out = []
    for _ in range(n_syllables):
        for slot in rng.choice(spec.syllables):
            out.append(rng.choice(spec.consonants) if slot == "C" else rng.choice(spec.vowels))
    return "".join(out)


def _make_language(spec: LanguageSpec, seed: int) -> Language:
    rng = random.Random(f"language|{spec.name}|{seed}")
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for concept in CONCEPTS:
        # Function words are short (1 syllable), content words 1-3 syllables; retry on collision.
        short = concept in RELATIONS
        for attempt in range(1000):
            n = 1 if short and attempt < 200 else rng.choice((1, 2, 2, 3)) + attempt // 200
            w = _make_word(rng, spec, n)
            if len(w) >= 2 and w not in used:
                break
        lexicon[concept] = w
        used.add(w)
    suffixes = [_make_word(rng, spec, 1) for _ in range(2)]
    return Language(
        name=spec.name,
        weight=spec.weight,
        lexicon=lexicon,
        word_order=spec.word_order,
        adjective_after_noun=spec.adjective_after_noun,
        plural_suffix=suffixes[0],
        past_suffix=suffixes[1] if suffixes[1] != suffixes[0] else suffixes[1] + spec.vowels[0],
        negation_after_verb=rng.random() < 0.5,
        has_article=rng.random() < 0.6,
    )


# ----------------------------------------------------------------------------- entities
NAME_SYLLABLES = ("ta", "mor", "bel", "li", "sa", "ka", "ren", "do", "vi", "an", "nor", "el", "ga", "ris", "to", "mi", "lan", "ur", "fe", "zo")


@dataclass(frozen=True)
class Entity:
    """A named person or city. People carry attributes; cities only a name."""

    name: str
    kind: str  # "person" | "city"
    attributes: tuple[tuple[str, str], ...] = ()  # (attribute, value) pairs, values are concepts/names/numbers

    def attr(self, key: str) -> str:
        return dict(self.attributes)[key]


PERSON_ATTRIBUTES = ("home", "job", "pet", "color", "age")


# ----------------------------------------------------------------------------- frames
# Plain slotted dataclasses (not frozen): frames are built by the hundred thousand and frozen
# dataclasses' __init__ is several times slower.
@dataclass(slots=True)
class NounPhrase:
    noun: str  # a concept, or a proper name when `proper`
    adjective: str | None = None
    plural: bool = False
    proper: bool = False


@dataclass(slots=True)
class Frame:
    """A language-independent clause: subject, verb, optional object, tense, polarity."""

    subject: NounPhrase
    verb: str
    obj: NounPhrase | None = None
    past: bool = False
    negated: bool = False
    # Relation-word prefix placed before the object ("in", "as"), for facts.
    preposition: str | None = None


@dataclass
class World:
    """Languages, entities and the renderers that turn frames and facts into text."""

    seed: int
    languages: tuple[Language, ...]
    people: tuple[Entity, ...]
    cities: tuple[Entity, ...]
    _word_to_lang: dict = field(default_factory=dict, repr=False)
    _by_name: dict = field(default_factory=dict, repr=False)

    # ---- lookup
    @property
    def language_names(self) -> tuple[str, ...]:
        return tuple(lang.name for lang in self.languages)

    @property
    def language_weights(self) -> tuple[float, ...]:
        return tuple(lang.weight for lang in self.languages)

    def language(self, name: str) -> Language:
        if not self._by_name:
            self._by_name.update({lang.name: lang for lang in self.languages})
        if name in self._by_name:
            return self._by_name[name]
        raise KeyError(f"unknown language {name!r}; known: {', '.join(self.language_names)}")

    def entity(self, name: str) -> Entity:
        for e in self.people + self.cities:
            if e.name == name:
                return e
        raise KeyError(f"unknown entity {name!r}")

    # ---- rendering
    def render_np(self, lang: Language, np: NounPhrase) -> list[str]:
        if np.proper:
            return [np.noun]
        noun = lang.word(np.noun) + (lang.plural_suffix if np.plural else "")
        words = [noun]
        if np.adjective:
            adj = lang.word(np.adjective)
            words = [noun, adj] if lang.adjective_after_noun else [adj, noun]
        if lang.has_article and not np.plural:
            words = [lang.word("the")] + words
        return words

    def render(self, lang: Language | str, frame: Frame) -> str:
        """One sentence: capitalised, ending in a full stop."""
        if isinstance(lang, str):
            lang = self.language(lang)
        s = self.render_np(lang, frame.subject)
        v = [lang.word(frame.verb) + (lang.past_suffix if frame.past else "")]
        if frame.negated:
            v = v + [lang.word("not")] if lang.negation_after_verb else [lang.word("not")] + v
        o: list[str] = []
        if frame.obj is not None:
            o = self.render_np(lang, frame.obj)
            if frame.preposition:
                o = [lang.word(frame.preposition)] + o
        parts = {"S": s, "V": v, "O": o}
        words = [w for slot in lang.word_order for w in parts[slot]]
        text = " ".join(words)
        # Capitalise ASCII initials only, so no upper-case accented letters enter the inventory.
        return (text[0].upper() if text[0].isascii() else text[0]) + text[1:] + "."

    def random_frame(self, rng: random.Random) -> Frame:
        """A random clause over common nouns (occasionally a person's name as subject)."""
        r = rng.random  # indexing by r() is several times faster than rng.choice on hot paths
        if r() < 0.15:
            subj = NounPhrase(self.people[int(r() * len(self.people))].name, proper=True)
        else:
            subj = NounPhrase(NOUNS[int(r() * len(NOUNS))], ADJECTIVES[int(r() * len(ADJECTIVES))] if r() < 0.4 else None, r() < 0.3)
        if r() < 0.7:
            verb = VERBS_TRANS[int(r() * len(VERBS_TRANS))]
            obj = NounPhrase(NOUNS[int(r() * len(NOUNS))], ADJECTIVES[int(r() * len(ADJECTIVES))] if r() < 0.4 else None, r() < 0.3)
        else:
            verb, obj = VERBS_INTRANS[int(r() * len(VERBS_INTRANS))], None
        return Frame(subj, verb, obj, past=r() < 0.4, negated=r() < 0.15)

    def fact_frame(self, person: Entity, attribute: str) -> Frame:
        """The frame stating one attribute of a person (the same truth in every language)."""
        subj = NounPhrase(person.name, proper=True)
        value = person.attr(attribute)
        if attribute == "home":
            return Frame(subj, "live", NounPhrase(value, proper=True), preposition="in")
        if attribute == "job":
            return Frame(subj, "work", NounPhrase(value), preposition="as")
        if attribute == "pet":
            return Frame(subj, "have", NounPhrase(value))
        if attribute == "color":
            return Frame(subj, "like", NounPhrase("color", adjective=value))
        if attribute == "age":
            return Frame(subj, "have", NounPhrase(f"{value} {{year}}", proper=True))
        raise KeyError(f"unknown attribute {attribute!r}; known: {', '.join(PERSON_ATTRIBUTES)}")

    def render_fact(self, lang: Language | str, person: Entity, attribute: str) -> str:
        if isinstance(lang, str):
            lang = self.language(lang)
        text = self.render(lang, self.fact_frame(person, attribute))
        # Ages are "<n> year-PL": the number is language-neutral, the unit word is not.
        return text.replace("{year}", lang.word("year") + lang.plural_suffix)

    # ---- language identification (for mixing metrics and filters)
    def word_languages(self) -> dict:
        if not self._word_to_lang:
            table: dict[str, set] = {}
            for lang in self.languages:
                for w in lang.lexicon.values():
                    table.setdefault(w, set()).add(lang.name)
            self._word_to_lang.update(table)
        return self._word_to_lang

    def language_shares(self, text: str) -> dict[str, float]:
        """Share of lexicon words in `text` that belong to each language (names/numbers ignored)."""
        table = self.word_languages()
        counts = {name: 0.0 for name in self.language_names}
        total = 0
        for w in _WORD_RE.findall(text.lower()):
            langs = table.get(w)
            if not langs:
                # Inflected forms: strip a known suffix and retry.
                langs = set()
                for lang in self.languages:
                    for suf in (lang.plural_suffix, lang.past_suffix):
                        if w.endswith(suf) and table.get(w[: -len(suf)], set()) & {lang.name}:
                            langs.add(lang.name)
            if langs:
                total += 1
                for name in langs:
                    counts[name] += 1 / len(langs)
        return {k: (v / total if total else 0.0) for k, v in counts.items()}

    def identify_language(self, text: str) -> str | None:
        """The language most of `text`'s words belong to, or None when no word is recognised."""
        shares = self.language_shares(text)
        best = max(shares, key=shares.get)
        return best if shares[best] > 0 else None


_WORD_RE = re.compile(r"[a-zà-ÿ]+")


def _make_entities(seed: int, n_people: int, n_cities: int) -> tuple[tuple[Entity, ...], tuple[Entity, ...]]:
    rng = random.Random(f"entities|{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_people + n_cities:
        n = rng.choice((2, 2, 3))
        name = "".join(rng.choice(NAME_SYLLABLES) for _ in range(n)).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    cities = tuple(Entity(n, "city") for n in names[n_people:])
    people = tuple(
        Entity(
            n,
            "person",
            (
                ("home", rng.choice(cities).name),
                ("job", rng.choice(JOBS)),
                ("pet", rng.choice(NOUNS_ANIMAL)),
                ("color", rng.choice(COLORS)),
                ("age", str(rng.randint(18, 90))),
            ),
        )
        for n in names[:n_people]
    )
    return people, cities


# The world is small on purpose: 300 people and 40 cities give 1,500 facts, enough to measure
# knowledge recall without dominating the token budget of a tiny model.
N_PEOPLE = 300
N_CITIES = 40


@lru_cache(maxsize=8)
def build_world(seed: int = 0, n_people: int = N_PEOPLE, n_cities: int = N_CITIES) -> World:
    """The world for `seed` (cached: the same seed returns the same object)."""
    languages = tuple(_make_language(spec, seed) for spec in LANGUAGE_SPECS)
    people, cities = _make_entities(seed, n_people, n_cities)
    return World(seed, languages, people, cities)


def translation_pair(world: World, rng: random.Random, src: str, tgt: str) -> tuple[str, str]:
    """One random frame rendered in two languages."""
    frame = world.random_frame(rng)
    return world.render(src, frame), world.render(tgt, frame)


def sample_language(world: World, rng: random.Random, weights: Sequence[float] | None = None) -> Language:
    """A language drawn by its weight (or by `weights`, in `world.languages` order)."""
    return rng.choices(world.languages, weights=weights or world.language_weights)[0]
