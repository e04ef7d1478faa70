"""Triton kernels. Importing this package does not import Triton: ``cells``, ``pointwise``
and ``persistent`` do, and only ``fusedrnn.backend.triton`` imports them, on first use,
so that ``TRITON_INTERPRET=1`` can be set before Triton is loaded."""
