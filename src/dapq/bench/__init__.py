"""The timing benches of `dapq bench` (speed.py): time to first token, decode throughput, peak memory and the
side-by-side comparison with kvpress. The evaluation harness is `dapq.harness`, its tasks `dapq.tasks`."""
