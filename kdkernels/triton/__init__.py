"""Triton kernels and their launch helpers. Import lazily: ``triton`` is optional.

``launch_counts`` records every launch by kernel name, so tests can assert that
a kernel really ran (under TRITON_INTERPRET=1 on CPU tensors, or on a GPU).
"""
from collections import Counter

launch_counts: Counter = Counter()
