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
     "a stock photo", "the background" -> nothing), drop one-character items, de-duplicate, and fall
     back to the whole caption when nothing is left.

Departure: the authors' released code asks an LLM for the noun phrases of the main subjects; this file
uses the paper's "standard NLP software" route, which needs no model and runs in DataLoader workers.
A known limit of any POS grammar: a participle between two nouns ("people walking dogs") starts a new
phrase ("walking dogs").

Hard negatives for the NegCLIP-style baseline (train.py --method negclip) are made here too, from the
same chunks: `hard_negative` swaps the modifiers of two phrases or replaces a modifier or a head noun by
a word seen in the same position of other captions (`slot_words`). Departure: NegCLIP (Yuksekgonul et
al., ICLR 2023) shuffles parts of COCO captions parsed with spaCy and mines hard negative images too;
this keeps only the two rules that target binding, with no image negatives.

Usage:
  python concepts.py "a small red circle left of a blue star"          # print the phrases of captions
  python concepts.py --data-dir DIR --out concepts.jsonl               # precompute them for tar shards

The precompute writes one JSON line per shard, {"shard": "00000.tar", "caption_key": null, "count": n,
"concepts": {"<sample key>": ["a dog", ...], ...}}, in a process pool; an interrupted run resumes where it
stopped (shards already in the file are skipped). `train.py --concepts FILE` reads it (data.WebDataset).
Shards are identified by file name, so one file serves one shard set.
"""

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import time

import nltk
from nltk.tokenize import TreebankWordTokenizer
from tqdm import tqdm

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


def _np_spans(tagged: list[tuple[str, str]]) -> list[tuple[int, int]]:
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
    for start, end in _np_spans(tagged):
        phrase = " ".join(w for w, _ in tagged[start:end]).lower().replace(" 's", "'s")
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
def _tagged(caption: str) -> tuple[tuple[str, str], ...]:
    """The caption's tokens with their POS tags, cached: concepts and hard negatives tag the same captions."""
    return tuple(tagger().tag(_tokenise(caption)))


@functools.lru_cache(maxsize=1 << 16)
def _extract_cached(caption: str) -> tuple[str, ...]:
    return tuple(_phrases(list(_tagged(caption)), caption))


def extract_concepts(caption: str) -> list[str]:
    """A caption -> its concept phrases, e.g. 'a dog chasing a red ball' -> ['a dog', 'a red ball']."""
    return list(_extract_cached(caption))


def extract_concepts_batch(captions: list[str]) -> list[list[str]]:
    """Many captions at once (NLTK's tag_sents is itself a loop over sentences, so this is one too)."""
    return [extract_concepts(c) for c in captions]


# ----------------------------------------------------------------------------- hard negatives (train.py --method negclip)
# NegCLIP's baseline trains with a hard negative for each caption: the same kind of words, bound
# differently. Its rules are written here over the noun phrases above, so they apply to any caption. A
# phrase has slots: slot 0 is its head noun, slot d > 0 the d-th modifier before the head ("a tiny red
# circle": circle, red, tiny). English orders modifiers by kind (size before colour before the noun), so
# words in one slot are mostly of one kind: in the shapes world slot 1 holds colours and slot 2 sizes.

SLOT_TAGS = ("JJ", "VBN", "VBG", "NN")  # a slot word's tag; a determiner, number or 's ends the slots


@functools.lru_cache(maxsize=1 << 16)
def phrase_slots(caption: str) -> tuple[str, tuple]:
    """A caption -> (its text with whitespace collapsed, one (slots, article) per noun phrase), where slots
    are the (start, end) character ranges of the head noun, then of each modifier going left, and article
    that of the phrase's 'a'/'an' (None if it has none). Ranges index the returned text."""
    text, tagged = re.sub(r"\s+", " ", caption.strip()), list(_tagged(caption))
    try:
        chars = list(_tokenizer.span_tokenize(text))  # the same tokens, as character ranges
    except ValueError:  # quotes the aligner cannot place: no phrases, so no negative
        return text, ()
    if len(chars) != len(tagged):
        return text, ()
    phrases = []
    for start, end in _np_spans(tagged):
        k = end - 1
        while k >= start and tagged[k][1].startswith(SLOT_TAGS):
            k -= 1
        slots = tuple(chars[j] for j in range(end - 1, k, -1))
        article = chars[k] if k >= start and tagged[k][0].lower() in ("a", "an") else None
        phrases.append((slots, article))
    return text, tuple(phrases)


def slot_words(captions: list[str]) -> dict[int, list[str]]:
    """{slot: the distinct lower-case words seen in that slot, sorted}: the replacement pool of hard_negative.
    Sorted, not a set: a set's order changes with each process's string hashing, and so would the negatives."""
    pool: dict[int, set] = {}
    for caption in captions:
        text, phrases = phrase_slots(caption)
        for slots, _ in phrases:
            for d, (s, e) in enumerate(slots):
                pool.setdefault(d, set()).add(text[s:e].lower())
    return {d: sorted(words) for d, words in pool.items()}


def _cased(word: str, like: str) -> str:
    """word with the initial capital of the word it replaces ('Red' -> 'Blue', but 'red' -> 'blue')."""
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower() if word[:1].isupper() and word[1:].islower() else word


def hard_negative(caption: str, rng: random.Random, pool: dict[int, list[str]] | None = None) -> str | None:
    """A caption with the same kind of words bound differently, or None when no rule applies. A rule is
    drawn among those that apply, then one of its edits:
      swap     two phrases exchange their words in one modifier slot: 'a tiny red circle and a large blue
               star' -> 'a tiny blue circle and a large red star' (an attribute swap, as in NegCLIP)
      replace  a word becomes one seen in the same slot of `pool` (slot_words) that the caption lacks:
               'a tiny green circle and ...' (slot 1), 'a tiny red square and ...' (slot 0, the noun)
    An 'a'/'an' before an edited word follows the new word. Only the edited words change, so the
    negative keeps the caption's wording and punctuation: nothing but the binding tells them apart."""
    text, phrases = phrase_slots(caption)

    def word(p: int, d: int) -> str:  # the word in slot d of phrase p
        return text[slice(*phrases[p][0][d])]

    present = set(re.findall(r"[\w']+", text.lower()))
    pool = pool or {}
    swaps = [
        (a, b, d)
        for a, b in itertools.combinations(range(len(phrases)), 2)
        for d in range(1, min(len(phrases[a][0]), len(phrases[b][0])))
        if word(a, d).lower() != word(b, d).lower()
    ]  # fmt: skip
    replaces = [(p, d) for p, (slots, _) in enumerate(phrases) for d in range(len(slots)) if set(pool.get(d, ())) - present]
    rules = [r for r in (swaps, replaces) if r]
    if not rules:
        return None
    rule = rng.choice(rules)
    if rule is swaps:
        a, b, d = rng.choice(swaps)
        edits = {(a, d): word(b, d), (b, d): word(a, d)}
    else:
        p, d = rng.choice(replaces)
        edits = {(p, d): rng.choice([w for w in pool[d] if w not in present])}
    changes = []  # (start, end, new text), applied right to left so earlier ranges stay valid
    for (p, d), new in edits.items():
        (slots, article), old = phrases[p], word(p, d)
        changes.append((*slots[d], _cased(new, old)))
        if article and d == len(slots) - 1:  # the word right after 'a'/'an'
            a_or_an = "an" if new[:1].lower() in ("a", "e", "i", "o", "u") else "a"
            changes.append((*article, _cased(a_or_an, text[slice(*article)])))
    negative = text
    for start, end, new in sorted(changes, reverse=True):
        negative = negative[:start] + new + negative[end:]
    return negative


# ----------------------------------------------------------------------------- precomputed concepts of tar shards


def concepts_index(path: str) -> dict[str, tuple[int, int]]:
    """{shard name: (byte offset, byte length) of its line} in a concepts file. A line torn by an
    interrupted run (no final newline) is left out; only the shard name of each line is parsed."""
    index, offset = {}, 0
    with open(path, "rb") as f:
        for line in f:
            m = re.match(rb'\{"shard": ("(?:[^"\\]|\\.)*")', line)
            if m and line.endswith(b"\n"):
                index[json.loads(m.group(1))] = (offset, len(line))
            offset += len(line)
    return index


def shard_concepts(path: str, offset: int) -> dict[str, list[str]]:
    """{sample key: phrases} of the shard whose line starts at `offset` (see concepts_index)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())["concepts"]


def _shard_job(job: tuple[str, str | None]) -> tuple[str, dict[str, list[str]]]:
    """One shard's {key: phrases}; runs in a pool process. data.py is imported here, not at the top of this
    file, because data.py imports this one."""
    from data import shard_captions

    shard, caption_key = job
    return os.path.basename(shard), {key: extract_concepts(c) for key, c in shard_captions(shard, caption_key)}


def precompute(shards: list[str], out: str, workers: int, caption_key: str | None = None) -> float:
    """Append the concepts of every shard not yet in `out`; returns captions per second."""
    done = concepts_index(out) if os.path.exists(out) else {}
    if os.path.exists(out):  # cut a line torn by an interruption, so that appending starts clean
        os.truncate(out, max((o + n for o, n in done.values()), default=0))
    todo = [(s, caption_key) for s in shards if os.path.basename(s) not in done]
    print(f"{out}: {len(shards) - len(todo)} of {len(shards)} shards already done, {len(todo)} to do, {workers} processes")
    # Ctrl-C reaches every process of the group: the pool ignores it, this process stops the pool.
    pool = multiprocessing.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 0 and todo else None
    captions, t0 = 0, time.time()
    try:
        with open(out, "a") as f, tqdm(total=len(todo), desc="concepts", unit="shard") as bar:
            for name, table in pool.imap_unordered(_shard_job, todo) if pool else map(_shard_job, todo):
                f.write(json.dumps({"shard": name, "caption_key": caption_key, "count": len(table), "concepts": table}) + "\n")
                f.flush()  # a finished shard survives an interruption
                captions += len(table)
                bar.update()
                bar.set_postfix(captions_per_s=f"{captions / (time.time() - t0):.0f}")
    finally:
        if pool:
            pool.terminate()
    rate = captions / max(time.time() - t0, 1e-9)
    if todo:
        print(f"{captions} captions in {time.time() - t0:.1f}s: {rate:.0f} captions/s")
    return rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="*", help="captions to cut into concept phrases, printed one per line")
    parser.add_argument("--data-dir", help="precompute for these tar shards: a folder, a glob or a brace range")
    parser.add_argument("--out", help="the JSON-lines file to write; shards already in it are skipped (resume)")
    parser.add_argument("--caption-key", default=None, help="read captions from this <key>.json field, as train.py does")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (0: all in this process)")
    parser.add_argument("--negatives", action="store_true",
                        help="also print a hard negative of each caption (--method negclip), replacing words by the other captions' words")
    args = parser.parse_args(argv)
    if args.data_dir or args.out:
        if not (args.data_dir and args.out) or args.captions:
            parser.error("--data-dir and --out go together, without positional captions")
        if args.workers < 0:
            parser.error("--workers must be 0 or more")
        from data import expand_shards  # here: data.py imports this file

        try:
            shards = expand_shards(args.data_dir)
        except FileNotFoundError as err:
            parser.error(f"--data-dir: {err}")
        try:
            return precompute(shards, args.out, args.workers, args.caption_key)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: the shards finished so far are in {args.out}; run the same command to resume")
    if not args.captions:
        parser.error("give captions to print, or --data-dir DIR --out FILE to precompute a shard set")
    pool = slot_words(args.captions)
    for caption, phrases in zip(args.captions, extract_concepts_batch(args.captions)):
        print(f"{caption}\n  -> " + " | ".join(phrases))
        if args.negatives:
            print(f"  negative: {hard_negative(caption, random.Random(caption), pool)}")


if __name__ == "__main__":
    main()
