"""The analysis suite: the paper's observations and ablations (commands `dapq analyze ...` and `dapq ablate ...`,
in `dapq.cli.analyze` and `dapq.cli.ablate`).

quantities.py holds the pure tensor math (query cosine, recall, attention similarity); similarity.py and recall.py
drive the experiments with queries captured by `dapq.hf.capture`; sources.py builds the prompts from the task
registry (`dapq.tasks`); ablate.py runs the DapQ ablations through the harness; checkpoint.py makes the
analyses resumable.
"""
