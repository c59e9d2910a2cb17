"""Benchmarks: task generators and loaders (niah, ruler, longbench, longbench_v2, helmet, summary) behind one task
registry (tasks.py), metrics, the resumable runner (one prefill per sample for all methods), reports and the
efficiency benchmarks (speed.py). Run them with `dapq eval ...`, `dapq report ...` and `dapq bench ...`."""
