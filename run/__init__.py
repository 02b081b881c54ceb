"""The machinery of a training run: not the paper, but what makes a run last, resume and report.

start.py        what a run starts from: its checkpoint, released weights (--init, the bias fitted), a preset
flags.py        train.py's flags checked, each error naming its flag
devices.py      the device, the autocast precision, torchrun's process group
scale.py        the global batch gathered across GPUs, and gradient accumulation
checkpoint.py   the checkpoint, log.jsonl, the lock on a run's folder; any weights as a model to evaluate
resume.py       --resume, Ctrl-C and SIGTERM, non-finite steps, a full disk
diagnostics.py  what the sigmoid losses see, logged during training
pictures.py     the loss curve, attention heat maps, the shapes world's contact sheet (python -m run.pictures)
report.py       eval.py --report: one HTML page of the comparison, the runs' training, the failures and where
                each phrase looks
figures.py      the page's charts (hand-written SVG) and inline pictures
"""
