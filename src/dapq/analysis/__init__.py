"""The analysis suite: the paper's observations and ablations as commands (`dapq analyze ...`, `dapq ablate ...`).

quantities.py holds the pure tensor math (query cosine, recall, attention similarity); similarity.py and recall.py
drive the experiments with queries captured by `dapq.hf.capture`; sources.py builds the prompts; cli.py and
ablate.py are the commands.
"""
