"""Thread limits for the small scikit-learn problems of the analysis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits  # a dependency of scikit-learn


@contextlib.contextmanager
def single_threaded_native_pools() -> Iterator[None]:
    """Run BLAS/OpenMP pools (numpy, scipy, scikit-learn, torch's OpenMP) with one thread inside.

    The analysis fits problems of at most a few thousand rows: there, synchronising BLAS/OpenMP
    threads costs more than it saves, and with torch's and scikit-learn's OpenMP runtimes both loaded
    on a busy machine it was measured 10-20x slower than one thread.
    """
    with threadpool_limits(limits=1):
        yield
