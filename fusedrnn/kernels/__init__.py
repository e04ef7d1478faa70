"""Triton kernels. Importing this package does not import Triton: ``cells`` (each cell's
math), ``tiles``, ``pointwise`` and ``persistent`` do, and they are imported on first use only
(by ``fusedrnn.backend.triton`` and the registry's ``Cell.triton_math``), so that
``TRITON_INTERPRET=1`` can be set before Triton is loaded."""
