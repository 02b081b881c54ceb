"""Where training samples come from: the synthetic shapes world (the default) or tar shards of CC3M.

shapes.py          the shapes world: scenes, captions, the dataset, the scenes' truth
loader.py          what train.py reads of either: the word vocabulary and the stream of micro-batches
shards.py          tar shards read with the standard library: samples, counts, the plan of an epoch
stream.py          the training stream of shards, epoch after epoch, skipping and counting bad samples
concepts_file.py   a file of concept phrases computed once, checked against the shards' captions
precompute.py      python -m sources.precompute --data-dir DIR --out FILE: writes that file
"""
