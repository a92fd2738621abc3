"""C source of the native kernels; built on first use by :mod:`svdcompress.native`."""
