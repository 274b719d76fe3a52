"""Where the bytes live: one ``SegmentMemory`` backend per device.

``host`` keeps segments in named POSIX shared memory; ``cuda`` keeps them in PyTorch CUDA
allocations shared through CUDA IPC. Both hand out plain handle dataclasses that the
server layer turns into protobuf; this package imports neither grpc nor protobuf, and
imports torch only inside the CUDA backend's functions.
"""

from kvbroker.memory.backend import CopyError, CudaHandle, HostHandle, SegmentHandle, SegmentMemory

__all__ = ["CopyError", "CudaHandle", "HostHandle", "SegmentHandle", "SegmentMemory"]
