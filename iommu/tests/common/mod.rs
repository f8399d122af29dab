//! Shared by the page-table test files.

pub mod pt_reference;
