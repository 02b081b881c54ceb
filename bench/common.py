"""The training step the benchmarks time: train.py's step, rebuilt from the same pieces for two methods.

train.py is a script, and scripts do not import one another, so its `embed` and `loss_of` are written again
here, on one process and for --method c2lip (the paper's weights) and siglip only. tests/test_bench.py
checks that `step_loss` equals the loss train.py's step takes (tests/fixtures.py `batch_loss`).

Dimension legend: B images, K phrases, N patches, D joint width.
"""

from baselines.losses import baseline_loss
from losses import c2lip_loss

METHODS = ("c2lip", "siglip")


def embed(net, batch: dict, method: str) -> dict:
    """batch (data.Collate) -> "image" (B, D), "text" (B, D), and for c2lip "phrase" (K, D), "patch" (B, N, D),
    "owner" (K,)."""
    c2lip = method == "c2lip"
    image, patch, text, phrase = net(batch["images"], batch["captions"], batch["phrases"] if c2lip else None, c2lip)
    emb = {"image": image, "text": text}
    return emb | {"phrase": phrase, "patch": patch, "owner": batch["owner"]} if c2lip else emb


def loss_of(model, emb: dict, method: str):
    """(L, {term: value}) of the embeddings: C2LIP's total at the paper's weights, or SigLIP's loss alone."""
    t, b = model.scale(), model.bias()
    if method != "c2lip":
        return baseline_loss(method, emb, t, b)
    return c2lip_loss(emb["image"], emb["text"], emb["phrase"], emb["patch"], emb["owner"], t, b)


def step_loss(model, batch: dict, method: str):
    """(L, {term: value}) of one batch, as train.py's step takes it on one process."""
    return loss_of(model, embed(model, batch, method), method)
