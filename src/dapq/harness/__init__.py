"""The evaluation harness: `runner` answers every (sample, method, budget) from one prefill per sample and appends
the rows to a run folder (`dapq.runs`); `scheduler` runs the same evaluation on Ray workers. Tasks come from
`dapq.tasks`, tables from `dapq.report`."""
