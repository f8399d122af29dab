//! Devices of iovmm.
