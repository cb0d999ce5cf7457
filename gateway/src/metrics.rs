//! The process-wide Prometheus recorder, shared with the `dispatcher` binary.

pub use dispatcher::startup::metrics::handle;
