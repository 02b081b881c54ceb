"""Concept phrases: cut a caption into the noun phrases it names (paper Section 3.1).

The paper's first fix for bag-of-words matching: a long caption can be matched by its words in any
order, but a short phrase such as "a tiny red circle" can only be matched by an image region that has
those attributes on that object. So every caption y_i is cut into phrases p_k, each owned by image
o(k) = i, and the losses in losses.py align each phrase with its image.

Pipeline (the paper's "standard NLP software"):
  1. tokenise with NLTK's Treebank tokenizer (pure regular expressions: no downloaded data);
  2. POS-tag with NLTK's averaged perceptron tagger (downloaded data, see `tagger()`);
  3. chunk noun phrases with a RegexpParser grammar: determiners and numbers, then adjectives and
     participles, then one or more nouns (noun modifiers and the head);
  4. strip generic or spatial head nouns ("a circle left (of)" -> "a circle"; "the left side",
     "a stock photo", "the background" -> nothing), drop one-character items, de-duplicate, and fall back to the whole caption when nothing is left.

Departure: the authors' released code asks an LLM for the noun phrases of the main subjects; this file
uses the paper's "standard NLP software" route, which needs no model and runs in DataLoader workers.
A known limit of any POS grammar: a participle between two nouns ("people walking dogs") starts a new
phrase ("walking dogs").

Usage: python concepts.py "a small red circle left of a blue star"
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
GENERIC = {
    "left", "right", "top", "bottom", "side", "sides", "middle", "center", "centre", "front", "back",
    "corner", "edge", "background", "foreground", "distance", "image", "images", "photo", "photos",
    "picture", "pictures", "photograph", "illustration", "view", "shot", "close", "closeup", "stock",
    "shape", "shapes", "object", "objects", "thing", "things", "something", "lot", "kind", "type",
}  # fmt: skip
ARTICLES = {"a", "an", "the", "one", "this", "that", "these", "those", "some"}
TAGGER_DATA = "averaged_perceptron_tagger_eng"

_tokenizer = TreebankWordTokenizer()
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


def normalise_phrase(phrase: str) -> str:
    """'The  Tiny red circle' -> 'tiny red circle': the form under which two phrases count as the same."""
    words = phrase.lower().split()
    while words and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def _phrases(tagged: list[tuple[str, str]], caption: str) -> list[str]:
    """POS-tagged tokens -> filtered, de-duplicated noun phrases (the caption itself if none survive)."""
    seen, out = set(), []
    for chunk in _chunker.parse(tagged).subtrees(lambda t: t.label() == "NP"):
        leaves = chunk.leaves()
        # Strip trailing generic nouns: "a red circle left" (of ...) -> "a red circle",
        # "the left side" -> nothing, "a stock photo" -> nothing.
        while leaves and leaves[-1][0].lower() in GENERIC:
            leaves = leaves[:-1]
        if not leaves or not leaves[-1][1].startswith("NN"):
            continue
        phrase = " ".join(w for w, _ in leaves).lower().replace(" 's", "'s")
        key = normalise_phrase(phrase)
        if len(key) > 1 and key not in seen:
            seen.add(key)
            out.append(phrase)
    return out or [caption.strip()]


def _tokenise(caption: str) -> list[str]:
    # The Treebank tokenizer keeps "circle," together only at the end of a sentence; commas inside
    # are split off, which is what the tagger was trained on.
    return _tokenizer.tokenize(re.sub(r"\s+", " ", caption.strip()))


@functools.lru_cache(maxsize=1 << 16)
def _extract_cached(caption: str) -> tuple[str, ...]:
    return tuple(_phrases(tagger().tag(_tokenise(caption)), caption))


def extract_concepts(caption: str) -> list[str]:
    """A caption -> its concept phrases, e.g. 'a dog chasing a red ball' -> ['a dog', 'a red ball']."""
    return list(_extract_cached(caption))


def extract_concepts_batch(captions: list[str]) -> list[list[str]]:
    """Many captions at once (NLTK's tag_sents is itself a loop over sentences, so this is one too)."""
    return [extract_concepts(c) for c in captions]


def main():
    parser = argparse.ArgumentParser(description="Print the concept phrases of captions, one caption per line.")
    parser.add_argument("captions", nargs="+", help="captions to cut into concept phrases")
    args = parser.parse_args()
    for caption, phrases in zip(args.captions, extract_concepts_batch(args.captions)):
        print(f"{caption}\n  -> " + " | ".join(phrases))


if __name__ == "__main__":
    main()
