//! iovmm's VMM.
