"""Augmented assignments (`x += y`, `-=`, `*=`, `/=`) on activations become out-of-place while a model trains.

Some models add their residuals in place: ComfyUI 0.8's Flux blocks do `img += attn_out` right after
`img_norm1(img)`, and LayerNorm saved `img` for its backward. Without activation checkpointing autograd then
refuses ("modified by an inplace operation"); with checkpointing it is worse: the block's forward mutates
the very input tensor that the checkpoint keeps for the recompute, and the recompute's own saved
activations are mutated again after they are stored, so the gradients come out wrong without an error.

`x += y` is Python's `x = x.__iadd__(y)`: the name is rebound to whatever `__iadd__` returns. Returning
`x + y` (a new tensor) instead of mutating `x` gives the code the same values while every tensor saved for
backward, and every checkpointed block input, keeps the value it had. Nothing is copied: the new tensor
is the allocation the in-place add avoided, and the old one stays alive only where autograd needs it
(exactly the memory a model written with `x = x + y` uses). Explicit `x.add_(y)` calls are not touched
(their result is often discarded, so only a real mutation is correct).

Only tensors that are in the autograd graph are affected: grad mode on, `x` not a view (a view's `+=`
must reach its base), and `x` a non-leaf that requires grad or `y` one that does. Optimizer updates (no_grad), sampling (inference
mode) and leaf parameters keep in-place semantics. The patch is process-wide while active (torch.Tensor
is one class), reference-counted so that nested or concurrent training runs share it, and removed when
the last one ends.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_OUT_OF_PLACE: dict[str, Callable] = {
    "__iadd__": torch.add, "__isub__": torch.sub, "__imul__": torch.mul, "__itruediv__": torch.div,
}
_lock = threading.Lock()
_active = 0
_originals: dict[str, Callable | None] = {}  # None: the method was inherited from torch._C.TensorBase


def _in_graph(x: torch.Tensor, other: object) -> bool:
    """Whether `x op= other` is a step of the autograd graph that may be done out of place: `x` (not a view,
    not a leaf parameter) requires grad, or `other` does and makes `x` join the graph."""
    if not torch.is_grad_enabled() or x._base is not None:
        return False
    if x.requires_grad:
        return not x.is_leaf
    return isinstance(other, torch.Tensor) and other.requires_grad


def _patched(name: str, original: Callable, out_of_place: Callable) -> Callable:
    def augmented(self, other):
        if not _in_graph(self, other):
            return original(self, other)
        result = out_of_place(self, other)
        if result.shape != self.shape:  # broadcasting that grows `self` is an error in place: torch says so
            return original(self, other)
        # In place keeps self's dtype (a bf16 residual plus a float32 branch stays bf16); so must the result.
        return result if result.dtype == self.dtype else result.to(self.dtype)

    augmented.__name__ = name
    augmented.__qualname__ = f"Tensor.{name}"
    return augmented


@contextmanager
def augmented_assignment_out_of_place() -> Iterator[None]:
    """While inside, `x += y` (and -=, *=, /=) on a tensor in the autograd graph returns a new tensor."""
    global _active
    with _lock:
        if _active == 0:
            for name, fn in _OUT_OF_PLACE.items():
                _originals[name] = vars(torch.Tensor).get(name)
                setattr(torch.Tensor, name, _patched(name, getattr(torch.Tensor, name), fn))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                for name, original in _originals.items():
                    if original is None:
                        delattr(torch.Tensor, name)
                    else:
                        setattr(torch.Tensor, name, original)
                _originals.clear()


def is_active() -> bool:
    return _active > 0
