"""Every op of the fastiml schema has a kernel for every backend that was built (DESIGN 1, 7).

The CUDA kernels are compiled on machines without a GPU, where no CUDA test can run them; this
test still catches a .cu file that was left out of the build or forgot to register one of its
ops. It needs no GPU: it asks the dispatcher which kernels are registered.
"""
import pytest
import torch

from fastiml import ops


def schema_ops():
    """The names of all ops the compiled module defines in the fastiml namespace."""
    names = sorted({name.split("::", 1)[1].split(".", 1)[0]
                    for name in torch._C._dispatch_get_all_op_names()
                    if name.startswith("fastiml::")})
    assert names, "no fastiml::* op is registered: is fastiml._C loaded?"
    return names


def test_schema_lists_the_python_ops():
    assert set(ops._OPS) <= set(schema_ops())


@pytest.mark.parametrize("op", schema_ops())
def test_every_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastiml::{op}", "CPU"), (
        f"fastiml::{op} has no CPU kernel")


@pytest.mark.skipif(not ops.compiled_with_cuda(),
                    reason="fastiml._C was built without its CUDA kernels (a CPU-only build: "
                           "torch without CUDA, no nvcc found, or FASTIML_CUDA=0)")
@pytest.mark.parametrize("op", schema_ops())
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastiml::{op}", "CUDA"), (
        f"fastiml::{op} has no CUDA kernel: its csrc/ops/cuda/*.cu file is missing from the "
        f"build or does not register it in TORCH_LIBRARY_IMPL(fastiml, CUDA, m)")
