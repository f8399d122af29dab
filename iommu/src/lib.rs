//! iovmm's IOMMU component.
