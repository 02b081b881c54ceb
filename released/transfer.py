"""One HTTP transfer into a .part file, which a bad network or a misbehaving server cannot turn into a file
released/download.py would then trust: its cache decides what a finished .part becomes.

  download(url, part, path, pinned)   url -> part, resumed where an earlier try stopped when that is safe

What can go wrong on the way, and what is done about it:
  - the file changes on the server between two tries. A .part is resumed only with If-Range naming the
    validator of the response that started it (its strong ETag, else its Last-Modified), recorded beside it
    in <part>.validator: a server whose file changed answers with the whole new file (200) and the .part
    starts again from zero; a 206 that names another validator is not appended either. A .part whose
    validator is unknown (the server sent none, or an older version of this code started it) is restarted,
    never resumed: its bytes could be of another version of the file;
  - a body cut short. With a Content-Length (or a Content-Range's total) the bytes are counted; a chunked
    body cut short raises in http.client; either way one line, and the .part is kept for the next try. A body
    with neither a length nor chunking cannot be told whole from cut: refused before it is read for a file
    with no pinned digest, left to the digest for a pinned one;
  - an HTML page served with status 200 (a login, quota or proxy page) for a file that is not HTML: refused,
    by its Content-Type or by its first bytes.
Only the standard library's urllib talks to the network; tqdm draws the bar.
"""

import http.client
import os
import urllib.error
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20
HTML_STARTS = (b"<!doctype html", b"<html")


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
    return start.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(HTML_STARTS)


def expected_total(response, have: int) -> int | None:
    """The size of the whole file, if the response says it: `have` bytes already there plus its Content-Length,
    else the total of its Content-Range ("bytes 100-299/300")."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit():
        return have + int(length)
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def open_url(request, url: str, by_hand: str, resuming: bool):
    """The response, or None for a 416 to a resumed range (the .part is odd: the caller starts again)."""
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and resuming:
            return None
        raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}); {by_hand}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not reach {url} ({reason}); offline? {by_hand}") from None


def download(url: str, part: str, path: str, pinned: bool) -> None:
    """url -> part, appending to what an earlier try of the same version left there (Range with If-Range), with
    a tqdm bar in bytes. `pinned`: the caller checks a published digest afterwards, so a body of unknown
    length may be read (the digest tells a cut one); without one it is refused."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    validator = read_validator(part) if have else None
    if have and validator is None:  # who sent these bytes is unknown: resuming could splice two versions
        discard(part)
        have = 0
    by_hand = f"download it by hand and place it at {path}"
    request = urllib.request.Request(url, headers={"User-Agent": "c2lip"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", validator)
    response = open_url(request, url, by_hand, resuming=have > 0)
    resumed = response is not None and response.status == 206 and have > 0
    if response is None or (resumed and not continues(response, have, validator)):
        if response is not None:
            response.close()
        discard(part)  # a range other than the one asked for, or of another version: start again from zero
        return download(url, part, path, pinned)
    with response:
        if response.headers.get_content_type() == "text/html" and not is_html_name(path):
            raise DownloadError(
                f"{url} answered with an HTML page (Content-Type text/html), not the file: a login, error or proxy "
                f"page? Refused; try again later, or {by_hand}"
            )
        total = expected_total(response, have if resumed else 0)
        if total is None and not response.chunked and not pinned:
            raise DownloadError(
                f"{url}: the server gave no length, so a download cut short could not be told from a whole one, and "
                f"no digest is published to tell them apart; {by_hand}"
            )
        if not resumed:  # the whole file: a new .part, from this response's version
            start_part(part, validator_of(response))
            have = 0
        done = copy_body(response, part, have, total, url, by_hand)
    if total is not None and done != total:
        raise DownloadError(f"{url}: the connection closed after {done} of {total} bytes; {again(part)}, or {by_hand}")
    with open(part, "rb") as f:
        if looks_like_html(f.read(1024)) and not is_html_name(path):
            discard(part)
            raise DownloadError(
                f"{url} sent an HTML page, not the file: refused and deleted; try again later, or {by_hand}"
            )


def again(part: str) -> str:
    if read_validator(part):
        return f"run again to resume from {part}"
    return "run again (the server names no version of the file, so it starts from zero)"


def continues(response, have: int, validator: str) -> bool:
    """A 206 continues the .part if it starts where the .part ends and is of the same version (a server that
    ignores If-Range but still names its validator gives itself away)."""
    starts = response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
    return starts and validator_of(response) in (None, validator)


def copy_body(response, part: str, have: int, total: int | None, url: str, by_hand: str) -> int:
    """The body appended to the .part -> the .part's size. A transfer that breaks keeps what arrived."""
    done = have
    bar = tqdm(
        total=total,
        initial=have,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=os.path.basename(part).removesuffix(".part"),
    )
    with open(part, "ab") as f, bar:
        try:
            while block := response.read1(CHUNK):  # read() would drop what a cut chunk had brought
                f.write(block)
                done += len(block)
                bar.update(len(block))
        except (http.client.HTTPException, OSError) as err:
            raise DownloadError(
                f"{url}: the transfer stopped after {done} bytes ({type(err).__name__}); {again(part)}, or {by_hand}"
            ) from None
    return done
