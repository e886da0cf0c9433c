"""Plain English-looking text from a few hundred common words.

Sentences are assembled from random parts of speech, so two strings share almost no word
3-shingles: the curator's exact and near-duplicate filters see every string as new.
"""

from __future__ import annotations

import random

NOUNS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact house city river garden kitchen window door table chair "
    "school teacher student book letter paper story song picture camera phone computer market store price "
    "money bank road car train bus bridge station airport ticket village farmer field forest mountain lake "
    "ocean island beach storm rain snow wind sun moon star tree flower leaf seed apple bread cheese coffee "
    "tea water milk soup dinner breakfast lunch doctor nurse hospital patient engine machine tool hammer "
    "rope box bottle glass cup plate spoon knife shirt coat shoe hat bag wallet key clock map lamp candle "
    "mirror blanket pillow bed dog cat horse bird fish cow sheep rabbit mouse bicycle boat plane ladder "
    "bucket fence wall roof floor stair yard shop library museum theater office factory court army team "
    "game ball coach player friend neighbor family brother sister mother father uncle baby crowd"
).split()

ADJECTIVES = (
    "small large old new young long short high low quick slow bright dark warm cold hot cool heavy light "
    "soft hard loud quiet clean dirty empty full rich poor busy lazy calm angry happy sad careful brave "
    "clever simple strange common rare early late fresh dry wet sharp smooth rough narrow wide deep "
    "shallow thin thick tall gentle proud humble famous local foreign modern ancient wooden metal plastic "
    "golden silver green blue red yellow purple broken hidden open closed sudden steady"
).split()

VERBS = (
    "carry find keep hold move push pull open close build break fix clean paint cover fill empty lift drop "
    "throw catch follow watch visit help teach borrow lend sell buy bring send check cook wash fold hang "
    "count measure compare choose protect replace repair collect share cut mix heat cool store test"
).split()

ADVERBS = (
    "quickly slowly carefully quietly loudly gently easily rarely often usually always never suddenly "
    "finally early later soon again together happily proudly"
).split()

PREPOSITIONS = "near behind under above beside inside outside across through around before after during without".split()

DETERMINERS = "the a one every each that this some another".split()

NAMES = (
    "Anna Ben Carla David Elena Frank Grace Henry Iris Jack Karen Leo Maria Nina Oscar Paula Quinn Rosa Sam "
    "Tara Umar Vera Walter Xena Yusuf Zoe"
).split()

WORD_COUNT = len(set(NOUNS + ADJECTIVES + VERBS + ADVERBS + PREPOSITIONS + DETERMINERS + NAMES))


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _phrase(rng: random.Random) -> str:
    """A noun phrase such as 'the quiet wooden ladder'."""
    words = [rng.choice(DETERMINERS)]
    if words[0] in ("a", "another") or rng.random() < 0.8:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(NOUNS))
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    """One sentence, statement or question."""
    kind = rng.random()
    verb = rng.choice(VERBS)
    if kind < 0.35:
        text = f"{_phrase(rng)} {_third_person(verb)} {_phrase(rng)} {rng.choice(PREPOSITIONS)} {_phrase(rng)}."
    elif kind < 0.55:
        text = f"{rng.choice(NAMES)} {rng.choice(ADVERBS)} {_third_person(verb)} {_phrase(rng)} {rng.choice(PREPOSITIONS)} {_phrase(rng)}."
    elif kind < 0.75:
        text = f"why does {_phrase(rng)} {verb} {_phrase(rng)} {rng.choice(PREPOSITIONS)} {_phrase(rng)}?"
    elif kind < 0.9:
        text = f"how can {rng.choice(NAMES)} {verb} {_phrase(rng)} {rng.choice(ADVERBS)}?"
    else:
        text = f"{rng.choice(ADVERBS)}, {_phrase(rng)} and {_phrase(rng)} {verb} {_phrase(rng)} together."
    return text[0].upper() + text[1:]


def short_sentence(rng: random.Random) -> str:
    """A sentence of about 20 to 45 characters."""
    kind = rng.random()
    verb = rng.choice(VERBS)
    if kind < 0.3:
        text = f"{rng.choice(NAMES)} {_third_person(verb)} {_phrase(rng)}."
    elif kind < 0.55:
        text = f"{_phrase(rng)} {_third_person(verb)} {_phrase(rng)}."
    elif kind < 0.8:
        text = f"why does {_phrase(rng)} {verb} {rng.choice(ADVERBS)}?"
    else:
        text = f"can {rng.choice(NAMES)} {verb} {_phrase(rng)}?"
    return text[0].upper() + text[1:]


def words(rng: random.Random, count: int) -> str:
    """A short label-like phrase of `count` words, e.g. an option of a multiple choice question."""
    parts = [rng.choice(ADJECTIVES) for _ in range(max(0, count - 1))] + [rng.choice(NOUNS)]
    return " ".join(parts).capitalize()


_DANGLING = set(DETERMINERS) | set(PREPOSITIONS) | set(ADJECTIVES) | {"an", "and", "does", "can", "how", "why"}


def _trim(out: str, target_len: int, min_len: int) -> str:
    """Shorten to about `target_len`: at a sentence end when one is close, else at a word boundary."""
    limit = int(target_len * 1.1)
    ends = [i + 1 for i, ch in enumerate(out[: limit + 1]) if ch in ".?" and (i + 1 == len(out) or out[i + 1] == " ")]
    if ends and ends[-1] >= max(target_len * 0.6, min_len):
        return out[: ends[-1]]
    kept = out[:limit].split(" ")[:-1]
    while len(kept) > 1 and kept[-1].lower().strip(",.?") in _DANGLING:
        kept.pop()
    cut = " ".join(kept).rstrip(",.?")
    last_start = max(cut.rfind(". "), cut.rfind("? ")) + 2 if (". " in cut or "? " in cut) else 0
    mark = "?" if cut[last_start:].startswith(("How ", "Why ")) else "."
    return cut + mark if len(cut) + 1 >= min_len else out


def text(rng: random.Random, target_len: int, min_len: int = 0, max_len: int | None = None) -> str:
    """A string close to `target_len` characters, within [min_len, max_len]."""
    if max_len is not None:
        target_len = min(target_len, max_len)
    target_len = max(target_len, min_len, 1)
    if target_len <= 24:
        out = words(rng, max(1, round(target_len / 7)))
    else:
        out = ""
        while len(out) < target_len * 0.9:
            room = target_len - len(out)
            # of a few possible sentences, the one that best fills the room left
            maker = short_sentence if room < 55 else sentence
            best = min((maker(rng) for _ in range(3)), key=lambda s: abs(len(s) + 1 - room))
            out = f"{out} {best}" if out else best
        if len(out) > target_len * 1.35:
            out = _trim(out, target_len, min_len)
    while len(out) < min_len:
        out = f"{out} {rng.choice(NOUNS)}"
    if max_len is not None and len(out) > max_len:
        out = out[:max_len].rstrip()
        if len(out) < min_len:  # rstrip may undercut a tight bound
            out = out.ljust(min_len, "x")
    return out


def numeric_text(rng: random.Random, template: str) -> str:
    """Digits shaped like `template` (for strings that hold a number)."""
    return "".join(str(rng.randrange(10)) if ch.isdigit() else ch for ch in template)
