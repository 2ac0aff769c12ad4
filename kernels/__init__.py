"""Triton kernels of TuneQDM: the fused packed-int4/int8 separable Linear (forward and backward) and
the dequantize kernel of the conv path.

Importing this package imports triton; tuneqdm_core imports it lazily, only when the dispatcher in
tuneqdm_core/functional.py picks the Triton backend (CUDA tensors) or a caller asks for it. On CPU
tensors the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, set before the first
kernel runs), which is how the tests exercise them.
"""
from .dequant import dequantize_codes, interpreting
from .separable_linear import SeparableLinearFn, linear_forward, linear_input_grad, row_experts_of, separable_linear

TUNEQDM_KERNELS = True  # marks this package as ours when it is found as a top-level `kernels`

__all__ = ["dequantize_codes", "interpreting", "SeparableLinearFn", "linear_forward", "linear_input_grad",
           "row_experts_of", "separable_linear"]
