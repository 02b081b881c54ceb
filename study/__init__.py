"""The study of the shapes world: several training runs per row, over seeds, in one command.

sweep.py     python -m study.sweep: trains what is missing, resumes what was interrupted, prints the tables
studies.py   the studies it runs: their protocols, rows and columns (docs/study.md, docs/mechanism.md)
compare.py   python -m study.compare: the README's first comparison, its commands run and its table written
"""
