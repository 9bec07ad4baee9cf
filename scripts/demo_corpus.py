"""Deterministic synthetic multi-domain corpus for the demo MoE model.

The demo model must be tiny and trainable on a laptop CPU, yet its experts
should specialise so that pruning/merging decisions are meaningful. We
therefore generate text from several clearly different "domains", each with
strong regularities (templates, fixed vocabularies, Markov structure) that a
small transformer can learn. Everything is stdlib-only and driven by a single
``random.Random(seed)`` so the corpus can be regenerated bit-for-bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict


class Document(TypedDict):
    """One corpus document: its domain label and its text."""

    domain: str
    text: str


# ---------------------------------------------------------------------------
# narrative: English-like sentences from templates and word lists
# ---------------------------------------------------------------------------

_NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Elena",
    "Felix",
    "Greta",
    "Hugo",
    "Iris",
    "Jonas",
    "Lena",
    "Marco",
    "Nora",
    "Oscar",
    "Paula",
    "Tom",
]
_ADJS = [
    "small",
    "old",
    "quiet",
    "bright",
    "happy",
    "tired",
    "brave",
    "green",
    "little",
    "strange",
    "kind",
    "clever",
    "sleepy",
    "busy",
    "gentle",
    "lost",
]
_ANIMALS = [
    "cat",
    "dog",
    "fox",
    "bird",
    "horse",
    "rabbit",
    "owl",
    "goat",
    "mouse",
    "bear",
    "duck",
    "wolf",
]
_PLACES = [
    "river",
    "market",
    "forest",
    "garden",
    "village",
    "station",
    "library",
    "harbor",
    "bakery",
    "school",
    "hill",
    "bridge",
]
_OBJECTS = [
    "book",
    "basket",
    "lamp",
    "letter",
    "apple",
    "hat",
    "key",
    "box",
    "cup",
    "map",
    "ball",
    "coat",
]
_TIMES = ["In the morning", "At noon", "In the evening", "Later that day", "At night"]
_FEELINGS = ["happy", "tired", "surprised", "calm", "hungry", "proud"]

_NARRATIVE_TEMPLATES = [
    "{name} walked to the {place} and saw a {adj} {animal}.",
    "The {adj} {animal} was sitting near the {place}.",
    "{time}, {name} found a {adj} {obj} by the {place}.",
    "{name} gave the {obj} to the {animal}.",
    "The {animal} looked at {name} and ran to the {place}.",
    "{name} felt {feeling} because the {obj} was {adj}.",
    "{time}, the {animal} came back to the {place}.",
    "{name} put the {obj} in the {adj} {obj2}.",
]


def _narrative(rng: random.Random) -> str:
    """A short story: one protagonist and animal reused across sentences."""
    name, animal = rng.choice(_NAMES), rng.choice(_ANIMALS)
    sentences = []
    for _ in range(rng.randint(3, 7)):
        sentences.append(
            rng.choice(_NARRATIVE_TEMPLATES).format(
                name=name,
                animal=animal,
                adj=rng.choice(_ADJS),
                place=rng.choice(_PLACES),
                obj=rng.choice(_OBJECTS),
                obj2=rng.choice(_OBJECTS),
                time=rng.choice(_TIMES),
                feeling=rng.choice(_FEELINGS),
            )
        )
    return " ".join(sentences)


# ---------------------------------------------------------------------------
# arithmetic: small expressions with their results
# ---------------------------------------------------------------------------


def _arith_line(rng: random.Random) -> str:
    """One exact equation; operands are small so results stay learnable."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def _arithmetic(rng: random.Random) -> str:
    """A worksheet of equations, one per line."""
    return "\n".join(_arith_line(rng) for _ in range(rng.randint(6, 14)))


# ---------------------------------------------------------------------------
# code: Python-like snippets
# ---------------------------------------------------------------------------

_VERBS = ["get", "load", "count", "parse", "update", "compute", "find", "build"]
_NOUNS = ["items", "users", "total", "values", "names", "scores", "rows", "data"]
_VARS = ["x", "y", "n", "i", "result", "value", "acc", "total"]


def _code_function(rng: random.Random) -> str:
    """One function definition following a handful of idiomatic shapes."""
    fname = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    arg = rng.choice(_NOUNS)
    var = rng.choice(_VARS)
    k = rng.randint(1, 9)
    shape = rng.randrange(4)
    if shape == 0:
        body = [f"    {var} = 0", f"    for item in {arg}:", f"        {var} += item * {k}", f"    return {var}"]
    elif shape == 1:
        body = [
            f"    {var} = []",
            f"    for item in {arg}:",
            f"        if item > {k}:",
            f"            {var}.append(item)",
            f"    return {var}",
        ]
    elif shape == 2:
        body = [f"    if len({arg}) == 0:", "        return None", f"    return {arg}[0] + {k}"]
    else:
        body = [f"    {var} = {{}}", f"    for key in {arg}:", f"        {var}[key] = len(key)", f"    return {var}"]
    return "\n".join([f"def {fname}({arg}):", *body])


def _code_calc(rng: random.Random) -> str:
    """Variable bindings followed by evaluated prints.

    The commented results depend on values bound lines earlier, so the model
    must first retrieve them (attention) and then combine them (MLP) - work
    that cannot all happen in the first layer, giving deeper experts a job.
    """
    names = rng.sample([*_VARS[:4], "a", "b", "c", "d"], 4)
    values = {n: rng.randint(0, 20) for n in names}
    lines = [f"{n} = {v}" for n, v in values.items()]
    for _ in range(rng.randint(2, 4)):
        x, y = rng.sample(names, 2)
        if rng.random() < 0.7:
            lines.append(f"print({x} + {y})  # {values[x] + values[y]}")
        else:
            lines.append(f"print({x} * {y})  # {values[x] * values[y]}")
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    """A small module: optional import, then 1-3 functions or calculation blocks."""
    parts = []
    if rng.random() < 0.5:
        parts.append(f"import {rng.choice(['os', 'sys', 'math', 'json', 're'])}\n")
    parts.extend(_code_calc(rng) if rng.random() < 0.5 else _code_function(rng) for _ in range(rng.randint(1, 3)))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------
# sequence: DNA-like records built from a biased codon vocabulary
# ---------------------------------------------------------------------------

_CODONS = ["GCT", "GAA", "AAG", "CTG", "TTC", "GGA", "ACC", "CAT", "TGG", "AGC", "CGA", "TAC"]
# Each codon is followed by one of three successors with weights 6:3:1, a
# low-entropy Markov chain so that "gene" text is predictable but not trivial.
_CODON_NEXT = [[(i * 5 + 1) % 12, (i * 7 + 3) % 12, (i + 6) % 12] for i in range(12)]
_CODON_NEXT_WEIGHTS = [6, 3, 1]


def _sequence(rng: random.Random) -> str:
    """FASTA-like entry: header, then an ATG...TAA gene in 60-column lines."""
    n_codons = rng.randint(30, 80)
    cur = rng.randrange(len(_CODONS))
    codons = []
    for _ in range(n_codons):
        codons.append(_CODONS[cur])
        cur = rng.choices(_CODON_NEXT[cur], _CODON_NEXT_WEIGHTS)[0]
    gene = "ATG" + "".join(codons) + "TAA"
    lines = [gene[i : i + 60] for i in range(0, len(gene), 60)]
    return f">seq_{rng.randint(100, 999)} len={len(gene)}\n" + "\n".join(lines)


# ---------------------------------------------------------------------------
# records: JSON objects and CSV tables
# ---------------------------------------------------------------------------

_CITIES = ["Oslo", "Paris", "Lima", "Tokyo", "Cairo", "Berlin", "Quito", "Delhi"]
_SURNAMES = ["Lind", "Moreau", "Silva", "Tanaka", "Haddad", "Berg", "Rossi", "Khan"]


def _records(rng: random.Random, world: World) -> str:
    """JSON lines or a CSV table about registry people.

    Ids increase within a document; city/age/active are fixed facts of each
    person in ``world``, so predicting them requires memorisation.
    """
    start, n = rng.randint(1000, 9000), rng.randint(3, 8)
    names = rng.sample(sorted(world.people), n)
    rows = [(nm, *world.people[nm]) for nm in names]
    if rng.random() < 0.5:
        return "\n".join(
            f'{{"id": {start + i}, "name": "{nm}", "city": "{c}", "age": {a}, "active": {act}}}'
            for i, (nm, c, a, act) in enumerate(rows)
        )
    lines = ["id,name,city,age,active"]
    lines += [f"{start + i},{nm},{c},{a},{act}" for i, (nm, c, a, act) in enumerate(rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# translation: English sentences paired with an invented SOV language
# ---------------------------------------------------------------------------

_EN_VERBS = {  # English verb -> (present, past)
    "see": ("sees", "saw"),
    "take": ("takes", "took"),
    "find": ("finds", "found"),
    "like": ("likes", "liked"),
    "carry": ("carries", "carried"),
    "hide": ("hides", "hid"),
}
_KL_SYLLABLES = ["ka", "lo", "mi", "ren", "sha", "tu", "vo", "zel", "pi", "dor", "ne", "gu", "ash", "ti", "rum"]
_KL_TENSE = {"present": "ai", "past": "ul"}


def _kl_sentence(rng: random.Random, lex: dict[str, str]) -> tuple[str, str]:
    """One EN/KL pair: SVO English becomes subject-ko [adj] object-ra [place-en] verb+tense."""
    adj, animal, obj, verb = rng.choice(_ADJS), rng.choice(_ANIMALS), rng.choice(_OBJECTS), rng.choice(list(_EN_VERBS))
    tense = rng.choice(list(_KL_TENSE))
    en_verb = _EN_VERBS[verb][0 if tense == "present" else 1]
    en = f"The {adj} {animal} {en_verb} the {obj}"
    kl = [f"{lex[animal]}-ko", lex[adj], f"{lex[obj]}-ra"]
    if rng.random() < 0.5:
        place = rng.choice(_PLACES)
        en += f" at the {place}"
        kl.append(f"{lex[place]}-en")
    kl.append(lex[verb] + _KL_TENSE[tense])
    kl_text = " ".join(kl) + " vo."
    return en + ".", kl_text[0].upper() + kl_text[1:]


def _translation(rng: random.Random, world: World) -> str:
    """2-5 parallel sentence pairs; the fixed lexicon must be memorised."""
    pairs = [_kl_sentence(rng, world.lexicon) for _ in range(rng.randint(2, 5))]
    return "\n".join(f"EN: {en}\nKL: {kl}" for en, kl in pairs)


# ---------------------------------------------------------------------------
# world: fixed facts shared by all documents of one corpus
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Facts that stay constant across a corpus (registry people, bilingual lexicon).

    Consistent facts give the experts something to memorise, so removing an
    expert measurably hurts, which is what a pruning demo needs.
    """

    people: dict[str, tuple[str, int, str]]
    lexicon: dict[str, str]


def make_world(rng: random.Random) -> World:
    """Draw the registry (name -> city, age, active) and an English->KL lexicon."""
    people = {
        f"{first} {last}": (rng.choice(_CITIES), rng.randint(18, 80), rng.choice(["true", "false"]))
        for first in _NAMES
        for last in _SURNAMES
    }
    english = [*_ADJS, *_ANIMALS, *_OBJECTS, *_PLACES, *_EN_VERBS]
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for word in english:
        kl = ""
        while not kl or kl in used:
            kl = "".join(rng.choices(_KL_SYLLABLES, k=rng.randint(2, 3)))
        used.add(kl)
        lexicon[word] = kl
    return World(people=people, lexicon=lexicon)


DOMAIN_GENERATORS: dict[str, Callable[[random.Random, World], str]] = {
    "narrative": lambda rng, _world: _narrative(rng),
    "arithmetic": lambda rng, _world: _arithmetic(rng),
    "code": lambda rng, _world: _code(rng),
    "sequence": lambda rng, _world: _sequence(rng),
    "records": _records,
    "translation": _translation,
}
"""Domain name -> generator; insertion order fixes the generation order."""

DOMAINS: tuple[str, ...] = tuple(DOMAIN_GENERATORS)


def generate_corpus(seed: int, n_docs_per_domain: int) -> list[Document]:
    """Generate ``n_docs_per_domain`` documents for every domain.

    Documents are interleaved round-robin over domains (doc 0 of every domain,
    then doc 1, ...), so any prefix of the list has the same domain mix. The
    output depends only on ``seed`` and ``n_docs_per_domain``.
    """
    rng = random.Random(seed)
    world = make_world(rng)
    docs: list[Document] = []
    for _ in range(n_docs_per_domain):
        for domain, generate in DOMAIN_GENERATORS.items():
            docs.append({"domain": domain, "text": generate(rng, world)})
    return docs
