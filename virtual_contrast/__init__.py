"""virtual-contrast: virtual contrast-enhanced T1 MRI, reproduced and validated."""

__version__ = "0.1.0"
