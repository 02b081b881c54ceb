"""Rule-made hard negatives for the NegCLIP-style baseline (train.py --method negclip).

Not part of C2LIP: the paper's point is that it needs no hard negatives, and it compares against NegCLIP
(Yuksekgonul et al., ICLR 2023), which trains with a hard negative caption per image: the same kind of
words, bound differently. Its rules are written here over the noun phrases of concepts.py, so they
apply to any caption. `hard_negatives` adds them to a batch (a data.Collate extra) as extra texts that
every image must score below (baselines/losses.py, `negclip_loss`).

Departure: NegCLIP shuffles parts of COCO captions parsed with spaCy and mines hard negative images too;
this keeps only the two rules that target binding (swap and replace), with no image negatives.

  python -m baselines.negatives "a tiny red circle and a large blue star"    # a hard negative of each caption
"""

import argparse
import functools
import itertools
import random
import re

import torch

from concepts import MAX_CAPTION_CHARS, TOKENIZER, article, collapse_spaces, noun_phrase_spans, tagged_tokens

# A noun phrase has slots: slot 0 is its head noun, slot d > 0 the d-th modifier before the head ("a tiny red
# circle": circle, red, tiny). English orders modifiers by kind (size before colour before the noun), so
# words in one slot are mostly of one kind: in the shapes world slot 1 holds colours and slot 2 sizes.

SLOT_TAGS = ("JJ", "VBN", "VBG", "NN")  # a slot word's tag; a determiner, number or 's ends the slots


@functools.lru_cache(maxsize=1 << 16)
def phrase_slots(caption: str) -> tuple[str, tuple]:
    """A caption -> (its text with whitespace collapsed, one (slots, article) per noun phrase), where slots
    are the (start, end) character ranges of the head noun, then of each modifier going left, and article
    that of the phrase's 'a'/'an' (None if it has none). Ranges index the returned text. A caption over
    concepts.MAX_CAPTION_CHARS, or one NLTK fails on (as concepts.extract_concepts can), gets no phrases."""
    text = collapse_spaces(caption)
    if len(text) > MAX_CAPTION_CHARS:
        return text, ()
    try:
        tagged = list(tagged_tokens(caption))
        chars = list(TOKENIZER.span_tokenize(text))  # the same tokens, as character ranges
        spans = noun_phrase_spans(tagged)
    except Exception:  # quotes the aligner cannot place, nltk.redos's TimeoutError: no phrases, so no negative
        return text, ()
    if len(chars) != len(tagged):
        return text, ()
    phrases = []
    for start, end in spans:
        k = end - 1
        while k >= start and tagged[k][1].startswith(SLOT_TAGS):
            k -= 1
        slots = tuple(chars[j] for j in range(end - 1, k, -1))
        a_or_an = chars[k] if k >= start and tagged[k][0].lower() in ("a", "an") else None
        phrases.append((slots, a_or_an))
    return text, tuple(phrases)


def slot_words(captions: list[str]) -> dict[int, list[str]]:
    """{slot: the distinct lower-case words seen in that slot, sorted}: the replacement words of hard_negative.
    Sorted, not a set: a set's order changes with each process's string hashing, and so would the negatives."""
    seen: dict[int, set] = {}
    for caption in captions:
        text, phrases = phrase_slots(caption)
        for slots, _ in phrases:
            for d, (s, e) in enumerate(slots):
                seen.setdefault(d, set()).add(text[s:e].lower())
    return {d: sorted(words) for d, words in seen.items()}


def _cased(word: str, like: str) -> str:
    """word with the initial capital of the word it replaces ('Red' -> 'Blue', but 'red' -> 'blue')."""
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if word[:1].isupper() and word[1:].islower() else word


def hard_negative(caption: str, rng: random.Random, words: dict[int, list[str]] | None = None) -> str | None:
    """A caption with the same kind of words bound differently, or None when no rule applies. A rule is
    drawn among those that apply, then one of its edits:
      swap     two phrases exchange their words in one modifier slot: 'a tiny red circle and a large blue
               star' -> 'a tiny blue circle and a large red star' (an attribute swap, as in NegCLIP)
      replace  a word becomes one seen in the same slot of `words` (slot_words) that the caption lacks:
               'a tiny green circle and ...' (slot 1), 'a tiny red square and ...' (slot 0, the noun)
    An 'a'/'an' before an edited word follows the new word. Only the edited words change, so the
    negative keeps the caption's wording and punctuation: nothing but the binding tells them apart."""
    text, phrases = phrase_slots(caption)

    def word(p: int, d: int) -> str:  # the word in slot d of phrase p
        return text[slice(*phrases[p][0][d])]

    present = set(re.findall(r"[\w']+", text.lower()))
    words = words or {}
    swaps = [
        (a, b, d)
        for a, b in itertools.combinations(range(len(phrases)), 2)
        for d in range(1, min(len(phrases[a][0]), len(phrases[b][0])))
        if word(a, d).lower() != word(b, d).lower()
    ]
    replaces = [
        (p, d) for p, (slots, _) in enumerate(phrases) for d in range(len(slots)) if set(words.get(d, ())) - present
    ]
    rules = [r for r in (swaps, replaces) if r]
    if not rules:
        return None
    rule = rng.choice(rules)
    if rule is swaps:
        a, b, d = rng.choice(swaps)
        edits = {(a, d): word(b, d), (b, d): word(a, d)}
    else:
        p, d = rng.choice(replaces)
        edits = {(p, d): rng.choice([w for w in words[d] if w not in present])}
    changes = []  # (start, end, new text), applied right to left so earlier ranges stay valid
    for (p, d), new in edits.items():
        (slots, a_or_an), old = phrases[p], word(p, d)
        changes.append((*slots[d], _cased(new, old)))
        if a_or_an and d == len(slots) - 1:  # the word right after 'a'/'an'
            changes.append((*a_or_an, _cased(article(new), text[slice(*a_or_an)])))
    negative = text
    for start, end, new in sorted(changes, reverse=True):
        negative = negative[:start] + new + negative[end:]
    return negative


def hard_negatives(samples: list[dict], phrases: list[str], tokenizer) -> dict:
    """Collate extra of --method negclip, made in the DataLoader workers: one hard negative per caption,
    "negatives" (B, Tn), and "has_negative" (B,), False where no rule applies (that row holds an empty text,
    never scored). Replacement words come from the batch's own captions; each caption's draws are seeded by
    its text, so a batch's negatives do not depend on which worker made it (and a resumed run replays them)."""
    captions = [s["caption"] for s in samples]
    words = slot_words(captions)
    negatives = [hard_negative(c, random.Random(f"negative:{c}"), words) for c in captions]
    return {
        "negatives": tokenizer([n or "" for n in negatives]),  # (B, Tn)
        "has_negative": torch.tensor([n is not None for n in negatives]),  # (B,)
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="+", help="captions; replacement words are drawn from all of them")
    args = parser.parse_args(argv)
    words = slot_words(args.captions)
    for caption in args.captions:
        print(f"{caption}\n  negative: {hard_negative(caption, random.Random(caption), words)}")


if __name__ == "__main__":
    main()
