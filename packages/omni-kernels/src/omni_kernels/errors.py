"""The one error omni_kernels raises for inputs it cannot take; kept free of torch so numpy-only modules share it."""


class KernelError(ValueError):
    """An input a kernel or packer cannot take: wrong shape, dtype, device, layout or format."""
