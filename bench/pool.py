"""The pooled concept loss (XAC): our batched form against the per-phrase loop of the authors' design.

  python -m bench.pool                 # B 96, K 300, N 196, D 768 on CPU, then peak memory at the paper's size
  python -m bench.pool --json pool.json --skip-memory

Speed: forward + backward of losses.xac_loss against a loop that, like the authors' code,
takes one phrase at a time and attends over all images' patches (written here from paper.md's
description), on the same inputs, interleaved, in one run. The two losses and gradients must agree.

Memory: peak resident memory of one forward + backward at the paper's global batch (768 images, about
3,000 phrases, 196 patches, 768 dims), measured in a fresh subprocess as its peak RSS minus the RSS
after its inputs exist: the extra memory the loss needs. (On CUDA the same is read from the allocator.)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from losses import owner_labels, sigmoid_loss, xac_loss


def per_phrase_loop(patch_emb, concept_emb, owner, scale, bias, tau=1.0):
    """XAC as the authors' code organises it: a Python loop over phrases, each attending over every image."""
    scores = []
    for c in concept_emb:  # (D,)
        weights = (patch_emb @ c / tau).softmax(dim=-1)  # (B, N)
        pooled = F.normalize((weights[:, :, None] * patch_emb).sum(1), dim=-1)  # (B, D)
        scores.append(pooled @ c)  # (B,)
    logits = scale * torch.stack(scores, dim=1) + bias  # (B, K)
    return sigmoid_loss(logits, owner_labels(owner, len(patch_emb)), len(concept_emb))


def batched(patch_emb, phrase_emb, owner, scale, bias, tau=1.0):
    """XAC as losses.py computes it: every (phrase, image) pair at once (pool.pooled_similarity)."""
    return xac_loss(patch_emb, phrase_emb, owner_labels(owner, len(patch_emb)), scale, bias, tau)


def inputs(B, K, N, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(B, N, D, generator=g), dim=-1).to(device).requires_grad_()
    c = F.normalize(torch.randn(K, D, generator=g), dim=-1).to(device).requires_grad_()
    owner = torch.randint(0, B, (K,), generator=g).sort().values.to(device)
    return u, c, owner


def time_fwd_bwd(fn, u, c, owner, repeats):
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    seconds = []
    for _ in range(repeats):
        u.grad = c.grad = None
        t0 = time.perf_counter()
        loss = fn(u, c, owner, t, b)
        loss.backward()
        if u.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return min(seconds), loss.item(), u.grad.clone(), c.grad.clone()


def peak_memory_child(B, K, N, D):
    """Runs in a subprocess: prints the peak extra bytes of one forward + backward."""
    u, c, owner = inputs(B, K, N, D, "cpu")
    # current resident memory (not the peak, which still counts the temporaries that built the inputs);
    # the peak after the backward pass is at least this, so the difference never undercounts
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    batched(u, c, owner, torch.tensor(10.0), torch.tensor(-10.0)).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"extra_bytes": peak - base, "seconds": time.perf_counter() - t0}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        type=int,
        nargs=4,
        default=[96, 300, 196, 768],
        metavar=("B", "K", "N", "D"),
        help="images, phrases, patches, width for the speed comparison",
    )
    p.add_argument(
        "--paper-size",
        type=int,
        nargs=4,
        default=[768, 3000, 196, 768],
        metavar=("B", "K", "N", "D"),
        help="sizes for the peak-memory measurement",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the minimum is reported)")
    p.add_argument("--skip-memory", action="store_true", help="skip the paper-size memory measurement")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args()
    if args.memory_child:
        return peak_memory_child(*args.paper_size)

    u, c, owner = inputs(*args.size, "cpu")
    ours = time_fwd_bwd(batched, u, c, owner, args.repeats)
    loop = time_fwd_bwd(per_phrase_loop, u, c, owner, args.repeats)
    result = {
        "size": dict(zip("BKND", args.size)),
        "ours_seconds": ours[0],
        "loop_seconds": loop[0],
        "speedup": loop[0] / ours[0],
        "loss_abs_diff": abs(ours[1] - loop[1]),
        "grad_max_abs_diff": max((ours[2] - loop[2]).abs().max().item(), (ours[3] - loop[3]).abs().max().item()),
    }
    B, K, N, D = args.size
    print(f"pooled concept loss, forward + backward, B {B} K {K} N {N} D {D}, {torch.get_num_threads()} threads")
    print(f"  per-phrase loop  {loop[0] * 1000:9.1f} ms")
    print(f"  ours (batched)   {ours[0] * 1000:9.1f} ms   {result['speedup']:.1f}x faster")
    print(
        f"  |loss difference| {result['loss_abs_diff']:.2e}, "
        f"max |gradient difference| {result['grad_max_abs_diff']:.2e}"
    )

    if not args.skip_memory:
        child = subprocess.run(
            [sys.executable, "-m", "bench.pool", "--memory-child", "--paper-size", *map(str, args.paper_size)],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the root, where bench/ is a package
            capture_output=True,
            text=True,
            check=True,
        )
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        result["paper_size"] = dict(zip("BKND", args.paper_size))
        result["paper_size_extra_gb"] = mem["extra_bytes"] / 1e9
        result["paper_size_seconds"] = mem["seconds"]
        B, K, N, D = args.paper_size
        print(
            f"paper size B {B} K {K} N {N} D {D}: peak extra memory {mem['extra_bytes'] / 1e9:.2f} GB "
            f"(the (K, B, D) pooled tensor alone would be {K * B * D * 4 / 1e9:.1f} GB), {mem['seconds']:.0f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
