"""Reports of run folders: `tables` (per-task tables and figures, `dapq report`), `front` (accuracy against peak KV
and TTFT, `dapq report --front`), `paired` (paired-bootstrap differences) and `markdown` (cells and tables). They
read rows through `dapq.runs` and scores through `dapq.tasks.metrics`; nothing here imports torch or the engine."""
