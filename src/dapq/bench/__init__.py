"""The timing benches of `dapq bench` (speed.py): time to first token, decode throughput and peak memory. The
evaluation harness is `dapq.harness`, its tasks `dapq.tasks`."""
