"""Builds fastiml's C++/CUDA extension ``fastiml._C`` (the package metadata is in pyproject.toml).

The CPU sources always build. The CUDA sources join when torch was built with CUDA and a CUDA
toolkit is found -- whether or not this machine has a GPU (build machines often have none).

Environment variables:
  FASTIML_CUDA=1|0        force the CUDA sources in (fail if impossible) or out
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0+PTX" (default), turned into -gencode flags; +PTX also
                          ships PTX, which newer GPUs compile at load
  FASTIML_CPU_FLAGS       extra C++ flags for every C++ source (default: none). The build is
                          portable without them: the CPU kernels are also compiled for AVX2 and
                          AVX-512 (csrc/ops/cpu/isa/) and chosen at run time, whatever the
                          build machine has
  FASTIML_PTXAS_VERBOSE=1 nvcc -Xptxas -v: the build log gives each CUDA kernel's registers,
                          shared memory and spill stores/loads (the README's tile-choice note)
  DEBUG=1                 -O0 -g
  MAX_JOBS                parallel compile jobs (default: from cores and memory)
"""
import glob
import os
import shutil
import sys

import setuptools
from setuptools import setup

if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's SPDX `license` needs 77
    sys.exit(f"fastiml: setuptools>=77 is needed to build (found {setuptools.__version__}); "
             "run `pip install -U setuptools` first")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root():
    """The CUDA toolkit root: the folder whose bin/nvcc is the compiler and that holds libcudart.

    A PATH entry for nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), whose parent is not
    a toolkit, so candidates are checked for the runtime library rather than trusted.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script names the real compiler
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for root in candidates:
        if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
            continue
        libs = glob.glob(os.path.join(root, "lib64", "libcudart*")) + glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart*"))
        if libs:
            return os.path.realpath(root)
    return None


def _flag(name):
    value = os.environ.get(name)
    return None if value is None or value == "" else value not in ("0", "false", "False", "no")


want_cuda = _flag("FASTIML_CUDA")
cuda_root = _toolkit_root() if want_cuda is not False else None
if cuda_root:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = cuda_root

try:
    import torch  # noqa: E402
except ImportError:
    # pip's default isolated build environment has no torch (pyproject.toml says why it is not
    # a build requirement): stop with the one line that tells what to do.
    sys.exit("fastiml: install torch first, then build with `pip install --no-build-isolation .`"
             " -- the extension must be compiled against the torch that runs it, and an isolated"
             " build would fetch a different, multi-GB torch")
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_root) and torch.version.cuda is not None and want_cuda is not False
if want_cuda and not with_cuda:
    sys.exit("FASTIML_CUDA=1 but CUDA cannot be built: torch.version.cuda=%s, toolkit=%s"
             % (torch.version.cuda, cuda_root))

debug = _flag("DEBUG") is True
opt = ["-O0", "-g"] if debug else ["-O3"]


def _cpu_flags():
    return os.environ.get("FASTIML_CPU_FLAGS", "").split()


def _cuda_archs():
    """TORCH_CUDA_ARCH_LIST as (SASS archs, PTX archs), e.g. ([80, 90], [90]) for the default:
    machine code for sm_80 and sm_90, and PTX for compute_90 that any newer GPU (sm_100, ...)
    compiles when the library loads."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sass, ptx = [], []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        num = int(arch.replace("+PTX", "").replace(".", ""))
        sass.append(num)
        if arch.endswith("+PTX"):
            ptx.append(num)
    # We pass -gencode ourselves; keep torch from appending its own (GPU-probing) list.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return sass, ptx


def _gencode(sass, ptx):
    return ([f"-gencode=arch=compute_{n},code=sm_{n}" for n in sass]
            + [f"-gencode=arch=compute_{n},code=compute_{n}" for n in ptx])


sources = ["csrc/fastiml.cpp"] + sorted(glob.glob("csrc/ops/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
# -fno-trapping-math changes no result (nothing here relies on floating-point exception traps);
# without it GCC treats float comparisons as possibly trapping and will not vectorise the
# kernels' branch-free selects. -ffp-contract=off: a vectorised loop must round s/tau - m
# exactly as the scalar loop that found m did (FMA contraction in one and not the other made
# the backward's exp(s - lse) disagree with the forward's lse). No fast-math: IEEE kept.
cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"] \
    + _cpu_flags()
extra_compile_args = {"cxx": cxx_flags}
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
    define_macros.append(("WITH_CUDA", None))
    sass, ptx = _cuda_archs()
    # The arch list, for fastiml.ops' "no kernel for this GPU" error (commas and digits only:
    # the flags pass through a shell).
    extra_compile_args["cxx"] += ["-DWITH_CUDA", "-DFASTIML_CUDA_SASS=" + ",".join(map(str, sass)),
                                  "-DFASTIML_CUDA_PTX=" + ",".join(map(str, ptx))]
    extra_compile_args["nvcc"] = (opt + ["-std=c++20", "-DWITH_CUDA", "--expt-relaxed-constexpr",
                                         "-lineinfo"] + _gencode(sass, ptx))
    if _flag("FASTIML_PTXAS_VERBOSE"):
        extra_compile_args["nvcc"] += ["-Xptxas", "-v"]
    # The CUDA build of torch ships headers that a bare toolkit may lack (cusparse.h, ...).
    for site_dir in sys.path:
        extra = os.path.join(site_dir, "nvidia", "cu13", "include")
        if os.path.isdir(extra):
            include_dirs.append(extra)
            break
    Extension = CUDAExtension
else:
    Extension = CppExtension

# The CPU kernels' AVX2 / AVX-512 variants come last: the linker keeps the first copy of an
# inline function of std / c10 / ATen that several objects define, and every other object must
# get a base copy, never a variant's (csrc/ops/cpu/isa/kernels.h).
sources += ["csrc/ops/cpu/isa/avx2.cpp", "csrc/ops/cpu/isa/avx512.cpp"]

if "MAX_JOBS" not in os.environ:
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))

print(f"fastiml build: cuda={'yes (' + cuda_root + ')' if with_cuda else 'no'}, "
      f"cpu_flags={_cpu_flags()}, debug={debug}, MAX_JOBS={os.environ['MAX_JOBS']}, "
      f"arch={os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else '-'}, "
      f"ptxas_verbose={bool(with_cuda and _flag('FASTIML_PTXAS_VERBOSE'))}")

setup(
    ext_modules=[Extension("fastiml._C", sources, include_dirs=include_dirs,
                           define_macros=define_macros, extra_compile_args=extra_compile_args,
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
