"""torch tensors in the weight segment.

Each distinct storage is published once (tied weights stay tied); a tensor travels as
(storage region, dtype, size, stride, offset) and is rebuilt with ``torch.frombuffer`` over
the mapping, so attaching copies nothing. Tensors that are not dense CPU tensors keep
torch's own pickling (a private copy per worker, usually tiny).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import EncodeError


def reduce(obj, layout):
    if not isinstance(obj, torch.Tensor) or type(obj) not in (torch.Tensor, torch.nn.Parameter):
        return NotImplemented
    if obj.device.type != "cpu":
        raise EncodeError(
            f"a {obj.device.type} tensor of shape {tuple(obj.shape)} is in the loaded model: "
            "workerpool shares CPU weights; move the model to the CPU in load() "
            "(model.cpu()) and to the device in predict() if you must")
    if obj.layout != torch.strided or obj.is_quantized:
        return NotImplemented
    storage = obj.untyped_storage()
    ref = layout.place(("torch", storage.data_ptr(), storage.nbytes()), storage_bytes(storage),
                       storage.nbytes(), address=storage.data_ptr())
    layout.repoint_later(repoint, obj, ref, obj.dtype, tuple(obj.shape), tuple(obj.stride()),
                         obj.storage_offset())
    return rebuild_tensor, (ref, obj.dtype, tuple(obj.shape), tuple(obj.stride()),
                            obj.storage_offset(), obj.requires_grad,
                            isinstance(obj, torch.nn.Parameter))


def storage_bytes(storage):
    """The storage's bytes as a numpy uint8 array (zero-copy), for writing into the segment."""
    raw = torch.empty(0, dtype=torch.uint8)
    raw.set_(storage, 0, (storage.nbytes(),), (1,))
    return raw.numpy()


def rebuild_tensor(buffer, dtype, size, stride, storage_offset, requires_grad, is_parameter):
    """A tensor viewing ``buffer``; a Parameter again if it was one."""
    tensor = view_tensor(buffer, dtype, size, stride, storage_offset)
    if is_parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def view_tensor(buffer, dtype, size, stride, storage_offset):
    if len(buffer) == 0:
        return torch.empty_strided(size, stride, dtype=dtype)
    with warnings.catch_warnings():
        # Read-only in workers on purpose: a write there is a SIGSEGV in that worker only.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    usable = len(buffer) // itemsize * itemsize
    return raw[:usable].view(dtype).as_strided(size, stride, storage_offset).detach()


def repoint(buffer, tensor, dtype, size, stride, storage_offset):
    """Make the parent's own ``tensor`` use the segment's copy, dropping its private bytes."""
    with torch.no_grad():
        tensor.data = view_tensor(buffer, dtype, size, stride, storage_offset)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already set, or parallel work has started; the intra-op count is what matters
