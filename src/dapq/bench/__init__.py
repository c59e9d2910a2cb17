"""Benchmarks: task generators and loaders (niah, ruler, longbench, longbench_v2, helmet), metrics, the resumable
runner (one prefill per sample for all methods) and reports. Run them with `dapq eval ...` and `dapq report ...`."""
