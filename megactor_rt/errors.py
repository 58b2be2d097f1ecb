"""Exception types. Every user-facing failure is one of these, with a message naming the file and problem."""

from __future__ import annotations


class MegactorError(Exception):
    """Base class of all errors megactor-rt raises on purpose (the CLI turns them into exit code 2)."""


class InputError(MegactorError):
    """Bad user input: unreadable/corrupt media, no face found, wrong image size, bad mask."""


class WeightsError(MegactorError):
    """Missing, unexpected or mis-shaped checkpoint keys, unsafe pickles, missing weight folders."""


class BackendUnavailable(MegactorError):
    """A backend (onnxruntime, tensorrt, compiled kernels) cannot be used here; the message says why."""


class EngineMismatch(MegactorError):
    """A TensorRT plan or ONNX file was built for another GPU, TensorRT version, precision or graph."""


class ResourceError(MegactorError):
    """Out of GPU or host memory; the message says which and what setting lowers the need."""


# What lowers the memory a run needs, for ResourceError messages.
TENSORRT_INSTALL = ("pip install tensorrt cuda-python polygraphy (TensorRT 11, or 10.x): the 'tensorrt' extra, "
                    "pip install -e '.[tensorrt]' in this checkout")  # (said wherever TensorRT is missing)
ONNX_INSTALL = ("pip install onnx onnxruntime: the 'onnx' extra, pip install 'megactor-rt[onnx]' (-e '.[onnx]' in a "
                "checkout)")  # (said where the export or its checks lack onnx/onnxruntime)
MEMORY_HINT = ("lower the memory needed: a smaller context window (--window 8 --overlap 4, config window/overlap: "
               "the UNet's activations grow with it), one window per UNet call (--window-batch 1, the default), "
               "CFG off or truncated (--guidance 1 or --cfg-steps K: CFG doubles the UNet batch), no "
               "--feature-reuse (it keeps deep features per window), fp16 weights (--precision fp16), or free the "
               "device (other processes: nvidia-smi)")
