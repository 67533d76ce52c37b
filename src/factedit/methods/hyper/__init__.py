"""The hyper-network family, MEND and MALMEN (specs/hypernetwork.md): capture of keys and value gradients
(capture.py) and the aggregation of per-token shifts into one weight shift (aggregate.py). The editors and their
meta-training build on these (issue 22)."""
