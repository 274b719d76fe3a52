"""The CUDA backend: GPU segments shared with clients by CUDA IPC.

``env`` configures PyTorch's allocator before torch loads, ``discovery`` names GPUs by
UUID, ``chunks`` holds the CUDA copy thresholds, ``refcounter`` resets torch's IPC
reference counter before a free, and ``backend`` is ``CudaMemory`` itself. Importing this
package does not import torch: the daemon imports it to configure the allocator first.
"""

from kvbroker.memory.backend import CopyError, CudaHandle
from kvbroker.memory.cuda.backend import CUDA_MIN_SEGMENT_BYTES, CUDA_SEGMENT_ALIGNMENT_BYTES, CudaMemory
from kvbroker.memory.cuda.chunks import DIRECT_CHUNK_MIN_BYTES, STAGING_BYTES, plan_chunks
from kvbroker.memory.cuda.discovery import GpuInfo, discover_gpus, gpu_uuid
from kvbroker.memory.cuda.env import configure_cuda_allocator_env

__all__ = [
    "CUDA_MIN_SEGMENT_BYTES",
    "CUDA_SEGMENT_ALIGNMENT_BYTES",
    "DIRECT_CHUNK_MIN_BYTES",
    "STAGING_BYTES",
    "CopyError",
    "CudaHandle",
    "CudaMemory",
    "GpuInfo",
    "configure_cuda_allocator_env",
    "discover_gpus",
    "gpu_uuid",
    "plan_chunks",
]
