"""Training learned pseudo queries for the `learned` method: the prompts (`corpus`, disjoint from every evaluation)
and the loop (`fit`). `dapq train-queries` is the command line."""
