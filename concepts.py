"""Concept phrases: cut a caption into the noun phrases it names (docs/paper.md, "The problem and the method").

The paper's first fix for bag-of-words matching: a long caption can be matched by its words in any
order, but a short phrase such as "a tiny red circle" can only be matched by an image region that has
those attributes on that object. So every caption y_i is cut into phrases p_k, each owned by image
o(k) = i, and the losses in losses.py align each phrase with its image.

Pipeline (the paper's "standard NLP software"):
  1. tokenise with NLTK's Treebank tokenizer (pure regular expressions: no downloaded data);
  2. POS-tag with NLTK's averaged perceptron tagger (downloaded data, see `tagger()`);
  3. chunk noun phrases with the RegexpParser GRAMMAR below: determiners and numbers, then adjectives
     and participles, then one or more nouns (noun modifiers and the head);
  4. strip generic or spatial head nouns ("a circle left (of)" -> "a circle"; "the left side",
     "a stock photo", "the background" -> nothing), drop one-character items, de-duplicate, and fall
     back to the whole caption when nothing is left (`phrases_or_caption`, the paper's rule).

Bound: a caption longer than MAX_CAPTION_CHARS is cut (at a space) before it is tagged and chunked, and a
failure of the tagger or chunker on one caption raises ConceptError, which the callers count as a skip of that
caption (sources/stream.py, sources/precompute.py): NLTK runs every regular expression under a wall-clock limit
(nltk.redos, 5 s) and a 1 MB caption, scraped text pasted into an alt-text, runs past it.

Departure (docs/departures.md): the authors' released code asks an LLM (Phi-3.5-mini-instruct) for the noun
phrases of the main subjects, and their README says the paper's own phrases came from a proprietary pipeline;
this file takes the paper's "standard NLP software" route, which needs no model and runs in DataLoader workers.
A known limit of any POS grammar: a participle between two nouns ("people walking dogs") starts a new
phrase ("walking dogs").

  python concepts.py "a small red circle left of a blue star"          # print the phrases of captions
"""

import argparse
import functools
import re

import nltk
from nltk.tokenize import TreebankWordTokenizer

# Determiners/numbers, modifiers, then nouns; optionally a possessive ("a cat's face"). A modifier is
# an adjective, a participle, or a noun followed by an adjective: the tagger sometimes reads an
# adjective as a noun ("a tiny/NN green/JJ circle/NN"), and that must not split the phrase in two.
GRAMMAR = r"""NP: {<DT|PRP\$|CD>*(<JJ.*|VBN|VBG>|<NN.*><JJ.*>)*<NN.*>+(<POS><JJ.*|VBN|VBG>*<NN.*>+)?}"""

# Head nouns that name a place in the frame or the picture itself rather than something in it.
GENERIC = set(
    "left right top bottom side sides middle center centre front back corner edge background foreground distance "
    "image images photo photos picture pictures photograph illustration view shot close closeup stock "
    "shape shapes object objects thing things something lot kind type".split()
)
ARTICLES = {"a", "an", "the", "one", "this", "that", "these", "those", "some"}
TAGGER_DATA = "averaged_perceptron_tagger_eng"
# Longer captions are cut before chunking. About 1,700 words, far above CC3M's alt-texts and the short LLaVA
# captions the paper trains on (DreamLIP's shortLLA_captions), so none of theirs is cut; 10,000 characters tag
# and chunk in well under a second, far inside nltk.redos's 5 s per regular expression. That limit is wall
# clock, so on a loaded machine a shorter caption can still run past it: extract_concepts then raises ConceptError.
MAX_CAPTION_CHARS = 10_000

TOKENIZER = TreebankWordTokenizer()
_chunker = nltk.RegexpParser(GRAMMAR)
_tagger = None


def tagger() -> nltk.tag.PerceptronTagger:
    """NLTK's English tagger: found on NLTK's search path (NLTK_DATA, ~/nltk_data, ...), else downloaded."""
    global _tagger
    if _tagger is None:
        try:
            _tagger = nltk.tag.PerceptronTagger()
        except LookupError:
            try:
                if not nltk.download(TAGGER_DATA, quiet=True):
                    raise LookupError(TAGGER_DATA)
                _tagger = nltk.tag.PerceptronTagger()
            except Exception as err:
                raise RuntimeError(
                    f"NLTK's POS tagger data '{TAGGER_DATA}' is missing and could not be downloaded ({err}).\n"
                    f"Install it with:  python -m nltk.downloader {TAGGER_DATA}\n"
                    f"or point NLTK_DATA at a folder that holds taggers/{TAGGER_DATA}/."
                ) from None
    return _tagger


class ConceptError(ValueError):
    """The tagger or the chunker failed on one caption (NLTK's TimeoutError, or any other error)."""


def phrases_or_caption(phrases: list[str], caption: str) -> list[str]:
    """The paper's rule: a caption with no phrase is its own (only) phrase."""
    return list(phrases) or [caption.strip()]


def article(word: str) -> str:
    """The indefinite article before `word`: 'an' before a vowel letter ('an orange star'), else 'a'."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def normalise_phrase(phrase: str) -> str:
    """'The  Tiny red circle' -> 'tiny red circle': the form under which two phrases count as the same."""
    words = phrase.lower().split()
    while words and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def noun_phrase_spans(tagged: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """POS-tagged tokens -> the token ranges [start, end) of the noun phrases, generic head nouns stripped."""
    spans, pos = [], 0
    for node in _chunker.parse(tagged):  # a flat tree: NP subtrees and the tokens between them
        if not isinstance(node, nltk.Tree):
            pos += 1
            continue
        start, end = pos, pos + len(node)
        pos = end
        # Strip trailing generic nouns: "a red circle left" (of ...) -> "a red circle",
        # "the left side" -> nothing, "a stock photo" -> nothing.
        while end > start and tagged[end - 1][0].lower() in GENERIC:
            end -= 1
        if end > start and tagged[end - 1][1].startswith("NN"):
            spans.append((start, end))
    return spans


def _phrases(tagged: list[tuple[str, str]], caption: str) -> list[str]:
    """POS-tagged tokens -> filtered, de-duplicated noun phrases (the caption itself if none survive)."""
    seen, out = set(), []
    for start, end in noun_phrase_spans(tagged):
        phrase = " ".join(w for w, _ in tagged[start:end]).lower().replace(" 's", "'s")
        key = normalise_phrase(phrase)
        if len(key) > 1 and key not in seen:
            seen.add(key)
            out.append(phrase)
    return phrases_or_caption(out, caption)


def collapse_spaces(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.strip())


def tokenise(caption: str) -> list[str]:
    # The Treebank tokenizer keeps "circle," together only at the end of a sentence; commas inside
    # are split off, which is what the tagger was trained on.
    return TOKENIZER.tokenize(collapse_spaces(caption))


@functools.lru_cache(maxsize=1 << 16)
def tagged_tokens(caption: str) -> tuple[tuple[str, str], ...]:
    """The caption's tokens with their POS tags, cached: concepts and hard negatives tag the same captions."""
    return tuple(tagger().tag(tokenise(caption)))


@functools.lru_cache(maxsize=1 << 16)
def _extract_cached(caption: str) -> tuple[str, ...]:
    return tuple(_phrases(list(tagged_tokens(caption)), caption))


def bounded(caption: str) -> str:
    """The caption cut to at most MAX_CAPTION_CHARS, before the word the bound falls in (if it has a space)."""
    if len(caption) <= MAX_CAPTION_CHARS:
        return caption
    return re.sub(r"\s+\S*$", "", caption[: MAX_CAPTION_CHARS + 1])[:MAX_CAPTION_CHARS]


def extract_concepts(caption: str) -> list[str]:
    """A caption -> its concept phrases, e.g. 'a dog chasing a red ball' -> ['a dog', 'a red ball']. A caption
    over MAX_CAPTION_CHARS gives the phrases of its start (`bounded`); ConceptError if the tagger or the
    chunker fails on it (the callers skip that caption and count it)."""
    tagger()  # missing tagger data stops the caller (RuntimeError): it is not one caption's fault
    try:
        return list(_extract_cached(bounded(caption)))
    except Exception as err:  # TimeoutError from nltk.redos (an OSError), or anything else NLTK raises
        raise ConceptError(f"{type(err).__name__}: {err}") from err


def extract_concepts_batch(captions: list[str]) -> list[list[str]]:
    """Many captions at once (NLTK's tag_sents is itself a loop over sentences, so this is one too)."""
    return [extract_concepts(c) for c in captions]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="+", help="captions to cut into concept phrases, printed one per line")
    args = parser.parse_args(argv)
    for caption, phrases in zip(args.captions, extract_concepts_batch(args.captions)):
        print(f"{caption}\n  -> " + " | ".join(phrases))


if __name__ == "__main__":
    main()
