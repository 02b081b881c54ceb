"""The benchmarks eval.py runs, and their metrics.

metrics.py            metrics as pure functions of scores (ties and NaN count against the model); embedding
                      in batches, without autograd
shapes_benchmark.py   the shapes benchmark: SugarCrepe's categories made exactly on held-out scenes
benchmarks.py         SugarCrepe, SugarCrepe++, zero-shot and retrieval on their official files
flags.py              eval.py's benchmark flags and their checks
"""
