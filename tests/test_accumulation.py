"""Gradient accumulation that keeps every negative (run/scale.accumulated_step, train.py --accum-freq): K
micro-batches must give the loss and the gradient of one pass over the whole batch, on one process and
under two gloo processes, and train.py must train and resume with it."""

import json
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import train
from baselines.losses import phrase_ids
from baselines.negatives import hard_negatives
from baselines.objectives import model_class
from data import Collate, WordTokenizer
from fixtures import batch_loss, crash_after_first_checkpoint, step_args, step_objective, write_cc3m
from model import CLIPConfig, TextConfig, VisionConfig
from run.scale import accumulated_step
from sources.shapes import ShapesDataset, ShapesWorld

CFG = CLIPConfig(
    vision=VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2),
    text=TextConfig(vocab_size=64, context_length=48, width=32, layers=1, heads=2),
    embed_dim=16,
)
# c2lip with every option the cache must carry: patches (L_xac's weight), phrase ids, the concept losses' own t, b
C2LIP = "--npc-weight 1.0 --xac-weight 0.5 --tau 0.5 --concept-labels phrase --concept-logits own".split()
CASES = {
    "c2lip": (CFG, step_args("c2lip", *C2LIP)),
    "siglip": (CFG, step_args("siglip")),
    "negclip": (CFG, step_args("negclip")),
    "clip": (replace(CFG, init_logit_bias=None), step_args("clip")),
}
EXTRAS = {"c2lip": [phrase_ids], "negclip": [hard_negatives]}  # the collate extras those flags ask for


SHAPES = ShapesWorld()
TOKENIZER = WordTokenizer.build([SHAPES.caption(SHAPES.scene(0, "train", i)) for i in range(500)], 48)  # 45 ids


def micro_batches(method: str, k: int, size: int, first: int = 0) -> list[dict]:
    """K micro-batches of `size` scenes from scene `first` on, each collated on its own as train.py's loader does."""
    data = ShapesDataset(SHAPES, seed=0, split="train", length=first + k * size)
    samples = [data[i] for i in range(first, first + k * size)]
    collate = Collate(TOKENIZER, EXTRAS.get(method, ()))
    return [collate(samples[j * size : (j + 1) * size]) for j in range(k)]


def concatenate(batches: list[dict]) -> dict:
    """The one batch that holds the micro-batches: token rows padded to the longest, owners offset."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if key in ("captions", "phrases", "negatives"):  # (rows, T): each micro-batch padded to its own longest
            width = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, width - p.shape[1])) for p in parts]
        if key == "owner":
            parts = [p + sum(len(b["images"]) for b in batches[:j]) for j, p in enumerate(parts)]
        out[key] = torch.cat(parts)
    return out


def whole_batch_step(model, batch, args):
    loss, terms = batch_loss(model, batch, args)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in terms.items()}


def grads(model) -> dict:
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    return {n: None if p.grad is None else p.grad.clone() for n, p in raw.named_parameters()}


def assert_same(got_terms, got_grads, terms, grads_, tol=1e-5):
    assert got_terms.keys() == terms.keys()
    for k, v in terms.items():
        torch.testing.assert_close(got_terms[k], v, atol=tol, rtol=tol, msg=k)
    for name, g in grads_.items():
        assert (got_grads[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(got_grads[name], g, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("method", list(CASES))
def test_four_micro_batches_give_the_gradient_of_the_whole_batch(method):
    cfg, args = CASES[method]
    parts = micro_batches(method, k=4, size=8)
    torch.manual_seed(0)
    model = model_class(args)(cfg)
    loss, terms = whole_batch_step(model, concatenate(parts), args)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    got_loss, got_terms = accumulated_step(model, parts, *step_objective(args), args)
    torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
    assert_same(got_terms, grads(model), terms, expected)
    if method == "negclip":  # the hard negatives are in the loss: some micro-batches have several
        assert sum(int(p["has_negative"].sum()) for p in parts) > 4


def test_with_grad_checkpointing_and_bf16():
    """Recomputing the blocks changes nothing; under bf16 autocast the cache stays in bf16 and the step
    agrees with the plain bf16 step to bf16's precision (smaller matrices round differently)."""
    cfg, args = CASES["c2lip"]
    parts = micro_batches("c2lip", k=4, size=8)
    torch.manual_seed(0)
    model = model_class(args)(cfg)
    whole_batch_step(model, concatenate(parts), args)
    expected = grads(model)
    model.visual.grad_checkpointing = model.text.grad_checkpointing = True
    model.zero_grad(set_to_none=True)
    accumulated_step(model, parts, *step_objective(args), args)
    assert_same({}, grads(model), {}, expected)

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = batch_loss(model, concatenate(parts), args)
    loss.backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    seen = []
    embed, loss_of = step_objective(args)
    record = lambda model, emb, args: seen.append(emb["patch"]) or loss_of(model, emb, args)
    bf16_loss, _ = accumulated_step(model, parts, embed, record, args, torch.bfloat16)
    assert seen[0].dtype == torch.bfloat16 and seen[0].shape == (32, 16, 16) and seen[0].is_leaf
    assert abs(bf16_loss.item() - loss.item()) < 1e-2 * abs(loss.item())
    for name, g in grads(model).items():
        assert (g - plain[name]).norm() <= 0.02 * plain[name].norm(), name


WORLD, K, SIZE = 2, 2, 4


def counting_allreduce(count: list, bucket):
    """DDP's averaging of one bucket of gradients, counted."""
    count[0] += 1
    fut = dist.all_reduce(bucket.buffer() / WORLD, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def worker(rank, init_file, out):
    """Rank r: its K micro-batches, two optimizer steps (DDP must finish its one reduction per step), and
    the number of gradient all-reduces against the plain step's."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for method, (cfg, args) in CASES.items():
        parts = micro_batches(method, K, SIZE, first=rank * K * SIZE)
        calls = {}
        for kind in ("plain", "accumulated"):
            torch.manual_seed(0)
            net = DistributedDataParallel(model_class(args)(cfg))
            count = [0]
            net.register_comm_hook(count, counting_allreduce)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                if kind == "plain":
                    terms = whole_batch_step(net, concatenate(parts), args)[1]
                else:
                    terms = accumulated_step(net, parts, *step_objective(args), args)[1]
                step_grads = grads(net)
                opt.step()
            calls[kind] = count[0]
        results[method] = {"terms": terms, "grads": step_grads, "calls": calls}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_ranks_of_micro_batches_equal_one_process_with_everything(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "out.pt")
    for method, (cfg, args) in CASES.items():
        everything = concatenate(micro_batches(method, WORLD * K, SIZE))  # rank 0's micro-batches, then rank 1's
        torch.manual_seed(0)
        model = model_class(args)(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            terms = whole_batch_step(model, everything, args)[1]
            expected = grads(model)
            opt.step()
        assert_same(got[method]["terms"], got[method]["grads"], terms, expected)
        calls = got[method]["calls"]
        assert calls["accumulated"] == calls["plain"] > 0, (method, calls)  # one synchronisation per step


FAST = ["--workers", "0", "--log-every", "1", "--precision", "fp32"]


def test_train_with_two_micro_batches_equals_batches_of_eight_and_resumes(tmp_path, monkeypatch):
    """train.py --accum-freq 2 --batch-size 4 sees the scenes of --batch-size 8 and takes the same steps; a run
    that dies after its step-1 checkpoint resumes on the micro-batches the uninterrupted run saw next."""
    common = ["--steps", "2", "--ckpt-every", "1", *FAST]
    accumulate = [*common, "--batch-size", "4", "--accum-freq", "2"]
    eight = torch.load(train.main([*common, "--batch-size", "8", "--out", str(tmp_path / "a")]), weights_only=False)
    straight = torch.load(train.main([*accumulate, "--out", str(tmp_path / "b")]), weights_only=False)
    assert straight["step"] == 2 and straight["args"]["accum_freq"] == 2
    for k, v in eight["model"].items():
        torch.testing.assert_close(straight["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in "ab"]
    assert [r["step"] for r in logs[1]] == [1, 2]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)

    crash_after_first_checkpoint(monkeypatch, [*accumulate, "--out", str(tmp_path / "c")])
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)["step"] == 1
    resumed = torch.load(train.main([*accumulate, "--out", str(tmp_path / "c"), "--resume"]), weights_only=False)
    assert resumed["step"] == 2
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert [json.loads(line)["step"] for line in open(tmp_path / "c" / "log.jsonl")] == [1, 2]


def test_an_epoch_of_shards_counts_steps_of_micro_batches(tmp_path):
    shards = write_cc3m(str(tmp_path / "cc3m"))
    argv = ["--data", "cc3m", "--data-dir", shards, "--epochs", "1", "--batch-size", "2", "--accum-freq", "2"]
    state = torch.load(train.main([*argv, "--out", str(tmp_path / "run"), *FAST]), weights_only=False)
    assert state["step"] == 3  # ceil(9 samples (5 by _stats.json + 4 counted) / (2 micro-batches of 2))
