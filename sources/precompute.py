"""The concept phrases of tar shards, computed once, in a process pool, resumably (concepts.py on every caption).

  python -m sources.precompute --data-dir /data/cc3m --out /data/cc3m-concepts.jsonl --workers 16   # Ctrl-C, rerun

Extracting phrases with NLTK in the DataLoader workers costs CPU on every epoch; this writes them once. The
file holds one JSON line per shard:
  {"shard": "00000.tar", "caption_key": null, "concepts": {"<sample key>": ["a dog", ...], ...},
   "digests": {"<sample key>": "9f86d081884c7d65", ...}, "count": n, "failed": f, "cut": c}
caption_key: the --caption-key the captions were read with (null: <key>.txt); digests: 8 bytes of blake2b of
every caption read, as hex (sources/concepts_file.py), in shard order, so that train.py can tell the file's
captions from the shards' (shard names and sample keys repeat across datasets); count: the samples with
phrases; failed: the captions NLTK failed on (an error, or nltk.redos's wall-clock limit), which have no
phrases; cut: the captions over concepts.MAX_CAPTION_CHARS, whose phrases come from their start. "error" marks
a shard that could not be read to its end (its phrases up to there are kept, and a rerun does not try it
again). `train.py --concepts FILE` reads it and checks it (sources/concepts_file.py). An interrupted run
resumes where it stopped, with the same --caption-key; a file written before the digests, or with another
caption key, is only replaced with --overwrite; an existing file that is not a concepts file is never written to.
"""

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import time

from tqdm import tqdm

from concepts import MAX_CAPTION_CHARS, ConceptError, extract_concepts
from sources.concepts_file import caption_digest, caption_source, concepts_index, concepts_lines
from sources.shards import expand_shards, shard_captions


def _shard_job(job: tuple[str, str | None]) -> dict:
    """One shard's line of the concepts file; runs in a pool process. A shard that cannot be read to its end
    keeps the phrases read before the error, and says so: a rerun does not try it again."""
    shard, caption_key = job
    record = {"shard": os.path.basename(shard), "caption_key": caption_key, "concepts": {}, "digests": {}}
    failed = cut = 0
    try:
        for key, caption in shard_captions(shard, caption_key):
            record["digests"][key] = caption_digest(caption)
            try:
                record["concepts"][key] = extract_concepts(caption)
            except ConceptError:  # that caption only (nltk.redos's wall-clock limit trips more on a loaded machine)
                failed += 1
                continue
            cut += len(caption) > MAX_CAPTION_CHARS
    except (tarfile.TarError, OSError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
    return record | {"count": len(record["concepts"]), "failed": failed, "cut": cut}


def resumable(out: str, caption_key: str | None) -> None:
    """ValueError unless every line of the concepts file `out` has caption digests and this caption key: a
    resumed precompute must not make a file of two formats or two kinds of caption."""
    for number, record in concepts_lines(out):
        if "digests" not in record:
            raise ValueError(f"{out} predates caption digests (line {number}); --overwrite rewrites it")
        if record.get("caption_key") != caption_key:
            theirs = record.get("caption_key")
            raise ValueError(
                f"{out} was written with {f'--caption-key {theirs}' if theirs else 'no --caption-key'} (line "
                f"{number}), not {caption_source(caption_key)}; pass that to resume it, --overwrite to replace it"
            )


def precompute(
    shards: list[str], out: str, workers: int, caption_key: str | None = None, overwrite: bool = False
) -> float:
    """Append the concepts of every shard not yet in `out` (all of them with `overwrite`); returns captions per
    second. ValueError if `out` exists and is not a concepts file, or (unless `overwrite`) one of another format
    or caption key."""
    done = concepts_index(out) if os.path.exists(out) else {}
    if os.path.exists(out) and os.path.getsize(out) and not done:
        raise ValueError(f"{out} exists and is not a concepts file; refusing to write into it")
    if done and not overwrite:
        resumable(out, caption_key)
    if os.path.exists(out):  # cut a line torn by an interruption, so that appending starts clean
        os.truncate(out, 0 if overwrite else max((o + n for o, n in done.values()), default=0))
        done = {} if overwrite else done
    todo = [(s, caption_key) for s in shards if os.path.basename(s) not in done]
    print(
        f"{out}: {len(shards) - len(todo)} of {len(shards)} shards already done, {len(todo)} to do, {workers} processes"
    )
    # Ctrl-C reaches every process of the group: the pool ignores it, this process stops the pool.
    processes = (
        multiprocessing.Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) if workers > 0 and todo else None
    )
    captions, failed, t0 = 0, [], time.time()
    bad_captions = cut = 0
    try:
        with open(out, "a") as f, tqdm(total=len(todo), desc="concepts", unit="shard") as bar:
            for record in processes.imap_unordered(_shard_job, todo) if processes else map(_shard_job, todo):
                f.write(json.dumps(record) + "\n")
                f.flush()  # a finished shard survives an interruption
                captions += record["count"]
                bad_captions, cut = bad_captions + record["failed"], cut + record["cut"]
                failed += [f"{record['shard']} ({record['error']})"] if "error" in record else []
                bar.update()
                bar.set_postfix(captions_per_s=f"{captions / (time.time() - t0):.0f}", unreadable=len(failed))
    finally:
        if processes:
            processes.terminate()
    rate = captions / max(time.time() - t0, 1e-9)
    if todo:
        print(f"{captions} captions in {time.time() - t0:.1f}s: {rate:.0f} captions/s")
    if failed:
        print(f"{len(failed)} shard(s) could not be read to their end; their phrases up to there are kept:")
        print("\n".join(f"  {f}" for f in failed))
    if cut:
        print(f"{cut} caption(s) over {MAX_CAPTION_CHARS} characters: phrases taken from their start only")
    if bad_captions:
        print(
            f"{bad_captions} caption(s) NLTK failed on (an error, or its time limit) have no phrases in {out} "
            "(each shard's line counts them as 'failed'); train.py tries them again and skips those that fail"
        )
    return rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the tar shards: a folder, a glob or a brace range")
    parser.add_argument(
        "--out", required=True, help="the JSON-lines file to write; shards already in it are skipped (resume)"
    )
    parser.add_argument(
        "--caption-key", default=None, help="read captions from this <key>.json field, as train.py does"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (0: all in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing concepts file --out")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    try:
        shards = expand_shards(args.data_dir)
    except FileNotFoundError as err:
        parser.error(f"--data-dir: {err}")
    try:
        return precompute(shards, args.out, args.workers, args.caption_key, args.overwrite)
    except ValueError as err:
        parser.error(f"--out: {err}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the shards finished so far are in {args.out}; run the same command to resume")


if __name__ == "__main__":
    main()
