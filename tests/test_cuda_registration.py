"""Every op of the fastiml schema has a kernel for every backend that was built (DESIGN 1, 7).

The CUDA kernels are compiled on machines without a GPU, where no CUDA test can run them; this
test still catches a .cu file that was left out of the build or forgot to register one of its
ops. It needs no GPU: it asks the dispatcher which kernels are registered.
"""
import os

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


@pytest.mark.parametrize("sass, ptx, capability, covered", [
    ((80, 90), (90,), (8, 0), True),
    ((80, 90), (90,), (8, 6), True),     # sm_80 code runs on sm_86
    ((80, 90), (90,), (7, 5), False),    # older than every arch
    ((80, 90), (90,), (10, 0), True),    # PTX for compute_90 compiles for sm_100
    ((80, 90), (), (10, 0), False),      # machine code only: "no kernel image" there
    ((80, 90), (), (9, 0), True),
    ((86,), (), (8, 0), False),          # a lower minor cannot run sm_86 code
    ((), (), (9, 0), False),
])
def test_arch_list_covers(sass, ptx, capability, covered):
    assert ops.arch_list_covers(sass, ptx, capability) is covered


@pytest.mark.skipif("TORCH_CUDA_ARCH_LIST" in os.environ,
                    reason="TORCH_CUDA_ARCH_LIST is set: the build may have used another list")
def test_the_default_arch_list_ships_ptx_for_the_newest():
    sass, ptx = ops._C.cuda_archs()
    if not ops.compiled_with_cuda():
        assert (sass, ptx) == ((), ())
        pytest.skip("a CPU-only build has no arch list")
    assert ptx and max(ptx) == max(sass), f"no PTX for the newest arch: sass {sass}, ptx {ptx}"
