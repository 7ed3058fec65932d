"""Build the gemv kernel as a plain shared library inside the omni_kernels package.

The Extension is optional: without a C compiler the install still succeeds and omni_kernels falls back
to torch (omni_kernels.available() is then False). It is a ctypes library, not a Python module: it uses
no Python C-API, only setuptools' compiler driver and its placement next to the package (also for
editable installs, where build_ext copies it into src/omni_kernels/).

No -march: the AVX-512 and AVX2 kernels carry per-function target attributes and are chosen at run time.
-fopenmp links libgomp.so.1, the soname torch's wheel ships in torch/lib, so once torch is imported the
loader reuses torch's OpenMP runtime instead of starting a second one.
"""

from setuptools import Extension, setup

setup(
    packages=["omni_kernels"],
    package_dir={"": "src"},
    ext_modules=[
        Extension(
            "omni_kernels._gemv_f32",
            sources=["csrc/gemv_f32.c"],
            extra_compile_args=["-O3", "-fopenmp", "-fPIC"],  # GCC/Clang; elsewhere the build is skipped
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ],
)
