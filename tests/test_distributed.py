"""Two processes with the gloo backend against one process holding the whole batch: the global-batch
losses and the gradients of one step must be the same (run/scale.gather, train.py's step)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from baselines.losses import concept_labels, phrase_ids
from data import Collate, WordTokenizer
from fixtures import batch_loss, step_args
from losses import npc_loss, owner_labels, xac_loss
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from run import scale
from sources.shapes import ShapesDataset, ShapesWorld, truth

CFG = CLIPConfig(
    vision=VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2),
    text=TextConfig(vocab_size=64, context_length=48, width=32, layers=1, heads=2),
    embed_dim=16,
)
LABELS = ["phrase", "scene"]  # both label rules that compare phrases or scenes across the ranks' images
WORLD = 2


def make_batches():
    """A batch of 6 scenes, and its split into WORLD per-rank batches as their loaders would make them."""
    data = ShapesDataset(ShapesWorld(), seed=0, split="train", length=6)
    samples = [data[i] for i in range(6)]
    collate = Collate(WordTokenizer.build([s["caption"] for s in samples], context_length=48), [truth, phrase_ids])
    per_rank = len(samples) // WORLD
    return collate(samples), [collate(samples[r * per_rank : (r + 1) * per_rank]) for r in range(WORLD)]


def one_step(model, batch, labels):
    args = step_args("c2lip", "--npc-weight", "1.0", "--xac-weight", "0.5", "--tau", "0.5", "--concept-labels", labels)
    loss, terms = batch_loss(model, batch, args)
    torch.testing.assert_close(loss, terms["L_sig"] + 1.0 * terms["L_npc"] + 0.5 * terms["L_xac"])
    loss.backward()
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.item() for k, v in terms.items()}, {n: p.grad.clone() for n, p in raw.named_parameters()}


def put_back_gather(x: torch.Tensor) -> torch.Tensor:
    """open_clip's default gather (gather_with_grad off), as the authors' C2LIP_Loss uses it: a plain all_gather,
    which carries no gradient, then this rank's own rows put back in place, so that theirs does."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
    dist.all_gather(sizes, torch.tensor([len(x)]))
    padded = torch.cat([x.detach(), x.new_zeros(int(max(sizes)) - len(x), *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(WORLD)]
    dist.all_gather(parts, padded)
    parts = [part[: int(n)] for part, n in zip(parts, sizes)]
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def worker(rank, init_file, out, labels, gather="ours"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    if gather == "put-back":
        scale.gather = put_back_gather
    torch.manual_seed(0)
    model = DistributedDataParallel(CLIP(CFG))
    _, local = make_batches()
    terms, grads = one_step(model, local[rank], labels)
    if rank == 0:
        torch.save({"terms": terms, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("labels", LABELS)
def test_the_label_rule_reaches_both_concept_losses(labels):
    """--concept-labels phrase | scene: the loss of a batch is computed with that rule's labels, which differ from
    the owner rule's on this batch (objects shared across its images; a phrase of image 1 made identical to one of
    image 0)."""
    whole = make_batches()[0]
    whole["phrase_ids"][whole["owner"] == 1] = whole["phrase_ids"][0]
    labels_z = concept_labels(labels, whole["owner"], 6, whole)  # (B, K) of the rule
    assert (labels_z != owner_labels(whole["owner"], 6)).any()
    torch.manual_seed(0)
    model = CLIP(CFG)
    args = step_args("c2lip", "--npc-weight", "1.0", "--xac-weight", "0.5", "--tau", "0.5", "--concept-labels", labels)
    _, terms = batch_loss(model, whole, args)
    x, u, _, c = model(whole["images"], whole["captions"], whole["phrases"])
    t, b = model.scale(), model.bias()
    torch.testing.assert_close(terms["L_npc"], npc_loss(x, c, labels_z, t, b))
    torch.testing.assert_close(terms["L_xac"], xac_loss(u, c, labels_z, t, b, 0.5))


@pytest.mark.parametrize("labels", LABELS)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, labels):
    whole = make_batches()[0]
    if labels == "scene":  # the batch holds pairs across the two ranks' halves that the scene rule makes positive
        across = concept_labels("scene", whole["owner"], 6, whole)[3:, whole["owner"] < 3]
        assert (across > 0).any()
    torch.manual_seed(0)
    terms, grads = one_step(CLIP(CFG), whole, labels)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt"), labels), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.pt")
    assert set(got["terms"]) == {"L_sig", "L_npc", "L_xac"}
    for k, v in terms.items():
        assert abs(got["terms"][k] - v) < 1e-5 * max(1.0, abs(v)), k
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_a_gather_without_gradient_scales_the_encoders_update_by_one_over_the_world_size(tmp_path):
    """What run/scale.py's `gather` docstring states. With open_clip's default gather each rank computes the same
    global loss L, and its own rows still carry dL/d(own rows) to the encoders; DDP's average over the W ranks then
    leaves dL/dtheta / W for every encoder weight, while t and b, read whole by every rank, keep dL/dt and dL/db.
    Our differentiable gather gives dL/dtheta for all (the test above)."""
    whole = make_batches()[0]
    torch.manual_seed(0)
    terms, grads = one_step(CLIP(CFG), whole, "owner")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = (str(tmp_path / "init"), str(tmp_path / "out.pt"), "owner", "put-back")
    mp.spawn(worker, args=args, nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.pt")
    for k, v in terms.items():
        assert abs(got["terms"][k] - v) < 1e-5 * max(1.0, abs(v)), k  # the same loss: only its gradient differs
    for name, g in grads.items():
        expected = g if name.startswith("logit_") else g / WORLD
        torch.testing.assert_close(got["grads"][name], expected, atol=1e-5, rtol=1e-4, msg=name)


def test_torchrun_two_cpu_processes_train_and_checkpoint(tmp_path):
    """The real entry point: torchrun, gloo on CPU, rank 0 writes the checkpoint and the log."""
    flags = "--steps 2 --batch-size 4 --workers 0 --log-every 1".split()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *flags]
    cmd += ["--out", str(tmp_path)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["step"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
