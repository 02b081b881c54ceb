"""The benchmarks eval.py runs, and their metrics.

metrics.py            metrics as pure functions of scores (ties and NaN count against the model); embedding
                      in batches, without autograd
shapes_benchmark.py   the shapes benchmark: SugarCrepe's categories made exactly on held-out scenes
benchmarks.py         SugarCrepe, SugarCrepe++, zero-shot and retrieval on their official files
report.py             eval.py --report: one HTML page of the comparison, the runs' training, the failures and
                      where each phrase looks
figures.py            the page's charts (hand-written SVG) and inline pictures
"""
