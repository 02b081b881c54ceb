"""Speed and memory, measured side by side in one run and read as ratios (the machines are shared and noisy).

  python -m bench.step           step.py: one training step, fp32 vs bf16, siglip vs c2lip, ours vs open_clip's B/16
  python -m bench.throughput     throughput.py: images/s and model FLOPs utilisation, eager vs torch.compile (a GPU)
  python -m bench.accumulation   accumulation.py: --accum-freq K, step time and peak memory against one batch
  python -m bench.pool           pool.py: L_xac batched (the root's pool.py) against the authors' loop over phrases
  python -m bench.data           data.py: does one loader process keep up with the training step?
  python -m bench.scoring        scoring.py: SugarCrepe at full size through eval.py with a B/16, time and memory
  common.py                      the training step they time, train.py's rebuilt (scripts do not import scripts)

docs/scale.md shows the figures they printed, with the commands (bench.scoring's: docs/real-data.md).
"""
