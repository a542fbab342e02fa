"""The toy corpus: filler sentences around four mechanisms that attribution graphs can check.

- induction / copying: a random span of nonsense words, repeated later in the same document;
- greater-than over years: "from the year 1732 to the year 1768" (the end year is always later);
- key -> value facts from a fixed invented table: "The capital of Varnia is Tolbek.";
- subject-verb agreement across a distractor noun: "The keys to the cabinet are old."

Everything is generated as a list of tokens, one per word, except that a year ("1732") is a century
token "17" followed by a two-digit token "32" (the tokenizer isolates digit pairs). The generator
therefore knows where every token sits, so a prompt can say where the evidence for its answer is
(the earlier copy, the start year, the country, the subject noun): attribution tests check that
graphs route through it. Position 0 of a tokenized text is always <bos>.

Streams are seeded by name (`random.Random("documents/0")`), so training documents, held-out
prompts of each kind and any later stream never share random draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

MECHANISMS = ("induction", "greater_than", "facts", "agreement")

# --- word lists (each word is one token) -------------------------------------------------------

NONSENSE = (
    "blick daro fenu mip zorp quab lunt vesk trop gliv snet prax wub dil ker yoom "
    "fash nib plo grek tavo zim hult brin skev mulp rask tein voth jisk gorb lemp "
    "pim quorl sarn thib ulk wemb yarp zeld crob dask frin hesk jopp kalv nurt obb"
).split()
"""The induction pool: these words appear only inside copied spans."""

COUNTRIES = (
    "Varnia Ostrel Keldor Trabia Velmora Quessa Dunmark Lorvia Brastov Ithmar Calvenn Morvane "
    "Sestria Tulvar Rendia Ambrel Zoravia Fennick Gallost Hyrrun Jastova Nolvey Pellaria Wystan"
).split()
CAPITALS = (
    "Tolbek Aurin Merrow Castrel Dovik Elsmar Fintow Gorlan Hallet Istren Jorvik Kessal "
    "Lunden Marbeck Norval Ospry Pelgrin Quarren Rusk Selvan Thorne Umbar Vellis Wendrel"
).split()
LANGUAGES = (
    "Morvish Keldric Ostrese Trabic Velmic Quessan Dunnic Lorvish Brastic Ithmic Calvese Norvic "
    "Sestric Tulvic Rendish Ambric Zoravic Fennish Gallostic Hyrric Jastovan Nolvic Pellaric Wystic"
).split()
RELATIONS = {
    "capital": ("The capital of {subject} is", CAPITALS),
    "language": ("The people of {subject} speak", LANGUAGES),
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    value: str


FACTS: tuple[Fact, ...] = tuple(
    Fact(relation, subject, values[i])
    for relation, (_, values) in RELATIONS.items()
    for i, subject in enumerate(COUNTRIES)
)
"""The fixed fact table: 24 countries x 2 relations = 48 facts."""

EVENTS = "war siege drought festival reign journey famine council".split()
CENTURIES = tuple(range(11, 20))
YEAR_RANGE = (2, 97)
"""Start years run from CC02 to CC97, so there is always a later year in the same century."""

NOUN_PAIRS = (
    ("key", "keys"), ("cabinet", "cabinets"), ("door", "doors"), ("box", "boxes"),
    ("author", "authors"), ("picture", "pictures"), ("lamp", "lamps"), ("window", "windows"),
    ("table", "tables"), ("letter", "letters"), ("bottle", "bottles"), ("road", "roads"),
)
AGREEMENT_PREPS = "to near behind beside under above".split()
PREDICATES = "old broken small heavy red new dusty clean open empty".split()

FILLER_NOUNS = (
    "man woman dog cat child river market garden house hill forest village ship bird "
    "farmer teacher"
).split()
FILLER_ADJS = "quiet tall little green cold bright busy".split()
INTRANSITIVE = "walked ran looked waited slept sang turned moved stood talked".split()
TRANSITIVE = "saw found followed painted carried watched".split()
FILLER_PREPS = "to near behind past into across toward around".split()
INDUCTION_FRAMES = (
    ("The", "sign", "read"), ("She", "wrote"), ("He", "whispered"), ("The", "note", "said"),
    ("They", "called", "it"), ("Once", "more", ":"), ("Again", "it", "read"),
)
CHANT_FRAMES = (("They", "chanted"), ("The", "crowd", "sang"))
PUNCTUATION = (".", ",", ":")


def words() -> list[str]:
    """Every word the generator can emit (digit pairs excluded), in a fixed order, no repeats."""
    out: list[str] = []
    groups = [
        PUNCTUATION, ["The", "the", "A", "a", "and", "then", "Later", "lasted", "from", "year",
                      "is", "are", "of", "capital", "people", "speak"],
        EVENTS, [w for pair in NOUN_PAIRS for w in pair], AGREEMENT_PREPS, PREDICATES,
        FILLER_NOUNS, FILLER_ADJS, INTRANSITIVE, TRANSITIVE, FILLER_PREPS,
        [w for frame in INDUCTION_FRAMES + CHANT_FRAMES for w in frame], COUNTRIES, CAPITALS, LANGUAGES, NONSENSE,
    ]
    for group in groups:
        for w in group:
            if w not in out:
                out.append(w)
    return out


# --- rendering ----------------------------------------------------------------------------------


def is_digit_pair(token: str) -> bool:
    return len(token) == 2 and token.isdigit()


def render(tokens: list[str]) -> str:
    """Tokens to text: no space before punctuation, a year's two digit tokens glued ("1732")."""
    parts: list[str] = []
    for i, tok in enumerate(tokens):
        glue = i > 0 and (tok in PUNCTUATION or (is_digit_pair(tok) and is_digit_pair(tokens[i - 1])))
        parts.append(tok if glue or i == 0 else " " + tok)
    return "".join(parts)


# --- sentences ----------------------------------------------------------------------------------


def is_heldout_year(century: int, yy: int) -> bool:
    """About one start year in eight never starts a range in training; held-out prompts use them."""
    return (century * 7 + yy * 3) % 8 == 0


def _year(century: int, yy: int) -> list[str]:
    return [f"{century:02d}", f"{yy:02d}"]


def _filler(rng: random.Random) -> list[str]:
    def np_() -> list[str]:
        adj = [rng.choice(FILLER_ADJS)] if rng.random() < 0.4 else []
        return adj + [rng.choice(FILLER_NOUNS)]

    det = rng.choice(["The", "A"])
    form = rng.random()
    if form < 0.45:
        return [det, *np_(), rng.choice(INTRANSITIVE), rng.choice(FILLER_PREPS), "the", *np_(), "."]
    if form < 0.8:
        return [det, *np_(), rng.choice(TRANSITIVE), "the", *np_(), "and", rng.choice(INTRANSITIVE),
                "."]
    return ["Later", ",", "the", *np_(), rng.choice(INTRANSITIVE), "."]


def _greater_than(rng: random.Random, heldout: bool) -> tuple[list[str], int, int]:
    """A year-range sentence without its last two tokens (end yy and "."); returns (tokens, cc, yy)."""
    while True:
        century, yy = rng.choice(CENTURIES), rng.randint(*YEAR_RANGE)
        if is_heldout_year(century, yy) == heldout:
            break
    head = ["The", rng.choice(EVENTS), "lasted", "from", "the", "year", *_year(century, yy), "to",
            "the", "year", f"{century:02d}"]
    return head, century, yy


def _fact(rng: random.Random) -> tuple[list[str], Fact]:
    fact = rng.choice(FACTS)
    template = RELATIONS[fact.relation][0].format(subject=fact.subject)
    return template.split(), fact


def _agreement(rng: random.Random, congruent: bool | None) -> tuple[list[str], bool]:
    """'The key(s) <prep> the cabinet(s)' without the verb; returns (tokens, subject is plural)."""
    subj, dist = rng.sample(NOUN_PAIRS, 2)
    plural = rng.random() < 0.5
    if congruent is None:
        congruent = rng.random() < 0.5
    dist_plural = plural if congruent else not plural
    head = ["The", subj[plural], rng.choice(AGREEMENT_PREPS), "the", dist[dist_plural]]
    return head, plural


def _context_sentence(rng: random.Random) -> list[str]:
    """A complete sentence that is not a copied span: filler, a fact, a year range, an agreement."""
    kind = rng.random()
    if kind < 0.55:
        return _filler(rng)
    if kind < 0.7:
        tokens, fact = _fact(rng)
        return [*tokens, fact.value, "."]
    if kind < 0.85:
        tokens, _, yy = _greater_than(rng, heldout=False)
        return [*tokens, f"{rng.randint(yy + 1, 99):02d}", "."]
    tokens, plural = _agreement(rng, None)
    return [*tokens, "are" if plural else "is", rng.choice(PREDICATES), "."]


# --- documents ----------------------------------------------------------------------------------


def document_tokens(rng: random.Random, n_tokens: int, span_len: tuple[int, int] = (3, 6),
                    spans: tuple[int, int] = (2, 3), chants: tuple[int, int] = (1, 2)
                    ) -> list[str]:
    """One training document of exactly `n_tokens` tokens, dense in mechanisms.

    A shuffled plan of sentences (2 facts, 2-3 year ranges, 1-2 agreements, 0-2 fillers, `chants`
    chants) with `spans` copied spans, each repeated after at least one other sentence. Sentences
    that no longer fit are skipped; the end is topped up with filler cut off at `n_tokens`.

    Chants ("They chanted zim obb zim obb zim obb.") make a previous-token head pay off on its
    own; without them induction (which needs one) stays on a plateau far past the ~2 minute
    training budget."""
    blocks: list[list[str]] = []
    for _ in range(2):
        tokens, fact = _fact(rng)
        blocks.append([*tokens, fact.value, "."])
    for _ in range(rng.randint(2, 3)):
        tokens, _, yy = _greater_than(rng, heldout=False)
        blocks.append([*tokens, f"{rng.randint(yy + 1, 99):02d}", "."])
    for _ in range(rng.randint(1, 2)):
        tokens, plural = _agreement(rng, None)
        blocks.append([*tokens, "are" if plural else "is", rng.choice(PREDICATES), "."])
    blocks += [_filler(rng) for _ in range(rng.randint(0, 2))]
    pool = list(NONSENSE)
    rng.shuffle(pool)
    for _ in range(rng.randint(*chants)):
        chant = [pool.pop() for _ in range(rng.randint(2, 3))]
        blocks.append([*rng.choice(CHANT_FRAMES), *chant * rng.randint(3, 5), "."])
    rng.shuffle(blocks)

    for _ in range(rng.randint(*spans)):
        span = [pool.pop() for _ in range(rng.randint(*span_len))]
        first = rng.randint(0, len(blocks) - 1)
        second = rng.randint(first + 1, len(blocks))
        blocks.insert(second, [*rng.choice(INDUCTION_FRAMES), *span, "."])
        blocks.insert(first, [*rng.choice(INDUCTION_FRAMES), *span, "."])

    out: list[str] = []
    for block in blocks:
        if len(out) + len(block) <= n_tokens:
            out += block
    while len(out) < n_tokens:
        out += _filler(rng)
    return out[:n_tokens]


def drill_tokens(rng: random.Random, n_tokens: int, span_len: tuple[int, int] = (6, 12),
                 repeats: tuple[int, int] = (2, 3)) -> list[str]:
    """A copying drill of exactly `n_tokens` tokens: spans of pool words, each said 2-3 times in a
    row, each time after an induction frame ("The sign read zim obb ker. Once more: zim obb ker.").

    Every word after a span's first saying is predictable only by induction. Early training on
    short drills is what lets the toy models escape the long induction plateau in their ~2 minute
    budget (on ordinary documents alone a 4-layer model did not form an induction head in 1500
    steps); see `ToyRecipe.curriculum`."""
    out: list[str] = []
    while len(out) < n_tokens:
        span = rng.sample(NONSENSE, rng.randint(*span_len))
        for _ in range(rng.randint(*repeats)):
            out += [*rng.choice(INDUCTION_FRAMES), *span, "."]
    return out[:n_tokens]


def iter_documents(seed: int = 0, n_tokens: int = 127, span_len: tuple[int, int] = (3, 6),
                   spans: tuple[int, int] = (2, 3), chants: tuple[int, int] = (1, 2)
                   ) -> Iterator[str]:
    """Endless training-style documents (text) of exactly `n_tokens` tokens each (+ <bos>).

    The toy models train on `seed` = their recipe's seed; use another seed (e.g. 1) for an
    activation cache that should not repeat the training documents."""
    rng = random.Random(f"documents/{seed}")
    while True:
        yield render(document_tokens(rng, n_tokens, span_len, spans, chants))


# --- held-out prompts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MechanismPrompt:
    """A prompt whose next token is determined by one mechanism.

    `targets` are all valid next tokens (one, except for greater-than: every later two-digit year);
    `foils` are the tempting wrong ones (the other verb, the earlier-or-equal years, the other values
    of the relation, the other pool words). `source_position` is the token index (with <bos> at 0)
    of the evidence the answer must come from: the earlier copy of the target (induction), the
    start year's two-digit token (greater-than), the country (facts), the subject noun (agreement).
    """

    kind: str
    text: str
    targets: list[str]
    source_position: int
    source_token: str
    foils: list[str] = field(default_factory=list)
    meta: dict[str, int | str] = field(default_factory=dict)


def _context(rng: random.Random, max_context: int) -> list[str]:
    out: list[str] = []
    for _ in range(rng.randint(0, max_context)):
        out += _context_sentence(rng)
    return out


def _prompt(kind: str, rng: random.Random, max_context: int, span_len: tuple[int, int]
            ) -> MechanismPrompt:
    ctx = _context(rng, max_context)
    if kind == "induction":
        span = rng.sample(NONSENSE, rng.randint(*span_len))
        first = [*rng.choice(INDUCTION_FRAMES), *span, "."]
        between: list[str] = []
        for _ in range(rng.randint(1, 2)):
            between += _context_sentence(rng)
        k = rng.randint(1, len(span) - 1)
        tokens = [*ctx, *first, *between, *rng.choice(INDUCTION_FRAMES), *span[:k]]
        source = len(ctx) + len(first) - 1 - len(span) + k
        return MechanismPrompt(
            kind, render(tokens), [span[k]], 1 + source, span[k],
            foils=[w for w in NONSENSE if w != span[k]],
            meta={"span_length": len(span), "copied_so_far": k,
                  "current_earlier_position": source, "current_token": span[k - 1]})
    if kind == "greater_than":
        head, century, yy = _greater_than(rng, heldout=True)
        tokens = [*ctx, *head]
        return MechanismPrompt(
            kind, render(tokens), [f"{v:02d}" for v in range(yy + 1, 100)],
            1 + len(ctx) + 7, f"{yy:02d}", foils=[f"{v:02d}" for v in range(yy + 1)],
            meta={"century": f"{century:02d}", "start_year": century * 100 + yy,
                  "century_position": 1 + len(ctx) + 6})
    if kind == "facts":
        head, fact = _fact(rng)
        others = RELATIONS[fact.relation][1]
        return MechanismPrompt(
            kind, render([*ctx, *head]), [fact.value], 1 + len(ctx) + 3, fact.subject,
            foils=[v for v in others if v != fact.value], meta={"relation": fact.relation})
    if kind == "agreement":
        head, plural = _agreement(rng, congruent=False)
        verb, other = ("are", "is") if plural else ("is", "are")
        return MechanismPrompt(
            kind, render([*ctx, *head]), [verb], 1 + len(ctx) + 1, head[1], foils=[other],
            meta={"distractor_position": 1 + len(ctx) + 4, "distractor": head[4],
                  "plural": int(plural)})
    raise ValueError(f"unknown mechanism {kind!r}; supported: {', '.join(MECHANISMS)}")


def mechanism_prompts(kind: str, n: int, seed: int = 0, max_context: int = 3,
                      span_len: tuple[int, int] = (3, 6)) -> list[MechanismPrompt]:
    """`n` held-out prompts of one mechanism, deterministic in (`kind`, `seed`).

    Held out from training: fresh random spans and contexts (0..`max_context` sentences before the
    query; 0 gives the shortest prompts), start years that never start a range in training, and
    agreement only across a distractor of the other number. Facts are fixed, so only their
    contexts are new."""
    if kind not in MECHANISMS:
        raise ValueError(f"unknown mechanism {kind!r}; supported: {', '.join(MECHANISMS)}")
    rng = random.Random(f"prompts/{kind}/{seed}")
    return [_prompt(kind, rng, max_context, span_len) for _ in range(n)]
