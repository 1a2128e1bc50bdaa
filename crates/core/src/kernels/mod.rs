//! CPU kernels (in progress).
