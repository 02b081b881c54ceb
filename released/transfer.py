"""One HTTP transfer into a .part file, which a bad network or a misbehaving server cannot turn into a file
released/download.py would then trust: its cache decides what a finished .part becomes.

  download(url, part, path, pinned, most)   url -> part, resumed where an earlier try stopped when that is safe

What can go wrong on the way, and what is done about it:
  - the file changes on the server between two tries. A .part is resumed only with If-Range naming the
    validator of the response that started it (its strong ETag, else its Last-Modified), recorded beside it
    in <part>.validator: a server whose file changed answers with the whole new file (200) and the .part
    starts again from zero. A 206 is appended only if it names that same validator (RFC 9110 has a 206 repeat
    a 200's ETag; one that names none cannot vouch for its bytes) and its Content-Range starts where the .part
    ends; any other 206 starts the .part again from zero. A .part whose validator is unknown (the server sent
    none, or an older version of this code started it) is restarted, never resumed: its bytes could be of
    another version of the file;
  - sizes that disagree. A 206's file size is its Content-Range's total and its body is read to the range's
    end at most, whatever its Content-Length says; a 206 to a request without Range is taken only when its
    range is the whole file;
  - a body cut short. With a Content-Length (or a 206's total) the bytes are counted; a chunked body cut short
    raises in http.client; either way one line, and the .part is kept for the next try. A body with neither a
    length nor chunking cannot be told whole from cut: refused before it is read for a file with no pinned
    digest, left to the digest for a pinned one;
  - a body longer than the file. `most` is the file's size where it is published, else a cap stated in
    released/download.py: a length above it is refused before the body is read, a body that runs past it is
    stopped there, refused and deleted;
  - a server that stalls: fewer than STALL_BYTES in STALL seconds (a read that brings nothing, or a trickle)
    ends the transfer, the .part kept for the next try. There is no limit on the whole time: a slow but
    steady 6 GB download goes on;
  - an encoded body. Identity is asked for; a Content-Encoding anyway is refused, not decoded: the sizes, the
    ranges and the .part are of the encoded bytes, and inflating is what a bomb wants. Only gzip on a file
    whose name ends in .gz is kept as it came (Apache's AddEncoding labels the file's own compression so);
  - an HTML page served with status 200 (a login, quota or proxy page) for a file that is not HTML: refused,
    by its Content-Type or by its start (after a BOM, white space, comments and an XML declaration);
  - redirects: followed (GitHub and the hub serve files from other hosts), at most MAX_REDIRECTS, to http or
    https only and never from https to http; one to another origin is said on stderr, in one line;
  - a full disk: one line naming the folder, and the .part keeps what was written for the run after.
Only the standard library's urllib talks to the network; tqdm draws the bar.
"""

import errno
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20
STALL, STALL_BYTES = 60, 64 << 10  # fewer than 64 KiB in a minute (about 1 KiB/s): the server has stalled
MAX_REDIRECTS = 5
HTML_TYPES = ("text/html", "application/xhtml+xml")
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")
HTML_PEEK = 64 << 10  # bytes of a finished .part read to tell an HTML page
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class DownloadError(RuntimeError):
    """A file could not be fetched or did not match its digest; the message is one line the user can act on."""


def validator_of(response) -> str | None:
    """What If-Range may name: the response's ETag unless weak (RFC 9110 forbids a weak one there), else
    its Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def read_validator(part: str) -> str | None:
    try:
        with open(part + ".validator") as f:
            return f.read().strip() or None
    except OSError:
        return None


def discard(part: str) -> None:
    """Remove a .part and its validator."""
    for file in (part, part + ".validator"):
        if os.path.exists(file):
            os.remove(file)


def start_part(part: str, validator: str | None) -> None:
    """An empty .part from a new response: the validator is written after the truncation, so that old bytes
    never sit beside the validator of another response, whenever the process dies."""
    discard(part)
    open(part, "wb").close()
    if validator:
        with open(part + ".validator", "w") as f:
            f.write(validator + "\n")


def is_html_name(path: str) -> bool:
    return path.lower().endswith((".html", ".htm"))


def looks_like_html(start: bytes) -> bool:
    """Whether a body opens as an HTML page: after a BOM, white space, <!-- comments --> and <?xml ...?>."""
    text = start.lower().removeprefix(b"\xef\xbb\xbf")
    while True:
        text = text.lstrip(b" \t\r\n")
        for opening, closing in ((b"<!--", b"-->"), (b"<?", b"?>")):
            if text.startswith(opening):
                text = text.partition(closing)[2]  # unclosed within the bytes read: nothing left, not a page
                break
        else:
            return text.startswith(HTML_STARTS)


def content_range(response) -> tuple[int, int, int] | None:
    """(first, last, total) of a Content-Range such as "bytes 100-299/300"; None if it is not one."""
    match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    first, last, total = map(int, match.groups()) if match else (0, -1, 0)
    return (first, last, total) if first <= last < total else None


def sizes(response) -> tuple[int | None, int | None]:
    """(end, total): the .part's size once this body is in, and the whole file's; None where not said. A 206's
    are its Content-Range's (checked before), a 200's its Content-Length (http.client's, None when chunked)."""
    if response.status == 206:
        _, last, total = content_range(response)
        return last + 1, total
    return response.length, response.length


class Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, bounded and said: at most MAX_REDIRECTS, to http or https only, never from https to
    http; one to another origin (scheme, host and port) is a line on stderr. A redirect's own body is not read."""

    max_repeats = max_redirections = MAX_REDIRECTS + 1  # so that this class stops a loop first, in one line

    def __init__(self, url: str, by_hand: str):
        super().__init__()
        self.url, self.by_hand, self.hops = url, by_hand, 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()  # urllib would read it to its end, and an endless one never ends
        self.hops += 1
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if self.hops > MAX_REDIRECTS:
            raise DownloadError(f"{self.url}: more than {MAX_REDIRECTS} redirects (a loop?); {self.by_hand}")
        if new.scheme not in ("http", "https") or (old.scheme, new.scheme) == ("https", "http"):
            raise DownloadError(
                f"{self.url} redirects to {newurl}: refused (http or https only, never from https to http); "
                f"{self.by_hand}"
            )
        first = urllib.parse.urlsplit(self.url)[:2]
        if new[:2] != old[:2] and new[:2] != first:
            tqdm.write(f"note: {self.url} redirects to another origin, {new.scheme}://{new.netloc}", file=sys.stderr)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(request, url: str, by_hand: str, resuming: bool):
    """The response, or None for a 416 to a resumed range (the .part is odd: the caller starts again)."""
    try:
        return urllib.request.build_opener(Redirects(url, by_hand)).open(request, timeout=STALL)
    except urllib.error.HTTPError as err:
        if err.code == 416 and resuming:
            return None
        reason = " ".join(str(err.reason).split())
        raise DownloadError(f"{url} answered HTTP {err.code} ({reason}); {by_hand}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason}); offline? {by_hand}") from None


def download(url: str, part: str, path: str, pinned: bool, most: int) -> None:
    """url -> part, appending to what an earlier try of the same version left there (Range with If-Range), with
    a tqdm bar in bytes. `pinned`: the caller checks a published digest afterwards, so a body of unknown
    length may be read (the digest tells a cut one); without one it is refused. `most`: the bytes the file
    may have."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    validator = read_validator(part) if have else None
    if have and validator is None:  # who sent these bytes is unknown: resuming could splice two versions
        discard(part)
        have = 0
    by_hand = f"download it by hand and place it at {path}"
    request = urllib.request.Request(url, headers={"User-Agent": "c2lip", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", validator)
    response = open_url(request, url, by_hand, resuming=have > 0)
    resumed = response is not None and response.status == 206 and have > 0
    if response is None or (resumed and not continues(response, have, validator)):
        if response is not None:
            response.close()
        discard(part)  # a range other than the one asked for, or of another version: start again from zero
        return download(url, part, path, pinned, most)
    if response.status == 206 and not resumed and not whole_file(response):
        response.close()
        raise DownloadError(f"{url} answered 206 (a part of the file) to a request for all of it; refused, {by_hand}")
    with response:
        end, total = check_response(response, url, path, pinned, most, by_hand)
        if not resumed:  # the whole file: a new .part, from this response's version
            try:
                start_part(part, validator_of(response))
            except OSError as err:
                raise DownloadError(unwritable(part, err, url, by_hand)) from None
            have = 0
        done = copy_body(response, part, have, end, most, url, by_hand)
    if total is not None and done != total:
        raise DownloadError(f"{url}: the connection closed after {done} of {total} bytes; {again(part)}, or {by_hand}")
    with open(part, "rb") as f:
        if looks_like_html(f.read(HTML_PEEK)) and not is_html_name(path):
            discard(part)
            raise DownloadError(
                f"{url} sent an HTML page, not the file: refused and deleted; try again later, or {by_hand}"
            )


def check_response(response, url: str, path: str, pinned: bool, most: int, by_hand: str):
    """Refuses, before its body is read, a response that cannot be the file: an HTML page, an encoded body, a
    size above `most`, a length nothing can check -> sizes(response)."""
    if response.headers.get_content_type() in HTML_TYPES and not is_html_name(path):
        raise DownloadError(
            f"{url} answered with an HTML page (Content-Type {response.headers.get_content_type()}), not the "
            f"file: a login, error or proxy page? Refused; try again later, or {by_hand}"
        )
    encoding = " ".join(response.headers.get("Content-Encoding", "identity").lower().split())
    if encoding not in ("identity", "") and not (encoding in ("gzip", "x-gzip") and path.endswith(".gz")):
        raise DownloadError(
            f"{url} answered with Content-Encoding {encoding} though identity was asked: its bytes are not the "
            f"file; refused, {by_hand}"
        )
    end, total = sizes(response)
    if total is not None and total > most:
        raise DownloadError(
            f"{url}: the server gives the file {total} bytes, more than the {most} it can have (its published "
            f"size, or the cap in released/download.py); refused, {by_hand}"
        )
    if end is None and not response.chunked and not pinned:
        raise DownloadError(
            f"{url}: the server gave no length, so a download cut short could not be told from a whole one, and "
            f"no digest is published to tell them apart; {by_hand}"
        )
    return end, total


def again(part: str) -> str:
    if read_validator(part):
        return f"run again to resume from {part}"
    return "run again (the server names no version of the file, so it starts from zero)"


def continues(response, have: int, validator: str) -> bool:
    """A 206 continues the .part if it starts where the .part ends and names the same version (a server that
    ignores If-Range gives itself away by its validator; one that names none cannot vouch for its bytes)."""
    span = content_range(response)
    return span is not None and span[0] == have and validator_of(response) == validator


def whole_file(response) -> bool:
    """A 206 whose range is the whole file (bytes 0-(n-1)/n), which a request without Range may get."""
    span = content_range(response)
    return span is not None and span[0] == 0 and span[1] + 1 == span[2]


def copy_body(response, part: str, have: int, end: int | None, most: int, url: str, by_hand: str) -> int:
    """The body appended to the .part -> the .part's size: read to `end` where the response says it, and never
    past `most` + 1 (one byte more tells a body longer than the file). What arrived is kept if the transfer
    breaks or stalls, or the disk fills."""
    stop = most + 1 if end is None else min(end, most + 1)
    done, mark = have, (time.monotonic(), have)  # mark: when the last STALL_BYTES had arrived, and where
    name = os.path.basename(part).removesuffix(".part")
    bar = tqdm(total=end, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
    try:
        with open(part, "ab", buffering=0) as f, bar:  # unbuffered: a write that fails is a write of this loop
            while done < stop and (block := read_block(response, min(CHUNK, stop - done), done, part, url, by_hand)):
                write_all(f, block)
                done += len(block)
                bar.update(len(block))
                if done - mark[1] >= STALL_BYTES:
                    mark = (time.monotonic(), done)
                elif time.monotonic() - mark[0] > STALL:
                    raise DownloadError(stalled(url, done, part, by_hand))
    except OSError as err:
        raise DownloadError(unwritable(part, err, url, by_hand)) from None
    if done > most:
        discard(part)
        raise DownloadError(
            f"{url} sent more than {most} bytes, more than the file can have (its published size, or the cap in "
            f"released/download.py): refused and deleted; {by_hand}"
        )
    return done


def read_block(response, size: int, done: int, part: str, url: str, by_hand: str) -> bytes:
    """Up to `size` bytes of the body; b"" at its end. A socket silent for STALL seconds raises TimeoutError."""
    try:
        return response.read1(size)  # read() would drop what a cut chunk had brought
    except TimeoutError:
        raise DownloadError(stalled(url, done, part, by_hand)) from None
    except (http.client.HTTPException, OSError) as err:
        raise DownloadError(
            f"{url}: the transfer stopped after {done} bytes ({type(err).__name__}); {again(part)}, or {by_hand}"
        ) from None


def write_all(f, block: bytes) -> None:
    """An unbuffered write may write part of a block (a disk filling up): the rest is written, or raises."""
    view = memoryview(block)
    while view:
        view = view[f.write(view) :]


def stalled(url: str, done: int, part: str, by_hand: str) -> str:
    return (
        f"{url}: the transfer stalled after {done} bytes (less than {STALL_BYTES >> 10} KiB in {STALL:g} s); "
        f"{again(part)}, or {by_hand}"
    )


def unwritable(part: str, err: OSError, url: str, by_hand: str) -> str:
    """One line for a .part that cannot be written; on a full disk, the .part keeps what was written."""
    kept = os.path.getsize(part) if os.path.exists(part) else 0
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk holding {os.path.dirname(part) or '.'} is full ({url}): {part} keeps the {kept} bytes "
            f"written; free some space, then {again(part)}, or {by_hand}"
        )
    return f"could not write {part} ({err.strerror}) for {url}; {by_hand}"
