//! The executors of the forward pass, one per backend. The CPU pass is `forward.rs` and `batch.rs` over the
//! per-op [`Backend`](driftwood_backend::Backend) trait; the GPU runs whole steps of its own (`cuda/`), which do
//! not go through the trait: weights uploaded once, fused kernels, graph-captured decode steps.

pub(crate) mod cuda;
